"""Several prompts decoded at once by the torch reference model, with a pre-allocated KV cache.

`eval bench` runs thousands of long answers; one sequence at a time leaves a GPU (and, less so, a CPU's
matrix units) mostly idle. Here the prompts of a batch are left-padded to one length, prefilled together
and then decoded one token per step for every unfinished row:

- the cache holds keys/values for the whole batch in tensors allocated in chunks (grown by doubling, not
  concatenated every step), so a step writes one column;
- each row has its own positions (padding does not shift RoPE) and a mask that hides its padding;
- each row samples with its own seeded generator through `r1v_quant.runtime.sampling.sample_tokens`' rules
  (`sample_token`), so a batched answer equals the answer the row would get alone.

The layer arithmetic is the reference decoder's (`r1v_quant.model.llm`), applied to a whole batch with
masks; a
test checks the logits against the one-sequence forward.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from r1v_quant.model.llm import apply_rope, rope_cos_sin
from r1v_quant.runtime.sampling import RuntimeResult, sample_token

CHUNK = 512  # cache columns added at a time (and at least what the prompts need)


@dataclass(frozen=True)
class Row:
    embeds: torch.Tensor  # (n, hidden): the prompt's embeddings (images written in)
    prompt_ids: Sequence[int]  # for the repetition penalty
    max_new_tokens: int
    seed: int


class _Cache:
    def __init__(self, layers: int, b: int, kv: int, d: int, cols: int, like: torch.Tensor):
        self.k = [like.new_zeros(b, kv, cols, d) for _ in range(layers)]
        self.v = [like.new_zeros(b, kv, cols, d) for _ in range(layers)]
        self.valid = torch.zeros(b, cols, dtype=torch.bool, device=like.device)

    @property
    def cols(self) -> int:
        return self.valid.shape[1]

    def ensure(self, cols: int) -> None:
        if cols <= self.cols:
            return
        new = max(cols, 2 * self.cols)
        self.k = [self._grow4(t, new) for t in self.k]
        self.v = [self._grow4(t, new) for t in self.v]
        valid = self.valid.new_zeros(self.valid.shape[0], new)
        valid[:, : self.valid.shape[1]] = self.valid
        self.valid = valid

    @staticmethod
    def _grow4(t: torch.Tensor, new: int) -> torch.Tensor:
        out = t.new_zeros(t.shape[0], t.shape[1], new, t.shape[3])
        out[:, :, : t.shape[2]] = t
        return out


def _forward(
    lm: torch.nn.Module,
    x: torch.Tensor,
    positions: torch.Tensor,
    cache: _Cache,
    start: int,
    query_ok: torch.Tensor,
) -> torch.Tensor:
    """Decoder over x (b, n, h) written at cache columns start..start+n; returns the final hidden states.

    A query sees the valid cache columns up to its own; a padded query sees itself only (its output is
    never used, and a row with no visible key would make the softmax NaN)."""
    spec = lm.spec
    b, n, _ = x.shape
    H, KV, d = spec.num_heads, spec.num_kv_heads, spec.head_dim
    cos, sin = rope_cos_sin(spec, positions.reshape(-1))
    cos = cos.reshape(b, 1, n, d).to(x.dtype)
    sin = sin.reshape(b, 1, n, d).to(x.dtype)
    end = start + n
    cols = torch.arange(end, device=x.device)
    causal = cols[None, :] <= (start + torch.arange(n, device=x.device))[:, None]  # (n, end)
    mask = causal[None] & cache.valid[:, None, :end]  # (b, n, end)
    own = cols[None, :] == (start + torch.arange(n, device=x.device))[:, None]
    mask = mask | (own[None] & ~query_ok[:, :, None])
    mask = mask[:, None]  # (b, 1, n, end)
    rep = H // KV
    for i, layer in enumerate(lm.model.layers):
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q = attn.q_proj(h).view(b, n, H, d).transpose(1, 2)
        k = attn.k_proj(h).view(b, n, KV, d).transpose(1, 2)
        v = attn.v_proj(h).view(b, n, KV, d).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache.k[i][:, :, start:end] = k
        cache.v[i][:, :, start:end] = v
        keys = cache.k[i][:, :, :end].repeat_interleave(rep, dim=1)
        vals = cache.v[i][:, :, :end].repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask)
        x = x + attn.o_proj(out.transpose(1, 2).reshape(b, n, -1))
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    return lm.model.norm(x)


@torch.inference_mode()
def generate_rows(
    lm: torch.nn.Module,
    rows: Sequence[Row],
    *,
    temperature: float,
    top_p: float,
    repetition_penalty: float,
    stop_ids: Collection[int],
    on_done: Callable[[int, RuntimeResult], None] | None = None,
) -> list[RuntimeResult]:
    """Decode every row of the batch (at most its own `max_new_tokens`); `on_done(i, result)` as each ends.

    `lm` is the model's `language_model` (Qwen2ForCausalLM) on the device the embeddings are on."""
    b = len(rows)
    weight = lm.lm_head.weight
    device, dtype = weight.device, weight.dtype
    lens = [r.embeds.shape[0] for r in rows]
    L = max(lens)
    x = torch.zeros(b, L, rows[0].embeds.shape[1], dtype=dtype, device=device)
    ok = torch.zeros(b, L, dtype=torch.bool, device=device)
    for j, r in enumerate(rows):
        x[j, L - lens[j] :] = r.embeds.to(device=device, dtype=dtype)
        ok[j, L - lens[j] :] = True
    positions = (ok.long().cumsum(1) - 1).clamp(min=0)
    spec = lm.spec
    budget = max(r.max_new_tokens for r in rows)
    cache = _Cache(spec.num_layers, b, spec.num_kv_heads, spec.head_dim, L + min(budget, CHUNK), x)
    cache.valid[:, :L] = ok
    hidden = _forward(lm, x, positions, cache, 0, ok)
    logits = lm.logits(hidden[:, -1]).float().cpu().numpy()

    rngs = [np.random.default_rng(r.seed) for r in rows]
    seen: list[np.ndarray | None] = [None] * b
    if repetition_penalty != 1.0:
        for j, r in enumerate(rows):
            s = np.zeros(logits.shape[1], dtype=bool)
            ids = np.asarray(r.prompt_ids, dtype=np.int64)
            s[ids[(ids >= 0) & (ids < len(s))]] = True
            seen[j] = s
    results = [RuntimeResult() for _ in rows]
    live = [r.max_new_tokens > 0 for r in rows]
    for j in range(b):
        if not live[j] and on_done:
            on_done(j, results[j])
    last = torch.zeros(b, dtype=torch.long)
    pos = positions[:, -1].clone()
    col = L
    while any(live):
        for j in range(b):
            if not live[j]:
                continue
            tok = sample_token(
                logits[j], temperature, top_p, rngs[j], penalty=repetition_penalty, seen=seen[j]
            )
            if tok in stop_ids:
                results[j].stopped = True
                live[j] = False
            else:
                results[j].tokens.append(tok)
                if seen[j] is not None:
                    seen[j][tok] = True  # type: ignore[index]
                last[j] = tok
                live[j] = len(results[j].tokens) < rows[j].max_new_tokens
            if not live[j] and on_done:
                on_done(j, results[j])
        if not any(live):
            break
        cache.ensure(col + 1)
        active = torch.tensor(live, device=device)
        cache.valid[:, col] = active
        pos = pos + 1
        emb = lm.model.embed_tokens(last.to(device))[:, None]
        hidden = _forward(lm, emb, pos[:, None], cache, col, active[:, None])
        logits = lm.logits(hidden[:, -1]).float().cpu().numpy()
        col += 1
    return results
