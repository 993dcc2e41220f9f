"""`eval bench`: accuracy of the reference and each candidate on the same items, and paired deltas.

Each model answers every item greedily in its own template (torch: `build_inputs`; llama.cpp: the runtime's
prompt) and stops at its flavour's end tokens. An answer cut off by the `max_tokens` budget is counted as
truncated (and wrong), never silently graded. The final answer after `</think>` is read by
r1v_quant.answers; per category and overall, each candidate is compared with the reference item by item:
the delta with a seeded bootstrap 95 % interval and the exact McNemar p-value.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r1v_quant.answers import extract_answer, is_correct
from r1v_quant.bench_sets import BenchItem, BenchSet
from r1v_quant.eval_backends import Backend
from r1v_quant.prompts import split_thinking
from r1v_quant.stats_tests import paired_delta


@dataclass
class ItemResult:
    id: str
    category: str
    kind: str
    gold: str
    pred: str | None
    correct: bool
    truncated: bool  # the max-tokens budget cut the response off: graded wrong, reported apart
    n_tokens: int
    response: str


def grade(item: BenchItem, text: str, stopped: bool, n_tokens: int) -> ItemResult:
    """Read and grade one response. A cut-off response is not graded (pred None, wrong, truncated)."""
    _, final = split_thinking(text)
    # a model that never closes its reasoning but stops on its own still answered: read the whole text
    body = final or text
    pred = extract_answer(body, item.kind, item.options) if stopped else None
    return ItemResult(
        id=item.id,
        category=item.category,
        kind=item.kind,
        gold=item.answer,
        pred=pred,
        correct=stopped and is_correct(pred, item.answer, item.kind, item.options),
        truncated=not stopped,
        n_tokens=n_tokens,
        response=text,
    )


def bench_pass(
    backend: Backend, items: list[BenchItem], max_tokens: int, *, progress: bool = False
) -> list[ItemResult]:
    out = []
    for item in tqdm(items, desc=f"bench {backend.artifact.name}", unit="item", disable=not progress):
        g = backend.generate(item.question, item.images, max_tokens)
        out.append(grade(item, g.text, g.stopped, g.n_tokens))
    return out


def bench_runner(
    items: list[BenchItem], max_tokens: int, *, progress: bool = False
) -> Callable[[Backend, bool], list[ItemResult]]:
    return lambda backend, _is_ref: bench_pass(backend, items, max_tokens, progress=progress)


def model_summary(results: list[ItemResult]) -> dict[str, Any]:
    n = len(results)
    cats: dict[str, list[ItemResult]] = {}
    for r in results:
        cats.setdefault(r.category, []).append(r)
    return {
        "n": n,
        "correct": sum(r.correct for r in results),
        "acc": 100 * sum(r.correct for r in results) / n if n else 0.0,
        "truncated": sum(r.truncated for r in results),
        "no_answer": sum(r.pred is None and not r.truncated for r in results),
        "mean_tokens": sum(r.n_tokens for r in results) / n if n else 0.0,
        "per_category": {
            c: {"n": len(v), "acc": 100 * sum(r.correct for r in v) / len(v)} for c, v in sorted(cats.items())
        },
    }


def compare(
    ref: list[ItemResult], cand: list[ItemResult], *, seed: int = 0, n_boot: int = 10_000
) -> dict[str, Any]:
    """Paired delta overall and per category (cand − ref, points), bootstrap CI and McNemar p."""
    if [r.id for r in ref] != [c.id for c in cand]:
        raise ValueError("results are not paired item by item")
    overall = paired_delta([r.correct for r in ref], [c.correct for c in cand], n_boot=n_boot, seed=seed)
    per: dict[str, Any] = {}
    for cat in sorted({r.category for r in ref}):
        idx = [i for i, r in enumerate(ref) if r.category == cat]
        per[cat] = paired_delta(
            [ref[i].correct for i in idx], [cand[i].correct for i in idx], n_boot=n_boot, seed=seed
        ).to_dict()
    return {**overall.to_dict(), "per_category": per}


def bench_report(
    bench: BenchSet,
    runs: list[tuple[dict[str, Any], list[ItemResult]]],
    *,
    max_drop: float,
    seed: int,
    max_tokens: int,
    n_boot: int = 10_000,
) -> dict[str, Any]:
    """`runs`: (artifact description, results) with the reference first. A candidate fails the gate when
    its accuracy is more than `max_drop` points below the reference's (point estimate)."""
    (ref_desc, ref_res), *cands = runs
    out: dict[str, Any] = {
        "bench": {
            "name": bench.name,
            "items": len(bench.items),
            "rows": bench.total_rows,
            "skipped_bad": [asdict(b) for b in bench.bad],
            "categories": bench.categories(),
            "max_tokens": max_tokens,
            "seed": seed,
        },
        "max_drop": max_drop,
        "reference": {**ref_desc, **model_summary(ref_res)},
        "candidates": [],
    }
    for desc, res in cands:
        delta = compare(ref_res, res, seed=seed, n_boot=n_boot)
        drop = -delta["delta"]
        out["candidates"].append(
            {**desc, **model_summary(res), "paired": delta, "drop": drop, "passed": drop <= max_drop}
        )
    out["passed"] = all(c["passed"] for c in out["candidates"])
    return out


def save_responses(path: Path, runs: list[tuple[dict[str, Any], list[ItemResult]]]) -> None:
    """Every response with its grading, one JSON line each (for reading what went wrong)."""
    from r1v_quant.atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for desc, results in runs:
            for r in results:
                f.write(json.dumps({"artifact": desc["artifact"], **asdict(r)}, ensure_ascii=False) + "\n")


def format_bench(report: dict[str, Any]) -> str:
    b = report["bench"]
    ref = report["reference"]
    lines = [
        f"benchmark {b['name']}: {b['items']} items, {len(b['categories'])} categories, "
        f"max {b['max_tokens']} new tokens"
        + (f", {len(b['skipped_bad'])} bad rows skipped" if b["skipped_bad"] else ""),
        f"reference {ref['artifact']}: {ref['acc']:.1f} % ({ref['correct']}/{ref['n']}, "
        f"{ref['truncated']} truncated, {ref['no_answer']} without an answer)",
    ]
    for c in report["candidates"]:
        p = c["paired"]
        verdict = "PASS" if c["passed"] else f"FAIL (drop {c['drop']:.1f} > {report['max_drop']:.1f} points)"
        lines.append(
            f"{c['artifact']}: {c['acc']:.1f} % ({c['correct']}/{c['n']}, {c['truncated']} truncated)  "
            f"Δ {p['delta']:+.1f} [{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]  McNemar p {p['p_mcnemar']:.3g}  "
            f"{verdict}"
        )
        for cat, d in p["per_category"].items():
            lines.append(
                f"    {cat:<24} n {d['n']:>4}  ref {d['ref_acc']:5.1f}  cand {d['cand_acc']:5.1f}  "
                f"Δ {d['delta']:+6.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]  p {d['p_mcnemar']:.3g}"
            )
    return "\n".join(lines)
