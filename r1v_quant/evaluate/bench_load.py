"""`--bench SPEC` -> a BenchSet: the built-in synthetic set, a preset (`NAME:PATH`) or a file / folder in any
format bench_formats reads; bad rows refused or skipped, an optional seeded (stratified) subset."""

from __future__ import annotations

import random
from pathlib import Path

from r1v_quant.evaluate.bench_formats import load_path, load_preset, split_preset
from r1v_quant.evaluate.bench_sets import BUILTIN, BenchItem, BenchSet, builtin_set
from r1v_quant.util.errors import R1VError


def load_bench(
    spec: str, *, limit: int = 0, seed: int = 0, skip_bad: bool = False, stratify: bool = False
) -> BenchSet:
    """The benchmark `spec` names. `limit` keeps a seeded random subset (in file order); with `stratify`
    the subset keeps every category's share (each category at least one item while the limit allows)."""
    if spec in BUILTIN:
        bench = builtin_set(spec)
    else:
        preset, path = split_preset(spec)
        bench = load_preset(preset, Path(path)) if preset else load_path(Path(spec))
    if bench.bad and not skip_bad:
        shown = "; ".join(f"{b.where}: {b.reason}" for b in bench.bad[:5])
        more = f" (and {len(bench.bad) - 5} more)" if len(bench.bad) > 5 else ""
        raise R1VError(
            f"benchmark {spec}: {len(bench.bad)} bad row(s): {shown}{more}; fix them or pass --skip-bad"
        )
    if not bench.items:
        raise R1VError(f"benchmark {spec}: no usable items")
    if limit and len(bench.items) > limit:
        rng = random.Random(f"r1v-quant-bench/{seed}")
        n = len(bench.items)
        keep = _stratified(bench.items, limit, rng) if stratify else rng.sample(range(n), limit)
        bench.items = [bench.items[i] for i in sorted(keep)]
    return bench


def _stratified(items: list[BenchItem], limit: int, rng: random.Random) -> list[int]:
    """`limit` item indices, each category's share kept (largest remainders), drawn at random within it."""
    by_cat: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        by_cat.setdefault(it.category, []).append(i)
    cats = sorted(by_cat)
    quota = {c: limit * len(by_cat[c]) / len(items) for c in cats}
    take = {c: min(len(by_cat[c]), max(1, int(quota[c]))) for c in cats}
    while sum(take.values()) > limit:  # more categories than the limit: drop the smallest shares
        c = min((c for c in cats if take[c]), key=lambda c: (quota[c], c))
        take[c] -= 1
    for c in sorted(cats, key=lambda c: (-(quota[c] - int(quota[c])), c)):
        if sum(take.values()) >= limit:
            break
        if take[c] < len(by_cat[c]):
            take[c] += 1
    return [i for c in cats for i in rng.sample(by_cat[c], take[c])]
