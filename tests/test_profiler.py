"""`r1v-quant profile`: output schema on the tiny replica (torch, llama.cpp, ONNX vision), the memory
probe, prompt sizing, statistics and the roofline arithmetic."""

from __future__ import annotations

import json
import mmap
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1v_quant.model.artifact import describe_artifact
from r1v_quant.plan.roofline import decode_bytes_per_token, prefill_flops_per_token, roofline
from r1v_quant.profiling.profiler import profile, summarize
from r1v_quant.profiling.worker import MemoryProbe, sized_prompt
from r1v_quant.util.errors import R1VError

TIMES = ("load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "vision_ms_per_tile")
MEMORY = ("peak_rss", "peak_rss_model", "baseline_rss")


def _check_schema(r: dict, *, backend: str, repeat: int, prompt: int, gen: int) -> None:
    assert r["backend"] == backend and r["repeat"] == repeat and len(r["runs"]) == repeat
    for key in TIMES + MEMORY:
        s = r["summary"][key]
        assert s["n"] == repeat and s["min"] <= s["median"] <= s["max"] and s["spread"] >= 0, key
        assert s["median"] > 0, key
    for run in r["runs"]:
        assert prompt - 40 <= run["prompt_tokens"] <= prompt  # the filler is sized to the target
        assert run["gen_tokens"] == gen and run["image_tiles"] == 1
        phases = run["phase_rss_peak_model"]
        assert set(phases) == {"load", "vision", "prefill", "decode"}
        assert run["peak_rss_model"] == max(phases.values())
        assert run["ttft_s"] >= run["prefill_s"]
    w = r["workload"]
    assert w["image_tiles"] == 1 and w["gen_tokens"] == gen
    p = r["planner"]
    assert p["peak_model"] > 0 and p["measured_peak_model"] == r["summary"]["peak_rss_model"]["median"]


def test_profile_torch_schema(tiny_dir: Path) -> None:
    r = profile(tiny_dir, threads=1, prompt_tokens=300, gen_tokens=2, repeat=2, progress=False)
    _check_schema(r, backend="torch", repeat=2, prompt=300, gen=2)
    assert r["dtype"] == "fp32" and r["workload"]["vision_runtime"] == "torch"
    # every repeat runs in a fresh process: loading costs about the fp32 weights (the warm-up's freed heap
    # can be reused, so a little less is possible)
    weights = 4 * sum(describe_artifact(tiny_dir).geometry.params.values())
    assert all(0.9 * weights <= run["phase_rss_peak_model"]["load"] <= 1.15 * weights for run in r["runs"])
    rf = r["roofline"]
    assert rf["bandwidth"]["read_gbs"] > 0 and rf["matmul"]["fp32_gflops"] > 0
    assert rf["decode"]["bytes_per_token"] > 0 and rf["decode"]["fraction"] > 0
    assert rf["prefill"]["fraction"] > 0 and rf["vision"]["fraction"] > 0


def test_profile_cli_json(tiny_dir: Path) -> None:
    from r1v_quant.cli.main import main

    res = CliRunner().invoke(
        main,
        ["profile", str(tiny_dir), "--threads", "1", "--prompt-tokens", "200", "--gen-tokens", "2",
         "--repeat", "1", "--no-image", "--no-roofline", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.output)
    assert r["runs"][0]["image_tiles"] == 0 and r["runs"][0]["vision_s"] is None
    assert "vision_ms_per_tile" not in r["summary"] and "roofline" not in r
    text = CliRunner().invoke(main, ["profile", str(tiny_dir), "--backend", "llama.cpp", "--repeat", "1"])
    assert text.exit_code == 2 and "runs on the torch backend" in text.output


@pytest.mark.llamacpp
def test_profile_llamacpp_schema(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> None:
    pytest.importorskip("llama_cpp")
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf

    d = tmp_path_factory.mktemp("profile-gguf")
    export_llm_gguf(tiny_dir, d / "tiny-Q8_0.gguf", "Q8_0", progress=False)
    export_mmproj_gguf(tiny_dir, d / "mmproj-tiny-Q8_0.gguf", "Q8_0")
    r = profile(d, threads=1, prompt_tokens=400, gen_tokens=3, repeat=1, progress=False)
    _check_schema(r, backend="llama.cpp", repeat=1, prompt=400, gen=3)
    run = r["runs"][0]
    assert run["n_ctx"] == 512 and run["n_ubatch"] == 512  # prompt + generated, rounded up to 256
    assert r["workload"]["vision_runtime"] == "llama.cpp mmproj"
    assert r["roofline"]["decode"]["bytes_per_token"] < r["artifact"]["stored_bytes"]["decoder"] * 2


def test_profile_onnx_vision(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> None:
    """Issue 9: the profiler can encode images with the ONNX export instead of the torch tower."""
    pytest.importorskip("onnxruntime")
    from r1v_quant.exporters.onnx_vision import export_onnx

    d = tmp_path_factory.mktemp("profile-onnx") / "onnx"
    export_onnx(tiny_dir, d, verify=False)
    r = profile(
        tiny_dir, threads=1, prompt_tokens=400, gen_tokens=2, repeat=1, vision=f"onnx:{d}", roofline=False,
        progress=False,
    )  # fmt: skip
    run = r["runs"][0]
    assert run["vision_runtime"] == "onnx" and run["image_tiles"] == 1 and run["vision_ms_per_tile"] > 0
    assert run["onnx"]["active_provider"] == "CPUExecutionProvider" and run["onnx"]["fallback"] is None
    assert "planner" not in r  # the planner does not model onnxruntime's memory
    with pytest.raises(R1VError, match="onnx:DIR"):
        profile(tiny_dir, vision="tensorrt:x", repeat=1, progress=False)


def test_sized_prompt() -> None:
    def render(q: str) -> str:
        return "<s>" + q + "</s>"

    def encode(t: str) -> list[int]:
        return [ord(c) for c in t]  # one token per character

    q, ids = sized_prompt(render, encode, 100)
    assert len(ids) <= 100 and len(ids) > 90 and ids == encode(render(q))
    with pytest.raises(ValueError):
        sized_prompt(render, encode, 5)  # shorter than the template itself


def test_summarize() -> None:
    s = summarize([{"load_s": 1.0}, {"load_s": 3.0}, {"load_s": 2.0}, {"load_s": None}])
    assert s["load_s"] == {"median": 2.0, "min": 1.0, "max": 3.0, "spread": 1.0, "n": 3}


def test_memory_probe_sees_an_allocation() -> None:
    probe = MemoryProbe()
    if not probe.resettable:
        pytest.skip("/proc/self/clear_refs is not writable here")
    probe.start()
    # 64 MiB touched and unmapped before the phase ends: an explicit mapping filled from one small chunk,
    # because in a long test process glibc may keep a freed buffer (numpy's, or a 64 MiB bytes object
    # used to fill the mapping) in its heap, and then RSS never drops
    buf = mmap.mmap(-1, 64 * 1024**2)
    chunk = b"\x01" * 1024**2
    for off in range(0, len(buf), len(chunk)):
        buf[off : off + len(chunk)] = chunk
    buf.close()
    probe.phase("alloc")
    probe.phase("idle")
    r = probe.report()
    assert r["phase_rss_peak_model"]["alloc"] >= 60 * 1024**2  # the peak survives the free
    assert r["phase_rss_peak_model"]["idle"] < 30 * 1024**2  # and was reset between phases


def test_roofline_arithmetic(tiny_dir: Path) -> None:
    g = describe_artifact(tiny_dir).geometry
    w = {"decoder": 1000, "embeddings": 600, "other": 10}
    # decoder + norms + lm_head (half of the untied embeddings) + KV of 50 tokens at 8 bytes each
    assert decode_bytes_per_token(g, w, 8, 50) == 1000 + 10 + 300 + 400
    assert decode_bytes_per_token(g, {**w, "lm_head": 100}, 0, 0) == 1110
    n = 64
    attn = 2 * 2 * g.llm_layers * g.heads * g.head_dim * n / 2
    assert prefill_flops_per_token(g, n) == 2 * (g.params["decoder"] + g.vocab * g.hidden) + attn
    r = roofline(
        g, {"decode_tokens_per_s": 50.0, "prefill_tokens_per_s": None}, bandwidth_gbs=10.0, gflops=100.0,
        decode_bytes=10**8, prompt_tokens=n, llc_bytes=32 * 1024**2,
    )  # fmt: skip
    assert r["decode"]["ceiling_tokens_per_s"] == 100.0 and r["decode"]["fraction"] == 0.5
    assert "note" not in r["decode"] and r["prefill"]["fraction"] is None
