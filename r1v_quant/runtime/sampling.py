"""Token sampling shared by every engine (llama.cpp, torch one-at-a-time, torch batched), so that they stop,
stream, count tokens and draw samples alike: greedy at temperature 0, else temperature and top-p after a
repetition penalty, each answer with its own seeded generator."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RuntimeResult:
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # False: max_new_tokens cut the answer off
    timings: dict[str, float] = field(default_factory=dict)


def sample_token(
    logits: np.ndarray,
    temperature: float,
    top_p: float,
    rng: np.random.Generator,
    *,
    penalty: float = 1.0,
    seen: np.ndarray | None = None,
) -> int:
    """One token: repetition penalty on the `seen` ids (a positive logit divided by `penalty`, a negative
    one multiplied, as transformers and vLLM do), then temperature and top-p; greedy at temperature 0."""
    if penalty != 1.0 and seen is not None:
        logits = logits.copy()
        hit = logits[seen]
        logits[seen] = np.where(hit > 0, hit / penalty, hit * penalty)
    if temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(-p)
        keep = order[: int(np.searchsorted(np.cumsum(p[order]), top_p)) + 1]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return int(rng.choice(len(p), p=p))


def sample_tokens(
    logits: np.ndarray,
    feed: Callable[[int], np.ndarray | None],
    *,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
    stop_ids: Collection[int],
    on_token: Callable[[int], Any] | None,
    repetition_penalty: float = 1.0,
    prompt_ids: Sequence[int] = (),
) -> RuntimeResult:
    """Sample up to `max_new_tokens` from the prompt's last-position `logits` on.

    `feed(token)` decodes an accepted token and returns the next logits, or None when the context is full
    (the result is then not `stopped`). A stop token ends the answer and is never fed. The llama.cpp and
    torch engines share this loop so that they stop, stream and count tokens alike. The repetition penalty
    covers the prompt's ids and every generated one.
    """
    rng = np.random.default_rng(seed)
    result = RuntimeResult()
    seen = None
    if repetition_penalty != 1.0:
        seen = np.zeros(len(logits), dtype=bool)
        ids = np.asarray(prompt_ids, dtype=np.int64)
        seen[ids[(ids >= 0) & (ids < len(seen))]] = True
    for _ in range(max_new_tokens):
        nxt = sample_token(logits, temperature, top_p, rng, penalty=repetition_penalty, seen=seen)
        if nxt in stop_ids:
            result.stopped = True
            break
        result.tokens.append(nxt)
        if seen is not None:
            seen[nxt] = True
        if on_token is not None:
            on_token(nxt)
        next_logits = feed(nxt)
        if next_logits is None:
            break  # context full
        logits = next_logits
    return result
