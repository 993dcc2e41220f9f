"""A conversation over the runtime protocol: `ChatSession` keeps the history (user turns with their
`<image>` tags, assistant turns without their reasoning) and each image's embeddings, so a later turn never
runs the vision encoder again; failed or interrupted turns leave no trace. `answer` is one such turn,
streamed as whole characters (`r1v-quant generate`, the demo).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.model.preprocess import ImageSource, open_image
from r1v_quant.model.prompts import place_images, split_thinking
from r1v_quant.runtime.options import RuntimeOptions
from r1v_quant.runtime.protocol import (
    ImageEmbeds,
    LanguageModel,
    OnToken,
    TokenText,
    VisionEncoder,
    check_pair,
    conversation_ids,
)
from r1v_quant.util.errors import R1VError


# -- the conversation --------------------------------------------------------------------------------------
@dataclass
class Reply:
    text: str  # everything generated: reasoning, </think>, answer
    thinking: str
    answer: str
    tokens: list[int]
    stopped: bool  # False: --max-new-tokens or the context cut it off
    prompt_tokens: int
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"answer": self.answer, "thinking": self.thinking, "text": self.text, "tokens": self.tokens,
                "n_tokens": len(self.tokens), "stopped": self.stopped, "prompt_tokens": self.prompt_tokens,
                "timings": {k: round(v, 4) for k, v in self.timings.items()}}  # fmt: skip


def _image_key(image: ImageSource) -> Any:
    """Cache key: a file by path, size and mtime; other sources by content."""
    if isinstance(image, str | Path):
        p = Path(image).expanduser().resolve()
        st = p.stat() if p.is_file() else None
        return ("file", str(p), st and (st.st_size, st.st_mtime_ns))
    if isinstance(image, bytes | bytearray):
        return ("bytes", hashlib.blake2b(image, digest_size=16).digest())
    rgb = open_image(image)
    return ("pixels", rgb.size, hashlib.blake2b(rgb.tobytes(), digest_size=16).digest())


class ChatSession:
    """A multi-turn conversation with images on any turn; failed or interrupted turns leave no trace."""

    def __init__(
        self,
        lm: LanguageModel,
        vision: VisionEncoder | None = None,
        *,
        system: str | None = None,
        think: bool = True,
        max_new_tokens: int = 1024,
        temperature: float = 0.0,
        seed: int = 0,
    ):
        check_pair(lm, vision)
        self.lm, self.vision = lm, vision
        self.system, self.think = system, think
        self.max_new_tokens, self.temperature, self.seed = max_new_tokens, temperature, seed
        self._cache: dict[Any, ImageEmbeds] = {}
        self.reset()

    def reset(self) -> None:
        self.messages: list[dict[str, str]] = (
            [{"role": "system", "content": self.system}] if self.system else []
        )
        self.images: list[ImageEmbeds] = []
        self.turns = 0

    def encode(self, image: ImageSource) -> ImageEmbeds:
        if self.vision is None:
            raise R1VError("this chat has no vision encoder: images need --mmproj (or --vision-onnx)")
        key = _image_key(image)
        if key not in self._cache:
            self._cache[key] = self.vision.encode(image)
        return self._cache[key]

    def ask(self, text: str, images: Sequence[ImageSource] = (), on_token: OnToken | None = None) -> Reply:
        """Answer `text` (images go where its `<image>` tags are, else before it); tokens to `on_token`."""
        text = place_images(text, len(images))
        t0 = time.perf_counter()
        new = [self.encode(im) for im in images]
        vision_s = time.perf_counter() - t0
        messages = [*self.messages, {"role": "user", "content": text}]
        embeds = [*self.images, *new]
        ids = conversation_ids(self.lm.flavor, messages, embeds, self.lm.tokenize, think=self.think)
        if len(ids) >= self.lm.n_ctx:
            raise R1VError(
                f"the conversation is {len(ids)} tokens, more than the context of {self.lm.n_ctx}: "
                "/reset it or raise --ctx"
            )
        rows = np.concatenate([e.rows for e in embeds]) if embeds else None
        result = self.lm.generate(
            ids,
            rows,
            max_new_tokens=self.max_new_tokens,
            temperature=self.temperature,
            seed=self.seed + self.turns,
            on_token=on_token,
        )
        full = self.lm.decode(result.tokens)
        thinking, answer = split_thinking(full, think_opened=self.think)
        # only the answer enters the history: the models were trained on histories without reasoning
        self.messages = [*messages, {"role": "assistant", "content": answer}]
        self.images = embeds
        self.turns += 1
        timings = {**result.timings, "vision_s": vision_s}
        return Reply(full, thinking, answer, result.tokens, result.stopped, len(ids), timings)

    def close(self) -> None:
        self.lm.close()


def answer(
    lm: LanguageModel,
    vision: VisionEncoder | None,
    prompt: str,
    images: Sequence[ImageSource] = (),
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
    think: bool = True,
    stream: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """One greedy answer (a fresh conversation), its text streamed to `stream` in whole characters."""
    session = ChatSession(lm, vision, system=system, think=think, max_new_tokens=max_new_tokens)
    pieces = TokenText(lm.decode)
    t0 = time.perf_counter()

    def on_token(token: int) -> None:
        text = pieces.push(token)
        if stream and text:
            stream(text)

    reply = session.ask(prompt, images, on_token=on_token)
    if stream:
        stream(pieces.flush() + "\n")
    return {
        "text": reply.text,
        "thinking": reply.thinking,
        "answer": reply.answer,
        "tokens": reply.tokens,
        "stopped": reply.stopped,
        "prompt_tokens": reply.prompt_tokens,
        "image_tiles": sum(im.tiles for im in session.images),
        "generate_seconds": round(time.perf_counter() - t0, 3),
        "timings": {k: round(v, 4) for k, v in reply.timings.items()},
    }


def answer_checkpoint(
    model_dir: Path | str,
    prompt: str,
    images: Sequence[ImageSource] = (),
    *,
    flavor: str | None = None,
    options: RuntimeOptions | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """`answer` from a checkpoint folder in the torch engines (16-bit or AWQ), with its load time."""
    from r1v_quant.runtime.engines import open_engines

    t0 = time.perf_counter()
    lm, vision = open_engines(model=Path(model_dir), options=options, flavor=flavor)
    load_s = time.perf_counter() - t0
    try:
        return {**answer(lm, vision, prompt, images, **kwargs), "load_seconds": round(load_s, 3)}
    finally:
        lm.close()
