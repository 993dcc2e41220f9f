"""Preprocessing must match InternVL / Skywork-R1V pixel for pixel and token for token."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from r1v_quant.model.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    PreprocessedImage,
    dynamic_tiles,
    find_grid,
    open_image,
    preprocess_image,
    target_ratios,
    to_tensor,
)
from r1v_quant.model.prompts import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    expand_image_tokens,
    image_placeholder,
)
from r1v_quant.util.errors import R1VError

# --------------------------------------------------------------------------------------------------------
# Independent reference: InternVL's dynamic_preprocess / find_closest_aspect_ratio transcribed literally.
# --------------------------------------------------------------------------------------------------------


def _internvl_target_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    target = set(
        (i, j)
        for n in range(min_num, max_num + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if i * j <= max_num and i * j >= min_num
    )
    return sorted(target, key=lambda x: x[0] * x[1])


def _find_closest_aspect_ratio(aspect_ratio, ratios, width, height, image_size):
    best_ratio_diff = float("inf")
    best_ratio = (1, 1)
    area = width * height
    for ratio in ratios:
        target_aspect_ratio = ratio[0] / ratio[1]
        ratio_diff = abs(aspect_ratio - target_aspect_ratio)
        if ratio_diff < best_ratio_diff:
            best_ratio_diff = ratio_diff
            best_ratio = ratio
        elif ratio_diff == best_ratio_diff:  # noqa: SIM102 (kept as a literal copy of InternVL)
            if area > 0.5 * image_size * image_size * ratio[0] * ratio[1]:
                best_ratio = ratio
    return best_ratio


def _internvl_grid(w: int, h: int, min_num: int = 1, max_num: int = 12, image_size: int = 448):
    ratios = _internvl_target_ratios(min_num, max_num)
    return _find_closest_aspect_ratio(w / h, ratios, w, h, image_size)


def _generator_order_ratios(min_num: int, max_num: int) -> list[tuple[int, int]]:
    """The documented deterministic order: first occurrence in the generator, then stable sort by area."""
    out: list[tuple[int, int]] = []
    for n in range(min_num, max_num + 1):
        for i in range(1, n + 1):
            for j in range(1, n + 1):
                if min_num <= i * j <= max_num and (i, j) not in out:
                    out.append((i, j))
    return sorted(out, key=lambda x: x[0] * x[1])


def _reference_tiles(image: Image.Image, grid: tuple[int, int], size: int, thumb: bool) -> list[Image.Image]:
    cols, rows = grid
    resized = image.resize((size * cols, size * rows), Image.Resampling.BICUBIC)
    tiles = []
    for k in range(cols * rows):
        x, y = (k % cols) * size, (k // cols) * size
        tiles.append(resized.crop((x, y, x + size, y + size)))
    if thumb and len(tiles) != 1:
        tiles.append(image.resize((size, size), Image.Resampling.BICUBIC))
    return tiles


def _torchvision_like(tile: Image.Image) -> torch.Tensor:
    """torchvision ToTensor + Normalize, transcribed (torchvision itself is not installed)."""
    img = torch.from_numpy(np.array(tile, copy=True)).permute(2, 0, 1).contiguous()
    img = img.to(dtype=torch.float32).div(255)
    mean = torch.as_tensor(IMAGENET_MEAN, dtype=torch.float32).view(-1, 1, 1)
    std = torch.as_tensor(IMAGENET_STD, dtype=torch.float32).view(-1, 1, 1)
    return img.sub_(mean).div_(std)


def _noise(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, size=(h, w, channels), dtype=np.uint8), mode)


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------------
# Grid selection
# --------------------------------------------------------------------------------------------------------

# (w, h, max_num, expected grid) worked out by hand from the rule.
HAND_GRIDS = [
    (448, 448, 12, (1, 1)),  # ties with (2,2),(3,3) but 448^2 is not > 0.5*448^2*4
    (512, 512, 12, (1, 1)),
    (10, 10, 12, (1, 1)),
    (1000, 1000, 12, (3, 3)),  # 1e6 > 0.5*448^2*4 and > 0.5*448^2*9: the tie rule climbs to (3,3)
    (800, 600, 12, (4, 3)),  # 4/3 exactly
    (800, 600, 6, (3, 2)),  # 4/3 is out of range; 1.5 is 0.167 away, 1.0 is 0.333 away
    (600, 800, 12, (3, 4)),
    (4000, 3000, 12, (4, 3)),
    (896, 448, 12, (2, 1)),  # (4,2) ties but 896*448 is not > 0.5*448^2*8
    (2000, 1000, 12, (4, 2)),  # same tie, now with enough pixels
    (1920, 1080, 12, (4, 2)),  # 16/9: 2.0 is closest; tie (2,1)->(4,2) taken
    (1080, 1920, 12, (2, 4)),
    (1344, 896, 12, (3, 2)),
    (300, 451, 12, (2, 3)),
    (100, 3000, 12, (1, 12)),
    (3000, 100, 12, (12, 1)),
    (672, 448, 2, (2, 1)),  # 1.5 is equidistant from 1 and 2; area 301056 > 0.5*448^2*2 -> later one
    (15, 10, 2, (1, 1)),  # same tie, too few pixels -> keep (1,1)
    (5000, 10, 1, (1, 1)),  # max_num=1 forces a single tile
]


def test_find_grid_tie_threshold_is_strict() -> None:
    # 4x9 (aspect 0.444): (1,2) and (2,4) tie at 0.5; area 36 == 0.5*3^2*8 exactly, so '>' keeps (1,2).
    assert find_grid(4, 9, max_num=8, image_size=3) == (1, 2) == _internvl_grid(4, 9, 1, 8, 3)
    assert find_grid(4, 9, max_num=8, image_size=2) == (2, 4) == _internvl_grid(4, 9, 1, 8, 2)


@pytest.mark.parametrize(("w", "h", "max_num", "expected"), HAND_GRIDS)
def test_find_grid_hand_checked(w: int, h: int, max_num: int, expected: tuple[int, int]) -> None:
    assert find_grid(w, h, max_num=max_num) == expected
    assert _internvl_grid(w, h, max_num=max_num) == expected  # guards the transcription too


TABLE_SIZES = [
    (448, 448), (800, 600), (600, 800), (1920, 1080), (1080, 1920), (100, 3000), (3000, 100), (300, 451),
    (512, 512), (2000, 1000), (1344, 896), (10, 10), (4000, 3000), (896, 448), (1000, 1000), (1, 1),
    (1, 5000), (5000, 1), (640, 480), (1280, 720), (720, 1280), (2048, 1536), (1024, 768), (333, 777),
    (1500, 1000), (900, 600), (224, 224), (7, 3), (3, 7), (2560, 1440), (3840, 2160), (1200, 400),
]  # fmt: skip


@pytest.mark.parametrize(("w", "h"), TABLE_SIZES)
def test_tile_count_table(w: int, h: int) -> None:
    grid = find_grid(w, h)
    assert grid == _internvl_grid(w, h)
    cols, rows = grid
    assert 1 <= cols * rows <= 12
    image = Image.new("RGB", (w, h), (10, 20, 30))
    # Small image_size keeps this fast; the grid must be recomputed for it.
    small_grid = find_grid(w, h, image_size=16)
    assert small_grid == _internvl_grid(w, h, image_size=16)
    tiles = dynamic_tiles(image, image_size=16)
    n = small_grid[0] * small_grid[1]
    assert len(tiles) == n + (1 if n > 1 else 0)
    assert len(dynamic_tiles(image, image_size=16, use_thumbnail=False)) == n


def test_find_grid_sweep_matches_internvl() -> None:
    """Every max_num and several image sizes (the tie rule depends on image_size) on a grid of shapes."""
    sides = [1, 2, 3, 5, 7, 10, 14, 21, 30, 45, 64, 100, 150, 224, 300, 448, 600, 896, 1000, 1500, 3000]
    mismatches = []
    for max_num in (1, 2, 4, 6, 9, 12):
        for image_size in (8, 448):
            for w, h in itertools.product(sides, sides):
                got = find_grid(w, h, max_num=max_num, image_size=image_size)
                want = _internvl_grid(w, h, max_num=max_num, image_size=image_size)
                if got != want:
                    mismatches.append((w, h, max_num, image_size, got, want))
    assert not mismatches, mismatches[:5]


def test_find_grid_min_num_above_one_uses_generator_order() -> None:
    # min_num=max_num=4 yields (1,4),(2,2),(4,1) at n=4; 5x2 (aspect 2.5) is equidistant from 1 and 4.
    ordered = _generator_order_ratios(4, 4)
    assert ordered == [(1, 4), (2, 2), (4, 1)]
    assert find_grid(5, 2, min_num=4, max_num=4, image_size=8) == (2, 2)  # 10 px is not > 0.5*64*4: keep
    assert find_grid(5, 2, min_num=4, max_num=4, image_size=1) == (4, 1)  # 10 > 0.5*1*4: move on
    for min_num, max_num in [(2, 6), (4, 4), (6, 7), (8, 9), (3, 12)]:
        ratios = _generator_order_ratios(min_num, max_num)
        for w, h in itertools.product([2, 5, 10, 15, 20, 40], [1, 2, 4, 6, 8]):
            want = _find_closest_aspect_ratio(w / h, ratios, w, h, 8)
            assert find_grid(w, h, min_num=min_num, max_num=max_num, image_size=8) == want


def test_target_ratios_order_and_content() -> None:
    assert target_ratios(1, 4) == [(1, 1), (1, 2), (2, 1), (1, 3), (3, 1), (2, 2), (1, 4), (4, 1)]
    for min_num, max_num in [(1, 12), (1, 6), (2, 9), (3, 3), (5, 12)]:
        got = target_ratios(min_num, max_num)
        assert got == _generator_order_ratios(min_num, max_num)
        assert set(got) == set(_internvl_target_ratios(min_num, max_num))
        assert len(got) == len(set(got))
        areas = [i * j for i, j in got]
        assert areas == sorted(areas)
    assert len(target_ratios(1, 12)) == sum(1 for i in range(1, 13) for j in range(1, 13) if i * j <= 12)


BAD_GRID_ARGS = [
    (0, 5, {}),
    (5, 0, {}),
    (5, 5, {"max_num": 0}),
    (5, 5, {"min_num": 3, "max_num": 2}),
    (5, 5, {"image_size": 0}),
]


@pytest.mark.parametrize(("w", "h", "kwargs"), BAD_GRID_ARGS)
def test_find_grid_rejects_bad_arguments(w: int, h: int, kwargs: dict) -> None:
    with pytest.raises(R1VError):
        find_grid(w, h, **kwargs)


# --------------------------------------------------------------------------------------------------------
# Pixels
# --------------------------------------------------------------------------------------------------------


def test_tiles_match_independent_resize_and_crop_at_448() -> None:
    image = _noise(800, 600, seed=1)
    tiles = dynamic_tiles(image)
    ref = _reference_tiles(image, (4, 3), 448, thumb=True)
    assert len(tiles) == 13
    for k, (got, want) in enumerate(zip(tiles, ref, strict=True)):
        assert got.mode == "RGB" and got.size == (448, 448)
        assert np.array_equal(np.asarray(got), np.asarray(want)), f"tile {k} differs"
    # Thumbnail is last, and it is the whole picture, not a crop.
    thumb = np.asarray(image.resize((448, 448), Image.Resampling.BICUBIC))
    assert np.array_equal(np.asarray(tiles[-1]), thumb)
    assert not np.array_equal(np.asarray(tiles[0]), thumb)


def test_tiles_are_row_major() -> None:
    # Each of the 3x2 cells is a distinct flat colour so a transposed order would be caught.
    cell = 16
    arr = np.zeros((2 * cell, 3 * cell, 3), dtype=np.uint8)
    colours = {}
    for r, c in itertools.product(range(2), range(3)):
        colour = (40 * (r * 3 + c) + 10, 200 - 30 * c, 50 + 100 * r)
        arr[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell] = colour
        colours[(r, c)] = colour
    image = Image.fromarray(arr, "RGB")
    assert find_grid(3 * cell, 2 * cell, image_size=cell) == (3, 2)
    tiles = dynamic_tiles(image, image_size=cell, use_thumbnail=False)
    assert len(tiles) == 6
    for k, tile in enumerate(tiles):
        r, c = divmod(k, 3)
        centre = np.asarray(tile)[cell // 2, cell // 2]
        assert tuple(int(v) for v in centre) == colours[(r, c)], f"tile {k} is not cell row {r} col {c}"


def test_single_tile_has_no_thumbnail() -> None:
    image = _noise(40, 40, seed=2)
    tiles = dynamic_tiles(image, image_size=40)
    assert len(tiles) == 1
    assert np.array_equal(np.asarray(tiles[0]), np.asarray(image))


@pytest.mark.parametrize("mode", ["RGBA", "P", "L", "LA", "CMYK", "1"])
def test_non_rgb_converted_before_resizing(mode: str) -> None:
    base = _noise(100, 70, seed=3, mode="RGBA")  # not a multiple of the tile size: a real resize
    if mode == "RGBA":
        image = base
    elif mode == "P":
        image = base.convert("RGB").quantize(colors=64)
    else:
        image = base.convert(mode)
    assert image.mode == mode
    size = 32
    rgb = image.convert("RGB")
    grid = find_grid(*image.size, image_size=size)
    want = _reference_tiles(rgb, grid, size, thumb=True)
    for source in (image, _png_bytes(image) if mode != "CMYK" else image):
        result = preprocess_image(source, image_size=size)
        expected = torch.stack([_torchvision_like(t) for t in want])
        assert torch.equal(result.pixel_values, expected)
    # dynamic_tiles given a non-RGB image must also convert first.
    tiles = dynamic_tiles(image, image_size=size)
    assert all(t.mode == "RGB" for t in tiles)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(tiles, want, strict=True))
    if mode in ("RGBA", "P"):
        # Teeth: resizing in the original mode (premultiplied alpha / NEAREST palette) gives other pixels.
        wrong = image.resize((size * grid[0], size * grid[1])).convert("RGB")
        right = rgb.resize((size * grid[0], size * grid[1]), Image.Resampling.BICUBIC)
        assert not np.array_equal(np.asarray(wrong), np.asarray(right))


def test_normalisation_constant_colour_by_hand() -> None:
    image = Image.new("RGB", (448, 448), (255, 128, 0))
    arr = to_tensor(image)
    assert arr.dtype == np.float32 and arr.shape == (3, 448, 448)
    # (255/255 - 0.485)/0.229, (128/255 - 0.456)/0.224, (0 - 0.406)/0.225
    expected = (2.2489082969, 0.2051820728, -1.8044444444)
    for c in range(3):
        assert np.all(arr[c] == arr[c, 0, 0])
        assert float(arr[c, 0, 0]) == pytest.approx(expected[c], abs=1e-6)
    r = (np.float32(1.0) - np.float32(0.485)) / np.float32(0.229)
    assert arr[0, 0, 0] == r  # float32 arithmetic, not float64 rounded afterwards


def test_to_tensor_bit_exact_with_torchvision_formula() -> None:
    tile = _noise(64, 48, seed=4)
    got = to_tensor(tile)
    assert got.shape == (3, 48, 64)
    assert np.array_equal(got, _torchvision_like(tile).numpy())
    # All 256 byte values in every channel, to cover each possible rounding.
    ramp = np.stack([np.arange(256, dtype=np.uint8)] * 3, axis=-1).reshape(16, 16, 3)
    ramp_img = Image.fromarray(ramp, "RGB")
    assert np.array_equal(to_tensor(ramp_img), _torchvision_like(ramp_img).numpy())


# --------------------------------------------------------------------------------------------------------
# preprocess_image
# --------------------------------------------------------------------------------------------------------


def test_preprocess_image_from_path_bytes_and_pil(tmp_path: Path) -> None:
    image = _noise(120, 80, seed=5)
    path = tmp_path / "x.png"
    image.save(path)
    size = 32
    grid = find_grid(120, 80, image_size=size)
    expected = torch.stack([_torchvision_like(t) for t in _reference_tiles(image, grid, size, thumb=True)])
    for source in (path, str(path), path.read_bytes(), image):
        res = preprocess_image(source, image_size=size)
        assert isinstance(res, PreprocessedImage)
        assert res.grid == grid
        assert res.size == (120, 80)
        assert res.num_tiles == grid[0] * grid[1] + 1 == res.pixel_values.shape[0]
        assert res.pixel_values.dtype == torch.float32
        assert res.pixel_values.shape[1:] == (3, size, size)
        assert torch.equal(res.pixel_values, expected)


def test_preprocess_image_options() -> None:
    image = _noise(200, 100, seed=6)
    res = preprocess_image(image, image_size=16, use_thumbnail=False)
    assert res.grid == find_grid(200, 100, image_size=16) and res.num_tiles == res.grid[0] * res.grid[1]
    flat = preprocess_image(image, image_size=16, dynamic=False)
    assert flat.grid == (1, 1) and flat.num_tiles == 1 and flat.size == (200, 100)
    want = _torchvision_like(image.resize((16, 16), Image.Resampling.BICUBIC))
    assert torch.equal(flat.pixel_values[0], want)
    capped = preprocess_image(image, image_size=16, max_num=1)
    assert capped.grid == (1, 1) and capped.num_tiles == 1
    with pytest.raises(R1VError):
        preprocess_image(image, min_num=0)


def test_preprocessed_image_is_frozen() -> None:
    res = preprocess_image(Image.new("RGB", (8, 8)), image_size=8)
    with pytest.raises(AttributeError):
        res.num_tiles = 5  # type: ignore[misc]


# --------------------------------------------------------------------------------------------------------
# open_image errors
# --------------------------------------------------------------------------------------------------------


def _one_line(err: pytest.ExceptionInfo[R1VError]) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.jpg"
    with pytest.raises(R1VError) as err:
        open_image(missing)
    msg = _one_line(err)
    assert "not found" in msg and str(missing) in msg
    with pytest.raises(R1VError, match="not a file"):
        open_image(tmp_path)


def test_corrupt_inputs(tmp_path: Path) -> None:
    with pytest.raises(R1VError) as err:
        open_image(b"definitely not an image")
    assert "cannot read image" in _one_line(err)
    with pytest.raises(R1VError, match="empty"):
        open_image(b"")
    truncated = _png_bytes(_noise(64, 64, seed=7))[:200]  # valid header, cut-off pixel data
    with pytest.raises(R1VError) as err:
        open_image(truncated)
    assert "cannot read image" in _one_line(err)
    bad = tmp_path / "bad.png"
    bad.write_bytes(truncated)
    with pytest.raises(R1VError) as err:
        open_image(bad)
    assert str(bad) in _one_line(err)


def test_zero_size_image() -> None:
    with pytest.raises(R1VError, match="zero size"):
        open_image(Image.new("RGB", (0, 5)))
    with pytest.raises(R1VError, match="zero-size"):
        dynamic_tiles(Image.new("RGB", (5, 0)))


def test_open_image_returns_rgb_copy() -> None:
    src = Image.new("RGB", (4, 4), (1, 2, 3))
    out = open_image(src)
    assert out.mode == "RGB" and out is not src
    assert open_image(Image.new("L", (3, 2), 77)).getpixel((0, 0)) == (77, 77, 77)


# --------------------------------------------------------------------------------------------------------
# Prompt placeholders
# --------------------------------------------------------------------------------------------------------


def test_image_placeholder() -> None:
    assert (IMG_START, IMG_END, IMG_CONTEXT) == ("<img>", "</img>", "<IMG_CONTEXT>")
    one = image_placeholder(1)
    assert one == "<img>" + "<IMG_CONTEXT>" * 256 + "</img>"
    thirteen = image_placeholder(13)
    assert thirteen.startswith("<img><IMG_CONTEXT>") and thirteen.endswith("<IMG_CONTEXT></img>")
    assert thirteen.count("<IMG_CONTEXT>") == 3328
    assert image_placeholder(3, tokens_per_tile=2) == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>"
    with pytest.raises(R1VError):
        image_placeholder(0)


def test_expand_image_tokens() -> None:
    text = "A: <image>\nB: <image>\nCompare."
    out = expand_image_tokens(text, [2, 1], tokens_per_tile=3)
    assert out == (
        "A: <img>" + "<IMG_CONTEXT>" * 6 + "</img>\nB: <img>" + "<IMG_CONTEXT>" * 3 + "</img>\nCompare."
    )
    assert "<image>" not in out
    assert expand_image_tokens("no images", []) == "no images"
    full = expand_image_tokens("<image>", [13])
    assert full == image_placeholder(13) and full.count(IMG_CONTEXT) == 3328


@pytest.mark.parametrize(("text", "tiles"), [("<image> and <image>", [1]), ("<image>", []), ("plain", [1])])
def test_expand_count_mismatch(text: str, tiles: list[int]) -> None:
    with pytest.raises(R1VError) as err:
        expand_image_tokens(text, tiles)
    msg = _one_line(err)
    assert f"{text.count('<image>')} <image>" in msg and f"{len(tiles)} image" in msg
