"""Model spec parsing, streaming checkpoint reader/writer, and every bad checkpoint the brief names."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from r1v_quant.model.checkpoint import INDEX_NAME, Checkpoint, ShardedWriter, open_checkpoint
from r1v_quant.model.presets import PRESETS, preset_config, write_layout
from r1v_quant.model.spec import param_count, parse_config
from r1v_quant.util.errors import CheckpointError, R1VError


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_spec_of_tiny(tiny_dir: Path) -> None:
    spec = open_checkpoint(tiny_dir).spec
    assert spec.flavor == "r1v" and spec.vision.norm_type == "layer_norm"
    assert spec.num_image_token == 256 and spec.projector_in == 4 * spec.vision.hidden_size
    assert spec.llm.num_heads > spec.llm.num_kv_heads  # GQA
    for n in (spec.llm.hidden_size, spec.llm.intermediate_size, spec.llm.num_heads * spec.llm.head_dim):
        assert n % 256 == 0 and n % 128 == 0  # K-quant blocks and AWQ groups divide every linear input
    assert spec.tokens.img_context is not None and spec.tokens.think_end is not None


@pytest.mark.parametrize("name,flavor", [("r1v-38b", "r1v"), ("r1v2-38b", "r1v2"), ("r1v3-38b", "r1v3")])
def test_real_38b_geometry(name: str, flavor: str) -> None:
    spec = parse_config(preset_config(name))
    assert spec.flavor == flavor
    total = param_count(spec.tensor_shapes())
    assert abs(total / 1e9 - 38.39) < 0.01
    layer = spec.tensor_shapes()["language_model.model.layers.0.self_attn.k_proj.weight"]
    assert layer == (1024, 5120)
    assert spec.tensor_shapes()["vision_model.encoder.layers.44.attn.qkv.weight"] == (9600, 3200)


def test_awq_copy_spelling_is_accepted() -> None:
    cfg = preset_config("r1v3-38b")
    cfg["architectures"] = ["InternVLChatModel"]
    cfg["llm_config"]["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    spec = parse_config(cfg)
    assert spec.is_quantized and spec.architecture == "InternVLChatModel"


def test_streaming_reader_returns_one_layer(tiny_dir: Path) -> None:
    ckpt = open_checkpoint(tiny_dir)
    assert len(set(ckpt.weight_map.values())) >= 2
    layer = ckpt.layer(1)
    assert set(layer) == set(ckpt.spec.llm_layer_shapes())
    assert layer["self_attn.q_proj.weight"].dtype == torch.bfloat16
    vit = ckpt.layer(0, vision=True)
    assert set(vit) == set(ckpt.spec.vision_layer_shapes())
    assert [i for i, _ in ckpt.iter_layers()] == list(range(ckpt.spec.llm.num_layers))


def test_writer_shards_and_index(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path, max_shard_bytes=1000)
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(5)}  # 400 bytes each
    w.add_many(tensors)
    wm = w.close()
    shards = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert not list(tmp_path.glob("*.partial")) and not list(tmp_path.glob("*.tmp"))
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["weight_map"] == wm and index["metadata"]["total_size"] == 2000
    with pytest.raises(R1VError, match="written twice"):
        w2 = ShardedWriter(tmp_path / "b")
        w2.add("x", torch.zeros(1))
        w2.add("x", torch.zeros(1))


def test_missing_shard(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    sorted(d.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="missing shard"):
        open_checkpoint(d)


def test_truncated_shard(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    shard = sorted(d.glob("model-*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        open_checkpoint(d)


def test_index_names_absent_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    idx = json.loads((d / INDEX_NAME).read_text())
    first = next(iter(idx["weight_map"].values()))
    idx["weight_map"]["language_model.model.layers.0.mlp.extra.weight"] = first
    (d / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="does not hold it"):
        open_checkpoint(d)


def test_index_pointing_outside_is_refused(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    idx = json.loads((d / INDEX_NAME).read_text())
    k = next(iter(idx["weight_map"]))
    idx["weight_map"][k] = "../outside.safetensors"
    (d / INDEX_NAME).write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="outside the model directory"):
        open_checkpoint(d)


def test_unknown_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlavaForConditionalGeneration"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unknown architecture"):
        open_checkpoint(d)


def test_unsupported_dimension(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"]["num_key_value_heads"] = 3
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported dimension"):
        open_checkpoint(d)


def test_shape_mismatch_is_reported(tiny_dir: Path, tmp_path: Path) -> None:
    d = _copy(tiny_dir, tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["llm_config"]["intermediate_size"] = 512
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has shape"):
        open_checkpoint(d)


def test_pickle_weights_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset_config("r1v-38b")))
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="pickle"):
        Checkpoint(d)


def test_single_file_checkpoint(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(preset_config("r1v-38b")))
    save_file({"a": torch.zeros(2)}, str(d / "model.safetensors"))
    ckpt = Checkpoint(d)
    assert ckpt.names() == ["a"] and torch.equal(ckpt.get("a"), torch.zeros(2))
    with pytest.raises(CheckpointError, match="lacks tensor"):
        ckpt.validate()


@pytest.mark.parametrize("name", list(PRESETS))
def test_layout_only_directory_inspects(name: str, tmp_path: Path) -> None:
    from r1v_quant.model.inspect_report import inspect_model

    r = inspect_model(write_layout(tmp_path / name, name))
    assert not r["has_weights"] and abs(r["params_total"] / 1e9 - 38.39) < 0.01
    assert 76e9 < r["weight_bytes"]["bf16"] < 77.5e9
    assert r["weight_bytes"]["awq-int4-g128"] < 0.42 * r["weight_bytes"]["bf16"]


def test_tiny_build_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import r1v_quant.replica.train as train
    from r1v_quant.replica.build import TinyOptions, build_tiny

    # a text step then an image step (the vision tower's gradients included); the measurement at the cap
    # decodes 8 tokens, not 96 (an untrained model rambles to the limit: that was most of this test's time)
    monkeypatch.setattr(train, "TEXT_FIRST", 1)
    monkeypatch.setattr(train, "MAX_NEW", 8)
    opts = TinyOptions(flavor="r1v2", vit="rms", steps=2, seed=7, min_accuracy=0)
    build_tiny(tmp_path / "a", opts)
    build_tiny(tmp_path / "b", opts)
    files = sorted(p.name for p in (tmp_path / "a").iterdir() if p.name != "tiny_build.json")
    assert "tokenizer.json" in files and "preprocessor_config.json" in files
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    spec = open_checkpoint(tmp_path / "a").spec
    assert spec.flavor == "r1v2" and spec.vision.qk_norm and not spec.vision.qkv_bias
