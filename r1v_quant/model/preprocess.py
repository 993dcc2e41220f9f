"""InternVL / Skywork-R1V image preprocessing, reproduced exactly with PIL + numpy + torch.

Pipeline (Skywork ``inference/utils.py`` == InternVL ``load_image``):

1. decode and convert to RGB *before* anything else (resizing a palette image would otherwise use NEAREST,
   and resizing RGBA premultiplies alpha, so the order changes pixels);
2. pick a tile grid (cols, rows) with ``min_num <= cols*rows <= max_num`` closest to the aspect ratio;
3. bicubic-resize to (cols*S, rows*S), cut row-major S x S tiles, append an S x S thumbnail of the whole
   image last when there is more than one tile;
4. per tile ``ToTensor`` (/255) then ImageNet ``Normalize``, in float32.

Each tile becomes ``num_image_token`` (256) ``<IMG_CONTEXT>`` tokens between ``<img>`` and ``</img>``.
EXIF orientation is deliberately *not* applied: the reference pipeline does not apply it either.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from r1v_quant.util.errors import R1VError

if TYPE_CHECKING:
    from r1v_quant.model.spec import ModelSpec

__all__ = [
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "PreprocessedImage",
    "dynamic_tiles",
    "find_grid",
    "open_image",
    "preprocess_image",
    "target_ratios",
    "to_tensor",
]

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# float32 constants, shaped for (3, H, W): torchvision's Normalize casts mean/std to the tensor dtype.
_MEAN32 = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD32 = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)

ImageSource = str | Path | bytes | bytearray | Image.Image


def _check_tile_range(min_num: int, max_num: int) -> None:
    if min_num < 1 or max_num < min_num:
        raise R1VError(f"invalid tile range min_num={min_num}, max_num={max_num} (need 1 <= min <= max)")


def _check_range(min_num: int, max_num: int, image_size: int) -> None:
    _check_tile_range(min_num, max_num)
    if image_size < 1:
        raise R1VError(f"invalid image_size={image_size} (must be positive)")


def target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """All grids (i, j) with ``min_num <= i*j <= max_num``, ordered by area i*j.

    InternVL builds ``sorted(set(generator), key=area)``; the set's iteration order only matters among grids
    of equal area. We use a deterministic rule instead: within one area, the order in which the generator
    (n ascending, i ascending, j ascending) first yields each grid. For ``min_num == 1`` (every R1V config)
    no two equal-area grids are ever adjacent in aspect ratio, so this cannot change ``find_grid``'s answer;
    for ``min_num > 1`` InternVL's own answer depends on CPython set internals on exact ties.
    """
    _check_tile_range(min_num, max_num)
    seen: dict[tuple[int, int], None] = {}  # insertion-ordered dedup
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num:
                    seen.setdefault((i, j), None)
    return sorted(seen, key=lambda r: r[0] * r[1])  # sorted() is stable


def find_grid(
    width: int, height: int, *, min_num: int = 1, max_num: int = 12, image_size: int = 448
) -> tuple[int, int]:
    """(cols, rows) of the grid InternVL's ``find_closest_aspect_ratio`` picks for a width x height image."""
    _check_range(min_num, max_num, image_size)
    if width <= 0 or height <= 0:
        raise R1VError(f"cannot tile a zero-size image ({width}x{height})")
    # Same float expressions as the reference, so exact ties (e.g. 2/1 vs 4/2) tie here too.
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for ratio in target_ratios(min_num, max_num):
        diff = abs(aspect_ratio - ratio[0] / ratio[1])
        if diff < best_diff:
            best_diff = diff
            best = ratio
        elif diff == best_diff and area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
            # A tie moves to the later (larger) grid only if the image has enough pixels to fill it.
            best = ratio
    return best


def _as_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit grayscale (PNG / TIFF): PIL's convert("RGB") clips every value above 255 to white; scale
        # the 0..65535 range down instead (I from a 16-bit file holds the same range)
        arr = np.asarray(image, dtype=np.float64)
        if image.mode == "I" and arr.max(initial=0) <= 255 and arr.min(initial=0) >= 0:
            gray = arr.astype(np.uint8)  # an 8-bit image stored as I: already in range
        else:
            gray = np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    if image.mode == "F":
        # 32-bit float: 0..1 intensities are scaled to 0..255, larger ones taken as 0..255 and clipped
        arr = np.asarray(image, dtype=np.float64)
        scale = 255.0 if arr.max(initial=0.0) <= 1.0 else 1.0
        gray = np.clip(np.round(np.nan_to_num(arr) * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(gray, mode="L").convert("RGB")
    return image.convert("RGB")


def dynamic_tiles(
    image: Image.Image,
    *,
    min_num: int = 1,
    max_num: int = 12,
    image_size: int = 448,
    use_thumbnail: bool = True,
) -> list[Image.Image]:
    """Row-major image_size x image_size tiles, plus a whole-image thumbnail last when there are several."""
    image = _as_rgb(image)  # resizing non-RGB modes would not match the reference pixels
    width, height = image.size
    cols, rows = find_grid(width, height, min_num=min_num, max_num=max_num, image_size=image_size)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) != 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def to_tensor(tile: Image.Image) -> np.ndarray:
    """(3, H, W) float32 = (pixel/255 - mean) / std, rounded exactly like torchvision ToTensor + Normalize."""
    arr = np.asarray(_as_rgb(tile), dtype=np.uint8).transpose(2, 0, 1)
    # Each step in float32, one rounding per op, matching torch's div(255) then sub_(mean).div_(std).
    x = arr.astype(np.float32) / np.float32(255.0)
    return np.ascontiguousarray((x - _MEAN32) / _STD32, dtype=np.float32)


def _describe(source: ImageSource) -> str:
    if isinstance(source, bytes | bytearray):
        return f"<{len(source)} bytes>"
    return str(source)


def _read_error(source: ImageSource, exc: BaseException) -> R1VError:
    msg = " ".join(str(exc).split())  # keep the message on one line
    return R1VError(f"cannot read image {_describe(source)}: {type(exc).__name__}: {msg}")


def open_image(source: ImageSource) -> Image.Image:
    """Decode ``source`` (path, encoded bytes or PIL image) fully and return it as a new RGB image."""
    if isinstance(source, Image.Image):
        image = source
        try:
            image.load()  # a lazily opened image may still fail to decode
            rgb = _as_rgb(image).copy()
        except Exception as exc:  # PIL plugins raise many unrelated exception types for bad data
            raise _read_error(source, exc) from exc
    else:
        if isinstance(source, bytes | bytearray):
            if not source:
                raise R1VError("cannot read image: empty byte string")
            fp: Path | io.BytesIO = io.BytesIO(bytes(source))
        else:
            fp = Path(source)
            if not fp.exists():
                raise R1VError(f"image file not found: {fp}")
            if not fp.is_file():
                raise R1VError(f"image path is not a file: {fp}")
        try:
            with Image.open(fp) as image:
                image.load()  # force the full decode so truncated files fail here, not later
                rgb = _as_rgb(image).copy()
        except Exception as exc:  # PIL plugins raise many unrelated exception types for bad data
            raise _read_error(source, exc) from exc
    if rgb.width == 0 or rgb.height == 0:
        raise R1VError(f"image {_describe(source)} has zero size ({rgb.width}x{rgb.height})")
    return rgb


@dataclass(frozen=True)
class PreprocessedImage:
    """One image ready for the vision tower."""

    pixel_values: torch.Tensor  # (num_tiles, 3, S, S) float32
    grid: tuple[int, int]  # (cols, rows); (1, 1) when not tiled
    num_tiles: int  # tiles including the thumbnail
    size: tuple[int, int]  # original (width, height)


def preprocess_image(
    source: ImageSource,
    *,
    image_size: int = 448,
    min_num: int = 1,
    max_num: int = 12,
    use_thumbnail: bool = True,
    dynamic: bool = True,
) -> PreprocessedImage:
    """Open, tile and normalise one image exactly as Skywork-R1V / InternVL do."""
    _check_range(min_num, max_num, image_size)
    image = open_image(source)
    if dynamic:
        grid = find_grid(image.width, image.height, min_num=min_num, max_num=max_num, image_size=image_size)
        tiles = dynamic_tiles(
            image, min_num=min_num, max_num=max_num, image_size=image_size, use_thumbnail=use_thumbnail
        )
    else:
        # Without dynamic tiling the transform's Resize((S, S), BICUBIC) is the whole story.
        grid = (1, 1)
        tiles = [image.resize((image_size, image_size), Image.Resampling.BICUBIC)]
    pixel_values = torch.from_numpy(np.stack([to_tensor(t) for t in tiles]))
    return PreprocessedImage(pixel_values=pixel_values, grid=grid, num_tiles=len(tiles), size=image.size)


def preprocess_for_spec(
    source: ImageSource, spec: ModelSpec, max_num: int | None = None
) -> PreprocessedImage:
    """`preprocess_image` with the tiling a checkpoint's config asks for (`max_num` overrides its cap)."""
    return preprocess_image(
        source,
        image_size=spec.force_image_size,
        min_num=spec.min_dynamic_patch,
        max_num=spec.max_dynamic_patch if max_num is None else max_num,
        use_thumbnail=spec.use_thumbnail,
        dynamic=spec.dynamic_image_size,
    )
