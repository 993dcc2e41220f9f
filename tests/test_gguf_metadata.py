"""`general.*` GGUF metadata as llama.cpp's convert_hf_to_gguf.py writes it (gguf-py's own heuristics):
type, name, basename, size label, license and base models from the source card, folder and parameter count."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

gguf = pytest.importorskip("gguf")

from r1v_quant.exporters.gguf_llm import export_llm_gguf  # noqa: E402
from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf  # noqa: E402
from r1v_quant.runtime.gguf_lib import general_metadata  # noqa: E402

CARD = """---
license: other
license_name: skywork-community
license_link: LICENSE
base_model:
- OpenGVLab/InternVL3-38B
- Qwen/QwQ-32B
language:
- en
- zh
tags:
- reasoning
pipeline_tag: image-text-to-text
---
# Skywork-R1V3-38B
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r1v_quant.replica.build import TinyOptions, build_tiny

    root = tmp_path_factory.mktemp("meta")
    built = root / "built"
    build_tiny(built, TinyOptions(flavor="r1v3", steps=0))
    named = root / "Skywork-R1V3-38B"  # a local copy of a release, folder named like the repo
    shutil.copytree(built, named)
    (named / "README.md").write_text(CARD)
    return named


def _general(path: Path) -> dict:
    r = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in r.fields.items() if k.startswith("general.")}


def test_llm_and_mmproj_carry_the_converters_general_keys(source: Path, tmp_path: Path) -> None:
    llm, mm = tmp_path / "llm.gguf", tmp_path / "mmproj.gguf"
    export_llm_gguf(source, llm, "Q8_0", progress=False)
    export_mmproj_gguf(source, mm, "F16", position_fix="shift")
    a, b = _general(llm), _general(mm)
    assert a["general.type"] == "model" and b["general.type"] == "mmproj"
    for g in (a, b):
        assert g["general.name"] == "Skywork R1V3 38B" and g["general.basename"] == "Skywork-R1V3"
        assert g["general.license"] == "other" and g["general.license.name"] == "skywork-community"
        assert g["general.base_model.count"] == 2
        assert g["general.base_model.0.organization"] == "OpenGVLab"
        assert g["general.base_model.1.repo_url"] == "https://huggingface.co/Qwen/QwQ-32B"
        assert g["general.languages"] == ["en", "zh"] and "reasoning" in g["general.tags"]
    # the folder says 38B but the replica has far fewer parameters: gguf-py then keeps "38b" as a finetune
    # tag and labels the size by the tensors written, as the converter does
    assert a["general.size_label"].endswith("M") and a["general.finetune"] == "38b"


def test_size_label_of_a_real_sized_model_comes_from_the_name(source: Path) -> None:
    meta = general_metadata(source, 32_759_882_752, "fallback")  # the 38B's language-model parameters
    assert (meta.size_label, meta.basename, meta.finetune) == ("38B", "Skywork-R1V3", None)


def test_folder_without_card(source: Path, tmp_path: Path) -> None:
    plain = tmp_path / "my-model"
    shutil.copytree(source, plain, ignore=shutil.ignore_patterns("README.md"))
    meta = general_metadata(plain, 1_234_000, "fallback")
    assert meta.name == "My Model" and meta.size_label == "1.2M" and meta.base_models is None
    assert meta.license is None
