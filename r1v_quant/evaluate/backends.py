"""The models `eval` and `check` compare, behind one small interface, and the same-architecture check.

An artifact (`r1v_quant.model.artifact.resolve_artifact`) is a checkpoint folder (16-bit or AWQ: the torch
engines, AWQ dequantized by r1v-quant's loader) or a GGUF (a `.gguf` file, with a sibling `mmproj*.gguf`
picked up when there is one, or a folder holding one language-model GGUF and at most one mmproj: the
llama.cpp engines). Both run through the runtime protocol (`r1v_quant.runtime.protocol`), as chat does:
they score the same token ids (the reference's tokenization, checked equal) and generate from each
artifact's own template and stop tokens.

Answers for `eval bench` come from `generate_many`: requests (question, images, seed) decoded with one
`Decoding` (r1v_quant.runtime.decoding), each answer's budget capped by the context the backend has. The
torch backend decodes a batch of requests at once (r1v_quant.runtime.batch_generate), llama.cpp one after
another, an OpenAI-compatible server several in parallel (r1v_quant.evaluate.server_backend).

Only one model is open at a time: callers open, use and close each backend in turn.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from r1v_quant.data.evalset import Window
from r1v_quant.evaluate.backend_protocol import Backend, Generation, GenRequest, OnDone
from r1v_quant.model.artifact import Artifact
from r1v_quant.model.preprocess import ImageSource
from r1v_quant.model.prompts import (
    DS_ASSISTANT,
    DS_BOS,
    DS_USER,
    IM_END,
    IM_START,
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
)
from r1v_quant.runtime.decoding import Decoding
from r1v_quant.runtime.options import RuntimeOptions
from r1v_quant.runtime.protocol import prompt_inputs
from r1v_quant.util.errors import R1VError

if TYPE_CHECKING:
    from r1v_quant.runtime.engines import TorchLM, TorchVision

# Tokenizer probe: ordinary text in several scripts, numbers, whitespace runs and every special token the
# templates and the image placeholder use. Two tokenizers that agree on all of these are treated as equal.
PROBE_TEXTS = (
    "Hello world, the answer is 42.",
    "What is 37 * 45? 37 * 45 = 1665, so \\boxed{1665}.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  ",
    "I'll check: it's 5, they're equal, WE'VE done it.",
    "图中显示了一个三角形，求它的面积。",
    "3.14159 -17 +42 100% 1,234,567 2025-07-15",
    "Emoji 🙂🚀 and symbols ∑ ∫ √ π ≤ ≥ → °C",
    f"{IMG_START}{IMG_CONTEXT * 3}{IMG_END}\nWhat shape is in the image?",
    f"{DS_BOS}{DS_USER}\nWhat is 6*7?{DS_ASSISTANT}<think>\nok</think>\n\n42",
    f"{IM_START}user\nhi{IM_END}\n{IM_START}assistant\n<think>\n",
)


def greedy(max_tokens: int) -> Decoding:
    return Decoding(0.0, 1.0, 1.0, 1, 0, max_tokens, "greedy")


# -- same architecture, same tokenizer --------------------------------------------------------------------


def check_compatible(ref: Artifact, cand: Artifact, *, needs_images: bool) -> None:
    """Refuse, with the reason, a candidate that is not the reference's architecture and tokenizer. A server
    tells neither before it answers: it is taken as it is."""
    if cand.backend == "openai":
        return
    for what, a, b in (  # the flavour first: another release's checkpoint differs in all of these
        ("flavour (chat template)", ref.flavor, cand.flavor),
        ("vocabulary size", ref.vocab, cand.vocab),
        ("hidden size", ref.hidden, cand.hidden),
        ("layer count", ref.layers, cand.layers),
    ):
        if a != b:
            raise R1VError(f"{cand.path}: {what} {b} differs from the reference's {a}: not the same model")
    if needs_images and cand.backend == "llama.cpp" and cand.mmproj_gguf is None:
        raise R1VError(f"{cand.path}: no mmproj GGUF next to it; image windows and image items need one")
    ref_tok = _tokenizer(ref)
    if cand.backend == "torch":
        compare_tokenizers(ref_tok.encode, _tokenizer(cand).encode, cand.path)
    elif cand.gguf_tokens is not None:
        want = [ref_tok.id_to_token(i) or f"[PAD{i}]" for i in range(ref.vocab)]
        diff = [i for i, (a, b) in enumerate(zip(want, cand.gguf_tokens, strict=True)) if a != b]
        if diff:
            i = diff[0]
            raise R1VError(
                f"{cand.path}: tokenizer differs from the reference's ({len(diff)} token(s); id {i} is "
                f"{cand.gguf_tokens[i]!r}, the reference has {want[i]!r})"
            )


def compare_tokenizers(ref_encode: Any, cand_encode: Any, where: Path | str) -> None:
    """Both tokenizers must give the same ids for every probe text."""
    for text in PROBE_TEXTS:
        a, b = ref_encode(text), cand_encode(text)
        if list(a) != list(b):
            raise R1VError(
                f"{where}: tokenizer differs from the reference's on {text[:40]!r}: {list(b)[:12]} vs "
                f"{list(a)[:12]}"
            )


def _tokenizer(art: Artifact) -> Any:
    from r1v_quant.model.tokenizer import R1VTokenizer

    return R1VTokenizer.from_dir(art.path)


# -- backends -------------------------------------------------------------------------------------------


class TorchBackend:
    """The torch engines (r1v_quant.runtime.engines) on a 16-bit or AWQ checkpoint, on the device and dtype
    `runtime` says (default: CPU float32, or a CUDA GPU in bfloat16 when there is one); answers are decoded
    in batches (r1v_quant.runtime.batch_generate)."""

    def __init__(self, artifact: Artifact, runtime: RuntimeOptions | None = None):
        from r1v_quant.runtime.engines import open_engines

        opts = runtime or RuntimeOptions()
        self.artifact = artifact
        lm, vision = open_engines(model=artifact.path, options=opts)
        self.lm: TorchLM = lm  # type: ignore[assignment]
        self.vision: TorchVision = vision  # type: ignore[assignment]
        self.spec = self.lm.model.spec
        self.batch_size = max(1, opts.batch_size)

    def tokenize(self, text: str) -> list[int]:
        return self.lm.tokenize(text)

    def logprobs(self, window: Window) -> torch.Tensor:
        rows = None if window.pixel_values is None else self.vision.encode_pixels(window.pixel_values)
        logits = self.lm.logits(window.input_ids.tolist(), rows, window.score)
        return torch.log_softmax(torch.from_numpy(logits), -1)

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation:
        return self.generate_many([GenRequest(question, images, 0)], greedy(max_new_tokens))[0]

    def _embeds(self, req: GenRequest) -> tuple[torch.Tensor, list[int]]:
        ids, rows = prompt_inputs(
            self.lm, self.vision, [{"role": "user", "content": req.question}], req.images
        )
        return self.lm.embed(ids, rows)[0], ids

    def generate_many(
        self, reqs: Sequence[GenRequest], decoding: Decoding, on_done: OnDone | None = None
    ) -> list[Generation]:
        """Batches of `batch_size` requests decoded together; a prompt's embeddings are computed once for
        all the samples of its question. Budgets are capped by the model's position limit."""
        from r1v_quant.runtime.batch_generate import Row, generate_rows

        out: list[Generation | None] = [None] * len(reqs)
        cache: dict[tuple[str, int], tuple[torch.Tensor, list[int]]] = {}
        limit = self.lm.n_ctx
        for start in range(0, len(reqs), self.batch_size):
            part = list(range(start, min(start + self.batch_size, len(reqs))))
            rows = []
            for i in part:
                key = (reqs[i].question, id(reqs[i].images))
                if key not in cache:
                    cache = {key: self._embeds(reqs[i])}  # requests of one question come together
                embeds, ids = cache[key]
                budget = max(0, min(decoding.max_tokens, limit - embeds.shape[0]))
                rows.append(Row(embeds, ids, budget, reqs[i].seed))

            def done(j: int, res: Any, part: list[int] = part, rows: list[Row] = rows) -> None:
                text = self.lm.decode(res.tokens)
                gen = Generation(text, len(res.tokens), res.stopped, rows[j].max_new_tokens)
                out[part[j]] = gen
                if on_done is not None:
                    on_done(part[j], gen)

            with torch.device(self.lm.device):
                generate_rows(
                    self.lm.model.language_model,
                    rows,
                    temperature=decoding.temperature,
                    top_p=decoding.top_p,
                    repetition_penalty=decoding.repetition_penalty,
                    stop_ids=self.lm.stop_ids,
                    on_done=done,
                )
        return [g for g in out if g is not None]

    def speed(self, req: GenRequest, n_tokens: int = 32) -> float:
        """Decode tokens per second for one batch of `batch_size` answers of `n_tokens` (never stopping)."""
        from r1v_quant.runtime.batch_generate import Row, generate_rows

        embeds, ids = self._embeds(req)
        rows = [Row(embeds, ids, n_tokens, k) for k in range(self.batch_size)]
        t0 = time.perf_counter()
        with torch.device(self.lm.device):
            lm = self.lm.model.language_model
            res = generate_rows(lm, rows, temperature=0.0, top_p=1.0, repetition_penalty=1.0, stop_ids=())
        return sum(len(r.tokens) for r in res) / max(time.perf_counter() - t0, 1e-9)

    def close(self) -> None:
        self.lm.close()


class LlamaCppBackend:
    """A GGUF (+ mmproj) in the llama.cpp engines (r1v_quant.runtime.engines); CPU unless n_gpu_layers."""

    def __init__(
        self,
        artifact: Artifact,
        *,
        n_ctx: int,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        max_tiles: int | None = None,
    ):
        from r1v_quant.runtime.engines import open_engines

        self.artifact = artifact
        if artifact.llm_gguf is None:
            raise R1VError(f"{artifact.path}: no language-model GGUF")
        options = RuntimeOptions(n_threads=n_threads, n_gpu_layers=n_gpu_layers, max_tiles=max_tiles)
        self.lm, self.vision = open_engines(
            gguf=artifact.llm_gguf, mmproj=artifact.mmproj_gguf, options=options, n_ctx=n_ctx
        )

    def tokenize(self, text: str) -> list[int]:
        return self.lm.tokenize(text)

    def _rows(self, images: Sequence[ImageSource]) -> np.ndarray | None:
        if not images:
            return None
        if self.vision is None:
            raise R1VError(f"{self.artifact.path}: no mmproj GGUF next to it; images need one")
        return np.concatenate([self.vision.encode(im).rows for im in images])

    def logprobs(self, window: Window) -> torch.Tensor:
        logits = self.lm.logits(window.input_ids.tolist(), self._rows(window.images), window.score.numpy())
        return torch.log_softmax(torch.from_numpy(logits), -1)

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation:
        return self.generate_many([GenRequest(question, images, 0)], greedy(max_new_tokens))[0]

    def _prompt(self, req: GenRequest) -> tuple[list[int], np.ndarray | None]:
        return prompt_inputs(self.lm, self.vision, [{"role": "user", "content": req.question}], req.images)

    def generate_many(
        self, reqs: Sequence[GenRequest], decoding: Decoding, on_done: OnDone | None = None
    ) -> list[Generation]:
        """One answer after another (the KV cache keeps the prompt shared by a question's samples); a
        budget is capped by what the context has left after the prompt."""
        out = []
        last: tuple[tuple[str, int], Any] | None = None
        for i, req in enumerate(reqs):
            key = (req.question, id(req.images))
            if last is None or last[0] != key:
                last = (key, self._prompt(req))
            ids, embeds = last[1]
            budget = max(0, min(decoding.max_tokens, self.lm.n_ctx - len(ids)))
            res = self.lm.generate(
                ids,
                embeds,
                max_new_tokens=budget,
                temperature=decoding.temperature,
                top_p=decoding.top_p,
                seed=req.seed,
                repetition_penalty=decoding.repetition_penalty,
            )
            gen = Generation(self.lm.decode(res.tokens), len(res.tokens), res.stopped, budget)
            out.append(gen)
            if on_done is not None:
                on_done(i, gen)
        return out

    def speed(self, req: GenRequest, n_tokens: int = 32) -> float:
        ids, embeds = self._prompt(req)
        res = self.lm.generate(ids, embeds, max_new_tokens=n_tokens, ignore_stop=True)
        return len(res.tokens) / max(res.timings["decode_s"], 1e-9)

    def close(self) -> None:
        self.lm.close()


def open_backend(artifact: Artifact, *, n_ctx: int = 4096, runtime: RuntimeOptions | None = None) -> Backend:
    rt = runtime or RuntimeOptions()
    if artifact.backend == "torch":
        return TorchBackend(artifact, rt)
    if artifact.backend == "openai":
        from r1v_quant.evaluate.server_backend import ServerBackend

        if rt.max_tiles is not None:
            raise R1VError(f"{artifact.path}: --max-tiles cannot reach a server (it tiles images itself)")
        return ServerBackend(artifact, parallel=rt.parallel)
    return LlamaCppBackend(
        artifact, n_ctx=n_ctx, n_threads=rt.n_threads, n_gpu_layers=rt.n_gpu_layers, max_tiles=rt.max_tiles
    )


def check_runtime_tokenizer(ref: Artifact, backend: Backend) -> None:
    """After loading: the backend's own tokenizer (llama.cpp's reading of the GGUF) must match the ref's.
    A server's tokenizer cannot be read: it is not checked."""
    if backend.artifact.backend == "openai":
        return
    compare_tokenizers(_tokenizer(ref).encode, backend.tokenize, backend.artifact.path)
