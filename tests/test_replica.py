"""The tiny replica is trained to a verified skill: what the build measures, what it refuses, and that the
prompts it trains and measures on are the prompts inference builds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from r1v_quant.cli.main import main
from r1v_quant.data.synthdata import (
    COLORS,
    SHAPES,
    image_problems,
    probe_problems,
    render_shape,
    text_problems,
)


def test_generated_problems_are_deterministic_and_answerable() -> None:
    a, b = image_problems(12, 5), image_problems(12, 5)
    assert [(p.question, p.answer, p.response()) for p in a] == [
        (p.question, p.answer, p.response()) for p in b
    ]
    assert [p.task for p in a[:3]] == ["color", "shape", "larger"]
    for p in a:
        assert p.answer in p.scene.description and p.response().endswith(f"\\boxed{{{p.answer}}}.")
        assert p.render().size == (448, 448)
    # every text problem's reasoning ends in its answer
    for p in text_problems(50, 3):
        assert p.answer in p.thinking.splitlines()[-1]
    probes = probe_problems()
    assert len(probes) == 2 * len(COLORS) * len(SHAPES)
    assert probes[0].render().tobytes() == (
        render_shape(probes[0].scene.items[0].color, probes[0].scene.items[0].shape).tobytes()
    )


def test_larger_answer_is_the_bigger_shape_whichever_is_named_first() -> None:
    pairs = [p for p in image_problems(60, 11) if p.task == "larger"]
    assert {p.question.split("the ")[1].split(" ")[0] == p.answer for p in pairs} == {True, False}
    for p in pairs:
        big, small = p.scene.items
        assert (big.box[2] - big.box[0]) > 1.5 * (small.box[2] - small.box[0]) and p.answer == big.color


def test_training_prompts_are_the_inference_prompts(tiny_rms_dir: Path) -> None:
    """The build's held-out check reads answers from the very token ids `generate` and chat build."""
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.reference import build_inputs
    from r1v_quant.replica.train import Encoder

    spec = open_checkpoint(tiny_rms_dir).spec
    enc = Encoder(tiny_rms_dir, spec.flavor, spec.num_image_token)
    p = probe_problems()[0]
    seq = enc.encode(p.question, p.response(), 0)
    ids, pixels, _ = build_inputs(tiny_rms_dir, spec, p.question, [p.render()])
    assert ids[0].tolist() == seq.ids[: seq.loss_from] and pixels is not None and pixels.shape[0] == 1
    t = text_problems(1, 0)[0]
    seq = enc.encode(t.question, t.response())
    ids, _, _ = build_inputs(tiny_rms_dir, spec, t.question)
    assert ids[0].tolist() == seq.ids[: seq.loss_from]


def test_build_records_what_the_replica_learned(tiny_dir: Path) -> None:
    from r1v_quant.replica.train import GATE_SLACK

    report = json.loads((tiny_dir / "tiny_build.json").read_text())
    held = report["heldout"]
    assert held["image"] >= report["min_accuracy"] and held["text"] >= report["min_accuracy"]
    assert held["probes_failed"] == [] and set(held["per_task"]) == {"color", "shape", "larger"}
    assert (
        report["steps_trained"] <= report["steps"]
        and report["history"][-1]["step"] == report["steps_trained"]
    )
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability() or report["cpu_capability"]
    # the last check measured greedily because its gate opened (or because it was the cap's)
    last = report["history"][-1]
    assert last["probes_named"] >= 24 - GATE_SLACK or last["step"] == report["steps"]
    assert set(report["seconds_training"]) == {"text_steps", "image_steps", "ema", "gate", "greedy_checks"}
    assert sum(report["seconds_training"].values()) <= report["seconds"]


def test_a_build_that_misses_its_threshold_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import r1v_quant.replica.train as train

    monkeypatch.setattr(train, "MAX_NEW", 8)  # the check at the cap: an untrained model rambles to the limit
    r = CliRunner().invoke(main, ["tiny", str(tmp_path / "y"), "--steps", "2"])
    last = r.stderr.splitlines()[-1]  # after the progress bar
    assert r.exit_code != 0 and last.startswith("error: training stopped at the 2-step cap below")
    assert len(last) < 250 and "Traceback" not in r.output
    assert not (tmp_path / "y").exists()  # nothing is left under the final name


@pytest.mark.slow
def test_replica_answers_with_margin_on_unseen_pictures(tiny_dir: Path) -> None:
    """Skill, not one answer: on 24 new pictures (a seed neither training nor the build's check used) the
    16-bit replica answers at least 21 right (the build's threshold is 90 %)."""
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.reference import R1VModel, build_inputs
    from r1v_quant.model.tokenizer import R1VTokenizer

    ckpt = open_checkpoint(tiny_dir)
    model, tok = R1VModel.from_checkpoint(ckpt), R1VTokenizer.from_dir(tiny_dir)
    right = 0
    for p in image_problems(24, 424_242):
        ids, pixels, _ = build_inputs(tiny_dir, ckpt.spec, p.question, [p.render()])
        out = model.generate(ids, pixels, max_new_tokens=48, stop_ids=tok.stop_ids(ckpt.spec.flavor))
        right += f"\\boxed{{{p.answer}}}" in tok.decode(out.tokens)
    assert right >= 21


def test_shared_prefix_training_pass_equals_one_padded_pass(tiny_rms_dir: Path) -> None:
    """Training runs each picture's prompt prefix once and continues every question from its keys and
    values; the logits at the scored positions are those of a plain padded pass over whole sequences."""
    from r1v_quant.data.synthdata import scene_problems, scenes
    from r1v_quant.model.checkpoint import open_checkpoint
    from r1v_quant.model.reference import R1VModel
    from r1v_quant.model.vision import extract_feature
    from r1v_quant.replica.train import Encoder, _forward, _pixels, shared_prefix

    ckpt = open_checkpoint(tiny_rms_dir)
    model = R1VModel.from_checkpoint(ckpt).float().eval()
    enc = Encoder(tiny_rms_dir, ckpt.spec.flavor, ckpt.spec.num_image_token)
    pics, seqs = scenes(3, 4), []
    for i, sc in enumerate(pics):
        seqs += [enc.encode(p.question, p.response(), i) for p in scene_problems(sc, i)]
    assert len(seqs) > len(pics) and 0 < shared_prefix(seqs) < min(s.loss_from for s in seqs)
    pixels = _pixels(pics)
    with torch.no_grad():
        logits, target, _ = _forward(model, seqs, pixels, enc.pad)
        lm, n = model.language_model, max(len(s.ids) for s in seqs)
        feats = extract_feature(model.vision_model, model.mlp1, ckpt.spec, pixels)
        want, want_t = [], []
        for s in seqs:
            ids = torch.tensor([s.ids + [enc.pad] * (n - len(s.ids))])
            emb = lm.model.embed_tokens(ids)
            emb = emb.masked_scatter((ids == ckpt.spec.tokens.img_context)[..., None], feats[s.image])
            full = lm.logits(lm.forward_embeds(emb))[0]
            want.append(full[s.loss_from - 1 : len(s.ids) - 1])
            want_t += s.ids[s.loss_from :]
    assert target.tolist() == want_t
    torch.testing.assert_close(logits, torch.cat(want), atol=1e-4, rtol=1e-4)
