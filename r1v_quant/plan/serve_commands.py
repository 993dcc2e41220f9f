"""The exact `vllm serve` / `llama-server` command line for one configuration the planner chose.

The numbers come from the plan row (planner.evaluate): the context, the KV-cache type, the fraction of GPU
memory, the images per prompt and tiles per image, the layers on the GPU. Flags, as the engines spell them:

vLLM (`vllm serve`, V1 engine, >= 0.21 for the CUDA-graph accounting the fraction assumes):
  --trust-remote-code     config.json's model_type `skywork_chat` is no transformers type and vLLM
                          registers no config class for it: the config is read through the checkpoint's
                          own configuration_skywork_chat.py (`auto_map`). The model itself is vLLM's
                          `SkyworkR1VChatModel`; no remote modelling code runs.
  --quantization awq_marlin  for AWQ checkpoints: vLLM would pick Marlin by itself on compute capability
                          >= 8.0, but `--quantization awq` forces the slow legacy kernel; naming
                          awq_marlin makes an unsupported GPU fail loudly instead of silently slow.
  --max-model-len, --kv-cache-dtype (auto = the model's 16-bit dtype, or fp8), --gpu-memory-utilization
  (fraction of TOTAL GPU memory for weights + activations + CUDA graphs + KV cache),
  --max-num-seqs / --max-num-batched-tokens (what the profiling run is sized by),
  --limit-mm-per-prompt '{"image": N}' (JSON form), --mm-processor-kwargs '{"max_dynamic_patch": N}' when
  fewer tiles than the model's maximum are planned, --enforce-eager for configurations without CUDA graphs,
  --override-generation-config with the sampling settings below.

llama-server: -m, --mmproj (with --no-mmproj-offload when the vision tower stays on the CPU), -c, -ngl,
-fa on (the planner's compute buffer is the flash-attention one; quantized V cache needs it), -ctk/-ctv for
a quantized KV cache, -np for several sequences (-c is then the total over all slots), --jinja (the chat
template stored in the GGUF), and the sampling settings.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from r1v_quant.model.spec import FLAVORS
from r1v_quant.model.storage import parse_awq
from r1v_quant.util.errors import R1VError

# Sampling the Skywork-R1V model card recommends for its reasoning outputs.
SAMPLING = {"temperature": 0.6, "top_p": 0.95, "repetition_penalty": 1.05}
ENGINES = ("vllm", "llama-server")
RUNTIME_OF = {"vllm": "vllm", "llama-server": "llama.cpp"}


def _json(d: dict[str, Any]) -> str:
    return json.dumps(d, separators=(", ", ": "))


def vllm_argv(row: dict[str, Any], model: str, g: dict[str, Any]) -> list[str]:
    """`vllm serve` for a plan row of runtime "vllm"; `g` is the plan's geometry (asdict)."""
    w = row["workload"]
    argv = ["vllm", "serve", model, "--trust-remote-code"]
    if parse_awq(row["llm_format"]):
        argv += ["--quantization", "awq_marlin"]
    argv += ["--max-model-len", str(w["ctx"])]
    argv += ["--kv-cache-dtype", "fp8" if row["kv_type"] == "fp8" else "auto"]
    argv += ["--gpu-memory-utilization", f"{row['gpu_memory_utilization']:.2f}"]
    argv += ["--max-num-seqs", str(w["batch"]), "--max-num-batched-tokens", str(w["prefill"])]
    argv += ["--limit-mm-per-prompt", _json({"image": w["images"] if w["tiles"] else 0})]
    if w["tiles"] and w["tiles"] < g["max_tiles"]:
        argv += ["--mm-processor-kwargs", _json({"max_dynamic_patch": max_dynamic_patch(w["tiles"])})]
    if row["enforce_eager"]:
        argv.append("--enforce-eager")
    argv += ["--override-generation-config", _json(SAMPLING)]
    return argv


def max_dynamic_patch(tiles: int) -> int:
    """InternVL's `max_dynamic_patch` that caps an image at `tiles` tiles (a thumbnail is added whenever
    an image gives more than one tile, so N allows N + 1)."""
    return 1 if tiles <= 2 else tiles - 1


def llama_server_argv(row: dict[str, Any], model: str, mmproj: str | None, g: dict[str, Any]) -> list[str]:
    """`llama-server` for a plan row of runtime "llama.cpp"."""
    w = row["workload"]
    argv = ["llama-server", "-m", model]
    if mmproj and row["vision_format"] != "none":
        argv += ["--mmproj", mmproj]
        if row["llm_device"] == "gpu" and row["vision_device"] == "cpu":
            argv.append("--no-mmproj-offload")
    argv += ["-c", str(w["ctx"] * w["batch"])]
    if w["batch"] > 1:
        argv += ["-np", str(w["batch"])]
    layers = row.get("gpu_layers")
    argv += [
        "-ngl",
        str(0 if row["llm_device"] == "cpu" else layers if layers is not None else g["llm_layers"] + 1),
    ]
    if w["prefill"] != 512:
        argv += ["-ub", str(w["prefill"])]
    argv += ["-fa", "on"]
    if row["kv_type"] != "f16":
        argv += ["-ctk", row["kv_type"], "-ctv", row["kv_type"]]
    argv += ["--jinja", "--temp", str(SAMPLING["temperature"]), "--top-p", str(SAMPLING["top_p"])]
    argv += ["--repeat-penalty", str(SAMPLING["repetition_penalty"])]
    return argv


def default_paths(p: dict[str, Any], row: dict[str, Any]) -> tuple[str, str | None]:
    """Model (and mmproj) paths for the command: the files planned for, or for a preset the names
    `r1v-quant awq` / `r1v-quant gguf` would give them (<release>-awq/, <release>-gguf/<release>-TYPE.gguf,
    mmproj-<release>-TYPE.gguf), or the Hub repo of the 16-bit release."""
    m = p["model"]
    if "path" in m:
        if m.get("kind") == "gguf":
            return m.get("llm_gguf") or m["path"], m.get("mmproj_gguf")
        return m["path"], None
    release = FLAVORS[m["flavor"]].release if m.get("flavor") in FLAVORS else m["preset"]
    if row["runtime"] == "vllm":
        if parse_awq(row["llm_format"]):
            return f"{release}-awq", None
        return f"Skywork/{release}", None
    folder = f"{release}-gguf"
    return (
        f"{folder}/{release}-{row['llm_format']}.gguf",
        f"{folder}/mmproj-{release}-{row['vision_format']}.gguf",
    )


def emit(
    p: dict[str, Any], engine: str, *, model: str | Path | None = None, mmproj: str | Path | None = None
) -> dict[str, Any]:
    """The command for the best fitting configuration of `engine` on the plan's single device.

    One-line R1VError when the plan has several devices, the engine does not run on the device, or no
    configuration of the engine fits (the closest one is named)."""
    if engine not in ENGINES:
        raise R1VError(f"unknown engine {engine!r}: one of {', '.join(ENGINES)}")
    if len(p["devices"]) != 1:
        raise R1VError("--emit writes one command: give exactly one --device")
    d = p["devices"][0]
    runtime = RUNTIME_OF[engine]
    if runtime == "vllm" and d["kind"] != "gpu":
        raise R1VError(f"vLLM needs a GPU: {d['device']} is a CPU device (use --emit llama-server)")
    rows = [r for r in d["configs"] if r["runtime"] == runtime]  # ranked best first
    if not rows:
        raise R1VError(f"no {engine} configuration was planned for {d['device']} (check --runtime)")
    best = rows[0]
    if best["verdict"] == "does not fit":
        raise R1VError(
            f"no {engine} configuration fits {d['device']} at {p['ctx']} tokens: the closest, "
            f"{best['config']}, needs {best['device_need'] / 1024**3:.1f} GiB of {d['usable'] / 1024**3:.1f}"
            f" (largest context it fits: {best['max_ctx']})"
        )
    argv = row_argv(p, best, model=model, mmproj=mmproj)
    assert argv is not None
    return {"engine": engine, "device": d["device"], "config": best["config"], "argv": argv,
            "command": shlex.join(argv)}  # fmt: skip


def row_argv(
    p: dict[str, Any],
    row: dict[str, Any],
    *,
    model: str | Path | None = None,
    mmproj: str | Path | None = None,
) -> list[str] | None:
    """The command line of one plan row (None for r1v-quant's own torch runtime)."""
    if row["runtime"] not in ("vllm", "llama.cpp"):
        return None
    model_path, mm_path = default_paths(p, row)
    model_path = str(model) if model is not None else model_path
    mm_path = str(mmproj) if mmproj is not None else mm_path
    g = p["model"]["geometry"]
    if row["runtime"] == "vllm":
        return vllm_argv(row, model_path, g)
    return llama_server_argv(row, model_path, mm_path, g)


def add_commands(p: dict[str, Any]) -> None:
    """Put each fitting recommendation's command line into it (`command`), for the report and --json."""
    for d in p["devices"]:
        for r in d["recommendations"]:
            argv = row_argv(p, r) if r["verdict"] != "does not fit" else None
            if argv is not None:
                r["command"] = shlex.join(argv)


# Devices a model card gives commands for: common GPU sizes (GiB, as sold) and two laptop/desktop RAM sizes.
CARD_DEVICES = {
    "vllm": ("gpu:24GB", "gpu:32GB", "gpu:48GB", "gpu:80GB"),
    "llama-server": ("gpu:24GB", "gpu:32GB", "gpu:48GB", "cpu:32GB", "cpu:64GB"),
}


def card_commands(
    path: str | Path, engine: str, *, serve_model: str, serve_mmproj: str | None = None,
    mmproj: str | Path | None = None, ctx: int = 32768,
) -> list[dict[str, Any]]:  # fmt: skip
    """The planner's command for the artifact at `path` on each of CARD_DEVICES[engine], devices with the
    same command grouped: [{"devices": [...], "command": str | None, "note": str}]. A device where nothing
    fits gets command None and the planner's one-line reason."""
    from r1v_quant.plan.planner import plan

    out: list[dict[str, Any]] = []
    for device in CARD_DEVICES[engine]:
        try:
            p = plan(model=path, mmproj=mmproj, devices=[device], ctx=ctx, runtime=RUNTIME_OF[engine])
            e = emit(p, engine, model=serve_model, mmproj=serve_mmproj)
            command, note = e["command"], e["config"]
        except R1VError as err:
            command, note = None, str(err)
        if out and out[-1]["command"] == command and command is not None:
            out[-1]["devices"].append(device)
        else:
            out.append({"devices": [device], "command": command, "note": note})
    return out
