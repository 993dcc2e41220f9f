"""`--cand openai:http://HOST:PORT/v1[#model]`: answers from an OpenAI-compatible chat-completions server.

This is the engine users deploy (llama-server, llama-cpp-python's server, vLLM): the benchmark measures
what they will get, with the server's own tokenizer, chat template, image preprocessing and sampler.

Each question goes as one user message whose content is a list of parts in the question's order: text,
and an `image_url` part (a base64 data URL) where each `<image>` placeholder stands. Sampling follows the
comparison's `Decoding`: temperature, top_p, seed, max_tokens, and the repetition penalty under both
names servers read (`repetition_penalty`: vLLM; `repeat_penalty`: llama.cpp), top-k and min-p switched
off. A reply split by a reasoning parser (`reasoning_content`) is joined back as `reasoning</think>answer`.
`finish_reason` "length" marks an answer the budget cut off.

Requests run in parallel (`parallel` in flight); the server queues what it cannot batch. Only the standard
library speaks HTTP here: a dead server, a refused request or a malformed reply is one error line.
"""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from r1v_quant.evaluate.backend_protocol import Generation, GenRequest, OnDone
from r1v_quant.model.artifact import Artifact
from r1v_quant.model.preprocess import ImageSource, open_image
from r1v_quant.model.prompts import IMAGE_PLACEHOLDER, THINK_END
from r1v_quant.runtime.decoding import Decoding
from r1v_quant.util.errors import R1VError

PREFIX = "openai:"
TIMEOUT_S = 3600.0  # one long reasoning answer may take many minutes on a busy server


def is_server_spec(spec: str) -> bool:
    return spec.startswith(PREFIX)


def server_artifact(spec: str) -> Artifact:
    """`openai:http://HOST:PORT/v1[#model]` as an artifact (nothing is contacted yet)."""
    url, _, model = spec[len(PREFIX) :].partition("#")
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise R1VError(f"{spec}: expected openai:http://HOST:PORT/v1 (optionally #MODEL)")
    url = url.rstrip("/")
    name = model or parsed.netloc
    return Artifact(
        name=name,
        path=Path(parsed.netloc),
        kind="server",
        flavor=None,
        vocab=0,
        hidden=0,
        layers=0,
        quant="served",
        llm_format="server",
        vision_format=None,
        size_bytes=0,
        extra={"url": url, "model": model or None},
    )


def image_data_url(image: ImageSource) -> str:
    """An image as a data URL: files and encoded bytes as they are (PNG / JPEG / ...), pixels as PNG."""
    from PIL import Image

    data: bytes | None = None
    if isinstance(image, str | Path):
        data = Path(image).expanduser().read_bytes()
    elif isinstance(image, bytes | bytearray):
        data = bytes(image)
    if data is not None:
        with Image.open(io.BytesIO(data)) as im:
            fmt = (im.format or "PNG").lower()
        if fmt in ("png", "jpeg", "gif", "webp", "bmp"):
            return f"data:image/{fmt};base64,{base64.b64encode(data).decode()}"
    buf = io.BytesIO()
    open_image(image).save(buf, format="PNG")
    return f"data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}"


def content_parts(question: str, images: Sequence[ImageSource]) -> list[dict[str, Any]]:
    """The question as OpenAI content parts, each `<image>` replaced by its image where it stands."""
    pieces = question.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(images):
        raise R1VError(f"the question has {len(pieces) - 1} <image> tag(s) but {len(images)} image(s)")
    parts: list[dict[str, Any]] = []
    for k, text in enumerate(pieces):
        if k:
            parts.append({"type": "image_url", "image_url": {"url": image_data_url(images[k - 1])}})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


class ServerBackend:
    """An OpenAI-compatible `/v1/chat/completions` endpoint; no logits, so `eval bench` only."""

    def __init__(self, artifact: Artifact, *, parallel: int = 4, timeout: float = TIMEOUT_S):
        self.artifact = artifact
        self.url = str(artifact.extra["url"])
        self.parallel = max(1, parallel)
        self.timeout = timeout
        models = self._call("GET", "/models", None, timeout=30.0)
        ids = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
        self.model = artifact.extra.get("model") or (ids[0] if ids else None)
        if self.model is None:
            raise R1VError(f"{self.url}: the server lists no model; name one as openai:URL#MODEL")
        if artifact.extra.get("model") and ids and self.model not in ids:
            raise R1VError(f"{self.url}: no model {self.model!r} (the server has {', '.join(map(str, ids))})")
        artifact.extra["served_model"] = self.model

    def _call(self, method: str, path: str, body: Any, *, timeout: float) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace").strip().replace("\n", " ")[:300]
            raise R1VError(f"{self.url}{path}: HTTP {e.code} {e.reason}: {detail}") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", e)
            raise R1VError(f"{self.url}: cannot reach the server ({why}); is it running?") from None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise R1VError(f"{self.url}{path}: the reply is not JSON ({raw[:80]!r})") from None

    def request_body(self, req: GenRequest, decoding: Decoding, max_tokens: int) -> dict[str, Any]:
        return {
            "model": self.model,
            "messages": [{"role": "user", "content": content_parts(req.question, req.images)}],
            "max_tokens": max_tokens,
            "temperature": decoding.temperature,
            "top_p": decoding.top_p,
            "seed": req.seed,
            "repetition_penalty": decoding.repetition_penalty,
            "repeat_penalty": decoding.repetition_penalty,
            "top_k": 0,
            "min_p": 0.0,
            "stream": False,
        }

    def _one(self, req: GenRequest, decoding: Decoding, max_tokens: int) -> Generation:
        body = self.request_body(req, decoding, max_tokens)
        try:
            reply = self._call("POST", "/chat/completions", body, timeout=self.timeout)
        except R1VError as e:
            if "HTTP 400" not in str(e) or "context" not in str(e).lower():
                raise
            # the budget and the prompt exceed the server's context (vLLM refuses that): let the server
            # give the answer what its context has left
            del body["max_tokens"]
            reply = self._call("POST", "/chat/completions", body, timeout=self.timeout)
        try:
            choice = reply["choices"][0]
            message = choice["message"]
            text = message.get("content") or ""
            reasoning = message.get("reasoning_content") or message.get("reasoning")
            if reasoning:
                text = f"{reasoning}\n{THINK_END}\n\n{text}"
            n = int((reply.get("usage") or {}).get("completion_tokens") or 0)  # the server's count
            finish = choice.get("finish_reason")
        except (KeyError, IndexError, TypeError, ValueError):
            raise R1VError(f"{self.url}/chat/completions: unexpected reply {str(reply)[:200]}") from None
        # llama-cpp-python's server keeps generating past max_tokens while its text ends inside a multi-byte
        # character, and counts those tokens: the budget is what the answer was allowed
        n = min(n, max_tokens) if "max_tokens" in body else n
        return Generation(text, n, finish == "stop", max_tokens)

    def generate(self, question: str, images: Sequence[ImageSource], max_new_tokens: int) -> Generation:
        greedy = Decoding(0.0, 1.0, 1.0, 1, 0, max_new_tokens, "greedy")
        return self._one(GenRequest(question, images, 0), greedy, max_new_tokens)

    def generate_many(
        self, reqs: Sequence[GenRequest], decoding: Decoding, on_done: OnDone | None = None
    ) -> list[Generation]:
        """`parallel` requests in flight; results in request order, `on_done` as each arrives."""
        out: list[Generation | None] = [None] * len(reqs)
        with ThreadPoolExecutor(self.parallel) as pool:
            budget = decoding.max_tokens
            futures = {pool.submit(self._one, r, decoding, budget): i for i, r in enumerate(reqs)}
            try:
                for fut in as_completed(futures):
                    i = futures[fut]
                    out[i] = fut.result()
                    if on_done is not None:
                        on_done(i, out[i])  # type: ignore[arg-type]
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
        return [g for g in out if g is not None]

    def speed(self, req: GenRequest, n_tokens: int = 32) -> float:
        greedy = Decoding(0.0, 1.0, 1.0, 1, 0, n_tokens, "greedy")
        t0 = time.perf_counter()
        gen = self._one(req, greedy, n_tokens)
        return gen.n_tokens / max(time.perf_counter() - t0, 1e-9)

    def tokenize(self, text: str) -> list[int]:
        raise R1VError(f"{self.url}: a server gives no tokenizer; it can only answer (eval bench)")

    def logprobs(self, window: Any) -> Any:
        raise R1VError(f"{self.url}: a server gives no logits for perplexity / KLD; use it with eval bench")

    def close(self) -> None:
        pass
