"""The one runtime protocol every command runs a model through.

A model runs as two engines: a `LanguageModel` (tokenize, decode, logits at chosen positions, generate
with streaming) and a `VisionEncoder` (one image -> the rows that fill its `<IMG_CONTEXT>` positions).
`r1v_quant.runtime.engines` implements them on torch (a 16-bit or AWQ checkpoint), llama.cpp (a GGUF and
its mmproj through libmtmd) and ONNX Runtime (an `r1v-quant onnx` vision export); `chat`, `eval` /
`check`, `profile`, `generate` and the demo all use them, so an answer, a log-probability or a timing means
the same thing whichever command produced it.

Any encoder whose width matches the language model's pairs with it (image rows only fill `<IMG_CONTEXT>`
positions): the torch LM with the ONNX tower, the GGUF with the torch tower, and so on.

`prompt_inputs` is the one place a conversation becomes token ids: the flavour's template
(`r1v_quant.model.prompts.build_prompt`), each `<image>` expanded to its tiles' `<IMG_CONTEXT>` run exactly
as `r1v_quant.model.reference.build_inputs` does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from r1v_quant.model.preprocess import ImageSource
from r1v_quant.model.prompts import IMAGE_PLACEHOLDER, build_prompt, expand_image_tokens, place_images
from r1v_quant.runtime.sampling import RuntimeResult
from r1v_quant.util.errors import R1VError

OnToken = Callable[[int], Any]


@dataclass
class ImageEmbeds:
    rows: np.ndarray  # (tiles * tokens_per_tile, hidden) float32, the <IMG_CONTEXT> rows in order
    tiles: int

    @property
    def tokens_per_tile(self) -> int:
        return self.rows.shape[0] // self.tiles


class VisionEncoder(Protocol):
    name: str
    width: int  # the embedding width it produces (the language model's hidden size)

    def encode(self, image: ImageSource) -> ImageEmbeds: ...


class LanguageModel(Protocol):
    name: str
    flavor: str
    n_embd: int
    n_ctx: int

    def tokenize(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def logits(
        self, ids: Sequence[int], image_embeds: np.ndarray | None, positions: Any = None
    ) -> np.ndarray:
        """float32 logits (n, vocab) of one forward over `ids` from an empty cache, at `positions` (an index
        or boolean mask over the sequence; None: every position)."""
        ...

    def generate(
        self,
        ids: Sequence[int],
        image_embeds: np.ndarray | None,
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token: OnToken | None = None,
        ignore_stop: bool = False,
        repetition_penalty: float = 1.0,
    ) -> RuntimeResult:
        """Sample after `ids` (r1v_quant.runtime.sampling's rules); `timings` holds prompt_s, decode_s,
        n_prompt, n_reused (prefix positions the engine kept from its previous call), n_gen."""
        ...

    def close(self) -> None: ...


def conversation_ids(
    flavor: str,
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[ImageEmbeds],
    tokenize: Callable[[str], list[int]],
    *,
    think: bool = True,
) -> list[int]:
    """Token ids of `messages` in the flavour's template, the k-th `<image>` expanded for `images[k]`."""
    text = build_prompt(flavor, messages, think=think)
    per_tile = images[0].tokens_per_tile if images else 1
    return tokenize(expand_image_tokens(text, [im.tiles for im in images], per_tile))


def with_images(messages: Sequence[Mapping[str, Any]], n_images: int) -> list[dict[str, Any]]:
    """The messages with one `<image>` tag per image: images without any tag in the conversation go before
    the last user message's text."""
    msgs = [dict(m) for m in messages]
    tags = sum(str(m["content"]).count(IMAGE_PLACEHOLDER) for m in msgs)
    if tags == 0 and n_images:
        users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
        if not users:
            raise R1VError("images need a user message to go with")
        msgs[users[-1]]["content"] = place_images(str(msgs[users[-1]]["content"]), n_images)
    elif tags != n_images:
        raise R1VError(f"the conversation has {tags} <image> tag(s) but {n_images} image(s) were given")
    return msgs


def prompt_inputs(
    lm: LanguageModel,
    vision: VisionEncoder | None,
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[ImageSource] = (),
    *,
    think: bool = True,
) -> tuple[list[int], np.ndarray | None]:
    """A conversation -> (token ids, image rows for its `<IMG_CONTEXT>` positions, None without images)."""
    msgs = with_images(messages, len(images))
    if images and vision is None:
        raise R1VError("this model has no vision encoder: images need an mmproj (or an ONNX vision export)")
    embeds = [vision.encode(im) for im in images] if vision is not None else []
    ids = conversation_ids(lm.flavor, msgs, embeds, lm.tokenize, think=think)
    return ids, (np.concatenate([e.rows for e in embeds]) if embeds else None)


def check_pair(lm: LanguageModel, vision: VisionEncoder | None) -> None:
    """Refuse a vision encoder whose embeddings do not fit the language model."""
    if vision is not None and vision.width != lm.n_embd:
        raise R1VError(
            f"the vision encoder ({vision.name}) gives {vision.width}-wide embeddings but the language "
            f"model is {lm.n_embd} wide: they come from different models"
        )


class TokenText:
    """Token ids -> text pieces that end on whole characters (a character may span several tokens)."""

    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self.decode = decode
        self.pending: list[int] = []

    def push(self, token: int) -> str:
        self.pending.append(token)
        text = self.decode(self.pending)
        # a UTF-8 character has at most 4 bytes, so 4 tokens that still end in U+FFFD are really invalid
        if text.endswith("\ufffd") and len(self.pending) < 4:
            return ""
        self.pending.clear()
        return text

    def flush(self) -> str:
        text = self.decode(self.pending) if self.pending else ""
        self.pending.clear()
        return text
