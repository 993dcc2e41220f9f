"""`r1v-quant demo`: the reuse rules of its steps (fast), and the whole demo end to end (slow): every step
runs, the report folder is written, a re-run reuses every step, a step whose record or output is gone is
redone together with the steps that read it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from r1v_quant.cli.demo import Demo, Step
from r1v_quant.replica.build import TinyOptions

STEPS = ["tiny", "inspect", "calibrate", "awq", "gguf", "check", "profile", "ask"]


def _toy_steps(out: Path, runs: list[str]) -> list[Step]:
    """a -> b (reads a) ; c needs a module that does not exist ; d reads c."""

    def make(key: str):
        def run() -> dict:
            runs.append(key)
            (out / f"{key}.txt").write_text(key)
            return {"value": key}

        return run

    return [
        Step("a", "step a", make("a"), ("a.txt",), line=lambda r: r["value"]),
        Step("b", "step b", make("b"), ("b.txt",), after=("a",)),
        Step("c", "step c", make("c"), ("c.txt",), needs=("no_such_module_r1v",)),
        Step("d", "step d", make("d"), ("d.txt",), after=("c",)),
    ]


def _run(out: Path, seed: int = 0) -> tuple[dict[str, str], list[str]]:
    runs: list[str] = []
    demo = Demo(out, seed=seed)
    for i, step in enumerate(_toy_steps(out, runs), 1):
        demo.run_step(step, i, 4)
    return {k: r["status"] for k, r in demo.records.items()}, runs


def test_steps_are_reused_redone_or_skipped(tmp_path: Path) -> None:
    status, runs = _run(tmp_path)
    assert status == {"a": "done", "b": "done", "c": "skipped", "d": "skipped"} and runs == ["a", "b"]
    assert json.loads((tmp_path / "steps" / "a.json").read_text())["result"] == {"value": "a"}
    assert not (tmp_path / "steps" / "c.json").exists()

    assert _run(tmp_path) == ({"a": "reused", "b": "reused", "c": "skipped", "d": "skipped"}, [])

    (tmp_path / "steps" / "b.json").unlink()  # record gone: redo b (its stale output is replaced)
    assert _run(tmp_path)[1] == ["b"]
    (tmp_path / "a.txt").unlink()  # output gone: redo a, and b that reads it
    assert _run(tmp_path)[1] == ["a", "b"]
    (tmp_path / "steps" / "a.json").write_text("{truncated")  # a damaged record counts as missing
    assert _run(tmp_path)[1] == ["a", "b"]
    assert _run(tmp_path, seed=1)[1] == ["a", "b"]  # another seed: nothing is reused
    assert _run(tmp_path, seed=1)[1] == []


def _demo(out: Path) -> tuple[dict, float]:
    t0 = time.perf_counter()
    r = subprocess.run(
        [sys.executable, "-m", "r1v_quant.cli.main", "demo", "--out", str(out), "--json", "--threads", "2"],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout), time.perf_counter() - t0


def _seed_replica(out: Path, tiny_dir: Path) -> None:
    """The demo's first step builds the default replica, the very one the session fixture built (same
    options and seed, same bytes on this machine): hand it over with the record the step writes, so the
    suite trains the replica once. The step's own running is what `test_steps_are_reused_redone_or_skipped`
    and `tests/test_replica.py` cover."""
    shutil.copytree(tiny_dir, out / "r1v-tiny")
    report = json.loads((tiny_dir / "tiny_build.json").read_text())
    assert TinyOptions() == TinyOptions(**{k: report[k] for k in ("flavor", "vit", "seed", "steps")})
    record = {"status": "done", "seconds": report["seconds"], "seed": 0, "result": report}
    (out / "steps").mkdir(parents=True)
    (out / "steps" / "tiny.json").write_text(json.dumps(record))


@pytest.mark.slow
@pytest.mark.llamacpp
def test_demo_runs_every_step_then_reuses_them(tmp_path: Path, tiny_dir: Path) -> None:
    for module in ("gguf", "llama_cpp", "skimage", "matplotlib"):
        pytest.importorskip(module)
    out = tmp_path / "demo"
    _seed_replica(out, tiny_dir)
    first, _ = _demo(out)
    steps = first["steps"]
    assert list(steps) == STEPS
    assert {k: s["status"] for k, s in steps.items()} == {**dict.fromkeys(STEPS, "done"), "tiny": "reused"}
    for key in STEPS:
        assert (out / "steps" / f"{key}.json").is_file()

    tiny = steps["tiny"]["result"]
    assert (
        tiny["heldout"]["image"] >= 0.9
        and tiny["heldout"]["text"] >= 0.9
        and not tiny["heldout"]["probes_failed"]
    )
    ask = steps["ask"]["result"]["answers"]
    engines = ["torch 16-bit", "torch AWQ int4", "llama.cpp Q4_K_M", "torch 16-bit", "llama.cpp Q4_K_M"]
    assert [a["engine"] for a in ask] == engines
    blue = [a for a in ask if a["image"] == "blue-circle.png"]
    assert blue[0]["correct"]  # the 16-bit replica names the colour (its build verified this picture)
    assert [a["gate_passed"] is None for a in blue] == [True, False, False]  # each artifact's own gate
    # every engine whose artifact passed its quality gate answers it right too
    assert all(a["correct"] for a in blue if a["gate_passed"]), blue
    photo = [a for a in ask if a["image"] == "coffee.png"]
    assert [a["tiles"] for a in photo] == [7, 7]  # 600x400 photo: 3x2 tiles + thumbnail
    check = steps["check"]["result"]
    assert check["reference"]["bench_acc"] >= 80.0  # the 16-bit model on the built-in benchmark
    assert all(r["ci_low"] <= r["bench_delta"] <= r["ci_high"] for r in check["rows"])
    assert steps["awq"]["result"]["loss_sum"] < steps["awq"]["result"]["loss_rtn_sum"]
    assert len(steps["check"]["result"]["rows"]) == 2
    assert (out / "check" / "report.md").is_file() and (out / "profile.json").is_file()

    report = out / "report"
    md = (report / "report.md").read_text()
    for key in STEPS:
        assert f"| {steps[key]['title']} | {steps[key]['status']} |" in md
    assert "## Quality gates" in md and "## Answers" in md and "skimage.data.coffee()" in md
    assert "SYNTHETIC" in md and "held-out image questions" in md
    for plot in ("quality_vs_size.png", "awq_layers.png", "sizes.png"):
        assert (report / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({plot})" in md

    again, seconds = _demo(out)
    assert {k: s["status"] for k, s in again["steps"].items()} == dict.fromkeys(STEPS, "reused")
    assert seconds < 60  # nothing is recomputed: imports, the plots and the report
    assert again["steps"]["ask"]["result"] == steps["ask"]["result"]
    assert "| reused |" in (report / "report.md").read_text()

    # a lost record or a lost output redoes that step (here: steps nothing else reads)
    (out / "steps" / "ask.json").unlink()
    (out / "profile.json").unlink()
    third, _ = _demo(out)
    status = {k: s["status"] for k, s in third["steps"].items()}
    assert status == {**dict.fromkeys(STEPS, "reused"), "profile": "done", "ask": "done"}
    for new, old in zip(third["steps"]["ask"]["result"]["answers"], ask, strict=True):
        assert {**new, "timings": None} == {**old, "timings": None}
