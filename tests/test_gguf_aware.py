"""Activation-aware GGUF: exact folding, importance matrix in the folded basis, imatrix file, split files."""

from __future__ import annotations

import errno
import functools
import json
import shutil
from collections import namedtuple
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_helpers import llama_logits  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from r1v_quant.calibration.pipeline import calibrate  # noqa: E402
from r1v_quant.calibration.render import MODALITIES  # noqa: E402
from r1v_quant.calibration.sensitivity import SENSITIVITY_FILE  # noqa: E402
from r1v_quant.calibration.stats import STATS_FILE, CalibrationStats  # noqa: E402
from r1v_quant.cli.gguf import gguf_command  # noqa: E402
from r1v_quant.cli.main import Group  # noqa: E402
from r1v_quant.exporters import gguf_aware, gguf_llm  # noqa: E402
from r1v_quant.exporters.gguf_aware import (  # noqa: E402
    FOLD_GROUPS,
    MODALITY_MODES,
    AwarePlan,
    expand_kv,
    input_stats,
    modality_shares,
)
from r1v_quant.exporters.gguf_imatrix import Imatrix, read_imatrix_gguf  # noqa: E402
from r1v_quant.exporters.gguf_llm import export_llm_gguf, gguf_tensor_name  # noqa: E402
from r1v_quant.exporters.quantize import llama_quantize  # noqa: E402
from r1v_quant.model.checkpoint import open_checkpoint  # noqa: E402
from r1v_quant.model.prompts import build_prompt  # noqa: E402
from r1v_quant.model.reference import R1VModel  # noqa: E402
from r1v_quant.model.tokenizer import R1VTokenizer  # noqa: E402
from r1v_quant.quant.awq_search import token_weights  # noqa: E402
from r1v_quant.util.errors import R1VError  # noqa: E402

pytestmark = pytest.mark.llamacpp
Q = gguf.GGMLQuantizationType
PROMPT = "What is 12 + 30? Then divide by 6."


@pytest.fixture(scope="module", autouse=True)
def fast_proxy():
    # the proxy scores 64 weight rows per linear instead of 256: same code, a third of the time
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf_llm, "AwareOptions", functools.partial(gguf_aware.AwareOptions, rows=64))
        yield


@pytest.fixture(scope="module")
def calib(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "stats"
    calibrate(tiny_dir, "default", 6, 512, out, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def out(tiny_dir: Path, calib: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """F16 and Q4_K_M, plain / imatrix only / activation-aware, exported once."""
    d = tmp_path_factory.mktemp("aware")
    runs = {
        "f16": ("F16", {}),
        "f16_aware": ("F16", {"calib": calib, "activation_aware": True}),
        "q4": ("Q4_K_M", {}),
        "q4_imatrix": ("Q4_K_M", {"calib": calib}),
    }
    paths = {}
    for key, (t, kw) in runs.items():
        paths[key] = d / f"{key}.gguf"
        report = export_llm_gguf(tiny_dir, paths[key], t, progress=False, **kw)
        paths[key + ".report"] = report  # type: ignore[assignment]
    return paths


@pytest.fixture(scope="module")
def ids(tiny_dir: Path) -> list[int]:
    tok = R1VTokenizer.from_dir(tiny_dir)
    text = build_prompt("r1v", [{"role": "user", "content": PROMPT}])
    return tok.encode(text + "Let me think step by step. First, 12 + 30 = 42; then 42 / 6 = 7.")


def tensors(path: Path) -> dict[str, tuple[int, np.ndarray]]:
    return {t.name: (int(t.tensor_type), np.array(t.data)) for t in gguf.GGUFReader(path).tensors}


def stored_weights(calib: Path) -> np.ndarray:
    """(layers, 3) per-token modality weights, read as plain JSON from calibrate's sensitivity.json."""
    return np.array(json.loads((calib / SENSITIVITY_FILE).read_text())["weights"], np.float64)


def auto_importance(stats: CalibrationStats, weights: np.ndarray, layer: int, group: str) -> np.ndarray:
    """Mean x² with each token weighted by its modality's stored sensitivity, straight from the stored
    sums (independent of the code): Σ_c w_c Σx²_c / Σ_c w_c n_c."""
    num = den = 0.0
    for c, m in enumerate(MODALITIES):
        n = int(stats.tensors[f"layers.{layer}.{group}.count.{m}"][0])
        num = num + weights[layer, c] * stats.tensors[f"layers.{layer}.{group}.sum_sq.{m}"].double().numpy()
        den += weights[layer, c] * n
    return num / den


def balanced_importance(stats: CalibrationStats, layer: int, group: str) -> np.ndarray:
    """Mean x², each modality present weighted equally (the `balanced` mode, formerly `auto`)."""
    parts = []
    for m in MODALITIES:
        n = int(stats.tensors[f"layers.{layer}.{group}.count.{m}"][0])
        if n:
            parts.append(stats.tensors[f"layers.{layer}.{group}.sum_sq.{m}"].double().numpy() / n)
    return sum(parts) / len(parts)


# -- folding -----------------------------------------------------------------------------------------------
def test_folding_is_exact_in_torch_including_gqa(tiny_dir: Path) -> None:
    # Random positive scales on all four groups (v_o under GQA: 4 query heads on 2 KV heads): the folded
    # float32 model computes what the original does.
    ckpt = open_checkpoint(tiny_dir)
    spec = ckpt.spec
    assert spec.llm.num_heads != spec.llm.num_kv_heads  # the replica exercises the GQA case
    g = torch.Generator().manual_seed(0)
    width = {"attn_in": spec.llm.hidden_size, "v_o": spec.llm.num_kv_heads * spec.llm.head_dim,
             "mlp_in": spec.llm.hidden_size, "up_down": spec.llm.intermediate_size}  # fmt: skip
    scales = {
        (i, grp.name): (torch.rand(width[grp.name], generator=g) * 4 + 0.25).numpy()
        for i in range(spec.llm.num_layers)
        for grp in FOLD_GROUPS
    }
    plan = AwarePlan(spec, scales, Imatrix({}, {}))
    ref = R1VModel.from_checkpoint(ckpt)
    folded = R1VModel.from_checkpoint(ckpt)
    state = {k: plan.fold(f"language_model.{k}", v) for k, v in folded.language_model.state_dict().items()}
    changed = [k for k, v in state.items() if not torch.equal(v, folded.language_model.state_dict()[k])]
    assert len(changed) == spec.llm.num_layers * 10  # 2 norms, 7 weights and v_proj's bias per layer
    folded.language_model.load_state_dict(state)
    x = torch.tensor([[5, 17, 42, 99, 123, 7, 300, 12, 64, 1]])
    a, b = ref(x), folded(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max()))
    # and a wrong o_proj expansion (tiling instead of repeating per KV head) would not be exact
    s = scales[(0, "v_o")]
    assert not np.array_equal(expand_kv(s, spec), np.tile(s, spec.llm.num_heads // spec.llm.num_kv_heads))


def test_folded_f16_gives_the_same_llama_logits(out: dict[str, Path], ids: list[int]) -> None:
    report = out["f16_aware.report"]["aware"]  # type: ignore[index]
    assert report["fold"] and report["scaled_groups"] >= 4  # the proxy did choose scales
    plain, folded = tensors(out["f16"]), tensors(out["f16_aware"])
    assert not np.array_equal(plain["blk.0.attn_q.weight"][1], folded["blk.0.attn_q.weight"][1])
    assert not np.array_equal(plain["blk.0.attn_norm.weight"][1], folded["blk.0.attn_norm.weight"][1])
    want, got = llama_logits(out["f16"], ids), llama_logits(out["f16_aware"], ids)
    # the only difference is where fp16 rounds each (rescaled) weight
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.97


# -- importance matrix -------------------------------------------------------------------------------------
def test_imatrix_is_in_the_folded_basis(out: dict[str, Path], calib: Path, tiny_dir: Path) -> None:
    stats = CalibrationStats.load(calib)
    imat = read_imatrix_gguf(out["f16_aware"].with_name("f16_aware.imatrix.gguf"))
    folded, plain = tensors(out["f16_aware"]), tensors(out["f16"])
    means = imat.means()
    for layer, lin, group, norm in [(0, "attn_q", "qkv", "attn_norm"), (1, "ffn_up", "gate_up", "ffn_norm")]:
        name = f"blk.{layer}.{lin}.weight"
        # s per column, read back from the two files: norm weight (F32) plain / folded
        s = (
            plain[f"blk.{layer}.{norm}.weight"][1].astype(np.float64)
            / folded[f"blk.{layer}.{norm}.weight"][1]
        )
        assert np.ptp(s) > 0.5  # really rescaled
        want = auto_importance(stats, stored_weights(calib), layer, group) / s**2
        np.testing.assert_allclose(means[name], want, rtol=2e-4)
    # every decoder linear has an entry, sized by its input width
    spec = open_checkpoint(tiny_dir).spec
    assert len(means) == 7 * spec.llm.num_layers
    assert means["blk.2.ffn_down.weight"].shape == (spec.llm.intermediate_size,)


def test_imatrix_changes_the_quantized_weights(out: dict[str, Path], tmp_path: Path) -> None:
    plain, weighted = tensors(out["q4"]), tensors(out["q4_imatrix"])
    assert plain.keys() == weighted.keys()
    differ = [n for n in plain if not np.array_equal(plain[n][1], weighted[n][1])]
    assert {f"blk.{i}.ffn_gate.weight" for i in range(4)} <= set(differ)
    assert "token_embd.weight" not in differ and "output.weight" not in differ  # no entries for those
    # through the API on the folded F16: the folded-basis imatrix lowers its own weighted error, and an
    # imatrix in the wrong (unfolded) basis gives other weights
    means = read_imatrix_gguf(out["f16_aware"].with_name("f16_aware.imatrix.gguf")).means()
    unfolded = read_imatrix_gguf(out["q4_imatrix"].with_name("q4_imatrix.imatrix.gguf")).means()
    runs = {"none": None, "folded": means, "unfolded": unfolded}
    src = tensors(out["f16_aware"])
    q = {}
    for key, im in runs.items():
        dst = tmp_path / f"{key}.gguf"
        llama_quantize(out["f16_aware"], dst, "Q4_K_M", imatrix=im)
        q[key] = tensors(dst)
    name = "blk.1.attn_q.weight"
    assert q["folded"][name][0] == Q.Q4_K
    assert not np.array_equal(q["folded"][name][1], q["none"][name][1])
    assert not np.array_equal(q["folded"][name][1], q["unfolded"][name][1])
    w = src[name][1].astype(np.float32)

    def weighted_err(key: str) -> float:
        deq = gguf.quants.dequantize(q[key][name][1], Q.Q4_K).reshape(w.shape)
        return float((((deq - w) ** 2) * means[name]).sum())

    assert weighted_err("folded") < weighted_err("none")


def test_imatrix_file_layout(out: dict[str, Path], calib: Path, tiny_dir: Path) -> None:
    # what llama.cpp's tools/imatrix writes and common/imatrix-loader reads
    path = out["f16_aware"].with_name("f16_aware.imatrix.gguf")
    r = gguf.GGUFReader(path)
    vt = gguf.GGUFValueType
    assert r.get_field("general.type").contents() == "imatrix"
    ds = r.get_field("imatrix.datasets")
    assert ds.types == [vt.ARRAY, vt.STRING] and ds.contents() == [CalibrationStats.load(calib).set_hash]
    assert r.get_field("imatrix.chunk_count").types == [vt.UINT32]
    assert r.get_field("imatrix.chunk_count").contents() == 6  # calibration samples
    assert r.get_field("imatrix.chunk_size").contents() == 512
    spec = open_checkpoint(tiny_dir).spec
    stats = CalibrationStats.load(calib)
    by_name = {t.name: t for t in r.tensors}
    assert len(by_name) == 2 * 7 * spec.llm.num_layers
    names = [t.name for t in r.tensors]  # by weight name, each in_sum2 then counts (llama-imatrix's order)
    bases = sorted({n.rsplit(".", 1)[0] for n in names})
    assert names == [f"{b}.{part}" for b in bases for part in ("in_sum2", "counts")]
    for t in r.tensors:
        assert t.tensor_type == Q.F32
    for i in range(spec.llm.num_layers):
        for hf, group, width in [("self_attn.k_proj", "qkv", spec.llm.hidden_size),
                                 ("mlp.down_proj", "down_proj", spec.llm.intermediate_size)]:  # fmt: skip
            name = gguf_tensor_name(f"language_model.model.layers.{i}.{hf}.weight", spec.llm.num_layers)
            sums, counts = by_name[name + ".in_sum2"], by_name[name + ".counts"]
            assert list(sums.shape) == [width, 1] and list(counts.shape) == [1, 1]  # ggml ne order
            # tokens with weight: every modality, but vision tokens carry none where their measured
            # sensitivity is zero (the last layer: its output at an image position predicts no answer)
            text = stats.count(i, group, "prompt") + stats.count(i, group, "response")
            want = stats.count(i, group) if stored_weights(calib)[i, 0] > 0 else text
            assert int(counts.data[0, 0]) == want
    # written and read back: the same numbers
    imat = read_imatrix_gguf(path)
    assert imat.counts["blk.0.attn_k.weight"] == stats.count(0, "qkv")


# -- modality weights: the same modes as `awq` -------------------------------------------------------------
def test_modality_shares_are_awq_token_weights_summed_per_modality() -> None:
    # the GGUF statistics weigh each modality by what AWQ's per-token weights add up to over its tokens
    assert set(MODALITY_MODES) == {"auto", "balanced", "uniform", "text"}
    sens = np.array([3e-6, 0.05, 0.05])
    for counts in ([512, 40, 300], [0, 17, 90], [256, 0, 0], [5, 5, 0]):
        masks = [torch.tensor([c for c, n in enumerate(counts) for _ in range(n)], dtype=torch.uint8)]
        for mode in MODALITY_MODES:
            w = token_weights(masks, mode, torch.tensor(sens, dtype=torch.float32))[0].double()
            per_mod = np.array([float(w[masks[0] == c].sum()) for c in range(3)])
            got = modality_shares(np.array(counts), mode, sens if mode == "auto" else None)
            np.testing.assert_allclose(got, per_mod / per_mod.sum(), rtol=1e-5, atol=1e-12)
    # auto without measured sensitivities is a programming error, named as such
    with pytest.raises(R1VError, match="needs the measured sensitivities"):
        modality_shares(np.array([1, 2, 3]), "auto")
    with pytest.raises(R1VError, match="unknown --modality-weights 'equal'"):
        modality_shares(np.array([1, 2, 3]), "equal")


def test_auto_statistics_follow_the_stored_sensitivity(calib: Path) -> None:
    stats, weights = CalibrationStats.load(calib), stored_weights(calib)
    assert weights.shape == (4, 3) and (weights[:, 1] > 0).all()
    for layer in range(4):
        counts = np.array([stats.count(layer, "qkv", m) for m in MODALITIES], np.float64)
        assert counts.min() > 0  # the set has vision, prompt and response tokens
        for group in ("qkv", "o_proj", "gate_up", "down_proj"):
            a_abs, a_sq, a_n = input_stats(stats, layer, group, "auto", weights[layer])
            b_abs, b_sq, b_n = input_stats(stats, layer, group, "balanced")
            np.testing.assert_allclose(a_sq, auto_importance(stats, weights, layer, group), rtol=1e-6)
            np.testing.assert_allclose(b_sq, balanced_importance(stats, layer, group), rtol=1e-6)
            # mean |x| takes the same per-modality shares: w_c n_c / Σ w n under auto, 1/3 each balanced
            share = weights[layer] * counts / (weights[layer] * counts).sum()
            means = [stats.get(layer, group, "mean_abs", m).double().numpy() for m in MODALITIES]
            np.testing.assert_allclose(
                a_abs, sum(w * x for w, x in zip(share, means, strict=True)), rtol=1e-6
            )
            np.testing.assert_allclose(b_abs, sum(means) / 3, rtol=1e-6)
            assert not np.allclose(a_sq, b_sq, rtol=1e-3)  # the two modes really differ here
            assert b_n == stats.count(layer, group)
            assert a_n == (stats.count(layer, group) if weights[layer, 0] > 0 else counts[1:].sum())
        # uniform: the stored all-token statistics, bit for bit; text: vision tokens carry no weight
        u_abs, u_sq, _ = input_stats(stats, layer, "qkv", "uniform")
        assert np.array_equal(u_sq, stats.importance(layer, "qkv").double().numpy())
        t_sq = input_stats(stats, layer, "qkv", "text")[1]
        text_only = sum(stats.get(layer, "qkv", "sum_sq", m).double() for m in ("prompt", "response"))
        np.testing.assert_allclose(t_sq, text_only.numpy() / counts[1:].sum(), rtol=1e-6)


def test_plan_weighs_each_layer_by_its_own_sensitivity(out: dict[str, Path], calib: Path) -> None:
    # the activation-aware scale choice saw each layer's own measured shares (not layer 0's, not balanced)
    report = out["f16_aware.report"]["aware"]  # type: ignore[index]
    stats, weights = CalibrationStats.load(calib), stored_weights(calib)
    assert report["modality_weights"] == "auto"
    assert report["sensitivity"]["source"] == "calibration"
    stored = json.loads((calib / SENSITIVITY_FILE).read_text())
    assert report["sensitivity"]["samples"] == stored["sample_ids"]
    shares = []
    for rep in report["layers"]:
        i = rep["layer"]
        counts = np.array([stats.count(i, "qkv", m) for m in MODALITIES], np.float64)
        want = weights[i] * counts / (weights[i] * counts).sum()
        np.testing.assert_allclose(rep["modality_shares"], want, atol=2e-6)
        shares.append(rep["modality_shares"])
    assert len({tuple(x) for x in shares}) == 4  # layers differ: per-layer weights reach the plan


def _copy_calib(calib: Path, dst: Path, *, keep_sensitivity: bool) -> Path:
    shutil.copytree(calib, dst)
    if not keep_sensitivity:
        (dst / SENSITIVITY_FILE).unlink()
    return dst


def test_calibration_without_sensitivity_file(
    tiny_dir: Path, calib: Path, out: dict[str, Path], tmp_path: Path
) -> None:
    # An older calibration (no sensitivity.json): `auto` measures it from the model and the set that
    # report.json records, the same numbers calibrate stores, so the same importance matrix; nothing is
    # written into the calibration folder.
    old = _copy_calib(calib, tmp_path / "old", keep_sensitivity=False)
    before = sorted(p.name for p in old.iterdir())
    rep = export_llm_gguf(tiny_dir, tmp_path / "a" / "m.gguf", "F16", progress=False, calib=old)
    assert rep["aware"]["sensitivity"]["source"] == "measured"
    assert sorted(p.name for p in old.iterdir()) == before
    assert not list((tmp_path / "a").glob(".r1v-sensitivity-*"))  # the spill folder is gone
    got = read_imatrix_gguf(tmp_path / "a" / "m.imatrix.gguf").means()
    ref = export_llm_gguf(tiny_dir, tmp_path / "b" / "m.gguf", "F16", progress=False, calib=calib)
    assert ref["aware"]["sensitivity"]["source"] == "calibration"
    want = read_imatrix_gguf(tmp_path / "b" / "m.imatrix.gguf").means()
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5)
    # and against balanced, auto's importance differs (the modes are not the same thing)
    bal = export_llm_gguf(
        tiny_dir, tmp_path / "c" / "m.gguf", "F16", progress=False, calib=old, modality_weights="balanced"
    )
    assert "sensitivity" not in bal["aware"]  # balanced never needs the measurement
    balanced = read_imatrix_gguf(tmp_path / "c" / "m.imatrix.gguf").means()
    assert not np.allclose(balanced["blk.0.attn_q.weight"], want["blk.0.attn_q.weight"], rtol=1e-3)

    # the recorded set cannot be rebuilt: one clear error saying how to fix it, nothing written
    moved = _copy_calib(calib, tmp_path / "moved", keep_sensitivity=False)
    report = json.loads((moved / "report.json").read_text())
    report["set"]["source"] = str(tmp_path / "gone")
    (moved / "report.json").write_text(json.dumps(report))
    o = tmp_path / "o"
    with pytest.raises(R1VError, match="no sensitivity.json, and its set does not reload.*re-run `r1v-q"):
        export_llm_gguf(tiny_dir, o / "m.gguf", "F16", progress=False, calib=moved)
    report["set"]["source"], report["seed"] = "default", 1  # reloads, but as another set
    (moved / "report.json").write_text(json.dumps(report))
    with pytest.raises(R1VError, match="now has hash .* not the calibrated .*--modality-weights balanced"):
        export_llm_gguf(tiny_dir, o / "m.gguf", "F16", progress=False, calib=moved)
    assert not o.exists() or not any(o.iterdir())

    # a sensitivity file that does not belong to these statistics, or is not one, is refused
    bad = _copy_calib(calib, tmp_path / "bad", keep_sensitivity=True)
    data = json.loads((bad / SENSITIVITY_FILE).read_text())
    (bad / SENSITIVITY_FILE).write_text(json.dumps({**data, "set_hash": "sha256:" + "0" * 64}))
    with pytest.raises(R1VError, match="measured on calibration set sha256:0000"):
        export_llm_gguf(tiny_dir, o / "m.gguf", "F16", progress=False, calib=bad)
    (bad / SENSITIVITY_FILE).write_text(json.dumps({**data, "weights": data["weights"][:3]}))
    with pytest.raises(R1VError, match="not a valid sensitivity file"):
        export_llm_gguf(tiny_dir, o / "m.gguf", "F16", progress=False, calib=bad)
    (bad / SENSITIVITY_FILE).write_text(json.dumps(data)[:100])
    with pytest.raises(R1VError, match="cannot read sensitivity"):
        export_llm_gguf(tiny_dir, o / "m.gguf", "F16", progress=False, calib=bad)


# -- split files -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gguf_type", ["Q8_0", "Q4_K_M"])  # written split by Python / re-split after libllama
def test_split_loads_with_identical_logits(
    tiny_dir: Path, tmp_path: Path, out: dict[str, Path], ids: list[int], gguf_type: str
) -> None:
    whole = out["q4"] if gguf_type == "Q4_K_M" else tmp_path / "whole.gguf"
    if gguf_type == "Q8_0":
        export_llm_gguf(tiny_dir, whole, gguf_type, progress=False)
    d = tmp_path / "split"
    report = export_llm_gguf(tiny_dir, d / "m.gguf", gguf_type, progress=False, split_max_size=500_000)
    files = [Path(p) for p in report["files"]]
    n = len(files)
    assert n >= 3 and sorted(d.iterdir()) == files
    assert [f.name for f in files] == [f"m-{i:05d}-of-{n:05d}.gguf" for i in range(1, n + 1)]
    assert report["path"] == str(files[0]) and report["bytes"] == sum(f.stat().st_size for f in files)
    for i, f in enumerate(files):
        r = gguf.GGUFReader(f)
        assert r.get_field("split.no").contents() == i and r.get_field("split.count").contents() == n
        assert sum(int(t.n_bytes) for t in r.tensors) <= 500_000 or len(r.tensors) == 1
    first = gguf.GGUFReader(files[0])
    assert first.get_field("tokenizer.chat_template") is not None  # metadata in the first shard
    assert gguf.GGUFReader(files[1]).get_field("tokenizer.chat_template") is None
    shard_tensors = {}
    for f in files:
        shard_tensors.update(tensors(f))
    whole_tensors = tensors(whole)
    assert shard_tensors.keys() == whole_tensors.keys()
    assert all(np.array_equal(shard_tensors[k][1], whole_tensors[k][1]) for k in whole_tensors)
    np.testing.assert_array_equal(llama_logits(files[0], ids), llama_logits(whole, ids))


# -- bad input ---------------------------------------------------------------------------------------------
def _stats_variant(calib: Path, dst: Path, edit) -> Path:
    dst.mkdir()
    meta = CalibrationStats.load(calib).metadata
    tensors_ = load_file(str(calib / STATS_FILE))
    save_file(edit(tensors_), str(dst / STATS_FILE), metadata=meta)
    return dst


def test_bad_inputs(tiny_dir: Path, calib: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    o = tmp_path / "o"
    with pytest.raises(R1VError, match="unsupported GGUF type 'Q4_K_X'"):
        export_llm_gguf(tiny_dir, o / "x.gguf", "Q4_K_X", calib=calib, activation_aware=True)
    with pytest.raises(R1VError, match="--activation-aware needs --calib"):
        export_llm_gguf(tiny_dir, o / "x.gguf", "Q4_K_M", activation_aware=True)
    with pytest.raises(R1VError, match="no calibration statistics"):
        export_llm_gguf(tiny_dir, o / "x.gguf", "Q4_K_M", calib=tmp_path)
    fewer = _stats_variant(
        calib, tmp_path / "fewer", lambda t: {k: v for k, v in t.items() if not k.startswith("layers.3.")}
    )
    with pytest.raises(R1VError, match="3 decoder layers, the model has 4"):
        export_llm_gguf(tiny_dir, o / "x.gguf", "Q4_K_M", calib=fewer, activation_aware=True)
    narrow = _stats_variant(
        calib,
        tmp_path / "narrow",
        lambda t: {k: (v[:128] if ".gate_up." in k and ".count." not in k else v) for k, v in t.items()},
    )
    with pytest.raises(R1VError, match="gate_up have 128 channels, the model has 256"):
        export_llm_gguf(tiny_dir, o / "x.gguf", "Q4_K_M", calib=narrow)
    assert not o.exists() or not any(o.iterdir())

    # not enough space, seen up front ...
    Usage = namedtuple("Usage", "total used free")
    with monkeypatch.context() as mp:
        mp.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
        with pytest.raises(R1VError, match="not enough free space"):
            export_llm_gguf(tiny_dir, o / "x.gguf", "Q4_K_M", calib=calib, progress=False)
    # ... or the disk filling up part-way: one clear line, nothing left behind
    real = gguf_llm._convert
    calls: list[str] = []

    def full(ckpt, t):
        calls.append(t.name)
        if len(calls) == 7:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(ckpt, t)

    with monkeypatch.context() as mp:
        mp.setattr(gguf_llm, "_convert", full)
        for t in ("Q8_0", "Q4_K_M"):
            calls.clear()
            with pytest.raises(R1VError, match="no space left on device"):
                export_llm_gguf(
                    tiny_dir, o / f"{t}.gguf", t, calib=calib, split_max_size=400_000, progress=False
                )
    assert list(o.iterdir()) == []

    # a shard of an earlier run counts as an existing output
    (o / "y-00001-of-00002.gguf").write_bytes(b"")
    with pytest.raises(R1VError, match="y-00001-of-00002.gguf: already exists"):
        export_llm_gguf(tiny_dir, o / "y.gguf", "Q8_0")


def _cli() -> Group:
    group = Group()
    group.add_command(gguf_command)
    return group


def test_cli(tiny_dir: Path, calib: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["gguf", str(tiny_dir), "--out", str(tmp_path), "--mmproj-type", "none"]
    r = runner.invoke(
        _cli(), [*args, "--type", "Q4_0", "--calib", str(calib), "--activation-aware", "--json"]
    )
    assert r.exit_code == 0, r.output
    llm = json.loads(r.output)["llm"]
    assert llm["aware"]["fold"] and llm["imatrix"]["used_by_quantizer"]  # Q4_0 goes through libllama
    assert llm["calibration_set_hash"] == CalibrationStats.load(calib).set_hash
    assert Path(llm["imatrix"]["path"]).is_file()
    meta = gguf.GGUFReader(llm["path"])
    assert meta.get_field("r1v_quant.activation_aware").contents() is True
    assert meta.get_field("quantize.imatrix.entries_count").contents() == 28
    assert {t.tensor_type for t in meta.tensors if t.name.endswith("attn_q.weight")} == {Q.Q4_0}  # pure
    r = runner.invoke(
        _cli(), [*args, "--type", "F16", "--calib", str(calib), "--modality-weights", "balanced", "--json"]
    )
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["llm"]["aware"]["modality_weights"] == "balanced"
    r = runner.invoke(_cli(), [*args, "--type", "F16", "--calib", str(calib), "--modality-weights", "equal"])
    assert r.exit_code == 2 and "'equal' is not one of 'auto', 'balanced', 'uniform', 'text'" in r.output
    for bad, msg in [
        (["--type", "Q4_K_M", "--activation-aware"], "--activation-aware needs --calib"),
        (["--type", "Q8_0", "--split-max-size", "lots"], "cannot read memory size"),
        (["--type", "Q8_0", "--calib", str(tmp_path / "none")], "no calibration statistics"),
    ]:
        r = runner.invoke(_cli(), [*args, *bad])
        assert r.exit_code == 2 and r.output.startswith("error: ") and len(r.output.strip().splitlines()) == 1
        assert msg in r.output, r.output
