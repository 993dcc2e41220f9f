"""The memory planner: 38B arithmetic by hand, verdicts for the standard devices, llama.cpp's own buffer
sizes, and (slow) its predictions against the profiler's measurements on the tiny replica's artifacts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from r1v_quant.model.artifact import Geometry, describe_artifact
from r1v_quant.model.presets import preset_spec
from r1v_quant.model.storage import weight_bytes
from r1v_quant.plan.memory_model import (
    Config,
    Workload,
    clip_compute_buffer,
    kv_cache_bytes,
    llama_compute_buffer,
    model_terms,
    peaks,
    torch_prefill_activations,
)
from r1v_quant.plan.planner import format_plan, parse_device, parse_size, plan
from r1v_quant.util.errors import R1VError

GiB = 1024**3
MiB = 1024**2
DEVICES = ["gpu:24GB", "gpu:30GB", "gpu:48GB", "cpu:16GB", "cpu:32GB", "cpu:64GB"]


@pytest.fixture(scope="module")
def plan38() -> dict:
    return plan(preset="r1v-38b", devices=DEVICES, ctx=4096)


def _device(p: dict, name: str) -> dict:
    return next(d for d in p["devices"] if d["device"] == name)


# -- 38B arithmetic ----------------------------------------------------------------------
def test_38b_weights_and_kv_by_hand(plan38: dict) -> None:
    m = plan38["model"]
    assert m["params_total"] == pytest.approx(38.39e9, rel=1e-3)
    assert m["formats"]["bf16"] == pytest.approx(76.8e9, rel=2e-3)  # 2 bytes x 38.39 B
    # KV cache per token = 2 (K, V) x 64 layers x 8 KV heads x 128 head dim x bytes per element
    kv = m["kv_bytes_per_token"]
    assert kv["f16"] == 2 * 64 * 8 * 128 * 2 == 262144
    assert kv["fp8"] == 2 * 64 * 8 * 128
    assert kv["q8_0"] == 2 * 64 * 8 * 128 * 34 // 32  # ggml q8_0: 34 bytes per 32 values
    g = Geometry.from_spec(preset_spec("r1v-38b"))
    assert kv_cache_bytes(g, 4096, "f16") == 1 * GiB
    assert kv_cache_bytes(g, 32768, "q4_0", batch=2) == 2 * 32768 * 2 * 64 * 8 * 128 * 18 // 32


def test_38b_terms_by_hand() -> None:
    """Torch prefill activations and llama.cpp's buffers at 38B, from the formulas' hand expansion."""
    g = Geometry.from_spec(preset_spec("r1v-38b"))
    n, h, f = 4096, 5120, 27648
    # 4 hidden-wide tensors + gate/up/product (3 x ffn) at 2 bytes, + float32 RoPE tables
    assert torch_prefill_activations(g, n, 2) == (4 * n * h + 3 * n * f) * 2 + 2 * n * 128 * 4
    # flash attention: f16 mask n_ctx x n_ubatch + FFN stage per token (3 ffn + hidden + 773) f32
    assert llama_compute_buffer(g, 8192, 512, True) == 8192 * 512 * 2 + 512 * 4 * (3 * f + h + 773)
    # InternViT-6B one tile: 1025 positions x max(ffn + 3 hidden, 5 hidden) f32 = 91.8 MB
    assert clip_compute_buffer(g) == 1025 * 4 * (12800 + 3 * 3200)


def test_awq_weights_match_published_size() -> None:
    """AWQ int4 g128 decoder + 16-bit ViT, mlp1, embeddings: ~30.6 GB, Skywork's ">= 30 GB" card."""
    assert sum(weight_bytes(preset_spec("r1v-38b"), "awq-int4-g128").values()) == pytest.approx(
        30.6e9, rel=0.01
    )


# -- verdicts for the standard devices ----------------------------------------------------------------------
def test_standard_device_verdicts(plan38: dict) -> None:
    assert _device(plan38, "cpu:16GB")["verdict"] == "does not fit"  # even Q4_0 + Q8_0 mmproj is ~21 GiB
    for name in ("cpu:32GB", "cpu:64GB", "gpu:24GB", "gpu:30GB", "gpu:48GB"):
        assert _device(plan38, name)["verdict"] in ("fits", "tight"), name
    best32 = _device(plan38, "cpu:32GB")["recommendations"][0]
    assert best32["runtime"] == "llama.cpp" and best32["llm_format"] == "Q4_K_M"
    assert best32["vision_format"] == "Q8_0" and best32["kv_options"]["q8_0"]["max_ctx"] >= 32768
    assert _device(plan38, "cpu:64GB")["recommendations"][0]["llm_format"] == "Q8_0"
    # 24 GiB cannot hold a 4-bit LLM and the 6B ViT together: the vision tower goes to the host
    assert _device(plan38, "gpu:24GB")["recommendations"][0]["vision_device"] == "cpu"


def test_awq_on_30gb_gpu(plan38: dict) -> None:
    """AWQ weights with the 16-bit ViT are 28.5 GiB: beside vLLM's reservations (CUDA context, profiling
    peak, CUDA graphs) no KV cache fits on a 30 GiB card; with the ViT's linears in AWQ int4 (2.7 GiB
    instead of 10.3) tens of thousands of tokens do. vLLM has no vision-on-CPU mode, so none is planned."""
    rows = [r for r in _device(plan38, "gpu:30GB")["configs"] if r["runtime"] == "vllm"]
    assert rows and all(r["vision_device"] == "gpu" for r in rows)
    awq = [r for r in rows if r["llm_format"] == "awq-int4-g128"]
    bf16_vit = next(r for r in awq if r["vision_format"] == "bf16" and r["kv_type"] == "fp8")
    int4_f16 = next(r for r in awq if r["vision_format"] == "awq-int4-g128" and r["kv_type"] == "f16")
    int4_fp8 = next(r for r in awq if r["vision_format"] == "awq-int4-g128" and r["kv_type"] == "fp8")
    assert bf16_vit["verdict"] == "does not fit" and bf16_vit["max_ctx"] == 0
    assert int4_f16["verdict"] == "fits" and int4_fp8["max_ctx"] > int4_f16["max_ctx"] > 16384


def test_max_context_is_the_boundary(plan38: dict) -> None:
    """At the reported largest context the config fits; 256 tokens more and it does not."""
    from r1v_quant.plan.planner import evaluate

    g = Geometry.from_spec(preset_spec("r1v-38b"))
    dev = parse_device("cpu:32GB")
    row = _device(plan38, "cpu:32GB")["recommendations"][0]
    cfg = Config("llama.cpp", row["llm_format"], row["vision_format"], row["kv_type"], weights=row["weights"])
    at = evaluate(g, cfg, dev, ctx=row["max_ctx"], batch=1, prefill=None, tiles=13)
    over = evaluate(g, cfg, dev, ctx=row["max_ctx"] + 256, batch=1, prefill=None, tiles=13)
    assert at["verdict"] != "does not fit" and over["verdict"] == "does not fit"


def test_batch_scales_kv(plan38: dict) -> None:
    p2 = plan(preset="r1v-38b", devices=["cpu:64GB"], ctx=4096, batch=2)
    one = _device(plan38, "cpu:64GB")["configs"][0]
    two = next(r for r in _device(p2, "cpu:64GB")["configs"] if r["config"] == one["config"])
    kv1 = next(t["bytes"] for t in one["terms"] if t["name"] == "kv_cache")
    kv2 = next(t["bytes"] for t in two["terms"] if t["name"] == "kv_cache")
    assert kv2 == 2 * kv1


def test_text_report(plan38: dict) -> None:
    text = format_plan(plan38)
    assert "256 KiB at f16" in text and "cpu:16GB" in text and "DOES NOT FIT" in text
    assert "breakdown of #1" in text and "kv_cache" in text


def test_plan_cli() -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.main import main

    res = CliRunner().invoke(main, ["plan", "--preset", "r1v3-38b", "--device", "cpu:32GB", "--markdown"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("| device |") and "| cpu:32GB | llama.cpp, LLM Q4_K_M" in res.output
    bad = CliRunner().invoke(main, ["plan", "--preset", "r1v-38b", "--device", "tpu:8GB"])
    assert bad.exit_code == 2 and bad.output.startswith("error: cannot read the device")


def test_device_and_size_parsing() -> None:
    assert parse_device("gpu:30GB").capacity == 30 * GiB
    assert parse_device("cpu:32GiB").reserve > 0 and parse_device("gpu:24GB").reserve == 0
    assert parse_size("512MB") == 512 * MiB
    for bad in ("tpu:30GB", "gpu", "gpu:lots", "cpu:1GB"):  # cpu:1GB: the OS reserve leaves nothing
        with pytest.raises(R1VError):
            parse_device(bad)
    with pytest.raises(R1VError):
        plan(devices=["cpu:32GB"])  # neither --model nor --preset


def test_reclaimable_terms_do_not_decide() -> None:
    g = Geometry.from_spec(preset_spec("r1v-38b"))
    cfg = Config("llama.cpp", "Q4_K_M", "none", "f16", weights={"decoder": 10 * GiB}, repacked=9 * GiB)
    terms = model_terms(g, cfg, Workload(ctx=4096, prefill=512, tiles=0))
    assert peaks(terms, reclaimable=True)["cpu"] - peaks(terms)["cpu"] == 9 * GiB


# -- artifacts on disk ----------------------------------------------------------------------
def test_plan_tiny_checkpoint(tiny_dir: Path) -> None:
    p = plan(model=tiny_dir, devices=["cpu:4GB"], ctx=1024, runtime="torch")
    row = p["devices"][0]["configs"][0]
    g = describe_artifact(tiny_dir).geometry
    weights = sum(t["bytes"] for t in row["terms"] if t["name"].startswith("weights."))
    assert weights == 4 * sum(g.params.values())  # dense fp32 on CPU
    assert row["verdict"] == "fits" and row["max_ctx"] == g.max_ctx


# -- llama.cpp's own numbers ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def gguf_dirs(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf

    root = tmp_path_factory.mktemp("plan-gguf")
    out = {}
    for llm, mm in (("Q8_0", "Q8_0"), ("Q4_K_M", "F16")):
        d = root / llm
        d.mkdir()
        export_llm_gguf(tiny_dir, d / f"tiny-{llm}.gguf", llm, progress=False)
        export_mmproj_gguf(tiny_dir, d / f"mmproj-tiny-{mm}.gguf", mm)
        out[llm] = d
    return out


@pytest.mark.llamacpp
@pytest.mark.parametrize("n_ctx", [512, 2048])
def test_llama_buffers_match_llamacpp_log(gguf_dirs: dict[str, Path], n_ctx: int, capsys) -> None:
    """llama.cpp logs the KV and compute buffers it allocates; the planner's formulas must agree."""
    from r1v_quant.runtime.llamacpp import LlamaCppRuntime

    art = describe_artifact(gguf_dirs["Q8_0"])
    with LlamaCppRuntime(art.llm_gguf, n_ctx=n_ctx, n_threads=1, verbose=True):
        pass  # llama-cpp-python prints libllama's log to sys.stderr while verbose
    log = capsys.readouterr().err
    compute = float(re.findall(r"CPU compute buffer size =\s+([\d.]+) MiB", log)[-1]) * MiB
    kv = float(re.findall(r"CPU KV buffer size =\s+([\d.]+) MiB", log)[-1]) * MiB
    g = art.geometry
    assert kv == pytest.approx(kv_cache_bytes(g, n_ctx, "f16"), abs=0.01 * MiB)
    assert compute == pytest.approx(llama_compute_buffer(g, n_ctx, 512, True), abs=0.5 * MiB)


@pytest.mark.llamacpp
def test_clip_buffer_matches_libmtmd_log(gguf_dirs: dict[str, Path], capsys) -> None:
    from r1v_quant.runtime.mtmd import MtmdVision

    art = describe_artifact(gguf_dirs["Q4_K_M"])
    with MtmdVision(art.mmproj_gguf, n_threads=1, verbose=True) as mv:
        mv.encode_tile(Image.new("RGB", (448, 448)))  # libmtmd reserves its buffer on first use
    log = capsys.readouterr().err
    logged = float(re.findall(r"CPU compute buffer size =\s+([\d.]+) MiB", log)[-1]) * MiB
    assert logged == pytest.approx(clip_compute_buffer(art.geometry), abs=0.02 * MiB)


@pytest.mark.llamacpp
def test_gguf_artifact_repacked_bytes(gguf_dirs: dict[str, Path]) -> None:
    q4 = describe_artifact(gguf_dirs["Q4_K_M"])
    q8 = describe_artifact(gguf_dirs["Q8_0"])
    assert q8.extra["repacked"] == 0 and 0 < q4.extra["repacked"] < q4.stored["decoder"]
    assert q4.vision_format == "F16" and q4.llm_format == "Q4_K_M"
    p = plan(model=gguf_dirs["Q4_K_M"], devices=["cpu:4GB"], ctx=1024, kv_type="f16")
    row = p["devices"][0]["configs"][0]
    assert {t["name"] for t in row["terms"]} >= {"kv_cache", "compute_buffer", "vision.compute_buffer"}


@pytest.mark.llamacpp
def test_gguf_header_is_read_once_per_file_version(
    gguf_dirs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The gguf package parses every header field eagerly (seconds for a 151k vocabulary) and a model
    card's commands describe the same files several times: one read per file version, not per call."""
    import gguf

    src = gguf_dirs["Q8_0"]
    d = tmp_path / "g"
    shutil.copytree(src, d)
    reads: list[str] = []
    real = gguf.GGUFReader

    def counting(path: Path, *a: object, **k: object) -> object:
        reads.append(Path(path).name)
        return real(path, *a, **k)

    monkeypatch.setattr(gguf, "GGUFReader", counting)
    first = describe_artifact(d)
    first.extra["mutated"] = True  # callers own their copy (eval's preflight writes into `extra`)
    again = describe_artifact(d)
    assert len(reads) == 2 and "mutated" not in again.extra  # language model + mmproj, once
    assert again.geometry == first.geometry and again.gguf_tokens == first.gguf_tokens
    # a rewritten file (outputs are replaced atomically: a new inode) is read again, with its new contents
    llm = first.llm_gguf
    tmp = llm.with_suffix(".new")
    shutil.copyfile(gguf_dirs["Q4_K_M"] / "tiny-Q4_K_M.gguf", tmp)
    tmp.replace(llm)
    third = describe_artifact(d)
    assert len(reads) == 4 and third.llm_format == "Q4_K_M" and first.llm_format == "Q8_0"


# -- planner vs profiler on every artifact kind -----------------------------------------------
@pytest.fixture(scope="module")
def awq_dir(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> Path:
    from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq

    out = tmp_path_factory.mktemp("plan-awq") / "awq"
    quantize_awq(tiny_dir, out, AWQOptions(samples=2, seq_len=256, method="rtn"), progress=False)
    return out


def _photo(path: Path, w: int, h: int) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def _check_prediction(path: Path, image: Path, prompt_tokens: int) -> None:
    from r1v_quant.profiling.profiler import profile

    r = profile(
        path, threads=1, prompt_tokens=prompt_tokens, gen_tokens=4, image=image, repeat=1, roofline=False,
        progress=False,
    )  # fmt: skip
    p = r["planner"]
    assert p["measured_peak_model"] > 0
    assert abs(p["error"]) <= 0.15, (p["peak_model"], p["measured_peak_model"], r["runs"][0])


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bf16", "bf16-13-tiles", "awq"])
def test_planner_matches_profiler_torch(kind: str, tiny_dir: Path, awq_dir: Path, tmp_path: Path) -> None:
    """Predicted peak memory above the runtime's base within 15 % of the measured peak (torch backend)."""
    if kind == "bf16-13-tiles":  # 800x600 -> 4x3 grid + thumbnail: the vision tower dominates
        _check_prediction(tiny_dir, _photo(tmp_path / "p.png", 800, 600), 3600)
    else:
        _check_prediction(awq_dir if kind == "awq" else tiny_dir, _photo(tmp_path / "p.png", 448, 448), 700)


@pytest.mark.slow
@pytest.mark.llamacpp
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M"])
def test_planner_matches_profiler_llamacpp(
    gguf_type: str, gguf_dirs: dict[str, Path], tmp_path: Path
) -> None:
    """The same for GGUF + mmproj on llama.cpp, at a prompt that fills the reserved compute buffer."""
    _check_prediction(gguf_dirs[gguf_type], _photo(tmp_path / "p.png", 448, 448), 700)
