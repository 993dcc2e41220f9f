"""Image embeddings from an mmproj GGUF through llama.cpp's libmtmd, tiled the InternVL way.

llama.cpp tiles InternVL images its own way (llava-uhd `select_best_resolution`, aspect-preserving black
padding, bilinear overview), which for non-square images gives a different grid than InternVL's
`find_closest_aspect_ratio` + stretch, so a different token sequence. `MtmdVision.image_embeds` instead
tiles with `r1v_quant.model.preprocess` (InternVL's rule, bicubic) and feeds each 448x448 tile to libmtmd
on its
own: an image of exactly the tile size is one llama.cpp tile with no resize (its resize is a plain copy at
equal size), so libmtmd only normalises and encodes it. The per-tile embeddings are concatenated in
InternVL order (tiles row-major, thumbnail last): the sequence the reference model writes over the
`<IMG_CONTEXT>` tokens.

libmtmd needs a text model only for its vocabulary (it tokenises the `<img>`/`</img>` text around an image
chunk); a vocab-only load reads no tensors. Without a text GGUF, a stub one (byte-level BPE vocab with the
two tags, no tensors) is written to a temporary directory, so encoding never loads the 32B decoder.

gguf_mmproj's `detect_position_order` runs a small random probe mmproj through it to tell which
position-row order the installed libmtmd uses.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from r1v_quant.model.preprocess import ImageSource, dynamic_tiles, open_image
from r1v_quant.model.prompts import IMG_END, IMG_START
from r1v_quant.model.qwen2_vocab import bytes_to_unicode
from r1v_quant.model.spec import ModelSpec
from r1v_quant.runtime.gguf_lib import Closeable, free_handle, llama_log, write_header
from r1v_quant.util.errors import R1VError


def import_mtmd() -> tuple[Any, Any]:
    try:
        import llama_cpp
        from llama_cpp import mtmd_cpp
    except (ImportError, OSError) as e:
        raise R1VError(
            f"llama-cpp-python (libmtmd) is not installed ({e}): pip install 'r1v-quant[gguf]'"
        ) from None
    return llama_cpp, mtmd_cpp


def write_stub_text_gguf(path: Path | str) -> Path:
    """A tensor-less qwen2 GGUF whose vocabulary holds the 256 byte tokens plus `<img>` and `</img>`.

    Only for `vocab_only` loading as libmtmd's text model: libmtmd tokenises the image tags with it and
    checks nothing else when the model has no hyper-parameters loaded.
    """
    import gguf

    path = Path(path)
    byte_chars = list(bytes_to_unicode().values())
    tokens = [*byte_chars, "ĠĠ", IMG_START, IMG_END, "<|endoftext|>"]
    types = [gguf.TokenType.NORMAL] * (len(byte_chars) + 1) + [gguf.TokenType.CONTROL] * 3
    writer = gguf.GGUFWriter(path=None, arch=gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    try:
        writer.add_name("r1v-quant mtmd vocab stub")
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(["Ġ Ġ"])  # the BPE loader requires a merges list
        # An eos llama.cpp knows as end-of-generation (else it warns while loading).
        writer.add_bos_token_id(len(tokens) - 1)
        writer.add_eos_token_id(len(tokens) - 1)
        writer.add_add_bos_token(False)
        writer.add_add_eos_token(False)
        write_header(writer, path)
    finally:
        writer.close()
    return path


def _mmproj_meta(path: Path) -> dict[str, int]:
    """Output width, tile size and tokens per tile, read from the mmproj header."""
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise R1VError(f"{path}: not a readable GGUF file ({e})") from None

    def scalar(key: str) -> int:
        field = reader.get_field(key)
        if field is None:
            raise R1VError(f"{path}: no {key} (not an InternVL mmproj GGUF)")
        return int(field.contents())

    proj = reader.get_field("clip.projector_type")
    if proj is None or proj.contents() != "internvl":
        raise R1VError(f"{path}: projector type is not 'internvl'")
    out = next((t for t in reader.tensors if t.name == "mm.model.mlp.3.weight"), None)
    if out is None:
        raise R1VError(f"{path}: no mm.model.mlp.3.weight")
    size, patch = scalar("clip.vision.image_size"), scalar("clip.vision.patch_size")
    scale = scalar("clip.vision.projector.scale_factor")
    return {
        "n_embd": int(out.shape[-1]) if len(out.shape) == 2 else int(out.shape[0]),
        "image_size": size,
        "tokens_per_tile": (size // patch // scale) ** 2,
    }


class MtmdVision(Closeable):
    """A libmtmd context for one mmproj GGUF, used to encode images (no text generation).

    `text_model`: a text GGUF whose vocabulary has `<img>`/`</img>` (loaded vocab-only); None writes a stub.
    Use as a context manager or call `close()`.
    """

    def __init__(
        self,
        mmproj: Path | str,
        *,
        text_model: Path | str | None = None,
        n_threads: int | None = None,
        use_gpu: bool = False,
        verbose: bool = False,
    ):
        self.llama_cpp, self.mtmd = import_mtmd()
        self.path = Path(mmproj)
        if not self.path.is_file():
            raise R1VError(f"{self.path}: no such mmproj file")
        self.verbose = verbose
        meta = _mmproj_meta(self.path)
        self.n_embd: int = meta["n_embd"]
        self.image_size: int = meta["image_size"]
        self.tokens_per_tile: int = meta["tokens_per_tile"]
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._model: Any = None
        self._ctx: Any = None
        try:
            self._open(text_model, n_threads or os.cpu_count() or 1, use_gpu)
        except BaseException:
            self.close()
            raise

    def _open(self, text_model: Path | str | None, n_threads: int, use_gpu: bool) -> None:
        lc, mtmd = self.llama_cpp, self.mtmd
        if text_model is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="r1v-mtmd-")
            text_model = write_stub_text_gguf(Path(self._tmp.name) / "vocab-stub.gguf")
        with llama_log(self.verbose):
            # Route libmtmd/clip logs through the same logger as libllama's.
            from llama_cpp._logger import llama_log_callback

            mtmd.mtmd_log_set(llama_log_callback, ctypes.c_void_p(0))
            mparams = lc.llama_model_default_params()
            mparams.vocab_only = True  # the vocabulary is all libmtmd uses; no tensors are read
            self._model = lc.llama_model_load_from_file(str(text_model).encode(), mparams)
            if not self._model:
                raise R1VError(f"{text_model}: llama.cpp could not load it as a text model")
            cparams = mtmd.mtmd_context_params_default()
            cparams.use_gpu = use_gpu
            cparams.print_timings = self.verbose
            cparams.n_threads = n_threads
            cparams.warmup = False
            self._ctx = mtmd.mtmd_init_from_file(str(self.path).encode(), self._model, cparams)
        if not self._ctx:
            raise R1VError(f"{self.path}: libmtmd could not load this mmproj (run with verbose=True)")
        if not mtmd.mtmd_support_vision(self._ctx):
            raise R1VError(f"{self.path}: libmtmd reports no vision support")

    def close(self) -> None:
        self._ctx = free_handle(self._ctx, self.mtmd.mtmd_free)
        self._model = free_handle(self._model, self.llama_cpp.llama_model_free)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- encoding ---------------------------------------------------------------------------------------
    def encode_rgb(self, rgb: np.ndarray) -> np.ndarray:
        """Encode one H x W x 3 uint8 image as llama.cpp would (its own tiling): (tokens, n_embd)."""
        mtmd = self.mtmd
        if self._ctx is None:
            raise R1VError("MtmdVision is closed")
        rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
        if rgb.ndim != 3 or rgb.shape[2] != 3:
            raise R1VError(f"expected an H x W x 3 RGB array, got shape {rgb.shape}")
        h, w = rgb.shape[:2]
        data = rgb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        bitmap = mtmd.mtmd_bitmap_init(w, h, data)
        chunks = mtmd.mtmd_input_chunks_init()
        try:
            part = mtmd.mtmd_input_part(text=None, bitmap=bitmap)
            parts = (ctypes.POINTER(mtmd.mtmd_input_part) * 1)(ctypes.pointer(part))
            with llama_log(self.verbose):
                rc = mtmd.mtmd_tokenize_from_parts(self._ctx, chunks, parts, 1, False)
            if rc != 0:
                raise R1VError(f"libmtmd could not preprocess a {w}x{h} image (code {rc})")
            every = [
                mtmd.mtmd_input_chunks_get(chunks, i) for i in range(mtmd.mtmd_input_chunks_size(chunks))
            ]
            image_type = mtmd.MTMD_INPUT_CHUNK_TYPE_IMAGE  # the others are the <img> / </img> text
            images = [c for c in every if mtmd.mtmd_input_chunk_get_type(c) == image_type]
            if not images:
                raise R1VError(f"libmtmd made no image chunk from a {w}x{h} image")
            outs = []
            for chunk in images:  # llama.cpp's own slicing gives one chunk per slice, overview last
                n_tokens = mtmd.mtmd_input_chunk_get_n_tokens(chunk)
                with llama_log(self.verbose):
                    rc = mtmd.mtmd_encode_chunk(self._ctx, chunk)
                if rc != 0:
                    raise R1VError(f"libmtmd failed to encode a {w}x{h} image (code {rc})")
                ptr = mtmd.mtmd_get_output_embd(self._ctx)
                outs.append(np.ctypeslib.as_array(ptr, shape=(n_tokens * self.n_embd,)).reshape(n_tokens, -1))
            return np.concatenate(outs)  # concatenate copies out of libmtmd's buffer
        finally:
            mtmd.mtmd_input_chunks_free(chunks)
            mtmd.mtmd_bitmap_free(bitmap)

    def encode_tile(self, tile: Image.Image) -> np.ndarray:
        """One square tile -> (tokens_per_tile, n_embd); refuses input llama.cpp would resize or slice."""
        if tile.size != (self.image_size, self.image_size):
            raise R1VError(
                f"a tile must be {self.image_size}x{self.image_size}, got {tile.size[0]}x{tile.size[1]}"
            )
        out = self.encode_rgb(np.asarray(tile.convert("RGB")))
        if out.shape[0] != self.tokens_per_tile:
            # llama.cpp sliced or resized the tile: the output would not be InternVL's
            raise R1VError(
                f"libmtmd made {out.shape[0]} tokens from one tile, expected {self.tokens_per_tile}"
            )
        return out

    def encode_tiles(self, tiles: Sequence[Image.Image], *, ps_version: str = "v2") -> np.ndarray:
        """(len(tiles), tokens_per_tile, n_embd); each tile encoded on its own, in the given order."""
        outs = [self.encode_tile(t) for t in tiles]
        out = np.stack(outs) if outs else np.empty((0, self.tokens_per_tile, self.n_embd), np.float32)
        if ps_version == "v1":
            # llama.cpp's pixel shuffle is v2; v1 is the same tokens with the per-tile grid transposed.
            side = int(round(self.tokens_per_tile**0.5))
            out = out.reshape(len(outs), side, side, -1).transpose(0, 2, 1, 3).reshape(out.shape)
        return out

    def image_embeds(
        self,
        image: ImageSource,
        *,
        min_num: int = 1,
        max_num: int = 12,
        use_thumbnail: bool = True,
        ps_version: str = "v2",
    ) -> np.ndarray:
        """InternVL-tiled image -> (tiles, tokens_per_tile, n_embd), the reference model's image_embeds."""
        tiles = dynamic_tiles(
            open_image(image),
            min_num=min_num,
            max_num=max_num,
            image_size=self.image_size,
            use_thumbnail=use_thumbnail,
        )
        return self.encode_tiles(tiles, ps_version=ps_version)

    def image_embeds_for(
        self, image: ImageSource, spec: ModelSpec, *, max_num: int | None = None
    ) -> np.ndarray:
        """`image_embeds` with the tiling settings of a checkpoint's spec (`max_num` overrides its max)."""
        if not spec.dynamic_image_size:
            img = open_image(image).resize((self.image_size, self.image_size), Image.Resampling.BICUBIC)
            return self.encode_tiles([img], ps_version=spec.ps_version)
        return self.image_embeds(
            image,
            min_num=spec.min_dynamic_patch,
            max_num=spec.max_dynamic_patch if max_num is None else max_num,
            use_thumbnail=spec.use_thumbnail,
            ps_version=spec.ps_version,
        )


# -- parity against the torch reference ------------------------------------------------------------------
def load_reference_vision(
    model_dir: Path | str, *, dtype: torch.dtype = torch.float32
) -> tuple[ModelSpec, Callable[[torch.Tensor], torch.Tensor]]:
    """The checkpoint's spec and its vision tower + mlp1 in torch as a function of pixel values.

    Only `vision_model.*` and `mlp1.*` are read, so this works for the 38B without loading the decoder.
    """
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.vision import Projector, VisionModel, extract_feature

    ckpt = open_checkpoint(model_dir)
    spec = ckpt.spec
    with torch.device("meta"):
        vm, mlp1 = VisionModel(spec.vision), Projector(spec.projector_in, spec.llm.hidden_size)
    for prefix, module in (("vision_model", vm), ("mlp1", mlp1)):
        state = {k: v.to(dtype) for k, v in ckpt.with_prefix(prefix).items()}
        module.load_state_dict(state, strict=True, assign=True)
    vm.eval()
    mlp1.eval()

    @torch.no_grad()
    def embeds(pixel_values: torch.Tensor) -> torch.Tensor:
        return extract_feature(vm, mlp1, spec, pixel_values.to(dtype)).float()

    return spec, embeds


def embedding_parity(
    model_dir: Path | str,
    mmproj: Path | str,
    images: Sequence[ImageSource],
    *,
    max_num: int | None = None,
    n_threads: int | None = None,
) -> dict[str, Any]:
    """Per-token cosine of libmtmd (InternVL tiling) vs the torch reference over `images`: a quality gate.

    Returns min / median / mean cosine over all tokens, tokens compared and per-image minima.
    """
    from r1v_quant.model.preprocess import preprocess_for_spec

    spec, ref = load_reference_vision(model_dir)
    mins: list[float] = []
    all_cos: list[np.ndarray] = []
    with MtmdVision(mmproj, n_threads=n_threads) as mv:
        for image in images:
            pre = preprocess_for_spec(image, spec, max_num)
            cos = cosine_rows(mv.image_embeds_for(image, spec, max_num=max_num), ref(pre.pixel_values))
            all_cos.append(cos)
            mins.append(float(cos.min()))
    cat = np.concatenate(all_cos) if all_cos else np.zeros(0)
    if not cat.size:
        raise R1VError("embedding_parity needs at least one image")
    return {
        "min": float(cat.min()),
        "median": float(np.median(cat)),
        "mean": float(cat.mean()),
        "tokens": int(cat.size),
        "per_image_min": mins,
    }


def cosine_rows(a: np.ndarray | torch.Tensor, b: np.ndarray | torch.Tensor) -> np.ndarray:
    """Per-token cosine similarity of two (..., n_embd) arrays of the same shape."""
    x = torch.as_tensor(np.asarray(a), dtype=torch.float64).reshape(-1, np.shape(a)[-1])
    y = torch.as_tensor(np.asarray(b), dtype=torch.float64).reshape(-1, np.shape(b)[-1])
    if x.shape != y.shape:
        raise R1VError(f"cannot compare {tuple(x.shape)} with {tuple(y.shape)} token embeddings")
    return torch.nn.functional.cosine_similarity(x, y, dim=-1).numpy()
