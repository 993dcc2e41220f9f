"""Peak memory of one R1V configuration, term by term, for three kinds of runtime.

Every term is bytes = (count from the model's geometry) x (bytes per element). Where a count is not
obvious from the architecture it is derived from the runtime's code or allocator, and the derivation is
written next to it; what is not derived (runtime base memory, CUDA context, libmtmd's per-context memory,
extra floats per llama.cpp ubatch token) is a named constant that says what it represents.
`r1v-quant profile` measures the same quantities, and tests/test_planner.py checks prediction against
measurement on the tiny replica for every artifact kind.

Runtimes:
  torch      r1v-quant's own reference forward (R1VModel; the profiler's torch backend): weights dense at
             the compute dtype (AWQ is dequantized on load), KV cache grown per token, eager activations.
  llama.cpp  GGUF + mmproj through libllama / libmtmd: weights as stored, KV cache for the whole context
             allocated up front, compute buffers reserved for the worst-case batch.
  vllm       vLLM's `vllm serve` with AWQ (Marlin) or 16-bit kernels: weights as stored, and what vLLM's
             start-up profiling reserves (vllm_memory.py). Estimates only: no GPU was available to
             measure it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from r1v_quant.model.artifact import Geometry
from r1v_quant.plan import vllm_memory as vm

GiB = 1024**3
MiB = 1024**2

# Bytes per element of KV-cache types (ggml block types: q8_0 = 34 B / 32, q4_0 = 18 B / 32).
KV_BYTES = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "fp8": 1.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}

# -- the constants that are not derived from the model ------------------------------------------------------
# Resident memory of a process that has imported torch + r1v_quant and run the warm-up, before any weight
# is loaded: the profiler's `baseline_rss` on this machine class (Python 3.11, torch 2.13 CPU), 327-328
# MiB; includes ~80 MB that torch spends once on the first module built on the meta device.
TORCH_CPU_BASE = 330 * MiB
# The same for r1v-quant's llama.cpp runtime (llama-cpp-python + libmtmd; r1v_quant's preprocessing
# imports torch too): `baseline_rss` 241 MiB text-only, 267 MiB after the vision warm-up.
LLAMA_CPP_BASE = 270 * MiB
# GPU memory a CUDA process holds before any tensor: context and loaded kernels. Typical value for recent
# drivers with lazy module loading (0.3 to 0.6 GiB); NOT measured here (no GPU on this machine). vLLM takes
# its memory snapshot after this exists, so it lies outside --gpu-memory-utilization.
CUDA_CONTEXT = 512 * MiB
# Per libmtmd context, beyond its weights and compute buffer: measured 3.4-3.8 MB for ViTs 128-384 wide
# (4-8 layers, F16 and Q8_0), independent of the weights' size; not attributed to a particular buffer.
MTMD_CONTEXT = int(3.6 * MiB)
# f32 values per ubatch token that llama.cpp's compute buffer holds beyond the FFN stage's gate, up,
# product and residual: measured on Qwen2 layouts of several widths, constant across them, unattributed.
LLAMA_FFN_EXTRA_FLOATS = 773
# llama.cpp pads the context to a multiple of 256 cells.
LLAMA_CTX_PAD = 256
# Bytes per element of the type ggml converts activations to before a matmul with weights of each type
# (`vec_dot_type`): the CPU backend's work buffer holds the largest such converted input.
VEC_DOT_BYTES = {
    "F32": 4.0, "F16": 2.0, "BF16": 2.0, "Q8_0": 34 / 32, "Q4_0": 34 / 32, "Q5_0": 34 / 32,
    "Q4_1": 36 / 32, "Q5_1": 36 / 32, "IQ4_NL": 34 / 32, "K": 292 / 256,
}  # fmt: skip


def vec_dot_bytes(ggml_type: str) -> float:
    t = ggml_type.upper()
    return VEC_DOT_BYTES.get(t, VEC_DOT_BYTES["K"] if "_K" in t or t.startswith("IQ") else 2.0)


@dataclass
class Term:
    name: str
    bytes: int
    pool: str  # "gpu" | "cpu"
    phase: str  # "resident" | "load" | "vision" | "prefill" | "decode"
    note: str = ""
    # counted in resident memory (RSS) but page cache the kernel may drop: never decides a verdict
    reclaimable: bool = False


@dataclass
class Workload:
    """What the runtime must hold at once."""

    ctx: int  # tokens in the KV cache at the end (prompt + generated)
    prefill: int  # tokens in one forward pass (torch: the whole prompt; llama.cpp: n_ubatch)
    tiles: int  # image tiles encoded together (torch: all tiles of an image; llama.cpp: 1 per call)
    batch: int = 1  # sequences decoded together (vLLM: --max-num-seqs)
    images: int = 1  # images per prompt (vLLM: --limit-mm-per-prompt)


@dataclass
class Config:
    """One way to run the model: runtime, formats and where each part lives."""

    runtime: str  # "torch" | "llama.cpp" | "vllm"
    llm_format: str
    vision_format: str
    kv_type: str
    llm_device: str = "cpu"  # "cpu" | "gpu"
    vision_device: str = "cpu"
    dtype: str = "fp32"  # torch runtime: compute dtype
    flash_attn: bool = True  # llama.cpp
    weights: dict[str, int] = field(default_factory=dict)  # bytes per component as the runtime holds them
    load_transient: int = 0  # extra bytes while loading (torch: dequantization intermediates)
    repacked: int = 0  # llama.cpp: bytes of weights its CPU backend repacks into a second buffer
    enforce_eager: bool = False  # vLLM: no CUDA graphs (--enforce-eager)
    gpu_layers: int | None = None  # llama.cpp on a GPU: decoder layers offloaded (-ngl); None = all

    def label(self) -> str:
        v = "vision on CPU" if self.vision_device == "cpu" and self.llm_device == "gpu" else ""
        parts = [self.runtime, f"LLM {self.llm_format}", f"vision {self.vision_format}", f"KV {self.kv_type}"]
        if self.gpu_layers is not None:
            parts.append(f"{self.gpu_layers} layers on GPU")
        if self.enforce_eager:
            parts.append("eager (no CUDA graphs)")
        return ", ".join(parts + ([v] if v else []))


def kv_cache_bytes(g: Geometry, tokens: int, kv_type: str, batch: int = 1) -> int:
    """2 (K and V) x layers x KV heads x head dim x bytes per element, per token."""
    return int(g.kv_elements_per_token() * KV_BYTES[kv_type] * tokens * batch)


def pad(n: int, to: int) -> int:
    return -(-n // to) * to


# -- torch: r1v-quant's reference forward -------------------------------------------------------------------
def torch_vision_activations(g: Geometry, tiles: int, cb: int) -> int:
    """Peak live bytes of preprocessing + `extract_feature` over `tiles` tiles at `cb` bytes per element.

    From vision.py: `VisionModel.forward` keeps every layer's output in `states` (select_layer), so at the
    last layer L outputs of T x N x C are alive. Inside a layer, with u = T x N x C: attention holds norm1
    out (1u), the fused qkv (3u), q/k norms (2u, InternViT-6B only), the SDPA output (1u; CPU flash
    attention, no N x N scores, and its output is already laid out for the reshape) and proj (1u); the MLP
    holds its input and norm2 out (2u) plus fc1 and GELU outputs (2 x F/C u). The fp32 pixels (P per tile)
    stay alive meanwhile. Before that, preprocess.py holds the tiles' arrays while `to_tensor` makes four
    float32 temporaries of one tile, then stacks them all (2 T P), next to the resized image and its PIL
    tiles (T x S^2 x 3 bytes each).
    """
    n, c, f = g.positions, g.vit_hidden, g.vit_ffn
    u = tiles * n * c * cb
    attn = (6 + (2 if g.vit_qk_norm else 0)) * u
    mlp = 2 * u + 2 * tiles * n * f * cb
    p = 3 * g.image_size**2 * 4
    preprocess = max((tiles + 4) * p, 2 * tiles * p) + 2 * tiles * 3 * g.image_size**2
    return max(preprocess, g.vit_layers * u + max(attn, mlp) + tiles * p)


def torch_prefill_activations(g: Geometry, tokens: int, cb: int) -> int:
    """Peak live bytes of one `forward_embeds` over `tokens` tokens, KV cache excluded.

    From llm.py, at the last decoder layer: the embeddings passed in (1v), the layer input and the
    attention residual sum (2v) and norm output (1v), with v = tokens x hidden; the MLP then holds
    SiLU(gate), up and their product (3 x tokens x ffn) — Qwen2's attention stage (q, repeated k and v,
    SDPA output, o_proj: 4 x tokens x heads x head dim) is smaller whenever ffn > hidden. RoPE tables
    (cos, sin) are float32: 2 x tokens x head dim x 4.
    """
    v = tokens * g.hidden * cb
    mlp = 4 * v + 3 * tokens * g.ffn * cb
    attn = 4 * v + 4 * tokens * g.heads * g.head_dim * cb
    return max(mlp, attn) + 2 * tokens * g.head_dim * 4


def torch_decode_transient(g: Geometry, ctx: int, cb: int) -> int:
    """One decode step at `ctx` cached tokens, in one layer: `Qwen2Attention` keeps the previous K tensor
    (`prev`) alive after `KVCache.update` has concatenated a new one, and `repeat_interleave` expands K and
    V to all query heads; plus the float32 logits row."""
    old_k = ctx * g.kv_heads * g.head_dim * cb
    repeated = 2 * ctx * g.heads * g.head_dim * cb
    return old_k + repeated + g.vocab * 4


def awq_load_transient(g: Geometry) -> int:
    """`awq_state_dict` dequantizes one linear at a time; for N weights of the largest linear it holds the
    packed int32 (N/2 B), `unpack_columns`' int64 output (8N) and its transposed copy (8N)."""
    largest = max(g.ffn * g.hidden, g.heads * g.head_dim * g.hidden)
    return int(16.5 * largest)


def torch_terms(g: Geometry, cfg: Config, w: Workload) -> list[Term]:
    cb = DTYPE_BYTES[cfg.dtype]
    dev = cfg.llm_device
    terms = [Term(f"weights.{k}", v, dev, "resident", f"dense {cfg.dtype}") for k, v in cfg.weights.items()]
    if cfg.load_transient:
        terms.append(Term("load.transient", cfg.load_transient, "cpu", "load", "largest tensor in flight"))
    if dev == "gpu":
        # weights are loaded on the host first, then moved
        terms.append(Term("load.host_copy", sum(cfg.weights.values()), "cpu", "load", "host copy on load"))
        terms.append(Term("runtime.cuda_context", CUDA_CONTEXT, "gpu", "resident", "estimate"))
    terms.append(Term("runtime.base", TORCH_CPU_BASE, "cpu", "resident", "python + torch, measured"))
    kv_type = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}[cfg.dtype]  # the cache holds k/v as computed
    prompt_kv = kv_cache_bytes(g, w.prefill, kv_type, w.batch)
    full_kv = kv_cache_bytes(g, w.ctx, kv_type, w.batch)
    if w.tiles and g.vit_layers:
        terms.append(
            Term(
                "vision.activations",
                torch_vision_activations(g, w.tiles, cb),
                dev,
                "vision",
                f"{w.tiles} tiles at once",
            )
        )
    terms.append(Term("prefill.kv_cache", prompt_kv, dev, "prefill", f"{w.prefill} prompt tokens"))
    terms.append(
        Term("prefill.activations", torch_prefill_activations(g, w.prefill, cb) * w.batch, dev, "prefill")
    )
    terms.append(Term("decode.kv_cache", full_kv, dev, "decode", f"{w.ctx} tokens"))
    terms.append(Term("decode.transient", torch_decode_transient(g, w.ctx, cb) * w.batch, dev, "decode"))
    return terms


# -- llama.cpp ----------------------------------------------------------------------------------------------
def llama_compute_buffer(g: Geometry, n_ctx: int, n_ubatch: int, flash_attn: bool) -> int:
    """libllama's CPU/GPU compute buffer, reserved at context creation for n_ubatch tokens over n_ctx cells.

    Structure (ggml-alloc reuses memory, so the buffer is the largest stage, not a sum): the KQ mask
    (n_ctx x n_ubatch, f16 with flash attention, else f32) lives through every layer; without flash
    attention the KQ scores (n_ctx x n_ubatch x heads, f32, softmax in place) plus q, k, v and the
    attention output (5 hidden + 2 KV widths per token); the FFN stage holds gate, up and their product
    (3 x ffn) plus the residual (1 x hidden) per token, plus LLAMA_FFN_EXTRA_FLOATS per token. Checked
    against the size llama.cpp logs for Qwen2 layouts with hidden 256/512, ffn 768/2048, 4/8 heads, 2/4
    KV heads, n_ctx 512..8192, n_ubatch 128..512: equal to within 0.1 MiB with flash attention off, and
    within 0.5 MiB with it on (tests/test_planner.py checks it against the live log).
    """
    k, u = pad(n_ctx, LLAMA_CTX_PAD), n_ubatch
    ffn_stage = u * 4 * (3 * g.ffn + g.hidden + LLAMA_FFN_EXTRA_FLOATS)
    if flash_attn:
        return k * u * 2 + ffn_stage
    attn_stage = k * u * 4 * g.heads + u * 4 * (5 * g.hidden + 2 * g.kv_heads * g.head_dim + 5)
    return k * u * 4 + max(attn_stage, ffn_stage)


def llama_work_buffer(g: Geometry, n_ubatch: int, ggml_type: str) -> int:
    """CPU backend work buffer: the FFN down-projection's input (n_ubatch x ffn) converted to the weights'
    vec_dot type. Only the CPU backend needs it."""
    return int(n_ubatch * g.ffn * vec_dot_bytes(ggml_type))


def clip_work_buffer(g: Geometry, ggml_type: str) -> int:
    """The same for libmtmd's ViT: fc2's input (positions x ViT ffn) in the weights' vec_dot type."""
    return int(g.positions * g.vit_ffn * vec_dot_bytes(ggml_type))


def clip_compute_buffer(g: Geometry) -> int:
    """libmtmd's (clip) compute buffer for one 448 tile with flash attention (its CPU default): per patch
    position the larger of the MLP stage (ffn + 3 hidden) and the attention stage (5 hidden), in f32.
    Matches the size libmtmd logs for ViT widths 128..384 and ffn 512..1024 to within 0.01 MiB."""
    return g.positions * 4 * max(g.vit_ffn + 3 * g.vit_hidden, 5 * g.vit_hidden)


def llama_terms(g: Geometry, cfg: Config, w: Workload) -> list[Term]:
    """libllama + libmtmd. With `cfg.gpu_layers` = L < layers (`-ngl L`, partial offload) the GPU holds L
    decoder layers' weights and KV cells, the host the rest and the output matrix (llama.cpp offloads
    the output layer only with -ngl > layers); each backend reserves a compute buffer for its part of the
    graph, counted at the full size on both (an upper bound: llama.cpp sizes each for its worst split)."""
    dev_llm, dev_vis = cfg.llm_device, cfg.vision_device
    partial = dev_llm == "gpu" and cfg.gpu_layers is not None and cfg.gpu_layers < g.llm_layers
    share = cfg.gpu_layers / g.llm_layers if partial else 1.0  # type: ignore[operator]
    terms = []
    for k, v in cfg.weights.items():
        pool = dev_vis if k in ("vision", "projector") else dev_llm
        # llama.cpp keeps the token embedding table on the host even when every layer is offloaded
        if k == "embeddings" and dev_llm == "gpu":
            emb = v // 2
            terms.append(Term("weights.token_embd", emb, "cpu", "resident", "always on the host"))
            terms.append(
                Term("weights.output", v - emb, "cpu" if partial else "gpu", "resident", cfg.llm_format)
            )
            continue
        fmt = cfg.vision_format if k in ("vision", "projector") else cfg.llm_format
        if k == "decoder" and partial:
            on_gpu = int(v * share)
            terms.append(
                Term("weights.decoder", on_gpu, "gpu", "resident", f"{fmt}, {cfg.gpu_layers} layers")
            )
            terms.append(
                Term("weights.decoder_host", v - on_gpu, "cpu", "resident", f"{fmt}, the other layers")
            )
            continue
        terms.append(Term(f"weights.{k}", v, pool, "resident", fmt))
    n_ctx = pad(w.ctx, LLAMA_CTX_PAD)
    kv = kv_cache_bytes(g, n_ctx, cfg.kv_type, w.batch)
    kv_note = f"{n_ctx} cells, {cfg.kv_type}, allocated up front"
    buf = llama_compute_buffer(g, n_ctx, w.prefill, cfg.flash_attn)
    buf_note = f"n_ubatch {w.prefill}, flash attention {'on' if cfg.flash_attn else 'off'}"
    if partial:
        kv_gpu = int(kv * share)
        terms.append(Term("kv_cache", kv_gpu, "gpu", "resident", f"{kv_note}, {cfg.gpu_layers} layers"))
        terms.append(Term("kv_cache_host", kv - kv_gpu, "cpu", "resident", f"{kv_note}, the other layers"))
        terms.append(Term("compute_buffer", buf, "gpu", "resident", buf_note))
        terms.append(Term("compute_buffer_host", buf, "cpu", "resident", f"{buf_note}, the host's layers"))
    else:
        terms.append(Term("kv_cache", kv, dev_llm, "resident", kv_note))
        terms.append(Term("compute_buffer", buf, dev_llm, "resident", buf_note))
    if dev_llm == "cpu" or partial:
        terms.append(
            Term(
                "work_buffer",
                llama_work_buffer(g, w.prefill, cfg.llm_format),
                "cpu",
                "resident",
                "FFN input in the vec_dot type",
            )
        )
    terms.append(Term("output_buffer", g.vocab * 4 * w.batch, "cpu", "resident", "last-token logits"))
    if g.vit_layers and cfg.vision_format != "none":
        terms.append(Term("vision.context", MTMD_CONTEXT, dev_vis, "resident", "libmtmd, measured"))
        terms.append(Term("vision.compute_buffer", clip_compute_buffer(g), dev_vis, "resident", "one tile"))
        if dev_vis == "cpu":
            terms.append(
                Term(
                    "vision.work_buffer",
                    clip_work_buffer(g, cfg.vision_format),
                    "cpu",
                    "resident",
                    "fc2 input in the vec_dot type",
                )
            )
        if w.tiles:
            rows = w.tiles * g.tokens_per_tile
            terms.append(
                Term("vision.embeddings", rows * g.hidden * 4, "cpu", "prefill", f"{w.tiles} tiles, f32")
            )
            # llama_batch_init(n, n_embd): the embedding rows of one batch, copied for llama_decode
            batch = min(rows, w.prefill) * g.hidden * 4
            terms.append(Term("vision.embedding_batch", batch, "cpu", "prefill", "one decode batch"))
    if cfg.repacked and dev_llm == "cpu":
        terms.append(
            Term(
                "weights.repacked_file_pages",
                cfg.repacked,
                "cpu",
                "resident",
                "file pages read for repacking stay mapped: in RSS, but reclaimable",
                reclaimable=True,
            )
        )
    terms.append(Term("runtime.base", LLAMA_CPP_BASE, "cpu", "resident", "python + libllama, measured"))
    if "gpu" in (dev_llm, dev_vis):
        terms.append(Term("runtime.cuda_context", CUDA_CONTEXT, "gpu", "resident", "estimate"))
    return terms


# -- vLLM ---------------------------------------------------------------------------------------------------
def vllm_terms(g: Geometry, cfg: Config, w: Workload) -> list[Term]:
    """What `vllm serve` holds on the GPU, as its start-up profiling reserves it (vllm_memory.py).

    Resident: the CUDA context (outside --gpu-memory-utilization), the weights as stored (Marlin repacks
    AWQ in place: same bytes), non-torch workspaces, CUDA graphs, vLLM's own 150 MiB allowance and the
    KV cache (whole 16-token blocks for `batch` requests of `ctx` tokens). The profiling run's peak is the
    largest of its three stages: the ViT over the largest image batch, one decoder forward over
    `w.prefill` (= --max-num-batched-tokens) tokens with the image embeddings still cached, and the
    sampler warm-up over `batch` rows of logits with the forward's hidden states alive."""
    fmt = {"decoder": cfg.llm_format, "vision": cfg.vision_format}  # mlp1, embeddings, norms stay 16-bit
    terms = [Term(f"weights.{k}", v, "gpu", "resident", fmt.get(k, "16-bit")) for k, v in cfg.weights.items()]
    terms.append(
        Term("runtime.cuda_context", CUDA_CONTEXT, "gpu", "resident", "estimate; outside the fraction")
    )
    terms.append(Term("runtime.non_torch", vm.NON_TORCH_TP1, "gpu", "resident", "workspaces, TP=1"))
    graphs = vm.cuda_graph_bytes(w.batch, w.prefill, cfg.enforce_eager)
    if graphs:
        terms.append(Term("cuda_graphs", graphs, "gpu", "resident", f"capture up to {min(2 * w.batch, 512)}"))
    terms.append(Term("profile.margin", vm.PROFILE_MARGIN, "gpu", "resident", "vLLM's own allowance"))
    ctx = vm.kv_tokens(w.ctx)
    terms.append(
        Term("kv_cache", kv_cache_bytes(g, ctx, cfg.kv_type, w.batch), "gpu", "resident",
             f"{w.batch} x {ctx} tokens ({vm.BLOCK_SIZE}-token blocks), {cfg.kv_type}")
    )  # fmt: skip
    if g.vit_layers and w.images and w.tiles:
        n = vm.images_per_encoder_batch(
            g, w.tiles, images_per_prompt=w.images, max_num_seqs=w.batch, max_num_batched_tokens=w.prefill,
            max_model_len=w.ctx,
        )  # fmt: skip
        tiles = n * w.tiles
        terms.append(
            Term("vision.activations", vm.vision_profile_bytes(g, tiles), "gpu", "vision",
                 f"{n} image(s) x {w.tiles} tiles")
        )  # fmt: skip
        terms.append(Term("prefill.encoder_cache", vm.encoder_output_bytes(g, tiles), "gpu", "prefill"))
    terms.append(
        Term("prefill.activations", vm.llm_profile_bytes(g, w.prefill), "gpu", "prefill",
             f"{w.prefill} batched tokens")
    )  # fmt: skip
    rows = min(w.batch, w.prefill)
    terms.append(Term("decode.sampler", vm.sampler_bytes(g, rows), "gpu", "decode", f"{rows} rows of logits"))
    terms.append(Term("decode.hidden_states", w.prefill * g.hidden * 2, "gpu", "decode", "dummy run output"))
    return terms


def vllm_utilization(terms: list[Term], capacity: int) -> float:
    """--gpu-memory-utilization: what vLLM must reserve (everything but the CUDA context) over the TOTAL
    GPU memory, rounded up to 0.01 so the KV cache gets at least what was planned."""
    peak = peaks([t for t in terms if t.name != "runtime.cuda_context"]).get("gpu", 0)
    return -(-peak * 100 // capacity) / 100


RUNTIMES = {"torch": torch_terms, "llama.cpp": llama_terms, "vllm": vllm_terms}


def peaks(terms: list[Term], *, reclaimable: bool = False) -> dict[str, int]:
    """Peak per pool: everything resident plus the largest phase (phases never overlap in time).
    `reclaimable=True` includes page cache that RSS shows but the kernel can drop (what `ps` reports);
    the default is what the device must really hold."""
    out: dict[str, int] = {}
    for pool in sorted({t.pool for t in terms}):
        mine = [t for t in terms if t.pool == pool and (reclaimable or not t.reclaimable)]
        resident = sum(t.bytes for t in mine if t.phase == "resident")
        phases: dict[str, int] = {}
        for t in mine:
            if t.phase != "resident":
                phases[t.phase] = phases.get(t.phase, 0) + t.bytes
        out[pool] = resident + max(phases.values(), default=0)
    return out


def model_terms(g: Geometry, cfg: Config, w: Workload) -> list[Term]:
    return RUNTIMES[cfg.runtime](g, cfg, w)
