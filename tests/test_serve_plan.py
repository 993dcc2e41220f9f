"""The planner's engine configurations and the commands it writes: vLLM as vLLM runs (vision tower on the
GPU, its start-up reservations), llama-server's flags, the 30 GB verdict for R1V-38B, and the model cards
carrying the same commands."""

from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1v_quant.cli.main import main
from r1v_quant.model.artifact import Geometry
from r1v_quant.model.presets import preset_spec
from r1v_quant.model.storage import awq_bits, weight_bytes
from r1v_quant.plan import vllm_memory as vm
from r1v_quant.plan.memory_model import CUDA_CONTEXT, Config
from r1v_quant.plan.planner import evaluate, parse_device, plan, vllm_vision_formats
from r1v_quant.plan.serve_commands import SAMPLING, max_dynamic_patch

GiB = 1024**3
MiB = 1024**2
GPUS = ["gpu:24GB", "gpu:30GB", "gpu:48GB", "gpu:80GB"]


@pytest.fixture(scope="module")
def g38() -> Geometry:
    return Geometry.from_spec(preset_spec("r1v-38b"))


@pytest.fixture(scope="module")
def plan30() -> dict:
    return plan(preset="r1v-38b", devices=["gpu:30GB"], ctx=32768)


def _flags(argv: list[str]) -> dict[str, str | None]:
    """--flag value pairs of a command line (a flag followed by another flag has value None)."""
    out: dict[str, str | None] = {}
    for i, a in enumerate(argv):
        if a.startswith("-") and not a.lstrip("-").replace(".", "").isdigit():
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            out[a] = None if nxt is None or (nxt.startswith("-") and not nxt[1:2].isdigit()) else nxt
    return out


def _cli(*args: str) -> tuple[int, str]:
    r = CliRunner().invoke(main, ["plan", *args])
    return r.exit_code, r.output


# -- the 30 GB verdict ---------------------------------------------------------------------------------------
def test_30gb_reaches_32k_with_vision_on_gpu(plan30: dict) -> None:
    d = plan30["devices"][0]
    best = d["recommendations"][0]
    assert d["verdict"] == "fits" and best["verdict"] == "fits"
    assert best["runtime"] == "vllm" and best["vision_device"] == "gpu" and best["max_ctx"] >= 32768
    # what makes it fit: the vision linears in AWQ int4 beside the int4 LLM, an fp8 KV cache
    assert best["llm_format"] == best["vision_format"] == "awq-int4-g128" and best["kv_type"] == "fp8"
    assert not best["enforce_eager"]  # CUDA graphs still fit
    assert best["workload"]["ctx"] == 32768 and best["gpu_memory_utilization"] <= 1.0


def test_30gb_by_hand(plan30: dict, g38: Geometry) -> None:
    """The 30 GiB budget term by term, and why nothing with a 16-bit vision tower or f16 KV reaches 32k."""
    rows = {r["config"]: r for r in plan30["devices"][0]["configs"] if r["runtime"] == "vllm"}
    best = plan30["devices"][0]["recommendations"][0]
    t = {x["name"]: x["bytes"] for x in best["terms"]}
    assert t["kv_cache"] == 32768 * 2 * 64 * 8 * 128 * 1 == 4 * GiB  # fp8: 1 byte per element
    assert t["runtime.cuda_context"] == CUDA_CONTEXT
    assert t["cuda_graphs"] == vm.cuda_graph_bytes(1, 2048, False)
    weights = sum(v for k, v in t.items() if k.startswith("weights."))
    assert weights == sum(weight_bytes(preset_spec("r1v-38b"), "awq-int4-g128", "awq-int4-g128").values())
    # profiling peak: the largest of the ViT (13 tiles), the 2048-token forward, the sampler
    stages = [
        t["vision.activations"],
        t["prefill.activations"] + t["prefill.encoder_cache"],
        t["decode.sampler"] + t["decode.hidden_states"],
    ]
    inside = weights + t["runtime.non_torch"] + t["cuda_graphs"] + t["profile.margin"] + t["kv_cache"]
    util = math.ceil((inside + max(stages)) * 100 / (30 * GiB)) / 100
    assert best["gpu_memory_utilization"] == pytest.approx(util)
    assert best["device_need"] == CUDA_CONTEXT + int(util * 30 * GiB)
    # bf16 vision tower (10.3 GiB): no context at all; f16 KV: under 32k even without CUDA graphs
    for name, r in rows.items():
        if "vision bf16" in name:
            assert r["max_ctx"] == 0, name
        elif "KV f16" in name:
            assert 16384 < r["max_ctx"] < 32768, name


def test_vision_awq_bytes_by_hand() -> None:
    spec = preset_spec("r1v-38b")
    bf16, int4 = weight_bytes(spec, "awq-int4-g128"), weight_bytes(spec, "awq-int4-g128", "awq-int4-g128")
    int8 = weight_bytes(spec, "awq-int4-g128", "awq-int8-g128")
    linears = 45 * (9600 * 3200 + 3200 * 3200 + 2 * 12800 * 3200)  # qkv, proj, fc1, fc2 per layer
    assert linears == 5_529_600_000
    assert bf16["vision"] - int4["vision"] == pytest.approx(linears * (2 - awq_bits(128, 4) / 8), abs=45 * 4)
    assert bf16["vision"] - int8["vision"] == pytest.approx(linears * (2 - awq_bits(128, 8) / 8), abs=45 * 4)
    assert int4["projector"] == bf16["projector"]  # mlp1 stays 16-bit
    assert awq_bits(128, 8) == 8 + 24 / 128 and awq_bits() == 4 + 20 / 128


def test_every_vllm_config_keeps_vision_on_gpu() -> None:
    p = plan(preset="r1v-38b", devices=GPUS, ctx=8192)
    for d in p["devices"]:
        rows = [r for r in d["configs"] if r["runtime"] == "vllm"]
        assert rows, d["device"]
        for r in rows:
            assert r["vision_device"] == r["llm_device"] == "gpu", r["config"]
            assert r["vision_format"] in vllm_vision_formats(r["llm_format"]), r["config"]
            assert r["kv_type"] in ("f16", "fp8")
    # one quantization config per checkpoint: no int8 tower beside an int4 LLM, no AWQ tower beside bf16
    assert vllm_vision_formats("awq-int4-g128") == ("bf16", "awq-int4-g128")
    assert vllm_vision_formats("bf16") == ("bf16",)


def test_vllm_max_context_is_the_boundary(plan30: dict, g38: Geometry) -> None:
    best = plan30["devices"][0]["recommendations"][0]
    cfg = Config("vllm", best["llm_format"], best["vision_format"], best["kv_type"], "gpu", "gpu",
                 weights=best["weights"])  # fmt: skip
    dev = parse_device("gpu:30GB")
    kw = {"batch": 1, "prefill": None, "tiles": 13}
    assert evaluate(g38, cfg, dev, ctx=best["max_ctx"], **kw)["verdict"] != "does not fit"
    assert evaluate(g38, cfg, dev, ctx=best["max_ctx"] + 256, **kw)["verdict"] == "does not fit"


def test_vllm_profiling_counts(g38: Geometry) -> None:
    # encoder budget max(2048, 13 x 256) = 3328 tokens: one 13-tile image per encoder batch
    kw = {"images_per_prompt": 1, "max_num_seqs": 256, "max_model_len": 32768}
    assert vm.images_per_encoder_batch(g38, 13, max_num_batched_tokens=2048, **kw) == 1
    assert vm.images_per_encoder_batch(g38, 13, max_num_batched_tokens=8192, **kw) == 2
    one_seq, text_only = {**kw, "max_num_seqs": 1}, {**kw, "images_per_prompt": 0}
    assert vm.images_per_encoder_batch(g38, 13, max_num_batched_tokens=8192, **one_seq) == 1
    assert vm.images_per_encoder_batch(g38, 13, max_num_batched_tokens=2048, **text_only) == 0
    # InternViT-6B, 13 tiles of 1025 positions: the MLP stage (x, norm2, fc1, GELU) at bf16 + the pixels
    u = 13 * 1025 * 3200 * 2
    assert vm.vision_profile_bytes(g38, 13) == 2 * u + 2 * 13 * 1025 * 12800 * 2 + 13 * 3 * 448 * 448 * 2
    assert vm.llm_profile_bytes(g38, 2048) == 2048 * 2 * (4 * 5120 + 3 * 27648)
    assert vm.sampler_bytes(g38, 256) == 256 * 152064 * 23
    assert vm.cuda_graph_bytes(1, 2048, True) == 0
    assert (
        vm.cuda_graph_bytes(1, 2048, False)
        < vm.cuda_graph_bytes(32, 2048, False)
        < vm.cuda_graph_bytes(256, 2048, False)
    )
    assert vm.kv_tokens(32768) == 32768 and vm.kv_tokens(1000) == 1008  # whole 16-token blocks
    assert [max_dynamic_patch(t) for t in (1, 2, 3, 7, 13)] == [1, 1, 2, 6, 12]


def test_more_sequences_cost_sampler_and_graphs(g38: Geometry) -> None:
    one = plan(preset="r1v-38b", devices=["gpu:80GB"], ctx=8192, runtime="vllm")["devices"][0]["configs"]
    many = plan(preset="r1v-38b", devices=["gpu:80GB"], ctx=8192, batch=64, runtime="vllm")
    r1 = next(r for r in one if r["config"] == many["devices"][0]["configs"][0]["config"])
    r64 = many["devices"][0]["configs"][0]
    t1 = {t["name"]: t["bytes"] for t in r1["terms"]}
    t64 = {t["name"]: t["bytes"] for t in r64["terms"]}
    assert t64["kv_cache"] == 64 * t1["kv_cache"]
    assert t64["decode.sampler"] == 64 * t1["decode.sampler"]
    assert t64.get("cuda_graphs", 0) > t1.get("cuda_graphs", 0) or r64["enforce_eager"]


# -- --emit --------------------------------------------------------------------------------------------------
def test_emit_vllm_matches_the_plan() -> None:
    code, out = _cli("--preset", "r1v-38b", "--device", "gpu:30GB", "--emit", "vllm", "--json")
    assert code == 0, out
    p = json.loads(out)
    e = p["emit"]
    argv = shlex.split(e["command"])
    assert argv == e["argv"] and argv[:2] == ["vllm", "serve"]
    best = p["devices"][0]["recommendations"][0]
    assert e["config"] == best["config"] and best["command"] == e["command"]  # --json carries it per row
    f = _flags(argv)
    assert f["--max-model-len"] == str(best["workload"]["ctx"]) == "32768"
    assert f["--kv-cache-dtype"] == "fp8" == best["kv_type"]
    assert float(f["--gpu-memory-utilization"]) == best["gpu_memory_utilization"]
    assert f["--max-num-seqs"] == "1" and f["--max-num-batched-tokens"] == str(best["workload"]["prefill"])
    assert json.loads(f["--limit-mm-per-prompt"]) == {"image": 1}
    assert f["--quantization"] == "awq_marlin"  # never the legacy kernel
    assert "--trust-remote-code" in f and "--enforce-eager" not in f
    assert json.loads(f["--override-generation-config"]) == SAMPLING
    # the plain command is the same line
    code, text = _cli("--preset", "r1v-38b", "--device", "gpu:30GB", "--emit", "vllm")
    assert code == 0 and text.strip() == e["command"]


def test_emit_vllm_options() -> None:
    code, out = _cli("--preset", "r1v-38b", "--device", "gpu:80GB", "--ctx", "8192", "--tiles", "7",
                     "--images", "2", "--emit", "vllm", "--serve-model", "/models/r1v", "--json")  # fmt: skip
    assert code == 0, out
    p = json.loads(out)
    f = _flags(p["emit"]["argv"])
    assert p["emit"]["argv"][2] == "/models/r1v"
    assert json.loads(f["--mm-processor-kwargs"]) == {"max_dynamic_patch": 6}
    assert json.loads(f["--limit-mm-per-prompt"]) == {"image": 2}
    assert f["--max-model-len"] == "8192"
    # on 80 GB the 16-bit language model fits: no --quantization at all
    best = p["devices"][0]["recommendations"][0]
    assert best["llm_format"] == "bf16" and "--quantization" not in f


def test_emit_llama_server_matches_the_plan() -> None:
    for device in ("gpu:30GB", "cpu:32GB"):
        code, out = _cli("--preset", "r1v-38b", "--device", device, "--emit", "llama-server", "--json")
        assert code == 0, out
        p = json.loads(out)
        argv = shlex.split(p["emit"]["command"])
        assert argv == p["emit"]["argv"] and argv[0] == "llama-server"
        row = next(r for r in p["devices"][0]["configs"] if r["config"] == p["emit"]["config"])
        f = _flags(argv)
        assert f["-c"] == str(row["workload"]["ctx"])
        assert f["-ngl"] == ("65" if row["llm_device"] == "gpu" else "0")  # 64 layers + the output layer
        assert f["-m"].endswith(f"-{row['llm_format']}.gguf")
        assert f["--mmproj"].endswith(f"-{row['vision_format']}.gguf")
        assert ("--no-mmproj-offload" in f) == (row["llm_device"] == "gpu" and row["vision_device"] == "cpu")
        assert f["-fa"] == "on" and "--jinja" in f
        if row["kv_type"] == "f16":
            assert "-ctk" not in f
        else:
            assert f["-ctk"] == f["-ctv"] == row["kv_type"]
        assert (f["--temp"], f["--top-p"], f["--repeat-penalty"]) == ("0.6", "0.95", "1.05")


def test_emit_errors_are_one_line() -> None:
    cases = [
        (["--device", "gpu:16GB", "--emit", "vllm"], "error: no vllm configuration fits gpu:16GB"),
        (["--device", "cpu:32GB", "--emit", "vllm"], "error: vLLM needs a GPU"),
        (["--device", "gpu:30GB", "--device", "gpu:48GB", "--emit", "vllm"], "error: --emit writes one"),
        (["--device", "gpu:30GB", "--runtime", "llama.cpp", "--emit", "vllm"], "error: no vllm configurat"),
    ]
    for args, start in cases:
        code, out = _cli("--preset", "r1v-38b", *args)
        assert code != 0 and out.startswith(start), (args, out)
        assert out.strip().count("\n") == 0, out  # one line, no traceback
    code, out = _cli("--preset", "r1v-38b", "--device", "gpu:16GB", "--emit", "vllm")
    assert "closest" in out and "largest context it fits" in out


def test_gpu_engine_is_an_alias() -> None:
    a = plan(preset="r1v-38b", devices=["gpu:48GB"], ctx=8192, runtime="gpu-engine")
    b = plan(preset="r1v-38b", devices=["gpu:48GB"], ctx=8192, runtime="vllm")
    assert a["devices"][0]["configs"] == b["devices"][0]["configs"]


def test_context_above_the_model_limit_is_capped() -> None:
    p = plan(preset="r1v-38b", devices=["gpu:80GB"], ctx=10**6, runtime="vllm")
    assert p["ctx"] == 131072 and "above the model's limit" in p["notes"][0]


# -- model cards ---------------------------------------------------------------------------------------------
def _emitted(*args: str) -> str:
    code, out = _cli(*args)
    assert code == 0, out
    return out.strip()


def test_awq_card_carries_the_planned_command(tiny_dir: Path, tmp_path: Path) -> None:
    from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq

    out = tmp_path / "tiny-awq"
    quantize_awq(tiny_dir, out, AWQOptions(samples=2, seq_len=256, method="rtn"), progress=False)
    body = (out / "README.md").read_text()
    for device in ("gpu:24GB", "gpu:80GB"):  # the fraction of memory differs per size
        cmd = _emitted("--model", str(out), "--device", device, "--emit", "vllm")
        assert cmd.startswith(f"vllm serve {out} --trust-remote-code --quantization awq_marlin"), cmd
        assert cmd in body, (device, cmd)
    assert "--quantization awq " not in body and "--max-model-len 16384" not in body


def test_gguf_card_carries_the_planned_command(tiny_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("gguf")
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf
    from r1v_quant.exporters.model_card import write_gguf_card

    out = tmp_path / "gguf"
    out.mkdir()
    llm, mm = out / "tiny-Q8_0.gguf", out / "mmproj-tiny-F16.gguf"
    export_llm_gguf(tiny_dir, llm, "Q8_0", progress=False)
    export_mmproj_gguf(tiny_dir, mm, "F16")
    run = {"llm": {"path": str(llm), "type": "Q8_0"}, "mmproj": {"path": str(mm), "type": "F16"}}
    write_gguf_card(out, tiny_dir, run, {"type": "Q8_0"})
    body = (out / "README.md").read_text()
    for device in ("gpu:24GB", "cpu:32GB"):
        cmd = _emitted("--model", str(llm), "--mmproj", str(mm), "--device", device, "--emit", "llama-server")
        assert cmd.startswith(f"llama-server -m {llm} --mmproj {mm} -c ") and cmd in body, (device, cmd)


def test_llama_partial_offload_is_the_most_layers_that_fit(g38: Geometry) -> None:
    """A 16 GiB GPU holds no 38B GGUF whole: llama-server gets -ngl L, the largest L that fits."""
    code, out = _cli("--preset", "r1v-38b", "--device", "gpu:16GB", "--emit", "llama-server", "--json")
    assert code == 0, out
    p = json.loads(out)
    row = next(r for r in p["devices"][0]["configs"] if r["config"] == p["emit"]["config"])
    layers = row["gpu_layers"]
    assert 0 < layers < 64 and _flags(p["emit"]["argv"])["-ngl"] == str(layers)
    t = {x["name"]: x for x in row["terms"]}
    dec = t["weights.decoder"]["bytes"] + t["weights.decoder_host"]["bytes"]
    assert t["weights.decoder"]["pool"] == "gpu" and t["weights.decoder"]["bytes"] == int(dec * layers / 64)
    assert t["weights.output"]["pool"] == "cpu"  # the output layer goes to the GPU only with -ngl > 64
    cfg = Config("llama.cpp", row["llm_format"], row["vision_format"], row["kv_type"], "gpu",
                 row["vision_device"], weights=row["weights"], gpu_layers=layers)  # fmt: skip
    dev, kw = parse_device("gpu:16GB"), {"batch": 1, "prefill": None, "tiles": 13}
    assert evaluate(g38, cfg, dev, ctx=32768, **kw)["verdict"] != "does not fit"
    cfg.gpu_layers = layers + 1
    assert evaluate(g38, cfg, dev, ctx=32768, **kw)["verdict"] == "does not fit"
