"""Model cards: every exporter's folder gets a README.md whose YAML front matter parses, with provenance."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner
from test_hub import CARD, REPO, SHA_MAIN, add_snapshot

from r1v_quant.cli.main import Group
from r1v_quant.exporters.model_card import (
    CARD_NAME,
    GGUF_MANIFEST,
    QUALITY_BEGIN,
    Card,
    command_line,
    render_card,
    update_card_quality,
    write_card,
)
from r1v_quant.util.errors import R1VError
from r1v_quant.util.hub import resolve_model

ROWS = [
    {
        "artifact": "Tiny-R1V-Q8_0.gguf",
        "size": 12_345_678,
        "ppl_ratio": 1.00213,
        "kld": 0.000412,
        "top1": 99.2,
    },
    {
        "artifact": "Tiny-R1V-F16.gguf",
        "size": "25 MB",
        "ppl_ratio": 1.0,
        "kld": 0.0,
        "bench_delta": "+0.0 | n=16",
    },
]


def split_card(text: str) -> tuple[dict, str]:
    assert text.startswith("---\n")
    _, front, body = text.split("---\n", 2)
    meta = yaml.safe_load(front)
    assert isinstance(meta, dict)
    return meta, body


@pytest.fixture(scope="module")
def hub_model(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(HF cache dir holding REPO with a `license: mit` card, the resolved snapshot)."""
    src = tmp_path_factory.mktemp("card_src") / "tiny"
    shutil.copytree(tiny_dir, src)
    (src / CARD_NAME).write_text(CARD)
    cache = tmp_path_factory.mktemp("card_cache")
    snap = add_snapshot(cache, REPO, src, SHA_MAIN, refs=("main",))
    return cache, snap


@pytest.fixture
def offline(hub_model: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_model[0]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_model[1]


def _front_common(meta: dict, library: str) -> None:
    assert meta["base_model"] == REPO and meta["base_model_relation"] == "quantized"
    assert meta["license"] == "mit"  # copied from the source's card
    assert meta["library_name"] == library and meta["pipeline_tag"] == "image-text-to-text"
    assert {"r1v-quant", "skywork-r1v"} <= set(meta["tags"])


def test_awq_card(offline: Path, tmp_path: Path) -> None:
    from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq

    out = tmp_path / "tiny-awq"
    report = quantize_awq(
        resolve_model(REPO), out, AWQOptions(samples=2, seq_len=256, method="rtn"), progress=False
    )
    meta, body = split_card((out / CARD_NAME).read_text())
    _front_common(meta, "transformers")
    assert {"awq", "int4"} <= set(meta["tags"])
    assert "Tiny R1V" not in body and CARD_NAME not in report["copied_files"]  # ours, not the source's
    code = out / "configuration_skywork_chat.py"  # remote code: copied as bytes out of the cache's blobs
    assert not code.is_symlink() and code.read_bytes() == (offline / code.name).read_bytes()
    assert f"r1v-quant awq {REPO} --revision {SHA_MAIN} --out {out}" in body
    assert "--method rtn" in body and "--samples 2" in body and "--seq-len 256" in body
    assert report["calibration_set_hash"] in body and "group size 128" in body
    assert f"vllm serve {out} --trust-remote-code --quantization awq_marlin" in body
    assert f"r1v-quant generate {out}" in body and "--quantization awq " not in body
    assert f"revision `{SHA_MAIN}`" in body and "torch " in body
    assert "| `model-00001-of-00001.safetensors` |" in body or "model-00001-of-" in body
    assert "Not measured yet" in body and "## Safety" in body


def test_card_of_a_local_source_without_license(tiny_dir: Path, tmp_path: Path) -> None:
    card = Card(
        kind="awq",
        source=tiny_dir,
        folder="out: 'quoted' # not yaml",
        summary="AWQ int4",
        commands=[command_line("awq", tiny_dir, {"out": "o", "int8": True, "no": False, "none": None})],
        details={"group size": 128},
        files={"a.safetensors": 2_500_000},
    )
    meta, body = split_card(render_card(card))
    assert "base_model" not in meta and meta["license"] == "other"
    assert "names no license" in body and "not a Hub repo" in body
    assert f"r1v-quant awq {tiny_dir} --out o --int8\n" in body
    assert "| `a.safetensors` | 2.50 MB |" in body


def test_license_fields_survive_yaml(tiny_dir: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_dir, src)
    (src / CARD_NAME).write_text(
        '---\nlicense: other\nlicense_name: "skywork: community # v1"\nlicense_link: LICENSE\n---\nbody\n'
    )
    card = Card(kind="onnx", source=src, folder="o", summary="s", commands=["c"], details={}, files={})
    meta, _ = split_card(render_card(card))
    assert meta["license"] == "other" and meta["license_name"] == "skywork: community # v1"
    assert meta["license_link"] == "LICENSE" and meta["library_name"] == "onnx"


def test_gguf_folder_card_collects_runs_and_keeps_quality(offline: Path, tmp_path: Path) -> None:
    gguf = pytest.importorskip("gguf")
    from r1v_quant.cli.gguf import gguf_command

    group = Group(commands={"gguf": gguf_command})
    out = tmp_path / "gguf"
    r = CliRunner().invoke(group, ["gguf", REPO, "--out", str(out), "--type", "F16", "--json"])
    assert r.exit_code == 0, r.output
    assert (out / "Tiny-R1V-F16.gguf").is_file()  # named after the repo, not the snapshot's commit
    reader = gguf.GGUFReader(out / "Tiny-R1V-F16.gguf")
    general = {k: f.contents() for k, f in reader.fields.items() if k.startswith("general.")}
    # llama.cpp's converter heuristics on the repo id (the snapshot folder is only a commit hash)
    assert general["general.name"] == "Tiny R1V"
    assert general["general.type"] == "model" and general["general.license"] == "mit"
    assert general["general.base_model.0.repo_url"] == f"https://huggingface.co/{REPO}"
    assert general["general.base_model.0.organization"] == "Skyworkish"
    meta, body = split_card((out / CARD_NAME).read_text())
    _front_common(meta, "gguf")
    assert "F16" in meta["tags"] and "llama.cpp" in meta["tags"]
    assert f"llama-mtmd-cli -m {out}/Tiny-R1V-F16.gguf --mmproj {out}/mmproj-Tiny-R1V-F16.gguf" in body
    assert f"llama-server -m {out}/Tiny-R1V-F16.gguf --mmproj {out}/mmproj-Tiny-R1V-F16.gguf -c " in body
    assert f"r1v-quant gguf {REPO} --revision {SHA_MAIN} --out {out}\n" in body  # from the click context

    update_card_quality(out, {"quality": ROWS})
    r = CliRunner().invoke(
        group, ["gguf", REPO, "--out", str(out), "--type", "Q8_0", "--mmproj-type", "none", "--json"]
    )
    assert r.exit_code == 0, r.output
    meta, body = split_card((out / CARD_NAME).read_text())
    assert {"F16", "Q8_0"} <= set(meta["tags"])
    assert f"r1v-quant gguf {REPO} --revision {SHA_MAIN} --out {out} --type Q8_0 --mmproj-type none" in body
    assert f"r1v-quant gguf {REPO} --revision {SHA_MAIN} --out {out}\n" in body  # the first run is kept
    for f in ("Tiny-R1V-F16.gguf", "Tiny-R1V-Q8_0.gguf", "mmproj-Tiny-R1V-F16.gguf"):
        assert f"| `{f}` |" in body
    assert "| Tiny-R1V-Q8_0.gguf | 12.35 MB | 1.002 | 0.000412 | 99.2 | – |" in body  # kept
    manifest = json.loads((out / GGUF_MANIFEST).read_text())
    assert {e["role"] for e in manifest["files"].values()} == {"llm", "mmproj"}
    assert len(manifest["files"]) == 3


def test_onnx_card(offline: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from r1v_quant.cli.onnx import onnx_command

    out = tmp_path / "onnx"
    r = CliRunner().invoke(onnx_command, [REPO, "--out", str(out), "--no-verify", "--json"])
    assert r.exit_code == 0, r.output
    meta, body = split_card((out / CARD_NAME).read_text())
    _front_common(meta, "onnx")
    assert "onnx" in meta["tags"]
    assert f"r1v-quant onnx {REPO} --revision {SHA_MAIN} --out {out} --no-verify" in body
    assert f'InferenceSession("{out}/vision.onnx"' in body and "--vision-onnx" in body
    assert "| `vision.onnx` |" in body and "| `preprocessing.json` |" in body


def test_update_card_quality(tiny_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(R1VError, match="no README.md"):
        update_card_quality(tmp_path, ROWS)
    card = Card(kind="gguf", source=tiny_dir, folder="g", summary="s", commands=["c"], details={}, files={})
    write_card(tmp_path, card)
    report = tmp_path / "check.json"
    report.write_text(json.dumps({"rows": ROWS}))
    update_card_quality(tmp_path, report)
    text = (tmp_path / CARD_NAME).read_text()
    split_card(text)
    assert text.count(QUALITY_BEGIN) == 1 and "Not measured yet" not in text
    assert "| Tiny-R1V-F16.gguf | 25 MB | 1 | 0 | – | +0.0 \\| n=16 |" in text
    for bad in ([], [{"size": 1}], {"quality": "x"}):
        with pytest.raises(R1VError, match="quality report"):
            update_card_quality(tmp_path, bad)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(R1VError, match="not a readable JSON"):
        update_card_quality(tmp_path, tmp_path / "broken.json")
    write_card(tmp_path, card)  # a re-render without a table keeps the measured one
    assert "| Tiny-R1V-F16.gguf | 25 MB |" in (tmp_path / CARD_NAME).read_text()


def test_gguf_card_names_split_shards_and_imatrix(tiny_dir: Path, tmp_path: Path) -> None:
    """A split language model is run from its first shard; an importance matrix is listed, not run."""
    from r1v_quant.exporters.model_card import write_gguf_card

    shards = [tmp_path / f"m-Q4_K_M-0000{i}-of-00002.gguf" for i in (1, 2)]
    for i, f in enumerate([*shards, tmp_path / "m-Q4_K_M.imatrix.gguf", tmp_path / "mmproj-m-F16.gguf"]):
        f.write_bytes(b"GGUF" * (1000 * (i + 1)))
    run = {
        "llm": {
            "type": "Q4_K_M", "path": str(shards[0]), "files": [str(f) for f in shards], "bytes": 12000,
            "tensors": 51, "seconds": 1.0, "intermediate": "BF16", "calibration_set_hash": "sha256:abc",
            "imatrix": {"path": str(tmp_path / "m-Q4_K_M.imatrix.gguf"), "used_by_quantizer": True},
            "aware": {"large": list(range(100))},
        },
        "mmproj": {"type": "F16", "path": str(tmp_path / "mmproj-m-F16.gguf"), "tensors": 82, "bytes": 16000},
    }  # fmt: skip
    write_gguf_card(
        tmp_path, tiny_dir, run, {"type": "Q4_K_M", "calib": "calib-dir", "activation_aware": True}
    )
    meta, body = split_card((tmp_path / CARD_NAME).read_text())
    assert "Q4_K_M" in meta["tags"] and meta["library_name"] == "gguf"
    assert f"llama-mtmd-cli -m {tmp_path}/{shards[0].name} --mmproj {tmp_path}/mmproj-m-F16.gguf" in body
    for f in (*shards, tmp_path / "m-Q4_K_M.imatrix.gguf"):
        assert f"| `{f.name}` |" in body
    assert "2 shards" in body and "importance matrix `m-Q4_K_M.imatrix.gguf` (used by the quantizer)" in body
    assert "activation-aware scales folded in" in body and "sha256:abc" in body
    assert "--calib calib-dir --activation-aware" in body
    manifest = json.loads((tmp_path / GGUF_MANIFEST).read_text())
    assert "aware" not in manifest["files"][shards[0].name]  # the manifest stays small
