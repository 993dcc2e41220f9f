"""Render a calibration sample exactly as the model sees it: chat template, image tiles, token ids, masks.

Each sample goes through the flavour's own template (`build_prompt`, no generation prompt, so a final
`<think>…</think>answer` turn is kept verbatim) and the real preprocessing; `<image>` expands to
`<img><IMG_CONTEXT>×256·tiles</img>`. Every token gets a modality: vision (the <IMG_CONTEXT> positions),
prompt (all other text up to the final assistant turn) or response (the final assistant turn).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from r1v_quant.calibration.dataset import CalibrationSet, Sample
from r1v_quant.model.preprocess import PreprocessedImage, preprocess_for_spec
from r1v_quant.model.prompts import IMAGE_PLACEHOLDER, build_prompt, expand_image_tokens
from r1v_quant.model.spec import ModelSpec
from r1v_quant.model.tokenizer import R1VTokenizer
from r1v_quant.util.errors import R1VError

VISION, PROMPT, RESPONSE = 0, 1, 2
MODALITIES = ("vision", "prompt", "response")  # index = code in RenderedSample.modality


class CalibrationWarning(UserWarning):
    """Something was changed to make a sample fit (e.g. truncated to --seq-len)."""


@dataclass(frozen=True)
class RenderedSample:
    id: str
    input_ids: torch.Tensor  # (n,) int64
    modality: torch.Tensor  # (n,) uint8, codes VISION / PROMPT / RESPONSE
    image_keys: tuple[str, ...]  # images kept (truncation can drop trailing ones), in token order
    tiles: tuple[int, ...]  # tiles per kept image
    truncated: bool
    original_length: int  # tokens before truncation

    @property
    def length(self) -> int:
        return int(self.input_ids.numel())

    def count(self, code: int) -> int:
        return int((self.modality == code).sum())


class Renderer:
    """Tokenizer + template + tiling settings of one checkpoint, applied to samples of one set."""

    def __init__(
        self, model_dir: Path | str, spec: ModelSpec, seq_len: int, tokenizer: R1VTokenizer | None = None
    ):
        if seq_len < 16:
            raise R1VError(f"--seq-len {seq_len} is too short (need at least 16 tokens)")
        self.spec = spec
        self.seq_len = seq_len
        self.tok = tokenizer or R1VTokenizer.from_dir(model_dir)
        self.ctx_id = spec.tokens.img_context

    def count_tokens(self, text: str) -> int:
        return len(self.tok.encode(text))

    def _preprocess(self, cset: CalibrationSet, key: str) -> PreprocessedImage:
        s = self.spec
        return preprocess_for_spec(cset.image_bytes(key), s)

    def pixels(self, rendered: RenderedSample, cset: CalibrationSet) -> torch.Tensor | None:
        """(tiles, 3, S, S) float32 for the kept images, or None for a text-only sample."""
        if not rendered.image_keys:
            return None
        try:
            return torch.cat([self._preprocess(cset, k).pixel_values for k in rendered.image_keys])
        except R1VError as e:
            raise R1VError(f"sample {rendered.id!r}: {e}") from None

    def render(self, sample: Sample, cset: CalibrationSet) -> RenderedSample:
        try:
            return self._render(sample, cset)
        except R1VError as e:
            msg = str(e)
            raise R1VError(msg if msg.startswith("sample ") else f"sample {sample.id!r}: {msg}") from None

    def _render(self, sample: Sample, cset: CalibrationSet) -> RenderedSample:
        flavor = self.spec.flavor
        msgs = []
        for t in sample.turns:
            content = t.content
            if t.images and IMAGE_PLACEHOLDER not in content:
                content = f"{IMAGE_PLACEHOLDER}\n" * len(t.images) + content  # as build_inputs does
            msgs.append({"role": t.role, "content": content})
        full = build_prompt(flavor, msgs, add_generation_prompt=False)
        prefix = None
        if sample.has_response:
            # Everything the model would be given before generating: the response starts right after it.
            prefix = build_prompt(flavor, msgs[:-1], add_generation_prompt=True, think=False)
            if not full.startswith(prefix):
                raise R1VError(f"template {flavor!r} renders the history differently with a final answer")
        keys = sample.images
        tiles = [self._preprocess(cset, k).num_tiles for k in keys]
        if keys and self.ctx_id is None:
            raise R1VError("the tokenizer has no <IMG_CONTEXT> token, so images cannot be placed")
        nit = self.spec.num_image_token
        text = expand_image_tokens(full, tiles, nit)
        enc = self.tok.backend.encode(text, add_special_tokens=False)
        ids = torch.tensor(enc.ids, dtype=torch.int64)
        modality = torch.full((len(enc.ids),), PROMPT, dtype=torch.uint8)
        if prefix is not None:
            # Response = tokens starting at or after the first character of the final assistant content.
            start = len(expand_image_tokens(prefix, tiles, nit))
            starts = torch.tensor([o[0] for o in enc.offsets], dtype=torch.int64)
            modality[starts >= start] = RESPONSE
        runs: list[tuple[int, int]] = []
        if self.ctx_id is not None:
            is_ctx = ids == self.ctx_id
            modality[is_ctx] = VISION
            runs = _runs(is_ctx)
        if [b - a for a, b in runs] != [t * nit for t in tiles]:
            raise R1VError(
                f"<IMG_CONTEXT> runs {[b - a for a, b in runs]} do not match the images' tiles {tiles} "
                "(does the text itself contain <IMG_CONTEXT>?)"
            )
        n = len(ids)
        if n <= self.seq_len:
            return RenderedSample(sample.id, ids, modality, tuple(keys), tuple(tiles), False, n)
        # Too long: cut at seq_len, but never through an image (its features must all be placed).
        cut, kept = self.seq_len, len(keys)
        for k, (a, b) in enumerate(runs):
            if b + 1 > cut:  # image k (with its </img>) does not fit: cut before its <img>
                cut, kept = a - 1, k
                break
        if cut < 1:
            raise R1VError(f"{n} tokens and the first image alone does not fit in --seq-len {self.seq_len}")
        dropped = len(keys) - kept
        warnings.warn(
            f"sample {sample.id!r}: {n} tokens > --seq-len {self.seq_len}, truncated to {cut}"
            + (f" ({dropped} image(s) dropped)" if dropped else ""),
            CalibrationWarning,
            stacklevel=3,
        )
        return RenderedSample(
            sample.id,
            ids[:cut].clone(),
            modality[:cut].clone(),
            tuple(keys[:kept]),
            tuple(tiles[:kept]),
            True,
            n,
        )


def _runs(mask: torch.Tensor) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1-D bool tensor."""
    pos = torch.nonzero(mask).flatten().tolist()
    runs: list[tuple[int, int]] = []
    for p in pos:
        if runs and runs[-1][1] == p:
            runs[-1] = (runs[-1][0], p + 1)
        else:
            runs.append((p, p + 1))
    return runs
