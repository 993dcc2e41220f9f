"""Held-out scoring windows: generated problems (text, and questions about rendered pictures) with their
worked answers, rendered in the model's own template. Scores are taken on the answer tokens only, so an
image-conditioned window measures what the model says *after seeing the image*.

Seeds differ from the ones the tiny replica trains on and from the default calibration set's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from r1v_quant.data.synthdata import image_problems, text_problems
from r1v_quant.model.preprocess import preprocess_for_spec
from r1v_quant.model.prompts import build_prompt, expand_image_tokens
from r1v_quant.model.spec import ModelSpec
from r1v_quant.model.tokenizer import R1VTokenizer
from r1v_quant.util.errors import R1VError

HELDOUT_SEED = 90_001


@dataclass
class Window:
    kind: str  # "text" | "image"
    input_ids: torch.Tensor  # (n,)
    pixel_values: torch.Tensor | None
    score: torch.Tensor  # (n,) bool: positions whose *next* token is an answer token
    images: list[Any] = field(default_factory=list)  # source PIL images (llama.cpp tiles them itself)


def heldout_windows(
    model_dir: Path | str,
    spec: ModelSpec,
    n_text: int = 16,
    n_image: int = 16,
    seed: int = HELDOUT_SEED,
    max_tiles: int | None = None,
) -> list[Window]:
    tok = R1VTokenizer.from_dir(model_dir)
    out: list[Window] = []

    def window(
        kind: str,
        question: str,
        response: str,
        pixels: torch.Tensor | None,
        tiles: list[int],
        images: list[Any] | None = None,
    ) -> Window:
        prompt = build_prompt(spec.flavor, [{"role": "user", "content": question}])
        prompt = expand_image_tokens(prompt, tiles, spec.num_image_token)
        p_ids, r_ids = tok.encode(prompt), tok.encode(response)
        ids = torch.tensor(p_ids + r_ids)
        score = torch.zeros(len(ids), dtype=torch.bool)
        score[len(p_ids) - 1 : len(ids) - 1] = True  # logits at i predict token i+1
        return Window(kind, ids, pixels, score, list(images or []))

    for p in text_problems(n_text, seed):
        out.append(window("text", p.question, p.response(), None, []))
    for p in image_problems(n_image, seed + 1):
        picture = p.render()
        pre = preprocess_for_spec(picture, spec, max_tiles)
        out.append(
            window(
                "image", f"<image>\n{p.question}", p.response(), pre.pixel_values, [pre.num_tiles], [picture]
            )
        )
    return out


@torch.no_grad()
def window_logits(model, windows: list[Window]) -> list[torch.Tensor]:
    """Logits at the scored positions of each window, from an R1VModel (or anything with its forward)."""
    return [model(w.input_ids[None], w.pixel_values)[0][w.score] for w in windows]


def window_targets(windows: list[Window]) -> list[torch.Tensor]:
    return [w.input_ids[1:][w.score[:-1]] for w in windows]


def text_windows(
    ids: list[int], ctx: int, stride: int | None = None, *, bos: int | None = None, max_windows: int = 0
) -> list[Window]:
    """llama-perplexity windows over a tokenized text: `ctx` tokens each, starting every `stride` tokens
    (default `ctx`: disjoint chunks), the first token replaced by `bos` when the model has one; the last
    min(stride, ctx/2 - 1) tokens of each window are scored (with stride = ctx exactly llama-perplexity's
    second half, and with a smaller stride every token is scored once, after at least ctx/2 tokens).
    """
    if ctx < 8:
        raise R1VError(f"--ctx must be at least 8 (got {ctx})")
    stride = ctx if stride is None else stride
    if stride < 1:
        raise R1VError(f"--stride must be at least 1 (got {stride})")
    if len(ids) < ctx:
        raise R1VError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}")
    n_scored = min(stride, ctx // 2 - 1)
    out: list[Window] = []
    for start in range(0, len(ids) - ctx + 1, stride):
        chunk = torch.tensor(ids[start : start + ctx])
        if bos is not None:
            chunk[0] = bos
        score = torch.zeros(ctx, dtype=torch.bool)
        score[ctx - 1 - n_scored : ctx - 1] = True
        out.append(Window("text", chunk, None, score))
        if max_windows and len(out) >= max_windows:
            break
    return out
