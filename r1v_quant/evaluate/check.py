"""`check`: the release gate. Perplexity / KL divergence on text and image-conditioned windows plus benchmark
accuracy for every candidate against the reference, gates applied, and a report written atomically:
report.md (tables), report.json (flat per-candidate rows for the model card, then the full measurements)
and quality_vs_size.png.

Each model is loaded once: its windows are scored and its benchmark answers generated while it is open.
KLD, PPL-ratio and top-token gates apply to every window kind separately (text and image each must pass);
the benchmark gate decides on the paired 95 % interval of the accuracy delta and on the run's resolution
(r1v_quant.evaluate.bench.verdict): a run too small to resolve --max-drop is UNRESOLVED, which does not pass.
A synthetic benchmark (builtin:*) is labelled so in the report and never written into a model card.
"""

from __future__ import annotations

import datetime
import json
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from r1v_quant import __version__
from r1v_quant.evaluate.bench import PASS, SYNTHETIC_NOTE, bench_report, bench_runner
from r1v_quant.evaluate.bench_sets import BenchSet
from r1v_quant.evaluate.ppl import WindowSpec, build_windows, evaluate_models, ppl_report
from r1v_quant.model.artifact import Artifact
from r1v_quant.runtime.decoding import Decoding, resolve_decoding
from r1v_quant.runtime.options import RuntimeOptions
from r1v_quant.util.atomic import atomic_dir

REPORT_FILES = ("report.md", "report.json", "quality_vs_size.png")


@dataclass(frozen=True)
class Gates:
    max_kld: float = 0.05  # mean KLD per window kind
    max_ppl_ratio: float = 1.05
    min_top1: float = 90.0  # same top token, percent
    max_drop: float = 1.0  # benchmark accuracy points below the reference


def apply_gates(kinds: dict[str, dict[str, float]], bench: dict[str, Any] | None, gates: Gates) -> list[str]:
    """The reasons a candidate fails (empty: it passes)."""
    fails = []
    for kind, s in kinds.items():
        if kind == "all":
            continue
        if s["kld_mean"] > gates.max_kld:
            fails.append(f"{kind} KLD {s['kld_mean']:.4g} > {gates.max_kld:g}")
        if s["ppl_ratio"] > gates.max_ppl_ratio:
            fails.append(f"{kind} PPL ratio {s['ppl_ratio']:.4f} > {gates.max_ppl_ratio:g}")
        if s["same_top_pct"] < gates.min_top1:
            fails.append(f"{kind} same top token {s['same_top_pct']:.1f} % < {gates.min_top1:g} %")
    if bench is not None and bench["verdict"] != PASS:
        fails.append(f"benchmark {bench['verdict']}: {bench['why']}")
    return fails


def flat_row(
    desc: dict[str, Any], kinds: dict[str, Any] | None, bench: dict[str, Any] | None
) -> dict[str, Any]:
    """One artifact as the flat row the model card reads."""
    all_ = (kinds or {}).get("all") or {}
    paired = (bench or {}).get("paired") or {}
    row = {
        "artifact": desc["artifact"],
        "path": desc["path"],
        "backend": desc["backend"],
        "quant": desc["quant"],
        "size_bytes": desc["size_bytes"],
        "ppl": all_.get("ppl_cand"),
        "ppl_ratio": all_.get("ppl_ratio"),
        "kld_mean": all_.get("kld_mean"),
        "top1_pct": all_.get("same_top_pct"),
        "bench_acc": (bench or {}).get("acc"),
        "bench_delta": paired.get("delta"),
        "ci_low": paired.get("ci_low"),
        "ci_high": paired.get("ci_high"),
        "p_mcnemar": paired.get("p_mcnemar"),
        "detectable": paired.get("detectable"),
        "bench_verdict": (bench or {}).get("verdict"),
        "truncated": (bench or {}).get("truncated"),
    }
    for kind, s in (kinds or {}).items():
        if kind != "all":
            row[f"kld_{kind}"] = s["kld_mean"]
    return row


def run_check(
    ref: Artifact,
    cands: list[Artifact],
    ws: WindowSpec,
    bench: BenchSet | None,
    gates: Gates,
    *,
    max_tokens: int = 1024,
    seed: int = 0,
    runtime: RuntimeOptions | None = None,
    progress: bool = False,
    command: str = "",
    decoding: Decoding | None = None,
) -> dict[str, Any]:
    """Measure everything and return the report (see :func:`write_report`). `decoding` defaults to the
    reference's own sampling settings, one answer per item, `max_tokens` each."""
    windows = build_windows(ref, ws)
    decoding = decoding or resolve_decoding(ref.path, ref.flavor, seed=seed, max_tokens=max_tokens)
    runs = evaluate_models(
        ref,
        cands,
        windows,
        per_model=bench_runner(bench.items, decoding, progress=progress, max_drop=gates.max_drop)
        if bench
        else None,
        gen_budget=decoding.max_tokens if bench else 0,
        runtime=runtime,
        progress=progress,
    )
    ppl = ppl_report(runs[0], runs[1:], windows, ws)
    bench_rep = None
    if bench is not None:
        bench_rep = bench_report(
            bench,
            [(r.artifact.describe(), r.bench) for r in runs],
            max_drop=gates.max_drop,
            seed=seed,
            decoding=decoding,
        )
    ref_row = flat_row(runs[0].artifact.describe(), None, bench_rep["reference"] if bench_rep else None)
    ref_row.update(ppl=ppl["reference"]["ppl"]["all"]["ppl"], ppl_ratio=1.0, kld_mean=0.0, top1_pct=100.0)
    rows = []
    for i, run in enumerate(runs[1:]):
        b = bench_rep["candidates"][i] if bench_rep else None
        row = flat_row(run.artifact.describe(), run.ppl, b)
        row["failures"] = apply_gates(run.ppl, b, gates)
        row["passed"] = not row["failures"]
        rows.append(row)
    return {
        "tool": f"r1v-quant {__version__} check",
        "command": command,
        "date": datetime.date.today().isoformat(),
        "gates": asdict(gates),
        "passed": all(r["passed"] for r in rows),
        "reference": ref_row,
        "rows": rows,
        "ppl": ppl,
        "bench": bench_rep,
    }


# -- writing --------------------------------------------------------------------------------------------


def _mb(n: int) -> str:
    if not n:
        return "–"
    return f"{n / 1e6:.1f} MB" if n < 1e9 else f"{n / 1e9:.2f} GB"


def _f(x: float | None, fmt: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def format_markdown(report: dict[str, Any]) -> str:
    g = report["gates"]
    ref = report["reference"]
    ppl, bench = report["ppl"], report["bench"]
    kinds = [k for k in ppl["candidates"][0]["kinds"] if k != "all"] if ppl["candidates"] else []
    out = [
        "# Quality gate report",
        "",
        f"Generated by `{report['tool']}` on {report['date']}"
        + (f":\n\n```\n{report['command']}\n```" if report["command"] else "."),
        "",
        f"**Verdict: {'PASS' if report['passed'] else 'FAIL'}** — gates: mean KLD ≤ {g['max_kld']:g} and PPL "
        f"ratio ≤ {g['max_ppl_ratio']:g} and same top token ≥ {g['min_top1']:g} % on every window kind "
        f"({', '.join(kinds)}), benchmark accuracy drop ≤ {g['max_drop']:g} points with 95 % confidence "
        "(a run too small to tell is UNRESOLVED, not a pass).",
        "",
        f"Reference: `{ref['artifact']}` ({ref['backend']}, {ref['quant']}, {_mb(ref['size_bytes'])}), "
        f"PPL {ref['ppl']:.4f}"
        + (f", benchmark {ref['bench_acc']:.1f} %" if ref["bench_acc"] is not None else "")
        + ".",
        "",
        "## Summary",
        "",
        "| artifact | backend | quant | size | PPL | PPL ratio | "
        + " | ".join(f"KLD {k}" for k in kinds)
        + " | same top % | bench % | Δ points [95 % CI] | McNemar p | detectable Δ | truncated | gate |",
        "|---|---|---|---:|---:|---:|" + "---:|" * len(kinds) + "---:|---:|---|---:|---:|---:|---|",
    ]
    for r in report["rows"]:
        delta = (
            f"{r['bench_delta']:+.1f} [{r['ci_low']:+.1f}, {r['ci_high']:+.1f}]"
            if r["bench_delta"] is not None
            else "–"
        )
        cells = [r["artifact"], r["backend"], r["quant"], _mb(r["size_bytes"]), _f(r["ppl"], ".4f")]
        cells += [_f(r["ppl_ratio"], ".4f"), *(_f(r.get(f"kld_{k}"), ".3g") for k in kinds)]
        cells += [_f(r["top1_pct"], ".2f"), _f(r["bench_acc"], ".1f"), delta, _f(r["p_mcnemar"], ".3g")]
        cells += [_f(r.get("detectable"), ".1f"), _f(r["truncated"], "d")]
        cells.append("PASS" if r["passed"] else ("UNRESOLVED" if r.get("bench_verdict") == "UNRESOLVED"
                                                  and len(r["failures"]) == 1 else "FAIL"))  # fmt: skip
        out.append(_row(cells))
    failing = [r for r in report["rows"] if r["failures"]]
    if failing:
        out += ["", "### Failed gates", ""]
        out += [f"- `{r['artifact']}`: " + "; ".join(r["failures"]) for r in failing]
    out += ["", "![quality vs size](quality_vs_size.png)", "", "## KL divergence and token statistics", ""]
    w = ppl["windows"]
    out.append(
        "Windows: "
        + ", ".join(f"{w[k]} {k}" for k in kinds if k in w)
        + (f" (set `{w['set']}`)" if w["set"] else "")
        + (f"; text file `{w['text_file']}`, ctx {w['ctx']}, stride {w['stride']}" if w["text_file"] else "")
        + ". Statistics as `llama-perplexity --kl-divergence` prints them; Δp is p(cand) − p(ref) of the "
        "correct token, in percent."
    )
    head = ["artifact", "kind", "tokens", "PPL ref", "PPL cand", "ratio", "KLD mean ± err", "median", "p99"]
    head += ["p99.9", "max", "same top %", "Δp mean %", "Δp RMS %", "Δp p1 / p99 %"]
    out += ["", _row(head), "|---|---|" + "---:|" * (len(head) - 2)]
    for c in ppl["candidates"]:
        for kind, s in c["kinds"].items():
            cells = [c["artifact"], kind, str(s["tokens"]), f"{s['ppl_ref']:.4f}", f"{s['ppl_cand']:.4f}"]
            cells += [f"{s['ppl_ratio']:.4f}", f"{s['kld_mean']:.3g} ± {s['kld_stderr']:.2g}"]
            cells += [f"{s[k]:.3g}" for k in ("kld_median", "kld_p99", "kld_p999", "kld_max")]
            cells += [f"{s['same_top_pct']:.2f}", f"{s['dp_mean_pct']:+.3f}", f"{s['dp_rms_pct']:.3f}"]
            cells += [f"{s['dp_p1_pct']:+.2f} / {s['dp_p99_pct']:+.2f}"]
            out.append(_row(cells))
    if bench is not None:
        b = bench["bench"]
        dec = Decoding(**{k: v for k, v in bench["decoding"].items() if k != "greedy"})
        out += [
            "",
            "## Benchmark",
            "",
            f"`{b['name']}`{SYNTHETIC_NOTE if b.get('synthetic') else ''}: {b['items']} items; decoding "
            f"{dec.label()} (an answer the budget cut off before its final answer counts as wrong and is "
            f"listed as truncated); the answer is read after the last `</think>`; paired bootstrap over "
            f"items (10,000 resamples, seed {b['seed']}); exact McNemar test (sign test over items when "
            "k > 1); detectable Δ: the smallest delta this n and k find with 80 % power."
            + (f" {len(b['skipped_bad'])} bad rows skipped." if b["skipped_bad"] else ""),
            "",
            "| category | n | "
            + " | ".join([bench["reference"]["artifact"], *[c["artifact"] for c in bench["candidates"]]])
            + " |",
            "|---|---:|" + "---:|" * (1 + len(bench["candidates"])),
        ]
        ref_cat = bench["reference"]["per_category"]
        for cat, v in ref_cat.items():
            cells = [f"{v['acc']:.1f}"]
            for c in bench["candidates"]:
                d = c["paired"]["per_category"][cat]
                cells.append(f"{d['cand_acc']:.1f} ({d['delta']:+.1f}, p {d['p_mcnemar']:.2g})")
            out.append(f"| {cat} | {v['n']} | " + " | ".join(cells) + " |")
        cells = [f"{bench['reference']['acc']:.1f}"]
        cells += [
            f"{c['acc']:.1f} ({c['paired']['delta']:+.1f}, p {c['paired']['p_mcnemar']:.2g})"
            for c in bench["candidates"]
        ]
        out.append(f"| **all** | {b['items']} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def _worst_kld(row: dict[str, Any]) -> float:
    """The largest per-kind mean KLD (what the KLD gate looks at); the pooled value without kinds."""
    per_kind = [v for k, v in row.items() if k.startswith("kld_") and k != "kld_mean" and v is not None]
    return max(per_kind) if per_kind else row["kld_mean"] or 0.0


def plot_quality_vs_size(report: dict[str, Any], path: Path) -> None:
    """KLD (worst window kind) and benchmark accuracy against size on disk; green passes, red fails."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref, rows = report["reference"], report["rows"]
    has_bench = ref["bench_acc"] is not None
    fig, axes = plt.subplots(1, 2 if has_bench else 1, figsize=(11 if has_bench else 6, 4.2), squeeze=False)
    mb = [r["size_bytes"] / 1e6 for r in [ref, *rows]]

    def label(ax: Any, text: str, x: float, y: float, dy: int = 5) -> None:
        ax.annotate(text, (x, y), fontsize=8, xytext=(5, dy), textcoords="offset points")

    ax = axes[0][0]
    for r in rows:
        y = max(_worst_kld(r), 1e-7)  # log axis: an exact match shows at the floor
        ax.scatter(r["size_bytes"] / 1e6, y, color="tab:green" if r["passed"] else "tab:red", zorder=3)
        label(ax, r["artifact"], r["size_bytes"] / 1e6, y)
    ax.axhline(report["gates"]["max_kld"], color="grey", ls="--", lw=1, label="KLD gate")
    ax.axvline(
        ref["size_bytes"] / 1e6, color="tab:blue", ls=":", lw=1, label=f"reference ({ref['artifact']})"
    )
    ax.set_yscale("log")
    ax.set_xlim(0, 1.15 * max(mb))
    ax.set_xlabel("size on disk (MB)")
    ax.set_ylabel("mean KL divergence vs reference\n(worst window kind)")
    ax.legend(fontsize=8, loc="lower left")
    ax.grid(alpha=0.3)
    if has_bench:
        ax = axes[0][1]
        ax.scatter(ref["size_bytes"] / 1e6, ref["bench_acc"], color="tab:blue", marker="s", zorder=3)
        label(ax, f"{ref['artifact']} (reference)", ref["size_bytes"] / 1e6, ref["bench_acc"], dy=-12)
        for r in rows:
            x, acc = r["size_bytes"] / 1e6, r["bench_acc"]
            # the paired interval of the delta, drawn around the candidate's accuracy
            err = [[r["bench_delta"] - r["ci_low"]], [r["ci_high"] - r["bench_delta"]]]
            color = "tab:green" if r["passed"] else "tab:red"
            ax.errorbar(x, acc, yerr=err, fmt="o", color=color, capsize=3, zorder=3)
            label(ax, r["artifact"], x, acc)
        ax.axhline(
            ref["bench_acc"] - report["gates"]["max_drop"], color="grey", ls="--", lw=1, label="accuracy gate"
        )
        ax.set_xlim(0, 1.15 * max(mb))
        ax.set_xlabel("size on disk (MB)")
        ax.set_ylabel("benchmark accuracy (%)\nbars: paired 95 % CI of the delta")
        ax.legend(fontsize=8, loc="lower left")
        ax.grid(alpha=0.3)
    fig.suptitle("quality vs size (green: passes every gate, red: fails one)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict[str, Any], out: Path) -> None:
    """report.md + report.json + quality_vs_size.png into `out`, all or nothing."""
    with atomic_dir(out) as tmp:
        (tmp / "report.json").write_text(json.dumps(report, indent=2, default=str) + "\n", encoding="utf-8")
        (tmp / "report.md").write_text(format_markdown(report), encoding="utf-8")
        plot_quality_vs_size(report, tmp / "quality_vs_size.png")


def card_rows(report: dict[str, Any]) -> dict[Path, list[dict[str, Any]]]:
    """The report's rows grouped by artifact folder, in the columns the model card shows."""
    from r1v_quant.exporters.model_card import CARD_NAME
    from r1v_quant.util.hub import hub_source

    out: dict[Path, list[dict[str, Any]]] = {}
    bench = report.get("bench") or {}
    # a synthetic benchmark measures nothing a user of the artifact can rely on: never in a card
    published = bench and not bench["bench"].get("synthetic")
    for r in report["rows"]:
        path = Path(r["path"])
        folder = path if path.is_dir() else path.parent
        if not (folder / CARD_NAME).is_file() or hub_source(folder) is not None:
            continue  # no card, or a Hugging Face cache snapshot (never written into)
        out.setdefault(folder, []).append(
            {
                "artifact": r["artifact"],
                "size": r["size_bytes"],
                "ppl_ratio": r["ppl_ratio"],
                "kld": r["kld_mean"],
                "top1": r["top1_pct"],
                "bench_delta": _bench_cell(r, bench["bench"]) if published else None,
            }
        )
    return out


def _bench_cell(row: dict[str, Any], bench: dict[str, Any]) -> str | None:
    """`-1.2 [-3.0, +0.6] on mathvision (n 304)`: the delta with its interval and what it was measured on."""
    if row.get("bench_delta") is None:
        return None
    return (
        f"{row['bench_delta']:+.1f} [{row['ci_low']:+.1f}, {row['ci_high']:+.1f}] on {bench['name']} "
        f"(n {bench['items']})"
    )


def update_cards(report: dict[str, Any]) -> list[Path]:
    """Write each candidate's measured quality into the model card of its artifact folder.

    A GGUF folder collects runs, and `gguf` rewrites its card: the card is updated under the folder's
    lock (r1v_quant.util.outputs), so a `gguf` run into it meanwhile is refused rather than overwritten.
    """
    from r1v_quant.exporters.model_card import GGUF_MANIFEST, update_card_quality
    from r1v_quant.util.outputs import claim_output

    written = []
    for folder, rows in card_rows(report).items():
        with claim_output(folder, folder=True) if (folder / GGUF_MANIFEST).is_file() else nullcontext():
            written.append(update_card_quality(folder, rows))
    return written
