"""Decoding as the model is meant to be run: the checkpoint's sampling settings, the repetition penalty,
seeds per (item, sample), k samples per item, and the batched torch decoder against one sequence at a time."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from r1v_quant.runtime.decoding import FLAVOR_SAMPLING, checkpoint_sampling, resolve_decoding
from r1v_quant.runtime.sampling import sample_token
from r1v_quant.util.errors import R1VError


def test_sampling_settings_from_the_checkpoint_or_the_flavour(tiny_dir: Path, tmp_path: Path) -> None:
    # the replica's generation_config.json states ids only, as Skywork's do: the flavour's published values
    pub = FLAVOR_SAMPLING["r1v"]
    assert checkpoint_sampling(tiny_dir, "r1v")[:3] == (pub.temperature, pub.top_p, pub.repetition_penalty)
    d = tmp_path / "m"
    d.mkdir()
    gen = {"do_sample": True, "temperature": 0.7, "top_p": 0.8}
    (d / "generation_config.json").write_text(json.dumps(gen))
    t, p, r, source = checkpoint_sampling(d, "r1v3")
    assert (t, p, r, source) == (0.7, 0.8, pub.repetition_penalty, "generation_config.json")
    (d / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert checkpoint_sampling(d, "r1v")[0] == 0.0
    with pytest.raises(R1VError, match="no known flavour"):
        checkpoint_sampling(tmp_path, None)
    dec = resolve_decoding(tiny_dir, "r1v", samples=4, seed=3, top_p=0.9, max_tokens=100)
    assert (dec.temperature, dec.top_p, dec.samples, dec.max_tokens) == (pub.temperature, 0.9, 4, 100)
    assert "partly set on the command line" in dec.source and not dec.greedy
    g = resolve_decoding(tiny_dir, "r1v", greedy=True)
    assert g.greedy and (g.top_p, g.repetition_penalty) == (1.0, 1.0)
    with pytest.raises(R1VError, match="--samples must be 1"):
        resolve_decoding(tiny_dir, "r1v", greedy=True, samples=2)


def test_seeds_are_per_item_and_sample_not_per_position(tiny_dir: Path) -> None:
    dec = resolve_decoding(tiny_dir, "r1v", samples=3, seed=5)
    seeds = {(i, s): dec.seed_for(i, s) for i in ("a", "b") for s in range(3)}
    assert len(set(seeds.values())) == 6
    assert resolve_decoding(tiny_dir, "r1v", samples=3, seed=5).seed_for("b", 2) == seeds[("b", 2)]
    assert resolve_decoding(tiny_dir, "r1v", samples=3, seed=6).seed_for("b", 2) != seeds[("b", 2)]


def test_repetition_penalty_as_transformers_applies_it() -> None:
    rng = np.random.default_rng(0)
    logits = np.array([3.0, -1.0, 2.0, 0.5], dtype=np.float32)
    seen = np.array([True, True, False, False])
    assert sample_token(logits, 0.0, 1.0, rng) == 0
    # seen positive logits are divided (3 -> 1.5), negative ones multiplied (-1 -> -2): token 2 wins
    assert sample_token(logits, 0.0, 1.0, rng, penalty=2.0, seen=seen) == 2
    assert logits[0] == 3.0  # the caller's logits are left alone
    # top-p keeps the smallest set reaching p: with one dominant token only it is ever drawn
    sharp = np.array([10.0, 0.0, 0.0, 0.0], dtype=np.float32)
    assert {sample_token(sharp, 1.0, 0.5, rng) for _ in range(50)} == {0}


def _single_logits(lm: torch.nn.Module, embeds: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Logits after the prompt and after each of `tokens`, from the one-sequence reference forward."""
    with torch.inference_mode():
        x = torch.cat([embeds, lm.model.embed_tokens(torch.tensor(tokens, dtype=torch.long))])[None]
        return lm.logits(lm.forward_embeds(x))[0, embeds.shape[0] - 1 :]


def test_batched_decoder_matches_one_sequence(tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Left padding, per-row positions and masks, a cache grown in chunks: every token the batch picks
    greedily is the one-sequence forward's argmax (up to float rounding: within 1e-4 of its top logit)."""
    from PIL import Image, ImageDraw

    import r1v_quant.runtime.batch_generate as bg
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.reference import R1VModel, build_inputs

    monkeypatch.setattr(bg, "CHUNK", 3)  # the cache grows several times within 20 tokens
    ckpt = open_checkpoint(tiny_dir)
    model = R1VModel.from_checkpoint(ckpt)
    image = Image.new("RGB", (200, 150), "white")
    ImageDraw.Draw(image).ellipse((40, 30, 160, 120), fill="red")
    prompts = [("What is 3 + 4?", []), ("<image>\nWhat colour is the shape?", [image]), ("Hi", [])]
    rows = []
    for k, (q, imgs) in enumerate(prompts):
        ids, pixels, _ = build_inputs(tiny_dir, ckpt.spec, q, imgs)
        rows.append(bg.Row(model.embed(ids, pixels)[0], ids[0].tolist(), 12 + 4 * k, k))
    assert len({r.embeds.shape[0] for r in rows}) == 3  # different lengths: padding is exercised
    results = bg.generate_rows(
        model.language_model, rows, temperature=0.0, top_p=1.0, repetition_penalty=1.0, stop_ids=()
    )
    for r, res in zip(rows, results, strict=True):
        assert len(res.tokens) == r.max_new_tokens and not res.stopped
        ref = _single_logits(model.language_model, r.embeds, res.tokens)
        for step, tok in enumerate(res.tokens):
            assert ref[step].max() - ref[step, tok] <= 1e-4, (step, tok)


def test_k_samples_per_item_with_recorded_seeds(tiny_dir: Path) -> None:
    from r1v_quant.evaluate.backends import open_backend
    from r1v_quant.evaluate.bench import bench_pass, compare, model_summary
    from r1v_quant.evaluate.bench_load import load_bench
    from r1v_quant.model.artifact import resolve_reference
    from r1v_quant.runtime.options import RuntimeOptions

    items = load_bench("builtin:tiny", limit=3, seed=2).items
    dec = resolve_decoding(tiny_dir, "r1v", samples=2, seed=9, max_tokens=8)
    rt = RuntimeOptions(torch_device="cpu", batch_size=4)
    backend = open_backend(resolve_reference(tiny_dir), runtime=rt)
    try:
        res = bench_pass(backend, items, 8, decoding=dec)
    finally:
        backend.close()
    assert [(r.id, r.sample) for r in res] == [(i.id, s) for i in items for s in range(2)]
    assert [r.seed for r in res] == [dec.seed_for(r.id, r.sample) for r in res]
    assert all(r.budget == 8 and r.n_tokens <= 8 for r in res)
    s = model_summary(res)
    assert (s["n"], s["answers"], s["samples"]) == (3, 6, 2)
    same = compare(res, res, n_boot=200)
    assert same["delta"] == 0.0 and same["n"] == 3 and same["detectable"] > 0
