"""One measured run of `r1v-quant profile`, in a process of its own (`python -m r1v_quant.profiling.worker`).

A fresh process per run isolates the model's memory: after imports and a warm-up on a toy model of the
same architecture (so torch's one-time initialisation, thread pools and kernels are not counted as the
model's), the worker records its resident memory as the baseline, resets the kernel's peak counter
(/proc/self/clear_refs, "5" resets VmHWM) and then reads VmHWM after each phase: load, vision,
prefill, decode. With CUDA it also reads torch.cuda.max_memory_allocated per phase (not tested here: no
GPU on this machine).

The model runs through the runtime protocol's engines (r1v_quant.runtime.engines), exactly as chat and
eval run it: `vision.encode(image)` (preprocessing included) then `lm.generate(...)` for exactly
--gen-tokens tokens, the first token marking the end of the prefill.

The request comes as JSON on stdin; the result is one JSON line on stdout.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from r1v_quant.util.proc import proc_status

FILLER = (
    "A train leaves the station at nine and travels north at sixty kilometres per hour while a second "
    "train leaves an hour later on the same line at ninety kilometres per hour; the table lists the "
    "distances, the times and the fuel used on every leg of both journeys, and the chart beside it "
    "plots the same numbers. "
)


# -- memory ------------------------------------------------------------------------------------------------
class MemoryProbe:
    """Peak resident memory (and CUDA memory) per phase, relative to a baseline."""

    def __init__(self, cuda: bool = False):
        self.cuda = cuda
        self.base = 0
        self.phases: dict[str, dict[str, int]] = {}
        self.resettable = self._reset()
        self.method = (
            "VmHWM reset per phase via /proc/self/clear_refs"
            if self.resettable
            else "getrusage ru_maxrss (no per-phase reset on this system)"
        )

    @staticmethod
    def _reset() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    @staticmethod
    def rss() -> int:
        return proc_status("VmRSS") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    @staticmethod
    def hwm() -> int:
        return proc_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def start(self) -> None:
        gc.collect()
        self.base = self.rss()
        self._reset()
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            self.cuda_base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()

    def phase(self, name: str) -> None:
        rec = {"rss_peak": self.hwm(), "rss_end": self.rss()}
        if self.cuda:
            import torch

            torch.cuda.synchronize()
            rec["vram_peak"] = torch.cuda.max_memory_allocated()
            rec["vram_reserved_peak"] = torch.cuda.max_memory_reserved()
            torch.cuda.reset_peak_memory_stats()
        self.phases[name] = rec
        self._reset()

    def report(self) -> dict[str, Any]:
        peak = max((p["rss_peak"] for p in self.phases.values()), default=self.base)
        out: dict[str, Any] = {
            "baseline_rss": self.base,
            "peak_rss": peak,
            "peak_rss_model": peak - self.base,
            "phase_rss_peak_model": {k: v["rss_peak"] - self.base for k, v in self.phases.items()},
            "phase_rss_end_model": {k: v["rss_end"] - self.base for k, v in self.phases.items()},
            "rss_method": self.method,
        }
        if self.cuda:
            out["peak_vram"] = max(p["vram_peak"] for p in self.phases.values())
            out["peak_vram_reserved"] = max(p["vram_reserved_peak"] for p in self.phases.values())
            out["phase_vram_peak"] = {k: v["vram_peak"] for k, v in self.phases.items()}
        return out


# -- prompts -----------------------------------------------------------------------------------------------
def sized_prompt(
    render: Callable[[str], str], encode: Callable[[str], list[int]], target: int
) -> tuple[str, list[int]]:
    """The question (filler text) whose rendered prompt is the longest not over `target` tokens."""
    words = FILLER.split()

    def text(n: int) -> str:
        return " ".join(words[i % len(words)] for i in range(n))

    lo, hi = 0, 1
    while len(encode(render(text(hi)))) <= target and hi < 1_000_000:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if len(encode(render(text(mid)))) <= target:
            lo = mid
        else:
            hi = mid
    ids = encode(render(text(lo)))
    if len(ids) > target:
        raise ValueError(f"--prompt-tokens {target} is shorter than the template and image ({len(ids)})")
    return text(lo), ids


def _now() -> float:
    return time.perf_counter()


# -- warm-ups: torch ----------------------------------------------------------------------------------------
def _toy_spec(spec: Any) -> Any:
    """The same architecture at toy width: 1 ViT layer x 64, 1 decoder layer x 64 (2 heads / 1 KV head)."""
    v = replace(spec.vision, hidden_size=64, num_layers=1, num_heads=2, intermediate_size=128)
    m = replace(
        spec.llm, hidden_size=64, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=32,
        intermediate_size=128, vocab_size=max(spec.llm.vocab_size, 8),
    )  # fmt: skip
    return replace(spec, vision=v, llm=m)


def warm_up_torch(spec: Any, device: str, dtype: Any) -> None:
    """Run every op of the forward once on a toy model (one-time initialisation is the runtime's cost)."""
    import torch

    from r1v_quant.model.llm import KVCache
    from r1v_quant.model.reference import R1VModel

    toy = _toy_spec(spec)
    with torch.device("meta"):
        R1VModel(spec)  # torch's first meta-device module build initialises ~80 MB once
    model = R1VModel(toy).to(device=device, dtype=dtype).eval()
    with torch.no_grad(), torch.device(device):
        s = spec.vision.image_size
        emb = model.image_embeds(torch.zeros(1, 3, s, s, dtype=dtype))
        lm = model.language_model
        cache = KVCache(1)
        h = lm.forward_embeds(emb.reshape(1, -1, 64)[:, :8].to(dtype), cache)
        lm.logits(lm.forward_embeds(lm.model.embed_tokens(torch.zeros(1, 1, dtype=torch.long)), cache))
        del h
    del model
    gc.collect()


# -- warm-ups: llama.cpp ------------------------------------------------------------------------------------
def _vram_used() -> int | None:
    """Device-wide used GPU memory (llama.cpp allocates outside torch, so max_memory_allocated is blind)."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        free, total = torch.cuda.mem_get_info()
        return int(total - free)
    except Exception:
        return None


def write_toy_gguf(path: Path, *, hidden: int = 64, ffn: int = 128, heads: int = 2, vocab: int = 64) -> Path:
    """A one-layer Qwen2 GGUF with random F32 weights: the warm-up model for the llama.cpp backend."""
    import gguf
    import numpy as np

    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("r1v-quant profiler warm-up")
    w.add_context_length(4096)
    w.add_embedding_length(hidden)
    w.add_block_count(1)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list([f"<t{i}>" for i in range(vocab)])
    w.add_token_types([gguf.TokenType.CONTROL] * vocab)
    w.add_token_merges(["a b"])  # the BPE loader requires a merges list
    w.add_eos_token_id(vocab - 1)
    w.add_string("r1v_quant.flavor", "r1v")
    rng = np.random.default_rng(0)
    d = hidden // heads
    shapes = {
        "token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,),
        "output.weight": (vocab, hidden),
        "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_q.bias": (hidden,),
        "blk.0.attn_k.weight": (d, hidden), "blk.0.attn_k.bias": (d,),
        "blk.0.attn_v.weight": (d, hidden), "blk.0.attn_v.bias": (d,),
        "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn),
    }  # fmt: skip
    for name, shape in shapes.items():
        w.add_tensor(name, (0.02 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def warm_up_llamacpp(threads: int | None, vision: bool) -> None:
    """Load, decode and free a toy model (and encode a tile through a probe mmproj) before the baseline:
    the libraries' code pages, tables and thread pools are the runtime's cost, not the model's."""
    import tempfile

    from r1v_quant.runtime.llamacpp import LlamaCppRuntime

    with tempfile.TemporaryDirectory(prefix="r1v-profile-") as td:
        toy = write_toy_gguf(Path(td) / "toy.gguf")
        with LlamaCppRuntime(toy, n_ctx=256, n_threads=threads) as rt:
            rt.generate([1, 2, 3], max_new_tokens=2, ignore_stop=True)
    if vision:
        from r1v_quant.exporters.gguf_mmproj import detect_position_order

        detect_position_order()  # writes a probe mmproj and encodes one tile with libmtmd
    gc.collect()


# -- the measured run --------------------------------------------------------------------------------------
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run(req: dict[str, Any]) -> dict[str, Any]:
    """Warm up, then open the engines (r1v_quant.runtime.engines) and measure load, vision, prefill and
    decode: the same steps for every backend; only the warm-up and a few report fields differ."""
    from r1v_quant.model.prompts import build_prompt, expand_image_tokens
    from r1v_quant.runtime.engines import open_engines
    from r1v_quant.runtime.options import RuntimeOptions

    backend, device = req["backend"], req["device"]
    on_torch = backend == "torch"
    threads = req.get("threads") or None
    onnx_dir = req.get("onnx_vision")
    image = req.get("image")
    if on_torch:
        import torch

        from r1v_quant.model.checkpoint import open_checkpoint
        from r1v_quant.model.preprocess import preprocess_for_spec

        if threads:
            torch.set_num_threads(threads)
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[req["dtype"]]
        spec = open_checkpoint(req["path"]).spec
        warm_up_torch(spec, device, dtype)
        if image:  # first use of the image libraries (decoders, resampling) is the runtime's, not the model's
            preprocess_for_spec(image, spec)
        gguf, model, mmproj = None, Path(req["path"]), None
    else:
        from r1v_quant.model.artifact import find_gguf_pair

        llm, found = find_gguf_pair(req["path"])
        mmproj = None if onnx_dir else (Path(req["mmproj"]) if req.get("mmproj") else found)
        warm_up_llamacpp(threads, bool(image and mmproj is not None))
        gguf, model = llm, None
    if onnx_dir:
        from r1v_quant.runtime.onnx import OnnxVisionEncoder  # noqa: F401  (imported before the baseline)
    cuda = device == "cuda"

    def sync() -> None:
        if on_torch and cuda:
            torch.cuda.synchronize()

    mem = MemoryProbe(cuda and on_torch)  # llama.cpp allocates outside torch: device-wide readings instead
    mem.start()
    vram0 = _vram_used() if cuda and not on_torch else None
    options = RuntimeOptions(
        n_threads=threads,
        n_gpu_layers=999 if cuda else 0,
        torch_device=device,
        torch_dtype=DTYPES[req.get("dtype") or "fp32"],
    )
    t0 = _now()
    lm, vision = open_engines(
        gguf=gguf, mmproj=mmproj, model=model, vision_onnx=Path(onnx_dir) if onnx_dir else None,
        options=options, n_ctx=req.get("ctx"), onnx_provider=device,
    )  # fmt: skip
    if image and vision is not None and hasattr(vision, "load"):
        vision.load()  # an mmproj loads on first use: its time and memory count as loading
    sync()
    load_s = _now() - t0
    mem.phase("load")
    vram_load = _vram_used() if vram0 is not None else None

    tiles, rows, vision_s = 0, None, None
    if image and vision is not None:
        t_req = _now()
        embeds = vision.encode(image)  # preprocessing included: it is part of answering a request
        sync()
        vision_s = _now() - t_req
        tiles, rows = embeds.tiles, embeds.rows
    mem.phase("vision")

    def render(question: str) -> str:
        content = ("<image>\n" if tiles else "") + question
        text = build_prompt(lm.flavor, [{"role": "user", "content": content}], think=True)
        per_tile = rows.shape[0] // tiles if rows is not None else 1
        return expand_image_tokens(text, [tiles] if tiles else [], per_tile)

    _, ids = sized_prompt(render, lm.tokenize, req["prompt_tokens"])
    gen = req["gen_tokens"]
    if len(ids) + gen > lm.n_ctx:
        raise ValueError(f"{len(ids)} prompt + {gen} generated tokens exceed --ctx {lm.n_ctx}")
    first: list[float] = []

    def on_token(_: int) -> None:
        if not first:
            first.append(_now())
            mem.phase("prefill")

    t_gen = _now()
    res = lm.generate(ids, rows, max_new_tokens=gen, on_token=on_token, ignore_stop=True)  # exactly gen
    sync()
    mem.phase("decode")
    vram_end = _vram_used() if vram0 is not None else None
    tm = res.timings
    n_gen = int(tm["n_gen"])
    runtime = "onnx" if onnx_dir else ("torch" if on_torch else "llama.cpp mmproj")
    out = {
        "load_s": load_s,
        "vision_s": vision_s,
        "vision_ms_per_tile": vision_s * 1000 / tiles if vision_s is not None and tiles else None,
        "prefill_s": tm["prompt_s"],
        "ttft_s": (vision_s or 0.0) + first[0] - t_gen if first else None,
        "prefill_tokens_per_s": tm["n_prompt"] / tm["prompt_s"],
        "decode_s": tm["decode_s"],
        "decode_tokens_per_s": n_gen / tm["decode_s"] if n_gen else None,
        "prompt_tokens": len(ids),
        "image_tiles": tiles,
        "gen_tokens": n_gen,
        "ctx_used": len(ids) + n_gen,
        "vision_runtime": runtime if tiles else None,
        "onnx": vision.encoder.report() if onnx_dir and vision is not None else None,
        "threads": torch.get_num_threads() if on_torch else lm.rt.n_threads,
        **mem.report(),
    }
    if not on_torch:
        out["n_ctx"], out["n_ubatch"] = lm.n_ctx, lm.rt.n_batch
    if vram0 is not None:
        out["vram_used"] = {"before": vram0, "after_load": vram_load, "end": vram_end}
        if vram_end is not None:
            out["peak_vram"] = max(vram_load or 0, vram_end) - vram0
    lm.close()
    return out


def main() -> None:
    req = json.loads(sys.stdin.read())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        result = run(req)
        print(json.dumps({"ok": True, "result": result}))
    except Exception as e:  # reported to the parent as one line; it decides how to surface it
        print(json.dumps({"ok": False, "error": f"{type(e).__name__}: {e}"}))
        sys.exit(1)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root
    main()
