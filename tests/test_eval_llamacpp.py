"""The llama.cpp backend of `eval`: same perplexity and answers as the torch backend for the same F16
weights on the tiny replica; GGUF artifacts found from a folder or a file with its sibling mmproj."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from r1v_quant.evaluate.backends import (  # noqa: E402
    RuntimeOptions,
    check_compatible,
    check_runtime_tokenizer,
    open_backend,
)
from r1v_quant.evaluate.bench import bench_pass  # noqa: E402
from r1v_quant.evaluate.bench_load import load_bench  # noqa: E402
from r1v_quant.evaluate.ppl import WindowSpec, build_windows, evaluate_models  # noqa: E402
from r1v_quant.model.artifact import resolve_artifact, resolve_reference  # noqa: E402
from r1v_quant.util.errors import R1VError  # noqa: E402

pytestmark = pytest.mark.llamacpp


@pytest.fixture(scope="module")
def f16_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf

    out = tmp_path_factory.mktemp("gguf-f16")
    export_llm_gguf(tiny_dir, out / "tiny-F16.gguf", "F16", progress=False)
    export_mmproj_gguf(tiny_dir, out / "mmproj-tiny-F16.gguf", "F16")
    return out


def test_same_perplexity_as_torch_for_f16_weights(tiny_dir: Path, f16_dir: Path) -> None:
    ref = resolve_reference(tiny_dir)
    cand = resolve_artifact(f16_dir)
    assert (cand.backend, cand.quant, cand.mmproj_gguf) == (
        "llama.cpp",
        "F16",
        f16_dir / "mmproj-tiny-F16.gguf",
    )
    check_compatible(ref, cand, needs_images=True)
    windows = build_windows(ref, WindowSpec(n_text=3, n_image=1))
    ref_run, cand_run = evaluate_models(ref, [cand], windows, runtime=RuntimeOptions(n_threads=2))
    for kind in ("text", "image", "all"):
        s = cand_run.ppl[kind]
        assert s["ppl_ref"] == pytest.approx(ref_run.ppl[kind]["ppl"], rel=1e-9)
        # the same function up to float16 weights and llama.cpp's kernels: noise, not a difference
        assert s["ppl_cand"] == pytest.approx(s["ppl_ref"], rel=2e-3), kind
        assert s["kld_max"] < 1e-3 and s["kld_mean"] < 1e-4, kind
        assert s["same_top_pct"] == 100.0, kind


def test_same_answers_as_torch(tiny_dir: Path, f16_dir: Path) -> None:
    items = load_bench("builtin:tiny", limit=4, seed=1).items
    assert any(i.images for i in items)
    ref = resolve_reference(tiny_dir)
    preds = []
    for art in (ref, resolve_artifact(f16_dir)):
        backend = open_backend(art, n_ctx=2048, runtime=RuntimeOptions(n_threads=2))
        try:
            if art.backend == "llama.cpp":
                check_runtime_tokenizer(ref, backend)  # llama.cpp's reading of the GGUF vocabulary
            results = bench_pass(backend, items, 64)
        finally:
            backend.close()
        assert not any(r.truncated for r in results)  # both stop at the flavour's end token
        preds.append([(r.pred, r.response) for r in results])
    assert preds[0] == preds[1]


def test_gguf_file_with_sibling_mmproj_and_missing_mmproj(
    tiny_dir: Path, f16_dir: Path, tmp_path: Path
) -> None:
    art = resolve_artifact(f16_dir / "tiny-F16.gguf")
    assert art.mmproj_gguf == f16_dir / "mmproj-tiny-F16.gguf"
    assert art.size_bytes == sum(p.stat().st_size for p in f16_dir.glob("*.gguf"))
    with pytest.raises(R1VError, match="an mmproj GGUF"):
        resolve_artifact(f16_dir / "mmproj-tiny-F16.gguf")
    alone = tmp_path / "tiny-F16.gguf"
    shutil.copy(f16_dir / "tiny-F16.gguf", alone)
    lone = resolve_artifact(alone)
    assert lone.mmproj_gguf is None
    ref = resolve_reference(tiny_dir)
    check_compatible(ref, lone, needs_images=False)  # text-only evaluation is fine
    with pytest.raises(R1VError, match="no mmproj GGUF"):
        check_compatible(ref, lone, needs_images=True)
