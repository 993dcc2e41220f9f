"""Answer one (image +) text prompt with the torch reference forward; tokens streamed as decoded text."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from r1v_quant.model.checkpoint import open_checkpoint
from r1v_quant.model.prompts import split_thinking
from r1v_quant.model.reference import R1VModel, build_inputs
from r1v_quant.model.tokenizer import R1VTokenizer


def answer(
    model_dir: Path | str,
    prompt: str,
    images: Sequence[str | Path] = (),
    *,
    system: str | None = None,
    max_new_tokens: int = 128,
    think: bool = True,
    flavor: str | None = None,
    stream: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_dir, flavor=flavor)
    model = R1VModel.from_checkpoint(ckpt)
    spec = ckpt.spec
    tok = R1VTokenizer.from_dir(model_dir)
    ids, pixels, _ = build_inputs(model_dir, spec, prompt, images, system=system, think=think)
    t_load = time.perf_counter()
    shown = ""
    out: list[int] = []

    def on_token(t: int) -> None:
        nonlocal shown
        out.append(t)
        if stream:
            text = tok.decode(out)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                stream(text[len(shown) :])
                shown = text

    result = model.generate(
        ids, pixels, max_new_tokens=max_new_tokens, stop_ids=tok.stop_ids(spec.flavor), on_token=on_token
    )
    if stream:
        stream("\n")
    text = tok.decode(result.tokens)
    thinking, final = split_thinking(text) if think else ("", text)
    return {
        "text": text,
        "thinking": thinking,
        "answer": final,
        "tokens": result.tokens,
        "stopped": result.stopped,
        "prompt_tokens": int(ids.shape[1]),
        "image_tiles": 0 if pixels is None else int(pixels.shape[0]),
        "load_seconds": round(t_load - t0, 3),
        "generate_seconds": round(time.perf_counter() - t_load, 3),
    }
