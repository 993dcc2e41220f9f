"""`eval bench` and `check` on the tiny replica: grading with truncation, gates and their exit codes, the
report files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from eval_helpers import perturbed_copy

from r1v_quant.cli.main import main
from r1v_quant.evaluate.bench import grade
from r1v_quant.evaluate.bench_sets import BenchItem
from r1v_quant.evaluate.check import Gates, apply_gates, format_markdown


def _item(kind: str = "numeric", answer: str = "42") -> BenchItem:
    return BenchItem("x", "What?", answer, kind, "cat")


def test_grade_counts_truncation_apart() -> None:
    text = "Let me think.\n</think>\n\nThe answer is \\boxed{42}."
    ok = grade(_item(), text, stopped=True, n_tokens=20)
    assert (ok.pred, ok.correct, ok.truncated) == ("42", True, False)
    # cut off by the budget after a complete boxed answer: graded; before one: truncated, never read
    cut = grade(_item(), text, stopped=False, n_tokens=20)
    assert (cut.pred, cut.correct, cut.truncated) == ("42", True, False)
    cut = grade(_item(), "Let me think.\n</think>\n\nThe answer is 42 and", stopped=False, n_tokens=20)
    assert (cut.pred, cut.correct, cut.truncated) == (None, False, True)
    cut = grade(_item(), "Let me think... maybe \\boxed{42}", stopped=False, n_tokens=20)
    assert (cut.pred, cut.truncated) == (None, True)  # still reasoning: a box there is not an answer
    # the answer after the last </think> wins over numbers in the reasoning
    r = grade(_item(), "so 41 or 43?\n</think>\n\n\\boxed{43}", stopped=True, n_tokens=9)
    assert (r.pred, r.correct) == ("43", False)
    r = grade(_item(), "a</think>b \\boxed{41}</think>\n\\boxed{42}", stopped=True, n_tokens=9)
    assert (r.pred, r.correct) == ("42", True)
    # a model that stops without closing its reasoning gave no answer (wrong, not truncated)
    r = grade(_item(), "The answer is 42.", stopped=True, n_tokens=5)
    assert (r.pred, r.correct, r.truncated) == (None, False, False)


def test_apply_gates() -> None:
    good = {"kld_mean": 0.01, "ppl_ratio": 1.01, "same_top_pct": 95.0}
    passing = {"verdict": "PASS", "why": "95 % CI [-0.4, +0.6] above -1"}
    kinds = {"text": good, "image": {**good, "kld_mean": 0.2}, "all": {**good, "kld_mean": 0.9}}
    fails = apply_gates(kinds, passing, Gates())
    assert fails == ["image KLD 0.2 > 0.05"]  # "all" is reported, never gated on its own
    unresolved = {"verdict": "UNRESOLVED", "why": "this run cannot resolve a 1-point drop"}
    fails = apply_gates({"text": {**good, "ppl_ratio": 1.2, "same_top_pct": 80.0}}, unresolved, Gates())
    assert fails == [
        "text PPL ratio 1.2000 > 1.05",
        "text same top token 80.0 % < 90 %",
        "benchmark UNRESOLVED: this run cannot resolve a 1-point drop",
    ]
    assert apply_gates({"text": good}, None, Gates()) == []


def test_gate_decides_on_the_interval_and_the_resolution() -> None:
    """PASS needs the interval above -max_drop and a run able to resolve max_drop; FAIL needs it below."""
    from r1v_quant.evaluate.bench import verdict

    base = {"n": 400, "delta": -0.5, "ci_low": -0.9, "ci_high": 0.1, "detectable": 0.8}
    assert verdict(base, 1.0)[0] == "PASS"
    assert verdict({**base, "detectable": 7.6}, 1.0)[0] == "UNRESOLVED"  # identical answers, 64 items
    assert "cannot resolve a 1-point drop" in verdict({**base, "detectable": 7.6}, 1.0)[1]
    assert verdict({**base, "ci_low": -1.6}, 1.0)[0] == "UNRESOLVED"  # straddles
    assert verdict({**base, "delta": -3.0, "ci_low": -4.0, "ci_high": -1.5}, 1.0)[0] == "FAIL"


@pytest.fixture(scope="module")
def broken_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The replica with its output layer drowned in noise: answers become garbage."""
    return perturbed_copy(tiny_dir, tmp_path_factory.mktemp("broken") / "tiny-broken", noise=3.0)


def _bench_file(tmp: Path) -> Path:
    """Colour questions about PNG files plus arithmetic, as a JSONL benchmark with image paths."""
    from r1v_quant.data.synthdata import image_problems, text_problems

    (tmp / "img").mkdir()
    rows = []
    for k, p in enumerate(image_problems(4, 321)):  # 4 pictures + 2 arithmetic questions
        p.render().save(tmp / "img" / f"{k}.png")
        rows.append(
            {
                "id": f"i{k}",
                "question": p.question,
                "answer": p.answer,
                "image": f"img/{k}.png",
                "kind": "numeric" if p.answer.isdigit() else "text",
                "category": "image",
                "instruction": "",
            }
        )
    for k, p in enumerate(text_problems(2, 321)):
        rows.append(
            {"id": f"t{k}", "question": p.question, "answer": p.answer, "category": p.kind, "instruction": ""}
        )
    f = tmp / "bench.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return f


@pytest.mark.slow
def test_bench_gate_exit_codes(tiny_dir: Path, broken_dir: Path, tmp_path: Path) -> None:
    """An identical candidate is UNRESOLVED at 6 items and passes a gate they can resolve; a broken one
    fails (exit 1); its cut-off answers count as truncated."""
    bench = _bench_file(tmp_path)
    responses = tmp_path / "responses.jsonl"
    args = ["eval", "bench", "--ref", str(tiny_dir), "--cand", str(tiny_dir), "--cand", str(broken_dir),
            "--bench", str(bench), "--max-tokens", "48", "--greedy", "--json"]  # fmt: skip
    res = CliRunner().invoke(main, [*args, "--save-responses", str(responses)])
    assert res.exit_code == 1, res.output
    rep = json.loads(res.output)
    assert rep["reference"]["n"] == 6 and rep["decoding"]["greedy"] and not rep["bench"]["synthetic"]
    same, broken = rep["candidates"]
    assert same["paired"]["delta"] == 0.0 and same["paired"]["p_mcnemar"] == 1.0
    assert same["verdict"] == "UNRESOLVED" and "cannot resolve a 1-point drop" in same["why"]
    assert same["paired"]["detectable"] > 1.0 and not rep["passed"]
    p = broken["paired"]
    assert p["ci_low"] <= p["delta"] <= p["ci_high"] and not broken["passed"]
    assert set(p["per_category"]) == set(rep["reference"]["per_category"]) >= {"image"}
    lines = [json.loads(x) for x in responses.read_text().splitlines()]
    assert len(lines) == 18 and {x["artifact"] for x in lines} == {
        tiny_dir.name,
        broken_dir.name,
        f"{tiny_dir.name}-2",
    }
    cut = [x for x in lines if x["truncated"]]
    assert all(x["pred"] is None and not x["correct"] and x["n_tokens"] == 48 for x in cut)
    # a gate the 6 items can resolve: the identical candidate passes, the verdicts follow the intervals
    res = CliRunner().invoke(main, [*args[:6], "--bench", str(bench), "--max-tokens", "48", "--greedy",
                                    "--json", "--max-drop", "95"])  # fmt: skip
    rep = json.loads(res.output)
    assert rep["candidates"][0]["verdict"] == "PASS" and res.exit_code == 0, res.output


def test_bench_bad_rows_and_missing_images(tiny_dir: Path, tmp_path: Path) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(
        '{"question": "1 + 1?", "answer": "2"}\n{"question": "x", "answer": "1", "image": "gone.png"}\n'
    )
    runner = CliRunner()
    args = ["eval", "bench", "--ref", str(tiny_dir), "--cand", str(tiny_dir), "--bench", str(f)]
    res = runner.invoke(main, args)
    assert res.exit_code == 2 and "bad.jsonl:2: image gone.png not found" in res.output
    res = runner.invoke(main, [*args, "--skip-bad", "--max-tokens", "48", "--json"])
    rep = json.loads(res.output)
    assert rep["bench"]["items"] == 1 and rep["bench"]["skipped_bad"][0]["where"] == "bad.jsonl:2"
    # one item resolves no drop: the gate says so and exits 1 instead of passing
    assert res.exit_code == 1 and rep["candidates"][0]["verdict"] == "UNRESOLVED"


def test_check_writes_report_and_gates(tiny_dir: Path, tiny_rms_dir: Path, tmp_path: Path) -> None:
    noisy = perturbed_copy(tiny_dir, tmp_path / "tiny-noisy", noise=0.05)
    runner = CliRunner()
    base = [
        "check",
        "--ref",
        str(tiny_dir),
        "--n-text",
        "2",
        "--n-image",
        "1",
        "--bench",
        "builtin:tiny",
        "--limit",
        "4",
        "--max-tokens",
        "64",
    ]
    out = tmp_path / "report"
    res = runner.invoke(main, [*base, "--cand", str(noisy), "--out", str(out), "--max-kld", "1e-9"])
    assert res.exit_code == 1, res.output  # the KLD gate is set below any real difference
    assert sorted(p.name for p in out.iterdir()) == ["quality_vs_size.png", "report.json", "report.md"]
    rep = json.loads((out / "report.json").read_text())
    row = rep["rows"][0]
    for key in (
        "artifact",
        "path",
        "backend",
        "size_bytes",
        "ppl",
        "ppl_ratio",
        "kld_mean",
        "top1_pct",
        "bench_acc",
        "bench_delta",
        "ci_low",
        "ci_high",
        "passed",
    ):
        assert key in row, key
    assert row["backend"] == "torch" and row["passed"] is False and row["kld_mean"] > 0
    assert any(f.startswith("text KLD") for f in row["failures"]) and any(
        f.startswith("image KLD") for f in row["failures"]
    )
    assert (out / "quality_vs_size.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert "**Verdict: FAIL**" in md and "tiny-noisy" in md and "| image |" in md
    assert md == format_markdown(rep)
    # loose gates: exit 0; an existing non-empty --out is refused before any work
    out2 = tmp_path / "report2"
    res = runner.invoke(
        main,
        [
            "check",
            "--ref",
            str(tiny_dir),
            "--n-text",
            "1",
            "--n-image",
            "1",
            "--bench",
            "none",
            "--cand",
            str(noisy),
            "--out",
            str(out2),
            "--max-kld",
            "10",
            "--max-ppl-ratio",
            "10",
            "--min-top1",
            "0",
        ],
    )
    assert res.exit_code == 0, res.output
    assert json.loads((out2 / "report.json").read_text())["passed"] is True
    res = runner.invoke(main, [*base, "--cand", str(noisy), "--out", str(out2)])
    assert res.exit_code == 2 and "not empty" in res.output
    # another architecture is refused with the reason, and nothing is written
    out3 = tmp_path / "report3"
    res = runner.invoke(main, [*base, "--cand", str(tiny_rms_dir), "--out", str(out3)])
    assert res.exit_code == 2 and "differs from the reference's" in res.output and not out3.exists()


def test_update_cards_writes_each_folders_rows(tiny_dir: Path, tmp_path: Path) -> None:
    """`check --update-cards`: rows go to the card of the folder that holds each artifact."""
    from r1v_quant.evaluate.check import update_cards
    from r1v_quant.exporters.model_card import CARD_NAME, Card, write_card

    gguf_dir, plain = tmp_path / "gguf", tmp_path / "no-card"
    for d in (gguf_dir, plain):
        d.mkdir()
    write_card(gguf_dir, Card(kind="gguf", source=tiny_dir, folder="g", summary="s", commands=["c"],
                              details={}, files={}))  # fmt: skip
    (gguf_dir / "m-Q8_0.gguf").write_bytes(b"GGUF")

    def row(name: str, path: Path, kld: float) -> dict:
        return {"artifact": name, "path": str(path), "size_bytes": 2_000_000, "ppl_ratio": 1.01,
                "kld_mean": kld, "top1_pct": 97.5, "bench_delta": -1.5}  # fmt: skip

    report = {"rows": [row("m-Q8_0.gguf", gguf_dir / "m-Q8_0.gguf", 0.00123), row("x", plain, 0.5)]}
    assert update_cards(report) == [gguf_dir / CARD_NAME]
    text = (gguf_dir / CARD_NAME).read_text()
    assert "| m-Q8_0.gguf |" in text and "0.00123" in text and "97.5" in text
    assert not (plain / CARD_NAME).exists()


def test_synthetic_benchmarks_never_reach_a_model_card(tiny_dir: Path, tmp_path: Path) -> None:
    from r1v_quant.evaluate.check import card_rows
    from r1v_quant.exporters.model_card import Card, write_card

    folder = tmp_path / "awq"
    folder.mkdir()
    write_card(folder, Card(kind="awq", source=tiny_dir, folder="a", summary="s", commands=["c"], details={},
                            files={}))  # fmt: skip
    row = {"artifact": "awq", "path": str(folder), "size_bytes": 1, "ppl_ratio": 1.0, "kld_mean": 0.01,
           "top1_pct": 99.0, "bench_delta": -1.25, "ci_low": -3.0, "ci_high": 0.5}  # fmt: skip
    for synthetic, cell in ((True, None), (False, "-1.2 [-3.0, +0.5] on mathvision (n 304)")):
        bench = {"bench": {"name": "mathvision", "items": 304, "synthetic": synthetic}}
        rows = card_rows({"rows": [row], "bench": bench})[folder]
        assert rows[0]["bench_delta"] == cell
