"""AWQ: folding is exact, the packed checkpoint loads and equals the fake-quant forward, resume, bad input."""

from __future__ import annotations

import dataclasses
import errno
import json
import shutil
from pathlib import Path

import pytest
import torch

from r1v_quant.calibration.capture import load_decoder_layer
from r1v_quant.exporters.awq_export import AWQOptions, quantize_awq
from r1v_quant.model.checkpoint import INDEX_NAME, open_checkpoint
from r1v_quant.model.llm import rope_cos_sin
from r1v_quant.model.reference import R1VModel
from r1v_quant.quant.awq_search import (
    INPUT_OF,
    RESPONSE,
    SCALE_GROUPS,
    VISION,
    AttentionAtTokens,
    AWQConfig,
    LossTokens,
    _fold,
    _layer_error,
    _quantize_clipped,
    _search_clip,
    apply_quantized,
    language_vision_sensitivity,
    layer_features,
    loss_tokens,
    quantize_layer,
    rtn_layer,
    screen_samples,
    token_weights,
)
from r1v_quant.util.errors import R1VError

OPTS = AWQOptions(samples=4, seq_len=512, vision="16bit")  # the tower: tests/test_awq_vision.py


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
    bal = token_weights(masks, "balanced")[0]
    assert torch.allclose(bal[:6].sum(), bal[6:8].sum()) and torch.allclose(bal[6:8].sum(), bal[8:].sum())
    assert torch.all(token_weights(masks, "text")[0][:6] == 0)
    assert torch.all(token_weights(masks, "uniform")[0] == 1)
    auto = token_weights(masks, "auto", torch.tensor([0.001, 0.5, 0.25]))[0]
    assert torch.allclose(auto[6] / auto[8], torch.tensor(2.0)) and torch.allclose(
        auto[0] / auto[8], torch.tensor(0.004)
    )
    assert torch.allclose(auto.mean(), torch.tensor(1.0))
    assert torch.all(token_weights(masks, "auto", torch.zeros(3))[0] == 1)  # nothing measured: uniform
    with pytest.raises(R1VError, match="sensitivities"):
        token_weights(masks, "auto")
    with pytest.raises(R1VError):
        token_weights(masks, "bogus")


def test_layer_sensitivity_matches_whole_model_autograd(tiny_dir: Path) -> None:
    """The streamed backward pass gives the same gradients as autograd through the whole model."""
    import torch.nn.functional as F

    from r1v_quant.calibration import ActivationStore, prepare
    from r1v_quant.calibration.capture import layer_sensitivity

    prep = prepare(tiny_dir, "default", 4, 256, seed=0, progress=False)
    rendered = [r for r in prep.rendered if r.image_keys][:1] + [
        r for r in prep.rendered if not r.image_keys
    ][:1]
    got, n = layer_sensitivity(
        prep.ckpt, prep.renderer, prep.cset, rendered, ActivationStore(), progress=False
    )
    model = R1VModel.from_checkpoint(tiny_dir).requires_grad_(False)
    lm = model.language_model
    want = torch.zeros(len(lm.model.layers), 3, dtype=torch.float64)
    counts = torch.zeros(3, dtype=torch.float64)
    for r in rendered:
        emb = model.embed(r.input_ids[None], prep.renderer.pixels(r, prep.cset))
        cos, sin = rope_cos_sin(lm.spec, torch.arange(emb.shape[1]))
        with torch.enable_grad():
            x, outs = emb.clone().requires_grad_(True), []
            for layer in lm.model.layers:
                x = layer(x, cos, sin)
                x.retain_grad()
                outs.append(x)
            sel = torch.nonzero(r.modality[1:] == RESPONSE).flatten()
            F.cross_entropy(
                lm.logits(lm.model.norm(x))[0][sel], r.input_ids[sel + 1], reduction="sum"
            ).backward()
        m = r.modality.long()
        for i, o in enumerate(outs):
            want[i] += torch.bincount(m, weights=o.grad[0].double().pow(2).sum(-1), minlength=3)
        counts += torch.bincount(m, minlength=3).double()
    want = (want / counts.clamp(min=1)).float()
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-3, atol=1e-12)
    assert torch.equal(n, counts.float())
    assert (got[:, RESPONSE] > 0).all() and got[-1, VISION] == 0  # the last layer: only answers matter
    pooled = language_vision_sensitivity(got, n)  # prompt and response pooled by their token counts
    lang = (want[:, 1] * counts[1] + want[:, 2] * counts[2]) / (counts[1] + counts[2])
    assert torch.allclose(pooled[:, 1], lang.float(), rtol=1e-3) and torch.equal(pooled[:, 1], pooled[:, 2])
    assert torch.equal(pooled[:, VISION], got[:, VISION])


def _masks() -> list[torch.Tensor]:
    # three samples: image + prompt + response, text only, image + prompt + response
    return [
        torch.tensor([VISION] * 40 + [1] * 10 + [RESPONSE] * 50),
        torch.tensor([1] * 12 + [RESPONSE] * 60),
        torch.tensor([VISION] * 30 + [1] * 8 + [RESPONSE] * 30),
    ]


@pytest.mark.parametrize("mode", ["balanced", "uniform", "text"])
def test_loss_tokens_stratified_and_deterministic(mode: str) -> None:
    masks = _masks()
    ws = token_weights(masks, mode)
    lt = loss_tokens(masks, ws, 60)
    again = loss_tokens(masks, ws, 60)
    assert all(torch.equal(a, b) for a, b in zip(lt.pos, again.pos, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(lt.weight, again.weight, strict=True))
    n = sum(p.numel() for p in lt.pos)
    assert 55 <= n <= 65
    codes, w = torch.cat(masks), torch.cat(ws)
    picked = torch.cat([m[p] for m, p in zip(masks, lt.pos, strict=True)])
    for c in range(3):  # every stratum keeps its total weight, zero-weight tokens are never picked
        mass = float(w[codes == c].sum())
        assert float(lt.all_weights[picked == c].sum()) == pytest.approx(mass, rel=1e-5)
        assert (picked == c).any() == (mass > 0)
    for p, m in zip(lt.pos, masks, strict=True):
        assert torch.equal(p, p.unique()) and (p.numel() == 0 or int(p.max()) < m.numel())
    every = loss_tokens(masks, ws, 0)  # budget 0: every token, own weight
    assert torch.equal(every.all_weights, w) and [p.numel() for p in every.pos] == [100, 72, 68]


def test_screen_samples_cover_both_kinds() -> None:
    masks = [torch.tensor([VISION, 1, 2]) if j % 4 else torch.tensor([1, 2]) for j in range(16)]
    picked = screen_samples(masks, 0.125)
    assert picked == screen_samples(masks, 0.125) and picked == sorted(set(picked))
    assert any(j % 4 == 0 for j in picked) and any(j % 4 for j in picked) and len(picked) <= 4
    lt = loss_tokens(masks, token_weights(masks, "uniform"), 0)
    rows = lt.screen_rows(picked, 4)
    sub = lt.subset(rows)
    assert rows.numel() == 4 and sum(p.numel() for p in sub.pos) == 4
    assert all(sub.pos[j].numel() == 0 for j in range(16) if j not in picked)


def _layer_and_samples(tiny_dir: Path, lengths=(70, 45, 90)):
    ckpt = open_checkpoint(tiny_dir)
    layer = load_decoder_layer(ckpt, 1)
    g = torch.Generator().manual_seed(0)
    h = ckpt.spec.llm.hidden_size
    inputs = [torch.randn(n, h, generator=g) * (1 + 4 * (torch.arange(h) % 37 == 0)) for n in lengths]
    cos, sin = rope_cos_sin(ckpt.spec.llm, torch.arange(max(lengths)))
    return layer, inputs, lambda n: (cos[:n], sin[:n])


def test_attention_at_tokens_equals_full_forward(tiny_dir: Path) -> None:
    layer, inputs, rope = _layer_and_samples(tiny_dir)
    lt = LossTokens(
        [torch.tensor([0, 5, 69]), torch.tensor([], dtype=torch.long), torch.tensor([3, 4, 50, 88])],
        [torch.ones(3), torch.ones(0), torch.ones(4)],
    )
    got = AttentionAtTokens(layer, inputs, lt, rope)()
    want = [
        layer.self_attn(layer.input_layernorm(x)[None], *rope(x.shape[0]))[0][p]
        for x, p in zip(inputs, lt.pos, strict=True)
    ]
    assert torch.allclose(got, torch.cat(want), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("mode", ["balanced", "uniform", "text"])
def test_subsample_loss_close_to_full_loss(tiny_dir: Path, mode: str) -> None:
    layer, inputs, rope = _layer_and_samples(tiny_dir, (400, 300, 500, 350))
    masks = [
        torch.tensor([VISION] * (n // 3) + [1] * 20 + [RESPONSE] * (n - n // 3 - 20))
        for n in (400, 300, 500, 350)
    ]
    targets = [layer(x[None], *rope(x.shape[0]))[0].detach() for x in inputs]
    apply = AWQConfig()
    q = rtn_layer(layer, apply)
    with torch.no_grad():
        for n, qw in q.items():
            layer.get_submodule(n).weight.copy_(qw.dequantize())
    ws = token_weights(masks, mode)
    full = _layer_error(layer, inputs, targets, loss_tokens(masks, ws, 0), rope)
    sub = _layer_error(layer, inputs, targets, loss_tokens(masks, ws, 600), rope)  # 600 of 1550 tokens
    assert full > 0 and sub == pytest.approx(full, rel=0.1)


def test_channel_stats_give_the_all_token_weighted_mean(tiny_dir: Path) -> None:
    from r1v_quant.calibration.stats import LayerStats
    from r1v_quant.exporters.awq_export import channel_stats

    layer, inputs, rope = _layer_and_samples(tiny_dir, (100, 72, 68))  # the lengths of _masks()
    masks = _masks()
    stats, cur = LayerStats.for_layer(1, layer), [masks[0]]
    with stats.hooks(layer, cur), torch.no_grad():
        for x, m in zip(inputs, masks, strict=True):
            cur[0] = m
            layer(x[None], *rope(x.shape[0]))
    ws = token_weights(masks, "balanced")
    lt = loss_tokens(masks, ws, 64)
    cfg = AWQConfig()
    from_stats = layer_features(layer, inputs, masks, ws, lt, rope, cfg, channel_stats(stats)).mean_abs
    own_pass = layer_features(layer, inputs, masks, ws, lt, rope, cfg).mean_abs
    w = torch.cat(ws)
    x1 = torch.cat([layer.input_layernorm(x) for x in inputs]).detach()
    assert torch.allclose(own_pass["self_attn.q_proj"], (x1.abs() * w[:, None]).sum(0) / w.sum(), rtol=1e-5)
    assert sorted(from_stats) == sorted(own_pass) == sorted(set(INPUT_OF.values()))
    for k, v in own_pass.items():
        assert torch.allclose(from_stats[k], v, rtol=1e-4, atol=1e-7), k


def test_clip_search_vectorised_equals_token_loop() -> None:
    g = torch.Generator().manual_seed(1)
    cfg = AWQConfig(group_size=32, clip_grid=10, clip_elements=10 * 64 * 5)  # forces row chunks of 5
    w = torch.randn(12, 64, generator=g) * torch.rand(12, 1, generator=g)
    x = torch.randn(300, 64, generator=g) * (1 + 5 * (torch.arange(64) % 9 == 0))
    wt = torch.rand(300, generator=g)
    xg = x.reshape(300, 2, 32)
    gram = torch.einsum("tgc,tgd->gcd", xg * wt[:, None, None], xg)
    cmax, cmin = _search_clip(w, gram, cfg)
    # reference: one candidate at a time, the error summed over tokens (the unvectorised algorithm)
    wg = w.reshape(12, 2, 32)
    ref = torch.einsum("tgc,ogc->tog", xg, wg)
    best = torch.full((12, 2), float("inf"))
    bmax, bmin = wg.amax(-1).clone(), wg.amin(-1).clone()
    for i in range(cfg.clip_grid):
        shrink = 1 - cfg.max_shrink * i / cfg.clip_grid
        tmax, tmin = wg.amax(-1) * shrink, wg.amin(-1) * shrink
        deq = _quantize_clipped(w, tmax, tmin, cfg).dequantize().reshape(12, 2, 32)
        err = ((torch.einsum("tgc,ogc->tog", xg, deq) - ref).pow(2) * wt[:, None, None]).sum(0)
        better = err < best
        best, bmax, bmin = (
            torch.where(better, err, best),
            torch.where(better, tmax, bmax),
            torch.where(better, tmin, bmin),
        )
    assert torch.equal(cmax, bmax) and torch.equal(cmin, bmin)
    assert (cmax < wg.amax(-1)).any(), "some group should shrink its range"


def test_fast_search_matches_full_search(tiny_dir: Path) -> None:
    """The screened, subsampled search finds a layer as good as scoring every candidate on every token."""
    import copy

    from r1v_quant.calibration import ActivationStore, iter_layers, prepare

    prep = prepare(tiny_dir, "default", 4, 320, seed=0, progress=False)
    store = ActivationStore(None, None)
    cap = next(iter(iter_layers(prep.ckpt, prep.renderer, prep.cset, prep.rendered, store, progress=False)))
    inputs, targets = list(cap.inputs), list(cap.outputs)
    rope = cap.rope
    losses = {}
    for name, cfg in {
        "fast": AWQConfig(
            loss_tokens=512, screen_tokens=128, screen_fraction=0.34, modality_weights="uniform"
        ),
        "full": AWQConfig(loss_tokens=0, screen_fraction=0, modality_weights="uniform"),
    }.items():
        layer = copy.deepcopy(cap.layer)
        res = quantize_layer(0, layer, inputs, targets, cap.modality, rope, cfg)
        ws = token_weights(cap.modality, cfg.modality_weights)
        losses[name] = _layer_error(layer, inputs, targets, loss_tokens(cap.modality, ws, 0), rope)
        assert res.report["loss"] < res.report["loss_rtn"]
    rtn = copy.deepcopy(cap.layer)
    apply_quantized(rtn, rtn_layer(rtn, cfg))
    losses["rtn"] = _layer_error(rtn, inputs, targets, loss_tokens(cap.modality, ws, 0), rope)
    store.close()
    # the fast search keeps most of what the full one gains over plain rounding (at these deliberately
    # small settings, 4 x 320 tokens, 512 loss tokens: 90 % on the trained replica's first layer)
    assert losses["rtn"] - losses["fast"] >= 0.75 * (losses["rtn"] - losses["full"]) > 0


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


def test_skywork_release_layout_loads(awq_run, tmp_path: Path) -> None:
    """Skywork's own AWQ releases were made with LMDeploy: `quantization_config` only inside `llm_config`,
    no `modules_to_not_convert`, architecture `InternVLChatModel`, eager attention in the LLM config
    (research/skywork-r1v-checkpoint.md §8). r1v-quant must read them as AWQ, so `check` can score them."""
    from r1v_quant.model.artifact import describe_artifact, resolve_artifact

    out, _, _ = awq_run
    theirs = tmp_path / "Skywork-R1V-38B-AWQ"
    shutil.copytree(out, theirs)
    cfg = json.loads((theirs / "config.json").read_text())
    del cfg["quantization_config"]
    cfg["architectures"] = ["InternVLChatModel"]
    cfg["llm_config"]["attn_implementation"] = "eager"
    cfg["llm_config"]["quantization_config"] = {
        "quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128, "zero_point": True,
    }  # fmt: skip
    (theirs / "config.json").write_text(json.dumps(cfg, indent=2))
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(5))
    assert torch.equal(R1VModel.from_checkpoint(theirs)(ids), R1VModel.from_checkpoint(out)(ids))
    art = resolve_artifact(theirs)
    assert (art.kind, art.backend) == ("awq", "torch")
    assert describe_artifact(theirs).llm_format == "awq-int4-g128"


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


def test_nan_weight_names_the_tensor(tiny_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan-model"
    shutil.copytree(tiny_dir, bad)
    ckpt = open_checkpoint(bad)
    name = "language_model.model.layers.1.mlp.down_proj.weight"
    shard = bad / ckpt.weight_map[name]
    tensors = load_file(str(shard))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, str(shard))
    with pytest.raises(R1VError, match=rf"tensor '{name}' \(.*\) holds NaN at index \[0, 0\]"):
        quantize_awq(bad, tmp_path / "out", AWQOptions(samples=2, seq_len=256), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*")), "output, work or lock left"


def test_disk_full_leaves_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import r1v_quant.model.checkpoint as ck

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck, "save_file", full)
    out = tmp_path / "out"
    with pytest.raises(R1VError, match="no space left"):
        quantize_awq(tiny_dir, out, AWQOptions(samples=2, seq_len=256, method="rtn"), progress=False)
    assert not out.exists()


# -- preflight plan (calibration/job_plan.py) ----------------------------------------------------------------
def test_plan_in_report_predicts_the_store(awq_run) -> None:
    out, report, _ = awq_run
    plan, mem = report["plan"], report["memory"]
    assert json.loads((out / "quant_report.json").read_text())["plan"] == plan
    assert plan["job"] == "awq" and plan["budget_source"] == "auto"  # the default
    assert plan["activation_bytes"] == mem["peak_cached_ram_bytes"] > 0  # the store, replayed exactly
    assert plan["predicted_spill_bytes"] == mem["peak_spill_disk_bytes"] == 0
    names = {t["name"] for t in plan["terms"]}
    assert {
        "search.layer",
        "search.reference_copy",
        "search.loss_token_buffers",
        "sensitivity.lm_head",
    } <= names
    assert plan["flops"]["search"] > 0 and plan["estimated_seconds"] > 0 and mem["peak_rss_bytes"] > 0


def test_spilling_search_matches_and_plan_predicts_spill(awq_run, tiny_dir: Path, tmp_path: Path) -> None:
    """A tiny budget: the search reads spilled activations back lazily; same files, predicted spill exact."""
    out_full, _, _ = awq_run
    out = tmp_path / "spilled"
    opts = AWQOptions(samples=OPTS.samples, seq_len=OPTS.seq_len, max_memory="200KB")
    report = quantize_awq(tiny_dir, out, opts, progress=False)
    plan, mem = report["plan"], report["memory"]
    assert (
        plan["budget_bytes"] == 200_000
        and plan["cache_peak_bytes"] == mem["peak_cached_ram_bytes"] <= 200_000
    )
    assert plan["predicted_spill_bytes"] == mem["peak_spill_disk_bytes"] > 0
    for s in sorted(p.name for p in out_full.glob("*.safetensors")):
        assert (out / s).read_bytes() == (out_full / s).read_bytes(), s


def test_preflight_refusals_leave_nothing(tiny_dir: Path, tmp_path: Path, monkeypatch) -> None:
    import shutil as sh

    import r1v_quant.calibration.job_plan as jp

    opts = AWQOptions(samples=2, seq_len=256)
    out = tmp_path / "out"
    real = sh.disk_usage
    with monkeypatch.context() as m:
        m.setattr(sh, "disk_usage", lambda p: real(p)._replace(free=1000))
        with pytest.raises(R1VError, match="not enough disk at .* outputs"):
            quantize_awq(tiny_dir, out, opts, progress=False)
    with monkeypatch.context() as m:
        m.setattr(jp, "mem_available", lambda: 50 * 10**6)
        with pytest.raises(R1VError, match=r"needs about .* RAM .*--seq-len or --device cuda"):
            quantize_awq(tiny_dir, out, opts, progress=False)
    assert sorted(tmp_path.iterdir()) == []  # no output, no work folder


def test_awq_cli_json_has_the_plan(tiny_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.awq import awq_command
    from r1v_quant.cli.main import Group

    out = tmp_path / "q"
    args = ["awq", str(tiny_dir), "--out", str(out), "--samples", "2", "--seq-len", "256", "--method", "rtn"]
    r = CliRunner().invoke(Group(commands={"awq": awq_command}), [*args, "--max-memory", "none", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["plan"]["budget_source"] == "none" and report["plan"]["budget_bytes"] is None
    assert report["plan"]["activation_bytes"] == report["memory"]["peak_cached_ram_bytes"]
    assert "sensitivity" not in report["plan"]["flops"]  # plain rounding measures no sensitivity


# -- --device: vision, capture, sensitivity and search on one device (r1v_quant/util/device.py)
def test_awq_explicit_cpu_device_gives_identical_files(awq_run, tiny_dir: Path, tmp_path: Path) -> None:
    """The fixture ran with --device auto; on a CPU-only machine an explicit cpu gives the same bytes."""
    out_auto, report_auto, _ = awq_run
    if torch.cuda.is_available():
        pytest.skip("auto resolves to cuda here: the fixture's files are not the CPU run's")
    out = tmp_path / "cpu"
    report = quantize_awq(tiny_dir, out, dataclasses.replace(OPTS, device="cpu"), progress=False)
    assert report["plan"]["device"] == report_auto["plan"]["device"] == "cpu"
    for s in sorted(p.name for p in out_auto.glob("*.safetensors")):
        assert (out / s).read_bytes() == (out_auto / s).read_bytes(), s


def test_awq_cli_device_cuda_without_cuda_is_one_line(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from click.testing import CliRunner

    from r1v_quant.cli.awq import awq_command
    from r1v_quant.cli.main import Group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "q"
    args = ["awq", str(tiny_dir), "--out", str(out), "--samples", "2", "--seq-len", "256"]
    r = CliRunner().invoke(Group(commands={"awq": awq_command}), [*args, "--device", "cuda"])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--device cuda: no CUDA device" in lines[0]
    assert sorted(tmp_path.iterdir()) == []  # no output, no work folder
