"""What an evaluation backend is: the requests it takes, the generations it returns, and the protocol the
torch and llama.cpp backends (r1v_quant.evaluate.backends, over the runtime protocol's engines) and the
OpenAI-server backend (r1v_quant.evaluate.server_backend) implement."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from r1v_quant.data.evalset import Window
from r1v_quant.model.artifact import Artifact
from r1v_quant.model.preprocess import ImageSource
from r1v_quant.runtime.decoding import Decoding


@dataclass
class Generation:
    text: str
    n_tokens: int
    stopped: bool  # False: the max-tokens budget (or the context) cut the answer off
    budget: int = 0  # the new tokens this answer was allowed: the decoding's budget, capped by the context


@dataclass(frozen=True)
class GenRequest:
    question: str  # the user turn with one `<image>` placeholder per image
    images: Sequence[ImageSource]
    seed: int


OnDone = Callable[[int, Generation], None]


class Backend(Protocol):
    artifact: Artifact

    def tokenize(self, text: str) -> list[int]: ...

    def logprobs(self, window: Window) -> torch.Tensor: ...

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation: ...

    def generate_many(
        self, reqs: Sequence[GenRequest], decoding: Decoding, on_done: OnDone | None = None
    ) -> list[Generation]: ...

    def speed(self, req: GenRequest, n_tokens: int = 32) -> float: ...

    def close(self) -> None: ...
