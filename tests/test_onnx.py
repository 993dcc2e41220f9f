"""ONNX export of vision tower + pixel shuffle + mlp1 (exporters/onnx_vision, runtime/onnx, cli/onnx)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from r1v_quant.cli.onnx import onnx_command  # noqa: E402
from r1v_quant.exporters.onnx_vision import (  # noqa: E402
    DATA_NAME,
    MODEL_NAME,
    PREPROCESSING_NAME,
    REPORT_NAME,
    compare,
    export_onnx,
    relocate_model,
)
from r1v_quant.model.preprocess import IMAGENET_MEAN, IMAGENET_STD, find_grid, preprocess_image  # noqa: E402
from r1v_quant.model.reference import R1VModel  # noqa: E402
from r1v_quant.model.spec import load_spec  # noqa: E402
from r1v_quant.runtime.onnx import (  # noqa: E402
    CPU,
    CUDA,
    OnnxVisionEncoder,
    ProviderFallbackWarning,
    choose_providers,
)
from r1v_quant.util.errors import R1VError  # noqa: E402

HAS_CUDA = CUDA in ort.get_available_providers()


def _photo(w: int, h: int, seed: int) -> Image.Image:
    """A textured RGB image (gradients + noise), so tiles differ from each other."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (w + h)], -1)
    arr = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
    return Image.fromarray(arr, "RGB")


def _pixels(image: Image.Image, spec) -> torch.Tensor:
    return preprocess_image(
        image,
        image_size=spec.force_image_size,
        min_num=spec.min_dynamic_patch,
        max_num=spec.max_dynamic_patch,
        use_thumbnail=spec.use_thumbnail,
    ).pixel_values


def _assert_fp32_close(got: np.ndarray, ref: np.ndarray) -> None:
    """fp32 ONNX vs fp32 torch: a few float32 ulps of the output scale (the trained mlp1 outputs reach ~100s,
    where one ulp is ~1e-5; the untrained tiny's stay below 1, where the bound is 1e-5 absolute)."""
    scale = max(1.0, float(np.abs(ref).max()))
    assert np.abs(got - ref).max() < 1e-5 * scale, (np.abs(got - ref).max(), scale)


def _random_tiles(n: int, seed: int = 0) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 448, 448, generator=g)
    return (
        (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    ).numpy()


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path, tiny_rms_dir: Path) -> dict[str, Path]:
    """Each variant exported once; the in-export torch vs onnxruntime check runs for fp32 layernorm only."""
    root = tmp_path_factory.mktemp("onnx")
    variants = {
        "fp32": (tiny_dir, {"verify": True}),
        "fp32_rms": (tiny_rms_dir, {"verify": False}),
        "int8": (tiny_dir, {"int8": True, "verify": False}),
        "fp16": (tiny_dir, {"dtype": "fp16", "verify": False}),
    }
    for name, (src, kw) in variants.items():
        export_onnx(src, root / name, **kw)
    return {name: root / name for name in variants}


@pytest.fixture(scope="module")
def torch_models(tiny_dir: Path, tiny_rms_dir: Path) -> dict[str, R1VModel]:
    return {"layernorm": R1VModel.from_checkpoint(tiny_dir), "rms": R1VModel.from_checkpoint(tiny_rms_dir)}


def _encoder(path: Path) -> OnnxVisionEncoder:
    return OnnxVisionEncoder(path, provider="cpu")


# -- numerics against the torch reference ------------------------------------------------------------------
@pytest.mark.parametrize("vit, export", [("layernorm", "fp32"), ("rms", "fp32_rms")])
@pytest.mark.parametrize("size", [(448, 448), (900, 450)], ids=["single-tile", "multi-tile"])
def test_fp32_matches_torch(exports, torch_models, vit: str, export: str, size: tuple[int, int]) -> None:
    model = torch_models[vit]
    pixels = _pixels(_photo(*size, seed=size[0]), model.spec)
    assert pixels.shape[0] == (1 if size == (448, 448) else 3)  # 2x1 grid + thumbnail
    ref = model.image_embeds(pixels).numpy()
    got = _encoder(exports[export]).encode(pixels.numpy())
    assert got.shape == ref.shape == (pixels.shape[0], 256, model.spec.llm.hidden_size)
    assert got.dtype == np.float32
    _assert_fp32_close(got, ref)


@pytest.mark.parametrize("size", [(448, 448), (900, 450)], ids=["single-tile", "multi-tile"])
def test_int8_cosine(exports, torch_models, size: tuple[int, int]) -> None:
    model = torch_models["layernorm"]
    pixels = _pixels(_photo(*size, seed=7), model.spec)
    ref = model.image_embeds(pixels).numpy()
    got = _encoder(exports["int8"]).encode(pixels.numpy())
    stats = compare(ref, got)
    assert stats["cosine_min"] >= 0.99, stats
    assert stats["max_abs_diff"] > 0  # it really is quantized


def test_int8_rewrites_weight_matmuls_only(exports) -> None:
    report = json.loads((exports["int8"] / REPORT_NAME).read_text())
    q = report["int8"]
    layers = 4  # tiny ViT: qkv, proj, fc1, fc2 per layer, + mlp1's two linears; attention's 2 stay fp32
    assert q["matmul_integer"] == 4 * layers + 2
    assert q["matmul_fp32_after"] == 2 * layers
    assert q["gemm"] == 0 and q["conv_fp32"] == 1
    fp32_bytes = (exports["fp32"] / MODEL_NAME).stat().st_size
    assert (exports["int8"] / MODEL_NAME).stat().st_size < 0.5 * fp32_bytes


def test_fp16_runs_and_is_close(exports, torch_models) -> None:
    model = torch_models["layernorm"]
    pixels = _pixels(_photo(900, 450, seed=3), model.spec)
    ref = model.image_embeds(pixels).numpy()
    got = _encoder(exports["fp16"]).encode(pixels.numpy())
    assert got.dtype == np.float32  # one I/O contract for every weight type
    stats = compare(ref, got)
    assert stats["cosine_min"] >= 0.999, stats
    assert stats["max_abs_diff"] < 0.01 * stats["ref_max_abs"] + 1e-3, stats
    assert json.loads((exports["fp16"] / REPORT_NAME).read_text())["weights"] == "fp16"
    assert graph_initializer_types(exports["fp16"] / MODEL_NAME) >= {onnx.TensorProto.FLOAT16}


def graph_initializer_types(path: Path) -> set[int]:
    return {t.data_type for t in onnx.load(str(path)).graph.initializer}


def test_dynamic_tile_axis(exports, torch_models) -> None:
    enc = _encoder(exports["fp32"])
    model = torch_models["layernorm"]
    x = _random_tiles(5, seed=5)
    ref = model.image_embeds(torch.from_numpy(x)).numpy()
    for n in (1, 5):
        got = enc.encode(x[:n])
        assert got.shape == (n, 256, model.spec.llm.hidden_size)
        _assert_fp32_close(got, ref[:n])  # tiles are independent: tile 0 alone = tile 0 of 5
    graph = onnx.load(str(exports["fp32"] / MODEL_NAME)).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "tiles"
    assert graph.output[0].type.tensor_type.shape.dim[0].dim_param == "tiles"


def test_export_report_verification(exports) -> None:
    report = json.loads((exports["fp32"] / REPORT_NAME).read_text())
    assert report["model"] == MODEL_NAME and report["external_data"] is None
    assert report["input"] == {"name": "pixel_values", "shape": ["tiles", 3, 448, 448], "dtype": "float32"}
    assert report["output"]["name"] == "image_embeds" and report["output"]["shape"][1:] == [256, 256]
    v = report["verification"]
    assert v["tiles"] == 2 and v["provider"] == CPU
    assert v["max_abs_diff"] < 1e-5 * max(1.0, v["ref_max_abs"]) and v["cosine_min"] > 0.99999
    assert set(report["files"]) == {MODEL_NAME, PREPROCESSING_NAME}
    assert report["bytes"] == sum(report["files"].values())
    assert v["reference"] == "torch fp32" and v["nonfinite"] == 0
    assert not any(p.name.startswith(".") for p in exports["fp32"].iterdir())  # no staging left behind


# -- providers --------------------------------------------------------------------------------------------
def test_choose_providers() -> None:
    assert choose_providers("auto", [CUDA, CPU]) == [CUDA, CPU]
    assert choose_providers("auto", [CPU]) == [CPU]
    assert choose_providers("cpu", [CUDA, CPU]) == [CPU]
    assert choose_providers("cuda", [CPU]) == [CUDA, CPU]
    with pytest.raises(R1VError, match="unknown provider"):
        choose_providers("tpu", [CPU])


@pytest.mark.skipif(HAS_CUDA, reason="this onnxruntime has a CUDA provider: no fallback to observe")
def test_cuda_request_reports_cpu_fallback(exports) -> None:
    with pytest.warns(ProviderFallbackWarning, match="asked for CUDAExecutionProvider but running on CPU"):
        enc = OnnxVisionEncoder(exports["fp32"], provider="cuda")
    rep = enc.report()
    assert rep["provider_requested"] == "cuda"
    assert rep["providers_requested"] == [CUDA, CPU]
    assert rep["active_provider"] == CPU and rep["providers_active"] == [CPU]
    assert "onnxruntime-gpu" in rep["fallback"]
    assert enc.encode(_random_tiles(1)).shape == (1, 256, 256)  # still runs, on CPU
    with pytest.raises(R1VError, match="asked for CUDAExecutionProvider"):
        OnnxVisionEncoder(exports["fp32"], provider="cuda", strict=True)


def test_auto_and_cpu_report_no_fallback(exports) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", ProviderFallbackWarning)
        for provider in ("auto", "cpu"):
            enc = OnnxVisionEncoder(exports["fp32"], provider=provider)
            assert enc.fallback is None
            assert enc.active_provider == (CUDA if provider == "auto" and HAS_CUDA else CPU)
            assert enc.report()["weights"] == "fp32"


# -- preprocessing.json ----------------------------------------------------------------------------------
def test_preprocessing_json(exports, tiny_dir: Path) -> None:
    pp = json.loads((exports["fp32"] / PREPROCESSING_NAME).read_text())
    spec = load_spec(tiny_dir)
    assert pp["image_size"] == 448 and pp["patch_size"] == 14
    assert pp["image_mean"] == list(IMAGENET_MEAN) and pp["image_std"] == list(IMAGENET_STD)
    assert pp["color_mode"] == "RGB" and pp["convert_to_rgb_first"] is True
    assert pp["resize"]["interpolation"] == "bicubic"
    assert pp["rescale_factor"] == pytest.approx(1 / 255)
    t = pp["tiling"]
    assert (t["min_tiles"], t["max_tiles"], t["use_thumbnail"], t["dynamic"]) == (1, 12, True, True)
    assert "thumbnail" in t and "row-major" in t["rule"]
    assert pp["tokens_per_tile"] == spec.num_image_token == 256
    ph = pp["placeholder"]
    assert (ph["image_tag"], ph["start"], ph["context"], ph["end"]) == (
        "<image>",
        "<img>",
        "<IMG_CONTEXT>",
        "</img>",
    )
    assert ph["token_ids"] == {
        "img_start": spec.tokens.img_start,
        "img_context": spec.tokens.img_context,
        "img_end": spec.tokens.img_end,
    }
    assert all(isinstance(v, int) for v in ph["token_ids"].values())
    assert pp["input"]["shape"] == ["tiles", 3, 448, 448] and pp["output"]["shape"] == ["tiles", 256, 256]


def test_encode_image_follows_preprocessing_json(exports, torch_models) -> None:
    enc = _encoder(exports["fp32"])
    image = _photo(1000, 300, seed=11)
    embeds, tiles = enc.encode_image(image)
    cols, rows = find_grid(1000, 300)
    assert tiles == cols * rows + 1 == embeds.shape[0]
    ref = torch_models["layernorm"].image_embeds(_pixels(image, torch_models["layernorm"].spec)).numpy()
    _assert_fp32_close(embeds, ref)


# -- external data (the >2 GB path) -----------------------------------------------------------------------
def test_external_data_single_file(tmp_path: Path, tiny_dir: Path, exports) -> None:
    report = export_onnx(tiny_dir, tmp_path / "ext", external_data=True, verify=False)
    out = tmp_path / "ext"
    assert report["external_data"] == DATA_NAME
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MODEL_NAME, DATA_NAME, PREPROCESSING_NAME, REPORT_NAME]
    )
    assert (out / DATA_NAME).stat().st_size > 20 * (out / MODEL_NAME).stat().st_size
    x = _random_tiles(2)
    assert np.array_equal(_encoder(out).encode(x), _encoder(exports["fp32"]).encode(x))


def test_relocate_per_tensor_files(tmp_path: Path, exports) -> None:
    """Above 2 GB the legacy exporter writes one file per tensor; relocate_model gathers them into one."""
    scattered = tmp_path / "scattered"
    scattered.mkdir()
    model = onnx.load(str(exports["fp32"] / MODEL_NAME))
    onnx.save_model(
        model,
        str(scattered / MODEL_NAME),
        save_as_external_data=True,
        all_tensors_to_one_file=False,
        size_threshold=0,
    )
    assert len(list(scattered.iterdir())) > 20
    final = tmp_path / "final"
    final.mkdir()
    moved = relocate_model(scattered / MODEL_NAME, final / MODEL_NAME, external=True, onnx=onnx)
    assert moved > 4_000_000 and sorted(p.name for p in final.iterdir()) == [MODEL_NAME, DATA_NAME]
    onnx.checker.check_model(str(final / MODEL_NAME))
    offsets = [
        int(e.value)
        for t in onnx.load(str(final / MODEL_NAME), load_external_data=False).graph.initializer
        for e in t.external_data
        if e.key == "offset"
    ]
    assert offsets and all(o % 4096 == 0 for o in offsets)  # aligned, so onnxruntime can mmap them
    x = _random_tiles(1)
    assert np.array_equal(_encoder(final).encode(x), _encoder(exports["fp32"]).encode(x))


# -- errors and CLI --------------------------------------------------------------------------------------
def test_bad_inputs(tmp_path: Path, tiny_dir: Path, exports) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    with pytest.raises(R1VError, match="not empty"):
        export_onnx(tiny_dir, busy)
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]
    with pytest.raises(R1VError, match="unknown dtype"):
        export_onnx(tiny_dir, tmp_path / "a", dtype="bf16")
    with pytest.raises(R1VError, match="--int8"):
        export_onnx(tiny_dir, tmp_path / "b", dtype="fp16", int8=True)
    with pytest.raises(R1VError, match="opset"):
        export_onnx(tiny_dir, tmp_path / "c", opset=11)
    with pytest.raises(R1VError):
        export_onnx(tmp_path / "no-such-model", tmp_path / "d")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy"]  # nothing half-written
    with pytest.raises(R1VError, match="no exported ONNX model"):
        OnnxVisionEncoder(tmp_path / "busy")
    enc = _encoder(exports["fp32"])
    with pytest.raises(R1VError, match="pixel_values must be"):
        enc.encode(np.zeros((2, 3, 224, 224), np.float32))


def test_cli_json(tmp_path: Path, tiny_dir: Path) -> None:
    out = tmp_path / "cli"
    res = CliRunner().invoke(
        onnx_command, [str(tiny_dir), "--out", str(out), "--int8", "--no-verify", "--json"]
    )
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["weights"] == "int8" and report["path"] == str(out) and report["verification"] is None
    assert (out / MODEL_NAME).is_file()
    res = CliRunner().invoke(onnx_command, [str(tiny_dir), "--out", str(out)])
    assert isinstance(res.exception, R1VError)  # r1v_quant.cli.main's Group turns it into one line, exit 2
    res = CliRunner().invoke(onnx_command, [str(tiny_dir), "--out", str(tmp_path / "x"), "--dtype", "int4"])
    assert res.exit_code == 2 and "int4" in res.output
