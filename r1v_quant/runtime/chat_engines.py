"""Chat engines: a conversation -> the flavour's prompt with images expanded -> streamed tokens.

A chat pairs one language model (`LlamaCppLM`: a GGUF in llama.cpp; `TorchLM`: a 16-bit or AWQ checkpoint
in the torch reference forward) with one vision encoder (`MmprojVision`: the mmproj GGUF through libmtmd;
`TorchVision`: the checkpoint's vision tower; `OnnxVision`: an `r1v-quant onnx` export). Any encoder whose
width matches the language model's pairs with it: image embeddings only fill the `<IMG_CONTEXT>` rows.

`ChatSession` keeps the history (user turns with their `<image>` tags, assistant turns without their
reasoning) and each image's embeddings, so a later turn never runs the vision encoder again. The prompt is
rendered by `r1v_quant.model.prompts.build_prompt` for the model's flavour (for a GGUF, the flavour
recorded in
it; the GGUF's `tokenizer.chat_template` is generated from the same data) and each `<image>` is expanded
exactly as `r1v_quant.model.reference.build_inputs` does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from r1v_quant.model.preprocess import ImageSource, expand_image_placeholders, open_image
from r1v_quant.model.prompts import IMAGE_PLACEHOLDER, build_prompt, split_thinking
from r1v_quant.runtime.llamacpp import RuntimeResult, sample_tokens
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
    width: int

    def encode(self, image: ImageSource) -> ImageEmbeds: ...


class LanguageModel(Protocol):
    name: str
    flavor: str
    n_embd: int
    n_ctx: int

    def tokenize(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def generate(
        self,
        ids: Sequence[int],
        image_embeds: np.ndarray | None,
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        on_token: OnToken | None,
    ) -> RuntimeResult: ...

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
    return tokenize(expand_image_placeholders(text, [im.tiles for im in images], per_tile))


# -- language models ---------------------------------------------------------------------------------------
class LlamaCppLM:
    """A GGUF in llama.cpp (`LlamaCppRuntime`); the KV cache is reused for the prefix shared across turns."""

    name = "llama.cpp"

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.flavor = runtime.flavor
        self.n_embd = runtime.n_embd
        self.n_ctx = runtime.n_ctx

    def tokenize(self, text: str) -> list[int]:
        return self.rt.tokenize(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.rt.detokenize(ids)

    def generate(self, ids: Sequence[int], image_embeds: np.ndarray | None, **options: Any) -> RuntimeResult:
        # LanguageModel.generate's keywords are a subset of LlamaCppRuntime.generate's: passed through as is
        return self.rt.generate(ids, image_embeds, **options)

    def close(self) -> None:
        self.rt.close()  # the runtime silences llama_free's buffer report itself


class TorchLM:
    """The torch reference forward of a 16-bit or AWQ checkpoint (AWQ runs dequantised on CPU)."""

    name = "torch"

    def __init__(self, model: Any, tokenizer: Any, *, n_ctx: int):
        self.model = model
        self.device = next(model.parameters()).device  # where open_backend put it
        self.tok = tokenizer
        self.flavor = model.spec.flavor
        self.n_embd = model.spec.llm.hidden_size
        self.n_ctx = n_ctx
        self.stop_ids = tokenizer.stop_ids(self.flavor)

    def tokenize(self, text: str) -> list[int]:
        return self.tok.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def generate(
        self,
        ids: Sequence[int],
        image_embeds: np.ndarray | None,
        *,
        max_new_tokens: int,
        temperature: float,
        seed: int,
        on_token: OnToken | None,
    ) -> RuntimeResult:
        import torch

        from r1v_quant.model.llm import KVCache

        lm = self.model.language_model
        t0 = time.perf_counter()

        def row(h: torch.Tensor) -> np.ndarray:  # the last position's float32 logits, on the host
            return lm.logits(h[0, -1]).float().cpu().numpy()

        with torch.inference_mode(), torch.device(self.device):
            x = torch.tensor([list(ids)])
            rows = None if image_embeds is None else torch.from_numpy(image_embeds).to(self.device)
            cache = KVCache(self.model.spec.llm.num_layers)
            hidden = lm.forward_embeds(self.model.embed(x, image_embeds=rows), cache)
            t1 = time.perf_counter()

            def feed(token: int) -> np.ndarray | None:
                if cache.length + 1 > self.n_ctx:
                    return None
                return row(lm.forward_embeds(lm.model.embed_tokens(torch.tensor([[token]])), cache))

            result = sample_tokens(
                row(hidden),
                feed,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=1.0,
                seed=seed,
                stop_ids=self.stop_ids,
                on_token=on_token,
            )
        t2 = time.perf_counter()
        result.timings = {"prompt_s": t1 - t0, "decode_s": t2 - t1, "n_prompt": len(ids), "n_reused": 0,
                          "n_gen": len(result.tokens)}  # fmt: skip
        return result

    def close(self) -> None:
        pass


# -- vision encoders ---------------------------------------------------------------------------------------
class MmprojVision:
    """The mmproj GGUF through libmtmd, tiled by InternVL's rule (`LlamaCppRuntime.image_embeds`)."""

    name = "mmproj (llama.cpp)"

    def __init__(self, runtime: Any):
        self.rt = runtime
        self.width = runtime.n_embd

    def encode(self, image: ImageSource) -> ImageEmbeds:
        rows = self.rt.image_embeds(image)
        return ImageEmbeds(rows, rows.shape[0] // self.rt.tokens_per_tile)


class TorchVision:
    """The checkpoint's own vision tower + mlp1 in torch."""

    name = "vision tower (torch)"

    def __init__(self, model: Any, max_tiles: int | None = None):
        self.model = model
        self.width = model.spec.llm.hidden_size
        self.max_tiles = max_tiles

    def encode(self, image: ImageSource) -> ImageEmbeds:
        from r1v_quant.model.preprocess import preprocess_for_spec

        spec = self.model.spec
        prepped = preprocess_for_spec(image, spec, self.max_tiles)
        weight = next(self.model.parameters())  # the model's device and dtype
        out = self.model.image_embeds(prepped.pixel_values.to(device=weight.device, dtype=weight.dtype))
        return ImageEmbeds(out.reshape(-1, out.shape[-1]).float().cpu().numpy(), prepped.num_tiles)


class OnnxVision:
    """An `r1v-quant onnx` export in onnxruntime (tiling and normalisation from its preprocessing.json)."""

    def __init__(self, path: Path | str, *, threads: int = 0, max_tiles: int | None = None):
        from r1v_quant.runtime.onnx import OnnxVisionEncoder

        self.max_tiles = max_tiles
        self.encoder = OnnxVisionEncoder(path, "auto", threads=threads)
        self.width = self.encoder.hidden_size
        self.name = f"ONNX ({self.encoder.active_provider})"

    def encode(self, image: ImageSource) -> ImageEmbeds:
        out, tiles = self.encoder.encode_image(image, self.max_tiles)
        return ImageEmbeds(np.ascontiguousarray(out.reshape(-1, out.shape[-1]), np.float32), tiles)


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
        if vision is not None and vision.width != lm.n_embd:
            raise R1VError(
                f"the vision encoder ({vision.name}) gives {vision.width}-wide embeddings but the language "
                f"model is {lm.n_embd} wide: they come from different models"
            )
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
        tags = text.count(IMAGE_PLACEHOLDER)
        if tags == 0:
            text = f"{IMAGE_PLACEHOLDER}\n" * len(images) + text
        elif tags != len(images):
            raise R1VError(f"the message has {tags} <image> tag(s) but {len(images)} image(s) are attached")
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


def open_backend(
    *,
    gguf: Path | None,
    mmproj: Path | None,
    model: Path | None,
    vision_onnx: Path | None = None,
    threads: int | None = None,
    n_ctx: int = 4096,
    torch_device: str = "auto",
    torch_dtype: str = "auto",
    max_tiles: int | None = None,
) -> tuple[LanguageModel, VisionEncoder | None]:
    """Open the language model and the vision encoder a chat asks for (no vision: text-only chat).
    `torch_device` / `torch_dtype` place a --model checkpoint as `eval` does (RuntimeOptions); `max_tiles`
    caps the dynamic tiling of every image (None: the model's own cap)."""
    from r1v_quant.plan.image_cost import check_max_tiles

    check_max_tiles(max_tiles)
    if (gguf is None) == (model is None):
        raise R1VError("give either --gguf (llama.cpp) or --model (torch checkpoint), not both or neither")
    onnx = None
    if vision_onnx is not None:
        onnx = OnnxVision(vision_onnx, threads=threads or 0, max_tiles=max_tiles)
    if gguf is not None:
        from r1v_quant.model.artifact import find_gguf_pair
        from r1v_quant.runtime.llamacpp import LlamaCppRuntime

        llm_file, found = find_gguf_pair(gguf)
        mmproj = mmproj or found
        if mmproj is not None and not Path(mmproj).is_file():
            raise R1VError(f"{mmproj}: no such mmproj file")
        rt = LlamaCppRuntime(llm_file, mmproj, n_ctx=n_ctx, n_threads=threads, max_tiles=max_tiles)
        vision: VisionEncoder | None = onnx or (MmprojVision(rt) if rt.has_vision else None)
        return LlamaCppLM(rt), vision
    if mmproj is not None:
        raise R1VError("--mmproj goes with --gguf; a --model checkpoint has its own vision tower")
    import torch

    from r1v_quant.model.reference import R1VModel
    from r1v_quant.model.tokenizer import R1VTokenizer
    from r1v_quant.runtime.backend import RuntimeOptions

    assert model is not None
    device, dtype = RuntimeOptions(torch_device=torch_device, torch_dtype=torch_dtype).torch_placement()
    if threads:
        torch.set_num_threads(threads)
    net = R1VModel.from_checkpoint(model, dtype=dtype, device=device)
    lm = TorchLM(net, R1VTokenizer.from_dir(model), n_ctx=n_ctx)
    return lm, onnx or TorchVision(net, max_tiles)
