"""What vLLM reserves on the GPU for Skywork-R1V, from vLLM's own accounting (docs/profile-and-plan.md).

vLLM (V1 engine, `vllm serve`) sizes its KV cache at start-up, in `Worker.determine_available_memory`:

    requested = --gpu-memory-utilization x TOTAL GPU memory
    KV cache  = requested - (weights + peak of one profiling run + non-torch memory [+ CUDA graphs])

* The CUDA context is NOT inside `requested`: the worker takes its memory snapshot after CUDA (and NCCL)
  are initialised and refuses to start when free memory < requested. So context + requested <= total.
* The profiling run (`GPUModelRunner.profile_run`) encodes the largest multimodal batch the encoder budget
  allows, keeps its outputs in the encoder cache, then runs one forward pass over `max_num_batched_tokens`
  dummy tokens and one sampler pass over `max_num_seqs` rows; torch's peak over all of it is reserved.
* CUDA graphs: captured after the KV cache is allocated. Since vLLM 0.21 their estimated size is counted
  inside `requested` (`VLLM_MEMORY_PROFILER_ESTIMATE_CUDAGRAPHS=1`, the default); `--enforce-eager`
  captures none. The planner follows the 0.21+ rule (older releases put graphs outside the fraction).
* The KV cache is paged in blocks of 16 tokens; one request of `--max-model-len` tokens must fit in it.

The functions here count bytes from the model's dimensions; the constants below are what cannot be
counted from the model, each with where its value comes from. Nothing here was measured on a GPU by
r1v-quant (this project's machines have none): the counts follow vLLM's code, the constants are values
vLLM itself logs on other models.
"""

from __future__ import annotations

from r1v_quant.model.artifact import Geometry

GiB = 1024**3
MiB = 1024**2

# KV-cache page: tokens per block. `CacheConfig.block_size` defaults to 16 on CUDA with the FlashAttention
# and FlashInfer backends; the cache is allocated in whole blocks.
BLOCK_SIZE = 16
# Memory vLLM's own start-up suggestion leaves free: "empirically observed that the memory profiling may
# slightly underestimate the memory consumption. So leave a small buffer (=150MiB) to avoid OOM"
# (gpu_worker.py, the `--kv-cache-memory` hint). Kept inside the fraction as well.
PROFILE_MARGIN = 150 * MiB
# GPU memory allocated outside torch during the profiling run at tensor-parallel size 1 (cuBLAS/cuBLASLt
# and attention-library workspaces): vLLM's debug log reports this "non-torch forward increase" as
# 0.13-0.14 GiB for 1-GPU runs of 0.6B-32B models; rounded up. (At TP > 1 NCCL adds ~0.4 GiB.)
NON_TORCH_TP1 = 160 * MiB
# Estimated CUDA-graph memory by the largest captured batch size (`max_cudagraph_capture_size`, by default
# min(2 x --max-num-seqs, 512)): vLLM logs "Estimated CUDA graph memory" of 0.30 GiB for 2 piecewise + 2
# full graphs up to 8 tokens, 0.61 GiB for 9 + 5 graphs up to 64 and 1.58-1.62 GiB for the default 51 + 35
# graphs up to 512 (other large models); rounded up because the graphs' pool depends on the model.
CUDA_GRAPHS_BY_CAPTURE_SIZE = ((8, int(0.5 * GiB)), (64, 1 * GiB), (512, 2 * GiB))
# Sampler warm-up (`_dummy_sampler_run`, top-k/top-p exercised): bytes per logit alive at its peak:
# the model-dtype logits (2), their float32 copy (4), the sorted values (4) and int64 sort indices (8),
# the softmax probabilities that cumsum overwrites in place (4), the top-p mask (1).
SAMPLER_BYTES_PER_LOGIT = 2 + 4 + 4 + 8 + 4 + 1
# The scheduler's token budget per step that the planner writes into the command (`--max-num-batched-tokens`;
# vLLM's own default is 2048 on GPUs under 70 GiB and 8192 above, so the plan pins it).
MAX_NUM_BATCHED_TOKENS = 2048


def cuda_graph_bytes(max_num_seqs: int, max_num_batched_tokens: int, enforce_eager: bool) -> int:
    """Estimated CUDA-graph memory for the default capture list (none with --enforce-eager)."""
    if enforce_eager:
        return 0
    largest = min(2 * max_num_seqs, 512, max_num_batched_tokens)
    return next(b for size, b in CUDA_GRAPHS_BY_CAPTURE_SIZE if largest <= size)


def max_tokens_per_image(g: Geometry, tiles: int) -> int:
    """Placeholder tokens of the largest image (what vLLM profiles with): tiles x tokens per tile."""
    return tiles * g.tokens_per_tile


def images_per_encoder_batch(
    g: Geometry, tiles: int, *, images_per_prompt: int, max_num_seqs: int, max_num_batched_tokens: int,
    max_model_len: int,
) -> int:  # fmt: skip
    """`MultiModalBudget._get_max_items`: images encoded together in the profiling run.

    The encoder budget is max(max_num_batched_tokens, tokens of one image) (`compute_mm_encoder_budget`;
    the encoder cache gets the same); the decoder side allows max_num_seqs x images per prompt."""
    if images_per_prompt <= 0:
        return 0
    per_image = max_tokens_per_image(g, tiles)
    budget = max(max_num_batched_tokens, per_image)
    per_prompt = max(1, min(images_per_prompt, max_model_len // per_image))
    return max(1, min(budget // per_image, max_num_seqs * per_prompt))


def vision_profile_bytes(g: Geometry, tiles: int, cb: int = 2) -> int:
    """Peak of vLLM's InternViT forward over `tiles` tiles at `cb` bytes per activation.

    vLLM's `InternVisionEncoderLayer` computes x + attn(norm1(x)) * ls1, then x + mlp(norm2(x)) * ls2, one
    layer at a time (no kept states), with a flash/memory-efficient attention kernel (no N x N scores).
    With u = tiles x positions x ViT width: the attention stage holds x, norm1(x), qkv (3u), the q/k norms
    (2u, InternViT-6B) and the attention output: 8u; the MLP stage holds x, norm2(x), fc1 and GELU outputs
    (2 x ffn/width u). Pixels (bf16 tiles) stay alive. Quantized linears (Marlin) dequantize inside the
    kernel: no weight-sized temporaries.
    """
    u = tiles * g.positions * g.vit_hidden * cb
    attn = (6 + (2 if g.vit_qk_norm else 0)) * u
    mlp = 2 * u + 2 * tiles * g.positions * g.vit_ffn * cb
    pixels = tiles * 3 * g.image_size**2 * cb
    return max(attn, mlp) + pixels


def encoder_output_bytes(g: Geometry, tiles: int, cb: int = 2) -> int:
    """Image embeddings kept in the encoder cache: tiles x tokens per tile x LLM width."""
    return tiles * g.tokens_per_tile * g.hidden * cb


def llm_profile_bytes(g: Geometry, tokens: int, cb: int = 2) -> int:
    """One decoder forward over `tokens` tokens (vLLM's dummy run at max_num_batched_tokens): at a
    layer's MLP the residual, input, norm output and output (4 hidden) plus the merged gate_up projection
    (2 ffn) and SiluAndMul's output (1 ffn) per token; attention is paged, so no scores are kept."""
    return tokens * cb * (4 * g.hidden + 3 * g.ffn)


def sampler_bytes(g: Geometry, rows: int) -> int:
    """The sampler warm-up over `rows` = min(max_num_seqs, max_num_batched_tokens) rows of logits."""
    return rows * g.vocab * SAMPLER_BYTES_PER_LOGIT


def kv_tokens(ctx: int) -> int:
    """Tokens one request of `ctx` tokens occupies: whole blocks of BLOCK_SIZE."""
    return -(-ctx // BLOCK_SIZE) * BLOCK_SIZE
