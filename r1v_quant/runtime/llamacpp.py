"""Run an exported language-model GGUF (+ mmproj GGUF) in llama.cpp with the reference model's token stream.

llama.cpp's own multimodal path (libmtmd's helpers) tiles InternVL images by a different rule and wraps
them in its own markers, so its token sequence differs from Skywork-R1V's. Here the prompt is rendered by
r1v-quant's templates, each `<image>` is expanded to `<img>` + `<IMG_CONTEXT>` x n + `</img>` exactly as
`r1v_quant.model.reference.build_inputs` does, the text is tokenized by the GGUF's vocabulary (tested equal
to the
checkpoint tokenizer), and the image embeddings from libmtmd (InternVL tiling, `MtmdVision`) are decoded
at the `<IMG_CONTEXT>` positions as embedding batches. Text runs are decoded as token batches. The result
is the reference model's input sequence, so logits compare position by position with the torch forward.

The KV cache is kept between `generate` calls and reused for the longest shared prefix (tokens, and image
rows by content), so a multi-turn chat only decodes what is new.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import time
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from r1v_quant.model.preprocess import ImageSource, open_image
from r1v_quant.model.prompts import CHAT_FORMATS, IMG_CONTEXT
from r1v_quant.runtime.gguf_lib import Closeable, free_handle, llama_log
from r1v_quant.runtime.protocol import ImageEmbeds, conversation_ids, with_images
from r1v_quant.runtime.sampling import RuntimeResult, sample_tokens
from r1v_quant.util.errors import R1VError

FLAVOR_KEY = "r1v_quant.flavor"  # written by exporters.gguf_llm


def _import_llama() -> Any:
    try:
        import llama_cpp
    except (ImportError, OSError) as e:
        raise R1VError(f"llama-cpp-python is not installed ({e}): pip install 'r1v-quant[gguf]'") from None
    return llama_cpp


TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4  # gguf.TokenType
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def gguf_token_types(path: Path | str) -> np.ndarray | None:
    """`tokenizer.ggml.token_type` of a GGUF file, read from its header alone (no tensors, no full parse of
    the token list: a few ms for 152k tokens); None when the file has no such key."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
        if m[:4] != b"GGUF":
            raise R1VError(f"{path}: not a GGUF file")
        n_kv = struct.unpack_from("<Q", m, 16)[0]
        pos = 24

        def string(pos: int) -> tuple[bytes, int]:
            n = struct.unpack_from("<Q", m, pos)[0]
            return m[pos + 8 : pos + 8 + n], pos + 8 + n

        for _ in range(n_kv):
            key, pos = string(pos)
            vtype = struct.unpack_from("<I", m, pos)[0]
            pos += 4
            if vtype == _GGUF_STRING:
                _, pos = string(pos)
            elif vtype in _GGUF_SCALARS:
                pos += struct.calcsize("<" + _GGUF_SCALARS[vtype])
            elif vtype == _GGUF_ARRAY:
                etype, count = struct.unpack_from("<IQ", m, pos)
                pos += 12
                if etype == _GGUF_STRING:
                    for _ in range(count):
                        pos += 8 + struct.unpack_from("<Q", m, pos)[0]
                elif etype in _GGUF_SCALARS:
                    size = struct.calcsize("<" + _GGUF_SCALARS[etype])
                    if key == b"tokenizer.ggml.token_type":
                        return np.frombuffer(m[pos : pos + size * count], dtype="<" + _GGUF_SCALARS[etype])
                    pos += size * count
                else:
                    return None  # nested arrays: not in a tokenizer section we know
            else:
                raise R1VError(f"{path}: unknown GGUF value type {vtype} for key {key!r}")
    return None


class LlamaCppRuntime(Closeable):
    """One language-model GGUF in a llama.cpp context, plus an optional mmproj for images."""

    def __init__(
        self,
        gguf: Path | str,
        mmproj: Path | str | None = None,
        *,
        n_ctx: int = 4096,
        n_batch: int = 512,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
        max_tiles: int | None = None,
        verbose: bool = False,
    ):
        self.lc = _import_llama()
        self.path = Path(gguf)
        if not self.path.is_file():
            raise R1VError(f"{self.path}: no such GGUF file")
        self.verbose = verbose
        self.n_threads = n_threads or os.cpu_count() or 1
        self.max_tiles = max_tiles
        self._model: Any = None
        self._ctx: Any = None
        self._vision: Any = None
        self._mmproj = Path(mmproj) if mmproj else None
        self._vision_gpu = n_gpu_layers > 0  # the vision tower goes where the language model goes
        self._keys: list[Any] = []  # what each KV-cache position holds (token id or image-row digest)
        self.vision_seconds = 0.0
        try:
            self._open(n_ctx, n_batch, n_gpu_layers)
        except BaseException:
            self.close()
            raise

    # -- setup ------------------------------------------------------------------------------------------
    def _open(self, n_ctx: int, n_batch: int, n_gpu_layers: int) -> None:
        lc = self.lc
        with llama_log(self.verbose):
            lc.llama_backend_init()
            mp = lc.llama_model_default_params()
            mp.n_gpu_layers = n_gpu_layers
            self._model = lc.llama_model_load_from_file(str(self.path).encode(), mp)
            if not self._model:
                raise R1VError(f"{self.path}: llama.cpp could not load it (run with verbose=True for why)")
            cp = lc.llama_context_default_params()
            cp.n_ctx = n_ctx
            cp.n_batch = cp.n_ubatch = min(n_batch, n_ctx)
            cp.n_threads = cp.n_threads_batch = self.n_threads
            cp.no_perf = True
            self._ctx = lc.llama_init_from_model(self._model, cp)
        if not self._ctx:
            raise R1VError(f"{self.path}: llama.cpp could not create a context of {n_ctx} tokens")
        self.n_ctx = lc.llama_n_ctx(self._ctx)
        self.n_batch = min(n_batch, n_ctx)
        self._vocab = lc.llama_model_get_vocab(self._model)
        self.n_vocab = lc.llama_vocab_n_tokens(self._vocab)
        self._added = self._added_tokens()
        self.n_embd = lc.llama_model_n_embd(self._model)
        self.flavor = self._flavor()
        self.img_context_id = self._single_id(IMG_CONTEXT)
        stops = [self._single_id(t) for t in CHAT_FORMATS[self.flavor].stop_tokens]
        self.stop_ids = sorted({t for t in stops if t is not None} | {self.lc.llama_vocab_eos(self._vocab)})
        self.stop_ids = [t for t in self.stop_ids if 0 <= t < self.n_vocab]

    def _meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = self.lc.llama_model_meta_val_str(self._model, key.encode(), buf, len(buf))
        return buf.value.decode() if n >= 0 else None

    def _flavor(self) -> str:
        from r1v_quant.model.spec import detect_flavor

        flavor = self._meta(FLAVOR_KEY)
        if flavor in CHAT_FORMATS:
            return flavor
        try:  # a GGUF from another converter: tell by its chat template
            return detect_flavor({}, self._meta("tokenizer.chat_template"))
        except R1VError:
            raise R1VError(f"{self.path}: cannot tell the R1V flavour (no {FLAVOR_KEY} key)") from None

    def _single_id(self, text: str) -> int | None:
        ids = self.tokenize(text)
        return ids[0] if len(ids) == 1 else None

    @property
    def vision(self) -> Any:
        if self._vision is None:
            if self._mmproj is None:
                raise R1VError("this model was loaded without an mmproj GGUF: images need --mmproj")
            from r1v_quant.runtime.mtmd import MtmdVision

            self._vision = MtmdVision(
                self._mmproj, text_model=self.path, n_threads=self.n_threads, use_gpu=self._vision_gpu
            )
            self._tiling = mmproj_tiling(self._mmproj)
        return self._vision

    @property
    def has_vision(self) -> bool:
        return self._mmproj is not None

    def close(self) -> None:
        if self._vision is not None:
            self._vision.close()
            self._vision = None
        with llama_log(self.verbose):  # llama_free logs its buffer sizes
            self._ctx = free_handle(self._ctx, self.lc.llama_free)
            self._model = free_handle(self._model, self.lc.llama_model_free)

    # -- text -------------------------------------------------------------------------------------------
    def _added_tokens(self) -> tuple[dict[str, int], re.Pattern[str] | None]:
        """The added tokens as the GGUF file types them (CONTROL / USER_DEFINED), by text.

        llama.cpp retypes some ordinary tokens by their text when it loads a vocabulary (the real Qwen2 BPE's
        "</s>", id 128247, becomes an end-of-generation control token), so the types it reports cannot say
        which tokens the checkpoint's tokenizer matches as added: the file's own list is read instead.
        """
        types = gguf_token_types(self.path)
        if types is None:
            return {}, None
        ids = np.flatnonzero((types == TOKEN_CONTROL) | (types == TOKEN_USER_DEFINED))
        added = {}
        for i in ids.tolist():
            text = self.lc.llama_vocab_get_text(self._vocab, i)
            if text:
                added[text.decode("utf-8", errors="replace")] = i
        if not added:
            return {}, None
        # leftmost-longest, as the tokenizers library matches added tokens
        pattern = re.compile("|".join(re.escape(t) for t in sorted(added, key=len, reverse=True)))
        return added, pattern

    def _llama_tokenize(self, text: str, parse_special: bool) -> list[int]:
        raw = text.encode()
        n_max = len(raw) + 16
        buf = (self.lc.llama_token * n_max)()
        n = self.lc.llama_tokenize(self._vocab, raw, len(raw), buf, n_max, False, parse_special)
        if n < 0:
            raise R1VError(f"llama.cpp could not tokenize {len(raw)} bytes of text")
        return list(buf[:n])

    def tokenize(self, text: str) -> list[int]:
        """Token ids as the checkpoint's tokenizer gives them: added tokens matched, nothing added (the
        templates write their own BOS).

        NFC first, as the tokenizer's normalizer does (llama.cpp applies none, so a decomposed "é" would
        split differently); the text is cut at the added tokens the GGUF lists, and llama.cpp tokenizes the
        pieces between them without parsing special tokens, so an ordinary token llama.cpp retyped as control
        ("</s>") is spelled the way the reference model saw it.
        """
        text = unicodedata.normalize("NFC", text)
        added, pattern = self._added
        if pattern is None:
            return self._llama_tokenize(text, True)
        ids: list[int] = []
        start = 0
        for m in pattern.finditer(text):
            if m.start() > start:
                ids += self._llama_tokenize(text[start : m.start()], False)
            ids.append(added[m.group()])
            start = m.end()
        if start < len(text):
            ids += self._llama_tokenize(text[start:], False)
        return ids

    def token_bytes(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = self.lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self.lc.llama_token_to_piece(self._vocab, token, buf, len(buf), 0, True)
        return buf.raw[:n]

    def detokenize(self, ids: Sequence[int]) -> str:
        return b"".join(self.token_bytes(t) for t in ids).decode("utf-8", errors="replace")

    # -- images and prompts -----------------------------------------------------------------------------
    def image_embeds(self, image: ImageSource) -> np.ndarray:
        """One image -> (tiles x tokens_per_tile, n_embd) float32, tiled by InternVL's rule."""
        t0 = time.perf_counter()
        vision = self.vision
        tiling = self._tiling
        if tiling["dynamic"]:
            max_num = tiling["max_num"] if self.max_tiles is None else self.max_tiles
            out = vision.image_embeds(
                image,
                min_num=tiling["min_num"],
                max_num=max_num,
                use_thumbnail=tiling["use_thumbnail"],
                ps_version=tiling["ps_version"],
            )
        else:
            from PIL import Image

            size = vision.image_size
            tile = open_image(image).resize((size, size), Image.Resampling.BICUBIC)
            out = vision.encode_tiles([tile], ps_version=tiling["ps_version"])
        if out.shape[-1] != self.n_embd:
            raise R1VError(
                f"mmproj gives {out.shape[-1]}-wide embeddings but the language model is {self.n_embd} wide"
            )
        self.vision_seconds += time.perf_counter() - t0
        return np.ascontiguousarray(out.reshape(-1, self.n_embd), dtype=np.float32)

    @property
    def tokens_per_tile(self) -> int:
        return int(self.vision.tokens_per_tile)

    def prompt(
        self,
        messages: Sequence[Mapping[str, Any]],
        images: Sequence[ImageSource] = (),
        *,
        think: bool = True,
    ) -> tuple[list[int], np.ndarray | None]:
        """The flavour's prompt with each `<image>` expanded to its tiles' `<IMG_CONTEXT>` run, and the image
        rows (r1v_quant.runtime.protocol's rules: images without any tag go before the last user message)."""
        msgs = with_images(messages, len(images))
        per_tile = self.tokens_per_tile if images else 1
        embeds = [ImageEmbeds(e, e.shape[0] // per_tile) for e in map(self.image_embeds, images)]
        ids = conversation_ids(self.flavor, msgs, embeds, self.tokenize, think=think)
        return ids, (np.concatenate([e.rows for e in embeds]) if embeds else None)

    # -- decoding ---------------------------------------------------------------------------------------
    def _keys_for(self, ids: Sequence[int], embeds: np.ndarray | None) -> list[Any]:
        ctx = self.img_context_id
        n_img = sum(1 for t in ids if t == ctx) if ctx is not None else 0
        have = 0 if embeds is None else embeds.shape[0]
        if n_img != have:
            raise R1VError(f"prompt has {n_img} <IMG_CONTEXT> tokens but the images give {have} embeddings")
        keys: list[Any] = []
        row = 0
        for t in ids:
            if t == ctx and embeds is not None:
                keys.append(("img", hashlib.blake2b(embeds[row].tobytes(), digest_size=16).digest()))
                row += 1
            else:
                keys.append(int(t))
        return keys

    def _decode(
        self, ids: Sequence[int], embeds: np.ndarray | None, start: int, *, all_logits: bool
    ) -> np.ndarray | None:
        """Decode positions start.. of `ids` (the cache holds 0..start-1); logits of every position when
        `all_logits`, else of the last one only. Text runs go as token batches, image runs as embeddings."""
        lc = self.lc
        n = len(ids)
        if n > self.n_ctx:
            raise R1VError(f"{n} tokens do not fit the context of {self.n_ctx} (raise --ctx)")
        ctx_id = self.img_context_id
        row_of = np.cumsum([t == ctx_id for t in ids]) - 1  # image-row index at each <IMG_CONTEXT>
        out = np.empty((n - start, self.n_vocab), np.float32) if all_logits else None
        last: np.ndarray | None = None
        pos = start
        while pos < n:
            is_img = ids[pos] == ctx_id and embeds is not None
            end = pos
            while (
                end < n and end - pos < self.n_batch and (ids[end] == ctx_id and embeds is not None) == is_img
            ):
                end += 1
            count = end - pos
            batch = lc.llama_batch_init(count, self.n_embd if is_img else 0, 1)
            try:
                if is_img:
                    rows = embeds[row_of[pos] : row_of[pos] + count]  # type: ignore[index]
                    ctypes.memmove(
                        batch.embd, np.ascontiguousarray(rows, np.float32).ctypes.data, rows.nbytes
                    )
                for j in range(count):
                    if not is_img:
                        batch.token[j] = int(ids[pos + j])
                    batch.pos[j] = pos + j
                    batch.n_seq_id[j] = 1
                    batch.seq_id[j][0] = 0
                    batch.logits[j] = all_logits or pos + j == n - 1
                batch.n_tokens = count
                with llama_log(self.verbose):
                    rc = lc.llama_decode(self._ctx, batch)
                if rc != 0:
                    raise R1VError(f"llama_decode failed with code {rc} at position {pos}")
                if all_logits:
                    for j in range(count):
                        ptr = lc.llama_get_logits_ith(self._ctx, j)
                        out[pos + j - start] = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))  # type: ignore[index]
                elif end == n:
                    ptr = lc.llama_get_logits_ith(self._ctx, count - 1)
                    last = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()
            finally:
                lc.llama_batch_free(batch)
            pos = end
        return out if all_logits else last

    def _clear(self, start: int = 0) -> None:
        mem = self.lc.llama_get_memory(self._ctx)
        if start == 0:
            self.lc.llama_memory_clear(mem, True)
        else:
            self.lc.llama_memory_seq_rm(mem, 0, start, -1)
        del self._keys[start:]

    def logits(self, ids: Sequence[int], image_embeds: np.ndarray | None = None) -> np.ndarray:
        """(len(ids), n_vocab) float32 logits at every position, from an empty cache."""
        keys = self._keys_for(ids, image_embeds)
        self._clear()
        out = self._decode(ids, image_embeds, 0, all_logits=True)
        self._keys = keys
        return out  # type: ignore[return-value]

    def generate(
        self,
        ids: Sequence[int],
        image_embeds: np.ndarray | None = None,
        *,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        on_token: Callable[[int], Any] | None = None,
        ignore_stop: bool = False,
        repetition_penalty: float = 1.0,
    ) -> RuntimeResult:
        """Sample up to `max_new_tokens` after `ids`; greedy at temperature 0. Stops at the stop ids unless
        `ignore_stop` (benchmarks that need exactly `max_new_tokens`)."""
        keys = self._keys_for(ids, image_embeds)
        if not ids:
            raise R1VError("empty prompt")
        same = 0
        for a, b in zip(self._keys, keys, strict=False):
            if a != b:
                break
            same += 1
        same = min(same, len(ids) - 1)  # decode at least one position to get fresh logits
        self._clear(same)
        t0 = time.perf_counter()
        logits = self._decode(ids, image_embeds, same, all_logits=False)
        t1 = time.perf_counter()
        self._keys = keys
        generated: list[int] = []

        def feed(token: int) -> np.ndarray | None:
            if len(self._keys) + 1 > self.n_ctx:
                return None
            generated.append(token)
            out = self._decode([*ids, *generated], image_embeds, len(self._keys), all_logits=False)
            self._keys.append(token)
            return out

        result = sample_tokens(
            logits,  # type: ignore[arg-type]
            feed,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop_ids=() if ignore_stop else self.stop_ids,
            on_token=on_token,
            repetition_penalty=repetition_penalty,
            prompt_ids=ids,
        )
        t2 = time.perf_counter()
        result.timings = {
            "prompt_s": t1 - t0,
            "decode_s": t2 - t1,
            "n_prompt": len(ids) - same,
            "n_reused": same,
            "n_gen": len(result.tokens),
            "vision_s": self.vision_seconds,
        }
        return result


def mmproj_tiling(path: Path) -> dict[str, Any]:
    """InternVL tiling settings from an mmproj (r1v_quant.* keys; R1V's values when another tool wrote it)."""
    import gguf

    reader = gguf.GGUFReader(path)

    def val(key: str, default: Any) -> Any:
        f = reader.get_field(key)
        return default if f is None else f.contents()

    return {
        "min_num": int(val("clip.vision.preproc_min_tiles", 1)),
        "max_num": int(val("clip.vision.preproc_max_tiles", 12)),
        "use_thumbnail": bool(val("r1v_quant.use_thumbnail", True)),
        "dynamic": bool(val("r1v_quant.dynamic_image_size", True)),
        "ps_version": str(val("r1v_quant.ps_version", "v2")),
    }
