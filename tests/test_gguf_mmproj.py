"""mmproj GGUF export: layout, and image embeddings through llama.cpp's libmtmd against the torch reference.

The per-token cosines before/after each llama.cpp fix are printed (run with -s to see them) and the
'before' values are asserted to be clearly worse, so the fixes are shown to matter.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gguf = pytest.importorskip("gguf")
pytest.importorskip("llama_cpp")

from r1v_quant.exporters.gguf_mmproj import (  # noqa: E402
    export_mmproj_gguf,
    plan_mmproj,
    resolve_position_fix,
    shift_positions,
)
from r1v_quant.model.checkpoint import open_checkpoint  # noqa: E402
from r1v_quant.model.preprocess import preprocess_image  # noqa: E402
from r1v_quant.model.reference import R1VModel  # noqa: E402
from r1v_quant.model.spec import load_spec, parse_config  # noqa: E402
from r1v_quant.runtime.mtmd import MtmdVision, cosine_rows, embedding_parity  # noqa: E402
from r1v_quant.util.errors import R1VError  # noqa: E402

pytestmark = pytest.mark.llamacpp
Q = gguf.GGMLQuantizationType


def textured(width: int, height: int, seed: int = 0) -> Image.Image:
    """A deterministic image whose every patch differs (gradients + coloured blobs + fine noise)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([x / width, y / height, 0.5 + 0.5 * np.sin((x + y) / 37.0)], -1) * 160
    for _ in range(12):
        cx, cy, r = rng.uniform(0, width), rng.uniform(0, height), rng.uniform(20, 120)
        img[(x - cx) ** 2 + (y - cy) ** 2 < r * r] += rng.uniform(-80, 80, 3)
    img += rng.normal(0, 12, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def mtmd(path: Path) -> MtmdVision:
    # One thread: ggml's spinning worker threads are slow on a busy 2-core test machine.
    return MtmdVision(path, n_threads=1)


def stats(cos: np.ndarray) -> tuple[float, float]:
    return float(cos.min()), float(np.median(cos))


def worse(before: tuple[float, float], after: tuple[float, float]) -> bool:
    """`before`'s worst-token error (1 - cosine) is measurable and over 100x `after`'s."""
    err_before, err_after = 1 - before[0], 1 - after[0]
    return err_before > 1e-4 and err_before > 100 * err_after


@pytest.fixture(scope="module")
def mmprojs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("mmproj")
    paths = {}
    for key, typ, fix in (("f16", "F16", "shift"), ("f16_none", "F16", "none"), ("q8", "Q8_0", "shift")):
        paths[key] = out / f"mmproj-{key}.gguf"
        rep = export_mmproj_gguf(tiny_dir, paths[key], typ, position_fix=fix)
        assert rep["position_fix"] == fix and rep["type"] == typ and not rep["f16_fallback"]
    return paths


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> R1VModel:
    return R1VModel.from_checkpoint(tiny_dir)


def ref_embeds(model: R1VModel, image: Image.Image, max_num: int | None = None) -> np.ndarray:
    s = model.spec
    pre = preprocess_image(
        image,
        image_size=s.force_image_size,
        min_num=s.min_dynamic_patch,
        max_num=s.max_dynamic_patch if max_num is None else max_num,
        use_thumbnail=s.use_thumbnail,
    )
    return model.image_embeds(pre.pixel_values).numpy()


# -- layout -------------------------------------------------------------------------------------------------
def expected_names(spec) -> set[str]:
    names = {"v.class_embd", "v.patch_embd.weight", "v.patch_embd.bias", "v.position_embd.weight"}
    v = spec.vision
    for i in range(v.num_layers):
        b = f"v.blk.{i}"
        kinds = ("weight", "bias") if v.qkv_bias else ("weight",)
        names |= {f"{b}.{p}.{k}" for p in ("attn_q", "attn_k", "attn_v") for k in kinds}
        if v.qk_norm:
            names |= {f"{b}.attn_q_norm.weight", f"{b}.attn_k_norm.weight"}
        norm_kinds = ("weight", "bias") if v.norm_type == "layer_norm" else ("weight",)
        names |= {f"{b}.{n}.{k}" for n in ("ln1", "ln2") for k in norm_kinds}
        names |= {f"{b}.{n}.{k}" for n in ("attn_out", "ffn_up", "ffn_down") for k in ("weight", "bias")}
        names |= {f"{b}.ls1.weight", f"{b}.ls2.weight"}
    names |= {f"mm.model.mlp.{i}.{k}" for i in (0, 1, 3) for k in ("weight", "bias")}
    return names


@pytest.mark.parametrize("variant", ["layernorm", "rms"])
def test_metadata_tensor_names_and_types(variant, tiny_dir, tiny_rms_dir, tmp_path):
    # llama.cpp runs a RMSNorm ViT only at 3200 x 45 layers; the rms replica is checked for layout only.
    model_dir = tiny_dir if variant == "layernorm" else tiny_rms_dir
    spec = load_spec(model_dir)
    path = tmp_path / "mmproj.gguf"
    rep = export_mmproj_gguf(model_dir, path, "F16", position_fix="shift")
    assert rep["bytes"] == path.stat().st_size and rep["tensors"] == len(expected_names(spec))
    r = gguf.GGUFReader(path)

    def val(key):
        return r.get_field(key).contents()

    v = spec.vision
    assert val("general.architecture") == "clip" and val("general.type") == "mmproj"
    assert val("clip.projector_type") == "internvl" and val("clip.has_vision_encoder") is True
    assert val("clip.use_gelu") is True and val("r1v_quant.position_fix") == "shift"
    expect = {
        "image_size": 448, "patch_size": 14, "embedding_length": v.hidden_size,
        "feed_forward_length": v.intermediate_size, "block_count": v.num_layers,
        "attention.head_count": v.num_heads, "projection_dim": spec.llm.hidden_size,
        "projector.scale_factor": 2, "preproc_min_tiles": spec.min_dynamic_patch,
        "preproc_max_tiles": spec.max_dynamic_patch,
    }  # fmt: skip
    for k, want in expect.items():
        assert val(f"clip.vision.{k}") == want, k
    assert val("clip.vision.attention.layer_norm_epsilon") == pytest.approx(v.eps)
    assert val("clip.vision.image_mean") == pytest.approx([0.485, 0.456, 0.406])
    assert val("clip.vision.image_std") == pytest.approx([0.229, 0.224, 0.225])

    tensors = {t.name: t for t in r.tensors}
    assert set(tensors) == expected_names(spec)
    for name, t in tensors.items():
        two_d_weight = len(t.shape) == 2 and name.endswith(".weight") and "norm" not in name
        want = Q.F16 if two_d_weight or name == "v.patch_embd.weight" else Q.F32
        assert t.tensor_type == want, name

    ckpt = open_checkpoint(model_dir)
    c = v.hidden_size
    qkv = ckpt.get("vision_model.encoder.layers.1.attn.qkv.weight").float()
    for p, part in enumerate(("attn_q", "attn_k", "attn_v")):
        got = np.asarray(tensors[f"v.blk.1.{part}.weight"].data, np.float32)
        np.testing.assert_array_equal(got, qkv[p * c : (p + 1) * c].half().float().numpy())
    table = ckpt.get("vision_model.embeddings.position_embedding").float()
    stored = np.asarray(tensors["v.position_embd.weight"].data).reshape(table.shape)
    np.testing.assert_array_equal(stored, shift_positions(table).numpy())
    np.testing.assert_array_equal(stored[0, -1], table[0, 0].numpy())  # CLS row last

    # libmtmd loads both layouts (q/k-norm tensors, no qkv bias, no norm bias for the rms variant).
    with mtmd(path) as mv:
        out = mv.encode_tile(textured(448, 448))
    assert out.shape == (256, spec.llm.hidden_size) and np.isfinite(out).all()


def test_plan_internvit_6b_dimensions():
    """The real R1V vision tower (3200 x 45, 25 heads, RMSNorm, q/k-norm, no qkv bias): layout and size."""
    cfg = {
        "architectures": ["SkyworkR1VChatModel"], "template": "skywork-r1v", "downsample_ratio": 0.5,
        "ps_version": "v2", "max_dynamic_patch": 12,
        "vision_config": {
            "architectures": ["InternVisionModel"], "hidden_size": 3200, "intermediate_size": 12800,
            "num_attention_heads": 25, "num_hidden_layers": 45, "qkv_bias": False,
            "qk_normalization": True, "norm_type": "rms_norm", "layer_norm_eps": 1e-6,
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 5120, "intermediate_size": 27648,
            "num_attention_heads": 40, "num_key_value_heads": 8, "num_hidden_layers": 64,
            "vocab_size": 152064,
        },
    }  # fmt: skip
    spec = parse_config(cfg)
    plan, fallback = plan_mmproj(spec, "F16")
    names = {t.name for t in plan}
    assert names == expected_names(spec) and not fallback
    assert "v.blk.0.attn_q.bias" not in names and "v.blk.44.attn_k_norm.weight" in names
    by_name = {t.name: t for t in plan}
    assert by_name["v.position_embd.weight"].shape == (1, 1025, 3200)
    assert by_name["mm.model.mlp.1.weight"].shape == (5120, 12800)
    gib = sum(t.nbytes for t in plan) / 2**30
    assert 10.2 < gib < 10.6  # ~5.63 B parameters at 2 bytes
    q8, fallback = plan_mmproj(spec, "Q8_0", strict=True)  # 32 divides 3200, 12800 and 5120
    assert not fallback and by_name.keys() == {t.name for t in q8}
    assert {t.qtype for t in q8 if t.name.endswith("ffn_up.weight")} == {Q.Q8_0}
    assert 5.5 < sum(t.nbytes for t in q8) / 2**30 < 5.8


# -- numerics through libmtmd -------------------------------------------------------------------------------
def test_single_tile_matches_reference_and_position_fix_matters(mmprojs, reference):
    image = textured(448, 448)
    ref = ref_embeds(reference, image)
    assert ref.shape == (1, 256, reference.spec.llm.hidden_size)
    with mtmd(mmprojs["f16_none"]) as mv:
        before = stats(cosine_rows(mv.image_embeds_for(image, reference.spec), ref))
    with mtmd(mmprojs["f16"]) as mv:
        got = mv.image_embeds_for(image, reference.spec)
        # A 448x448 input stays one llama.cpp tile (256 tokens: CLS dropped, 1024 patches / 4).
        assert mv.encode_rgb(np.asarray(image)).shape == (256, reference.spec.llm.hidden_size)
        assert mv.encode_rgb(np.asarray(textured(449, 448))).shape[0] > 256  # one pixel more: sliced
    after = stats(cosine_rows(got, ref))
    print(
        f"\n[mmproj F16, 1 tile] rows unchanged: min {before[0]:.6f} median {before[1]:.6f}"
        f" | rows shifted: min {after[0]:.6f} median {after[1]:.6f}"
    )
    assert got.shape == ref.shape
    assert after[0] >= 0.999
    # The replica's position table is small next to its patch embeddings (std 0.02 vs ~0.5), so the
    # unshifted error is small in absolute terms, but it is the whole error: the shift removes >99% of it.
    assert worse(before, after)


def test_non_square_image_internvl_tiling(mmprojs, reference):
    spec = reference.spec
    image = textured(800, 600, seed=1)
    max_num = 6  # InternVL: 3x2 + thumbnail (12 would give 4x3 + thumbnail: slower, same check)
    ref = ref_embeds(reference, image, max_num)
    cols_rows = preprocess_image(image, max_num=max_num).grid
    with mtmd(mmprojs["f16"]) as mv:
        native = mv.encode_rgb(np.asarray(image))  # llama.cpp's own tiling of the whole image
        got = mv.image_embeds_for(image, spec, max_num=max_num)
    with mtmd(mmprojs["f16_none"]) as mv:
        tiles_only = mv.image_embeds_for(image, spec, max_num=max_num)
    flat = ref.reshape(-1, ref.shape[-1])
    n = min(len(native), len(flat))
    native_cos = stats(cosine_rows(native[:n], flat[:n]))
    tiles_only_cos = stats(cosine_rows(tiles_only, ref))
    after = stats(cosine_rows(got, ref))
    print(
        f"\n[mmproj F16, 800x600, InternVL grid {cols_rows} + thumbnail = {len(ref)} tiles]"
        f"\n  llama.cpp's own tiling: {len(native)} tokens vs {len(flat)}; first {n}: min {native_cos[0]:.5f}"
        f" median {native_cos[1]:.5f}"
        f"\n  InternVL tiles, rows unchanged: min {tiles_only_cos[0]:.6f} median {tiles_only_cos[1]:.6f}"
        f"\n  InternVL tiles, rows shifted: min {after[0]:.6f} median {after[1]:.6f}"
    )
    assert cols_rows == (3, 2) and got.shape == ref.shape and len(ref) == 7
    assert after[0] >= 0.999
    assert len(native) != len(flat) or native_cos[0] < after[0] - 0.01
    assert worse(tiles_only_cos, after)


def test_q8_0_mmproj(mmprojs, reference, tiny_dir):
    r = gguf.GGUFReader(mmprojs["q8"])
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["v.blk.0.ffn_up.weight"] == Q.Q8_0 and types["mm.model.mlp.1.weight"] == Q.Q8_0
    assert types["v.patch_embd.weight"] == Q.F32 and types["v.position_embd.weight"] == Q.F32
    f16_bytes = {t.name: int(t.n_bytes) for t in gguf.GGUFReader(mmprojs["f16"]).tensors}
    q8 = [t for t in r.tensors if t.tensor_type == Q.Q8_0]
    assert sum(int(t.n_bytes) for t in q8) / sum(f16_bytes[t.name] for t in q8) == pytest.approx(34 / 64)
    image = textured(448, 448, seed=2)
    ref = ref_embeds(reference, image)
    with mtmd(mmprojs["q8"]) as mv:
        lo, med = stats(cosine_rows(mv.image_embeds_for(image, reference.spec), ref))
    print(f"\n[mmproj Q8_0, 1 tile] min {lo:.6f} median {med:.6f}")
    assert lo >= 0.99
    # The same gate from files alone (reference = vision tower + mlp1 only), over two images.
    gate = embedding_parity(tiny_dir, mmprojs["q8"], [image, textured(600, 300, seed=4)], n_threads=1)
    assert gate["min"] >= 0.99 and gate["tokens"] == 256 + 3 * 256 and len(gate["per_image_min"]) == 2


def test_q4_0_mmproj_runs_in_libmtmd(tiny_dir, tmp_path):
    """The lowest mmproj type offered: block-quantized 2-D weights, loaded and run by libmtmd, close to torch
    (measured min cosine 0.996 on held-out pictures; Q8_0 0.99989)."""
    path = tmp_path / "mmproj-q4.gguf"
    rep = export_mmproj_gguf(tiny_dir, path, "q4_0")
    assert rep["type"] == "Q4_0" and not rep["f16_fallback"]
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(path).tensors}
    assert types["v.blk.0.ffn_up.weight"] == Q.Q4_0 and types["mm.model.mlp.1.weight"] == Q.Q4_0
    assert types["v.patch_embd.weight"] == Q.F32 and types["v.blk.0.ln1.weight"] == Q.F32
    gate = embedding_parity(tiny_dir, path, [textured(448, 448, seed=2)], n_threads=1)
    assert 0.98 <= gate["min"] < 0.99999  # quantized, not a copy of F16


def test_ps_version_v1_reorders_tokens(mmprojs, tiny_dir, tmp_path):
    # llama.cpp's graph is the v2 pixel shuffle; for a v1 checkpoint the runtime transposes each tile's grid.
    v1 = tmp_path / "v1"
    shutil.copytree(tiny_dir, v1)
    cfg = json.loads((v1 / "config.json").read_text())
    cfg["ps_version"] = "v1"
    (v1 / "config.json").write_text(json.dumps(cfg))
    model = R1VModel.from_checkpoint(v1)
    image = textured(448, 448, seed=3)
    ref = ref_embeds(model, image)
    with mtmd(mmprojs["f16"]) as mv:
        got = mv.image_embeds_for(image, model.spec)
        as_v2 = mv.image_embeds_for(image, load_spec(tiny_dir))
    assert stats(cosine_rows(got, ref))[0] >= 0.999
    assert stats(cosine_rows(as_v2, ref))[0] < 0.99


def test_position_fix_auto_detects_installed_llamacpp(tiny_dir, tmp_path):
    fix, probe = resolve_position_fix("auto")
    print(f"\n[auto probe] {probe}")
    assert fix == "shift"  # the vendored llama.cpp appends CLS after the patches
    assert probe["min_cosine_cls_last_order"] > 0.999 > probe["min_cosine_stored_order"]
    rep = export_mmproj_gguf(tiny_dir, tmp_path / "auto.gguf", "F16")
    assert rep["position_fix"] == "shift" and rep["position_fix_requested"] == "auto"


# -- bad input ------------------------------------------------------------------------------------------
def test_bad_inputs(tiny_dir, mmprojs, tmp_path):
    with pytest.raises(R1VError, match="unsupported mmproj type"):
        export_mmproj_gguf(tiny_dir, tmp_path / "x.gguf", "Q4_K")
    with pytest.raises(R1VError, match="position_fix"):
        export_mmproj_gguf(tiny_dir, tmp_path / "x.gguf", "F16", position_fix="sideways")
    with pytest.raises(R1VError, match="already exists"):
        export_mmproj_gguf(tiny_dir, mmprojs["f16"], "F16", position_fix="shift")
    assert not (tmp_path / "x.gguf").exists()
    with mtmd(mmprojs["f16"]) as mv, pytest.raises(R1VError, match="448x448"):
        mv.encode_tile(textured(500, 448))
    with pytest.raises(R1VError, match="no such mmproj"):
        MtmdVision(tmp_path / "missing.gguf")


def test_quant_block_does_not_divide_row():
    cfg = json.loads(json.dumps(_odd_config()))
    spec = parse_config(cfg)
    with pytest.raises(R1VError, match="not a multiple of the 32-element block"):
        plan_mmproj(spec, "Q8_0", strict=True)
    plan, fallback = plan_mmproj(spec, "Q8_0")  # default: F16 for those tensors, like llama.cpp's converter
    types = {t.name: t.qtype for t in plan}
    assert "v.blk.0.attn_q.weight" in fallback and types["v.blk.0.attn_q.weight"] == Q.F16
    assert types["v.blk.0.ffn_down.weight"] == Q.Q8_0  # 480-long rows divide
    assert plan_mmproj(spec, "F16")[1] == []


def _odd_config() -> dict:
    # A ViT 120 wide: Q8_0's 32-blocks do not divide 120-long rows.
    return {
        "architectures": ["SkyworkR1VChatModel"], "template": "skywork-r1v", "downsample_ratio": 0.5,
        "vision_config": {
            "architectures": ["InternVisionModel"], "hidden_size": 120, "intermediate_size": 480,
            "num_attention_heads": 4, "num_hidden_layers": 2, "qkv_bias": True, "norm_type": "layer_norm",
        },
        "llm_config": {
            "architectures": ["Qwen2ForCausalLM"], "hidden_size": 256, "intermediate_size": 768,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 1, "vocab_size": 512,
        },
    }  # fmt: skip


def test_stream_reads_qkv_once(tiny_dir, tmp_path, monkeypatch):
    """Tensors are read one at a time, the fused qkv once for its three parts."""
    from r1v_quant.model.checkpoint import Checkpoint

    reads: list[str] = []
    orig = Checkpoint.get

    def counting(self, name: str) -> torch.Tensor:
        reads.append(name)
        return orig(self, name)

    monkeypatch.setattr(Checkpoint, "get", counting)
    export_mmproj_gguf(tiny_dir, tmp_path / "m.gguf", "F32", position_fix="none")
    assert len(reads) == len(set(reads))
    assert all(not n.startswith("language_model.") for n in reads)


def test_auto_without_llamacpp_falls_back_to_shift(monkeypatch, caplog):
    from r1v_quant.exporters import gguf_mmproj

    def missing(seed: int = 0) -> dict:
        raise R1VError("llama-cpp-python (libmtmd) is not installed (No module named 'llama_cpp')")

    monkeypatch.setattr(gguf_mmproj, "detect_position_order", missing)
    with caplog.at_level("WARNING"):
        assert resolve_position_fix("auto") == ("shift", {"probe": "unavailable"})
    assert "not installed" in caplog.text
