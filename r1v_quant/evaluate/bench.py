"""`eval bench`: accuracy of the reference and each candidate on the same items, and paired deltas.

Decoding (r1v_quant.runtime.decoding) is the reference's own sampling settings by default, k answers per
item with
seeds shared by every model (or greedy), each answer allowed up to the token budget its backend's context
leaves. Each model answers in its own template and stops at its flavour's end tokens.

Grading, as VLMEvalKit and Skywork's evaluation read reasoning output: the final answer is the text after
the last `</think>` (r1v_quant.evaluate.answers). An answer is

- graded when the model stopped on its own (or, cut off by the budget, had already boxed a final answer);
- **truncated** when the budget ran out before a final answer: counted wrong and reported apart;
- without an answer when the model stopped but no answer can be read (e.g. its reasoning never closed).

Per category and overall, each candidate is compared with the reference item by item: the delta of the
per-item accuracies with a seeded bootstrap 95 % interval, the exact McNemar / sign test, and the
smallest delta the run can detect at its n and k. The gate decides on the interval:

PASS        the interval's lower end is above -max_drop and the run resolves max_drop
FAIL        the whole interval is below -max_drop
UNRESOLVED  anything else: the run cannot tell (too few items or samples for max_drop, or an interval
            straddling it); it is reported as such and does not pass
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from r1v_quant.evaluate.answers import boxed_answer, extract_answer, final_answer, is_correct
from r1v_quant.evaluate.backend_protocol import Backend, GenRequest
from r1v_quant.evaluate.backends import greedy
from r1v_quant.evaluate.bench_sets import BenchItem, BenchSet
from r1v_quant.evaluate.stats_tests import Z_80, Z_95, paired_delta
from r1v_quant.runtime.decoding import Decoding

PASS, FAIL, UNRESOLVED = "PASS", "FAIL", "UNRESOLVED"
SYNTHETIC_NOTE = " (SYNTHETIC: generated built-in items, not a published benchmark)"


@dataclass
class ItemResult:
    id: str
    category: str
    kind: str
    gold: str
    pred: str | None
    correct: bool
    truncated: bool  # the budget ran out before a final answer: graded wrong, reported apart
    n_tokens: int
    response: str
    sample: int = 0
    seed: int = 0
    stopped: bool = True  # the model ended the answer itself
    budget: int = 0  # new tokens it was allowed


def grade(
    item: BenchItem,
    text: str,
    stopped: bool,
    n_tokens: int,
    *,
    sample: int = 0,
    seed: int = 0,
    budget: int = 0,
) -> ItemResult:
    """Read and grade one response: the answer after the last `</think>`. Cut off by the budget, only a
    complete boxed answer there counts; otherwise the response is truncated (pred None, wrong)."""
    final = final_answer(text)
    pred = None
    if final is not None:
        pred = extract_answer(final, item.kind, item.options) if stopped else boxed_answer(final, item.kind)
    correct = is_correct(
        pred, item.answer, item.kind, item.options, accept=item.accept, decimals=item.decimals
    )
    return ItemResult(
        id=item.id,
        category=item.category,
        kind=item.kind,
        gold=item.answer,
        pred=pred,
        correct=correct,
        truncated=not stopped and pred is None,
        n_tokens=n_tokens,
        response=text,
        sample=sample,
        seed=seed,
        stopped=stopped,
        budget=budget,
    )


def requests(items: list[BenchItem], decoding: Decoding) -> list[tuple[BenchItem, int, GenRequest]]:
    """(item, sample, request) for every answer, a question's samples together."""
    return [
        (it, s, GenRequest(it.question, it.images, decoding.seed_for(it.id, s)))
        for it in items
        for s in range(decoding.samples)
    ]


def bench_pass(
    backend: Backend,
    items: list[BenchItem],
    max_tokens: int,
    *,
    decoding: Decoding | None = None,
    progress: bool = False,
) -> list[ItemResult]:
    """Every item's answers from `backend` (greedy with `max_tokens` unless `decoding`), graded."""
    decoding = decoding or greedy(max_tokens)
    work = requests(items, decoding)
    bar = tqdm(total=len(work), desc=f"bench {backend.artifact.name}", unit="answer", disable=not progress)
    gens = backend.generate_many([r for _, _, r in work], decoding, on_done=lambda i, g: bar.update(1))
    bar.close()
    return [
        grade(it, g.text, g.stopped, g.n_tokens, sample=s, seed=req.seed, budget=g.budget)
        for (it, s, req), g in zip(work, gens, strict=True)
    ]


def preflight(backend: Backend, items: list[BenchItem], decoding: Decoding) -> dict[str, Any]:
    """Measured decode speed and what the run costs at most: items x samples x budget tokens."""
    first = items[0]
    tps = backend.speed(GenRequest(first.question, first.images, 0))
    answers = len(items) * decoding.samples
    worst = answers * decoding.max_tokens
    return {
        "tokens_per_s": tps,
        "answers": answers,
        "max_tokens_total": worst,
        "worst_hours": worst / max(tps, 1e-9) / 3600,
        "floor_detectable": floor_detectable(len(items), decoding.samples),
    }


def floor_detectable(n: int, k: int) -> float:
    """Points: the detectable delta of a run whose models never disagree (stats_tests.detectable_drop)."""
    return (Z_95 + Z_80) * 100 * (3 / n) ** 0.5 / k / n**0.5


def format_preflight(name: str, p: dict[str, Any], decoding: Decoding, max_drop: float | None) -> str:
    line = (
        f"preflight {name}: {p['answers']} answers ({decoding.samples} per item) x up to "
        f"{decoding.max_tokens} tokens = {p['max_tokens_total']:,} tokens at most; {p['tokens_per_s']:.1f} "
        f"tokens/s measured -> at most {p['worst_hours']:.2f} h"
    )
    if max_drop is not None and p["floor_detectable"] > max_drop:
        line += (
            f"; {p['answers'] // decoding.samples} items x {decoding.samples} samples cannot resolve a "
            f"{max_drop:g}-point drop (at best {p['floor_detectable']:.1f} points): the gate will be "
            "UNRESOLVED"
        )
    return line


def bench_runner(
    items: list[BenchItem],
    decoding: Decoding | int,
    *,
    progress: bool = False,
    max_drop: float | None = None,
    preflight_all: bool = True,
) -> Callable[[Backend, bool], list[ItemResult]]:
    """What `evaluate_models` runs on each open model: a preflight line (to stderr, when `progress`), then
    the answers. `decoding` may be a bare budget (greedy)."""
    dec = greedy(decoding) if isinstance(decoding, int) else decoding

    def run(backend: Backend, is_ref: bool) -> list[ItemResult]:
        if progress and (preflight_all or is_ref):
            p = preflight(backend, items, dec)
            backend.artifact.extra["preflight"] = p
            line = format_preflight(backend.artifact.name, p, dec, max_drop)
            print(line, file=sys.stderr, flush=True)
        return bench_pass(backend, items, dec.max_tokens, decoding=dec, progress=progress)

    return run


# -- summaries and the paired comparison --------------------------------------------------------------


def _per_item(results: list[ItemResult]) -> tuple[list[str], dict[str, float], dict[str, str]]:
    """Item ids in order, each item's accuracy over its samples, and its category."""
    order: list[str] = []
    hits: dict[str, list[bool]] = {}
    cat: dict[str, str] = {}
    for r in results:
        if r.id not in hits:
            order.append(r.id)
            hits[r.id] = []
            cat[r.id] = r.category
        hits[r.id].append(r.correct)
    return order, {i: sum(v) / len(v) for i, v in hits.items()}, cat


def model_summary(results: list[ItemResult]) -> dict[str, Any]:
    n_answers = len(results)
    order, acc, cat = _per_item(results)
    by_cat: dict[str, list[str]] = {}
    for i in order:
        by_cat.setdefault(cat[i], []).append(i)
    return {
        "n": len(order),
        "answers": n_answers,
        "samples": n_answers // len(order) if order else 0,
        "correct": sum(r.correct for r in results),
        "acc": 100 * sum(r.correct for r in results) / n_answers if n_answers else 0.0,
        "truncated": sum(r.truncated for r in results),
        "no_answer": sum(r.pred is None and not r.truncated for r in results),
        "mean_tokens": sum(r.n_tokens for r in results) / n_answers if n_answers else 0.0,
        "per_category": {
            c: {"n": len(ids), "acc": 100 * sum(acc[i] for i in ids) / len(ids)}
            for c, ids in sorted(by_cat.items())
        },
    }


def compare(
    ref: list[ItemResult], cand: list[ItemResult], *, seed: int = 0, n_boot: int = 10_000
) -> dict[str, Any]:
    """Paired delta overall and per category (cand - ref, points), bootstrap CI, exact test, detectable."""
    r_ids, r_acc, cat = _per_item(ref)
    c_ids, c_acc, _ = _per_item(cand)
    if r_ids != c_ids or len(ref) != len(cand):
        raise ValueError("results are not paired item by item")
    k = len(ref) // len(r_ids)
    ref_scores, cand_scores = [r_acc[i] for i in r_ids], [c_acc[i] for i in r_ids]
    overall = paired_delta(ref_scores, cand_scores, n_boot=n_boot, seed=seed, k=k)
    per: dict[str, Any] = {}
    for c in sorted(set(cat.values())):
        ids = [i for i in r_ids if cat[i] == c]
        per[c] = paired_delta(
            [r_acc[i] for i in ids], [c_acc[i] for i in ids], n_boot=n_boot, seed=seed, k=k
        ).to_dict()
    return {**overall.to_dict(), "per_category": per}


def verdict(paired: dict[str, Any], max_drop: float) -> tuple[str, str]:
    """(PASS | FAIL | UNRESOLVED, the reason in words) from the interval and the run's resolution."""
    low, high, det = paired["ci_low"], paired["ci_high"], paired["detectable"]
    if high < -max_drop:
        return FAIL, f"95 % CI [{low:+.1f}, {high:+.1f}] entirely below -{max_drop:g}"
    if low >= -max_drop and det <= max_drop:
        return PASS, f"95 % CI [{low:+.1f}, {high:+.1f}] above -{max_drop:g}"
    if det > max_drop:
        return UNRESOLVED, (
            f"this run cannot resolve a {max_drop:g}-point drop: it detects {det:.1f} points at "
            f"n {paired['n']} (more items or samples, or a larger --max-drop)"
        )
    return UNRESOLVED, f"95 % CI [{low:+.1f}, {high:+.1f}] straddles -{max_drop:g}"


def bench_report(
    bench: BenchSet,
    runs: list[tuple[dict[str, Any], list[ItemResult]]],
    *,
    max_drop: float,
    seed: int,
    max_tokens: int | None = None,
    decoding: Decoding | None = None,
    n_boot: int = 10_000,
) -> dict[str, Any]:
    """`runs`: (artifact description, results) with the reference first; the gate per candidate."""
    decoding = decoding or greedy(max_tokens or 0)
    (ref_desc, ref_res), *cands = runs
    out: dict[str, Any] = {
        "bench": {
            "name": bench.name,
            "synthetic": bench.synthetic,
            "items": len(bench.items),
            "rows": bench.total_rows,
            "skipped_bad": [asdict(b) for b in bench.bad],
            "categories": bench.categories(),
            "max_tokens": decoding.max_tokens,
            "seed": seed,
        },
        "decoding": decoding.describe(),
        "max_drop": max_drop,
        "reference": {**ref_desc, **model_summary(ref_res)},
        "candidates": [],
    }
    for desc, res in cands:
        delta = compare(ref_res, res, seed=seed, n_boot=n_boot)
        status, why = verdict(delta, max_drop)
        out["candidates"].append(
            {
                **desc,
                **model_summary(res),
                "paired": delta,
                "drop": -delta["delta"],
                "verdict": status,
                "why": why,
                "passed": status == PASS,
            }
        )
    out["passed"] = all(c["passed"] for c in out["candidates"])
    return out


def save_responses(path: Path, runs: list[tuple[dict[str, Any], list[ItemResult]]]) -> None:
    """Every response with its grading, one JSON line each (for reading what went wrong)."""
    from r1v_quant.util.atomic import atomic_file

    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for desc, results in runs:
            for r in results:
                f.write(json.dumps({"artifact": desc["artifact"], **asdict(r)}, ensure_ascii=False) + "\n")


def format_bench(report: dict[str, Any]) -> str:
    b = report["bench"]
    ref = report["reference"]
    dec = Decoding(**{k: v for k, v in report["decoding"].items() if k != "greedy"})
    lines = [
        f"benchmark {b['name']}{SYNTHETIC_NOTE if b['synthetic'] else ''}: "
        f"{b['items']} items, {len(b['categories'])} categories"
        + (f", {len(b['skipped_bad'])} bad rows skipped" if b["skipped_bad"] else ""),
        f"decoding: {dec.label()}",
        f"reference {ref['artifact']}: {ref['acc']:.1f} % ({ref['correct']}/{ref['answers']} answers, "
        f"{ref['truncated']} truncated, {ref['no_answer']} without an answer, "
        f"{ref['mean_tokens']:.0f} tokens on average)",
    ]
    for c in report["candidates"]:
        p = c["paired"]
        lines.append(
            f"{c['artifact']}: {c['acc']:.1f} % ({c['correct']}/{c['answers']}, {c['truncated']} truncated, "
            f"{c['no_answer']} without an answer)  Δ {p['delta']:+.1f} "
            f"[{p['ci_low']:+.1f}, {p['ci_high']:+.1f}]  p {p['p_mcnemar']:.3g}  detectable "
            f"{p['detectable']:.1f} points  {c['verdict']}: {c['why']}"
        )
        for cat, d in p["per_category"].items():
            lines.append(
                f"    {cat:<24} n {d['n']:>4}  ref {d['ref_acc']:5.1f}  cand {d['cand_acc']:5.1f}  "
                f"Δ {d['delta']:+6.1f} [{d['ci_low']:+.1f}, {d['ci_high']:+.1f}]  p {d['p_mcnemar']:.3g}"
            )
    return "\n".join(lines)
