"""AWQ: folding is exact, the packed checkpoint loads and equals the fake-quant forward, resume, bad input."""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from r1v_quant.awq import SCALE_GROUPS, _fold, token_weights
from r1v_quant.calibration.capture import load_decoder_layer
from r1v_quant.checkpoint import INDEX_NAME, open_checkpoint
from r1v_quant.errors import R1VError
from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
from r1v_quant.llm import rope_cos_sin
from r1v_quant.model import R1VModel

OPTS = AWQOptions(samples=4, seq_len=512)


def test_folding_keeps_16bit_output(tiny_dir: Path) -> None:
    ckpt = open_checkpoint(tiny_dir)
    layer = load_decoder_layer(ckpt, 1, torch.float64)
    x = torch.randn(1, 40, ckpt.spec.llm.hidden_size, dtype=torch.float64)
    cos, sin = rope_cos_sin(ckpt.spec.llm, torch.arange(40), torch.float64)
    before = layer(x, cos, sin)
    g = torch.Generator().manual_seed(0)
    for grp in SCALE_GROUPS:
        prev = layer.get_submodule(grp.prev)
        if prev.weight.shape[0] != layer.get_submodule(grp.linears[0]).weight.shape[1]:
            continue
        _fold(layer, grp, torch.rand(prev.weight.shape[0], generator=g, dtype=torch.float64) * 4 + 0.1)
    assert torch.allclose(layer(x, cos, sin), before, atol=1e-10, rtol=1e-9)


def test_token_weights_modes() -> None:
    masks = [torch.tensor([0] * 6 + [1, 1, 2, 2])]
    auto = token_weights(masks, "auto")[0]
    assert torch.allclose(auto[:6].sum(), auto[6:8].sum()) and torch.allclose(auto[6:8].sum(), auto[8:].sum())
    assert torch.all(token_weights(masks, "text")[0][:6] == 0)
    assert torch.all(token_weights(masks, "uniform")[0] == 1)
    with pytest.raises(R1VError):
        token_weights(masks, "bogus")


@pytest.fixture(scope="module")
def awq_run(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict]:
    out = tmp_path_factory.mktemp("awq") / "tiny-awq"
    layers: dict[int, dict] = {}
    report = quantize_awq(
        tiny_dir,
        out,
        OPTS,
        progress=False,
        on_layer=lambda i, m: layers.__setitem__(i, {k: v.clone() for k, v in m.state_dict().items()}),
    )
    return out, report, layers


def test_output_layout(awq_run, tiny_dir: Path) -> None:
    out, report, _ = awq_run
    cfg = json.loads((out / "config.json").read_text())
    for qc in (cfg["quantization_config"], cfg["llm_config"]["quantization_config"]):
        assert qc["quant_method"] == "awq" and qc["version"] == "gemm" and qc["bits"] == 4
        assert qc["group_size"] == 128 and qc["zero_point"] is True
        assert set(qc["modules_to_not_convert"]) >= {"vision_model", "mlp1", "lm_head"}
    for f in (
        "tokenizer.json",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "generation_config.json",
        "configuration_skywork_chat.py",
    ):
        assert (out / f).read_bytes() == (tiny_dir / f).read_bytes()
    ckpt = open_checkpoint(out)
    spec = ckpt.spec
    h, f = spec.llm.hidden_size, spec.llm.intermediate_size
    q = "language_model.model.layers.0.mlp.down_proj"
    assert ckpt.info(f"{q}.qweight").shape == (f, h // 8) and ckpt.info(f"{q}.qweight").dtype == "I32"
    assert ckpt.info(f"{q}.qzeros").shape == (f // 128, h // 8)
    assert ckpt.info(f"{q}.scales").shape == (f // 128, h) and ckpt.info(f"{q}.scales").dtype == "F16"
    assert ckpt.info("language_model.model.layers.0.self_attn.q_proj.bias").dtype == "F16"
    assert ckpt.info("vision_model.encoder.layers.0.attn.qkv.weight").dtype == "F16"
    assert ckpt.info("language_model.lm_head.weight").dtype == "F16"
    assert len(report["layers"]) == spec.llm.num_layers
    assert report["calibration_set_hash"] and report["versions"]["torch"]
    for r in report["layers"]:
        assert r["loss"] <= r["loss_rtn"] or r["fallback"]
    assert not list(out.parent.glob(".*awq-work*")), "work directory left behind"


def test_loader_matches_fake_quant_forward_exactly(awq_run, tiny_dir: Path) -> None:
    out, _, layers = awq_run
    loaded = R1VModel.from_checkpoint(out)
    ref = R1VModel.from_checkpoint(tiny_dir)
    with torch.no_grad():
        for p in ref.parameters():  # the AWQ checkpoint stores every 16-bit tensor as fp16
            p.copy_(p.to(torch.float16).float())
        for i, state in layers.items():
            ref.language_model.model.layers[i].load_state_dict(state)
    ids = torch.randint(0, ref.spec.llm.vocab_size, (1, 32), generator=torch.Generator().manual_seed(3))
    assert torch.equal(loaded(ids), ref(ids))


def test_resume_gives_identical_files(awq_run, tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out_full, _, _ = awq_run
    import r1v_quant.exporters.awq_export as ex

    real = ex.quantize_layer

    def interrupted(index, *a, **k):
        if index == 2:
            raise KeyboardInterrupt
        return real(index, *a, **k)

    monkeypatch.setattr(ex, "quantize_layer", interrupted)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        quantize_awq(tiny_dir, out, OPTS, progress=False)
    assert not out.exists() and (tmp_path / ".resumed.awq-work" / "layers" / "00001.safetensors").is_file()
    monkeypatch.setattr(ex, "quantize_layer", real)
    report = quantize_awq(tiny_dir, out, OPTS, resume=True, progress=False)
    assert [r.get("resumed", False) for r in report["layers"]][:3] == [True, True, False]
    shards = sorted(p.name for p in out_full.glob("*.safetensors"))
    assert shards == sorted(p.name for p in out.glob("*.safetensors"))
    for s in shards + [INDEX_NAME]:
        assert (out / s).read_bytes() == (out_full / s).read_bytes(), s


def test_bad_inputs(awq_run, tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    out, _, _ = awq_run
    with pytest.raises(R1VError, match="not empty"):
        quantize_awq(tiny_dir, out, OPTS, progress=False)
    with pytest.raises(R1VError, match="already quantized"):
        quantize_awq(out, tmp_path / "again", OPTS, progress=False)
    with pytest.raises(R1VError, match="does not divide"):
        quantize_awq(
            tiny_dir, tmp_path / "g", AWQOptions(samples=2, seq_len=256, group_size=96), progress=False
        )
    with pytest.raises(R1VError, match="nothing to resume"):
        quantize_awq(tiny_dir, tmp_path / "r", OPTS, resume=True, progress=False)


def test_nan_activations_name_the_layer(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, bad)
    ckpt = open_checkpoint(bad)
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    shard = bad / ckpt.weight_map[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard))
    with pytest.raises(R1VError, match="decoder layer 2"):
        quantize_awq(bad, tmp_path / "out", AWQOptions(samples=2, seq_len=256), progress=False)
    assert not (tmp_path / "out").exists()


def test_disk_full_leaves_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import r1v_quant.checkpoint as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(R1VError, match="no space left"):
        quantize_awq(tiny_dir, out, AWQOptions(samples=2, seq_len=256, method="rtn"), progress=False)
    assert not out.exists()
