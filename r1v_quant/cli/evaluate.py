"""`r1v-quant eval ppl|bench` and `r1v-quant check`: quality measurements and the release gate.

Exit codes: 0 all measured (and, for `bench`/`check`, every gate passed); 1 a gate failed; 2 a user mistake
(bad path, incompatible candidate, bad benchmark rows without --skip-bad).
"""

from __future__ import annotations

import json
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from r1v_quant.runtime.decoding import DEFAULT_MAX_TOKENS
from r1v_quant.util.errors import R1VError


def _models(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--cand",
        "cands",
        multiple=True,
        required=True,
        metavar="PATH|REPO[@REV]|openai:URL[#MODEL]",
        help="Candidate: checkpoint folder (16-bit / AWQ) or its Hugging Face repo id (REPO@REV pins a "
        "branch, tag or commit), a local .gguf file (sibling mmproj*.gguf used), a local folder with "
        "one GGUF (+ mmproj), or (eval bench) an OpenAI-compatible server, openai:http://HOST:PORT/v1 "
        "(#MODEL picks one of its models). Repeatable.",
    )(f)
    f = click.option(
        "--ref",
        "ref",
        required=True,
        metavar="PATH|REPO[@REV]",
        help="Reference: checkpoint folder or Hugging Face repo id (REPO@REV for a revision).",
    )(f)
    return f


def _runtime(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option("--threads", type=int, default=None, help="llama.cpp threads (default: all cores).")(f)
    f = click.option("--gpu-layers", type=int, default=0, show_default=True, help="llama.cpp layers on GPU.")(
        f
    )
    f = click.option(
        "--torch-device",
        default="auto",
        show_default=True,
        metavar="auto|cpu|cuda[:N]",
        help="Where the torch backend (16-bit reference, AWQ candidates) runs; auto: CUDA when present.",
    )(f)
    f = click.option(
        "--torch-dtype",
        type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
        default="auto",
        show_default=True,
        help="Torch backend compute dtype; auto: float32 on CPU, bfloat16 on CUDA (38B: ~77 GB in bf16).",
    )(f)
    return f


def _max_tiles(f: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--max-tiles",
        type=int,
        default=None,
        metavar="N",
        help="Tile cap of the dynamic image tiling (default: the checkpoint's max_dynamic_patch, 12 in R1V);"
        " a whole-image thumbnail is still added when the grid has more than one tile. Fewer tiles: less "
        "vision time and prompt, less detail.",
    )(f)


def _runtime_options(
    threads: int | None,
    gpu_layers: int,
    torch_device: str,
    torch_dtype: str,
    batch_size: int = 8,
    parallel: int = 4,
    max_tiles: int | None = None,
) -> Any:
    """The options of `_runtime`, checked before any model loads (a CUDA request without CUDA fails now)."""
    from r1v_quant.plan.image_cost import check_max_tiles
    from r1v_quant.runtime.options import RuntimeOptions

    if batch_size < 1 or parallel < 1:
        raise R1VError("--batch-size and --parallel must be at least 1")
    check_max_tiles(max_tiles)
    rt = RuntimeOptions(threads, gpu_layers, torch_device, torch_dtype, batch_size, parallel, max_tiles)
    rt.torch_placement()
    return rt


def _windows(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--text",
            "text_file",
            type=click.Path(path_type=Path),
            default=None,
            help="Plain-text file scored in --ctx windows (llama-perplexity style).",
        ),
        click.option("--ctx", type=int, default=2048, show_default=True, help="Window length for --text."),
        click.option(
            "--stride",
            type=int,
            default=None,
            help="Window start spacing for --text (default --ctx; each window scores its last "
            "min(stride, ctx/2-1) tokens).",
        ),
        click.option(
            "--chunks",
            type=int,
            default=0,
            show_default=True,
            help="At most this many --text windows (0: all).",
        ),
        click.option(
            "--n-text", type=int, default=16, show_default=True, help="heldout: text-answer windows."
        ),
        click.option(
            "--n-image", type=int, default=16, show_default=True, help="heldout: image-answer windows."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _bench_opts(f: Callable[..., Any]) -> Callable[..., Any]:
    opts = [
        click.option(
            "--limit",
            type=int,
            default=0,
            show_default=True,
            help="Evaluate a seeded random subset of this many items (0: all).",
        ),
        click.option(
            "--stratify", is_flag=True, help="With --limit: keep every category's share of the items."
        ),
        click.option(
            "--max-tokens",
            type=int,
            default=DEFAULT_MAX_TOKENS,
            show_default=True,
            help="Budget per answer, capped by the context (the model's trained length); an answer cut off "
            "before its final answer counts as truncated (wrong).",
        ),
        click.option(
            "--samples",
            type=int,
            default=1,
            show_default=True,
            help="Answers per item (sampled, seeds shared by every model); accuracy is their mean.",
        ),
        click.option(
            "--greedy", is_flag=True, help="Greedy decoding instead of the checkpoint's sampling settings."
        ),
        click.option("--temperature", type=float, default=None, help="Override the checkpoint's value."),
        click.option("--top-p", type=float, default=None, help="Override the checkpoint's top-p."),
        click.option(
            "--repetition-penalty", type=float, default=None, help="Override the checkpoint's penalty."
        ),
        click.option(
            "--batch-size", type=int, default=8, show_default=True, help="Torch backend: answers at once."
        ),
        click.option(
            "--parallel", type=int, default=4, show_default=True, help="Server backend: requests in flight."
        ),
        click.option("--skip-bad", is_flag=True, help="Skip malformed rows (they are still reported)."),
        click.option(
            "--seed", type=int, default=0, show_default=True, help="Subset, sampling and bootstrap seed."
        ),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _resolve(
    ref: str, cands: tuple[str, ...], needs_images: bool, *, progress: bool = True
) -> tuple[Any, list[Any]]:
    """Local paths or Hub repo ids (downloaded into the Hugging Face cache first), then the artifacts."""
    from r1v_quant.evaluate.backends import check_compatible
    from r1v_quant.evaluate.server_backend import is_server_spec, server_artifact
    from r1v_quant.model.artifact import resolve_artifact, resolve_reference
    from r1v_quant.util.hub import resolve_model

    ref_art = resolve_reference(resolve_model(ref, progress=progress))
    arts = [
        server_artifact(c) if is_server_spec(c) else resolve_artifact(resolve_model(c, progress=progress))
        for c in cands
    ]
    seen: dict[str, int] = {ref_art.name: 1}
    for a in arts:  # two artifacts with one name (two folders called "model"): number the later ones
        seen[a.name] = seen.get(a.name, 0) + 1
        if seen[a.name] > 1:
            a.name = f"{a.name}-{seen[a.name]}"
    for a in arts:
        check_compatible(ref_art, a, needs_images=needs_images)
    return ref_art, arts


def _load_benches(
    specs: tuple[str, ...], limit: int, seed: int, skip_bad: bool, stratify: bool = False
) -> Any:
    from r1v_quant.evaluate.bench_load import load_bench
    from r1v_quant.evaluate.bench_sets import BenchSet

    sets = [load_bench(s, limit=limit, seed=seed, skip_bad=skip_bad, stratify=stratify) for s in specs]
    if len(sets) == 1:
        return sets[0]
    items = []
    for s in sets:  # several benchmarks: categories are prefixed with the benchmark's name
        for it in s.items:
            it.category = f"{s.name}/{it.category}"
            items.append(it)
    return BenchSet(
        "+".join(s.name for s in sets),
        items,
        [b for s in sets for b in s.bad],
        sum(s.total_rows for s in sets),
        synthetic=any(s.synthetic for s in sets),
    )


def _decoding(ref_art: Any, o: dict[str, Any]) -> Any:
    """The reference's sampling settings with the command line's overrides."""
    from r1v_quant.runtime.decoding import resolve_decoding

    return resolve_decoding(
        ref_art.path,
        ref_art.flavor,
        greedy=o["greedy"],
        temperature=o["temperature"],
        top_p=o["top_p"],
        repetition_penalty=o["repetition_penalty"],
        samples=o["samples"],
        seed=o["seed"],
        max_tokens=o["max_tokens"],
    )


def _emit(data: Any, as_json: bool, text: str) -> None:
    click.echo(json.dumps(data, indent=2, default=str) if as_json else text)


@click.group("eval")
def eval_group() -> None:
    """Quality measurements of quantized artifacts against the 16-bit reference."""


@eval_group.command("ppl")
@_models
@click.option("--set", "set_name", default=None, help="Built-in windows: heldout (text + image answers).")
@_windows
@click.option(
    "--ref-dtype",
    type=click.Choice(["auto", "float32", "float16"]),
    default="auto",
    show_default=True,
    help="Storage of the reference log-probs between models.",
)
@_max_tiles
@_runtime
@click.option("--json", "as_json", is_flag=True)
def ppl_command(
    ref: str,
    cands: tuple[str, ...],
    set_name: str | None,
    text_file: Path | None,
    ctx: int,
    stride: int | None,
    chunks: int,
    n_text: int,
    n_image: int,
    ref_dtype: str,
    max_tiles: int | None,
    threads: int | None,
    gpu_layers: int,
    torch_device: str,
    torch_dtype: str,
    as_json: bool,
) -> None:
    """Perplexity of REF and each candidate on identical windows, and KL divergence against REF."""
    from r1v_quant.evaluate.ppl import WindowSpec, build_windows, evaluate_models, format_ppl, ppl_report

    if set_name is None and text_file is None:
        raise R1VError("pass --text FILE and/or --set heldout")
    rt = _runtime_options(threads, gpu_layers, torch_device, torch_dtype, max_tiles=max_tiles)
    ws = WindowSpec(set_name, text_file, ctx, stride, n_text, n_image, chunks, max_tiles)
    ref_art, arts = _resolve(ref, cands, needs_images=set_name is not None, progress=not as_json)
    windows = build_windows(ref_art, ws)
    runs = evaluate_models(
        ref_art,
        arts,
        windows,
        runtime=rt,
        ref_dtype=ref_dtype,
        progress=not as_json,
    )
    report = ppl_report(runs[0], runs[1:], windows, ws)
    report["runtime"] = rt.describe()
    _emit(report, as_json, format_ppl(report))


@eval_group.command("bench")
@_models
@click.option(
    "--bench",
    "benches",
    multiple=True,
    required=True,
    help="builtin:tiny (synthetic), NAME:PATH for a published benchmark (mathvista, mathvision, mmmu, "
    "logicvista, wemath, math500, aime, gsm8k), or a JSONL / VLMEvalKit TSV / JSON / parquet file or a "
    "folder of them. Repeatable.",
)
@_bench_opts
@click.option(
    "--max-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Gate: a candidate passes when its 95 % interval rules out a drop of more than this many points "
    "and the run can resolve it; exit 1 otherwise.",
)
@click.option(
    "--save-responses",
    type=click.Path(path_type=Path),
    default=None,
    help="Write every response with its grading to this JSONL file.",
)
@_max_tiles
@_runtime
@click.option("--json", "as_json", is_flag=True)
def bench_command(
    ref: str,
    cands: tuple[str, ...],
    benches: tuple[str, ...],
    max_drop: float,
    save_responses: Path | None,
    max_tiles: int | None,
    threads: int | None,
    gpu_layers: int,
    torch_device: str,
    torch_dtype: str,
    as_json: bool,
    **o: Any,
) -> None:
    """Accuracy of REF and each candidate on a benchmark, paired deltas with intervals, and the gate: PASS
    when the 95 % interval excludes a drop beyond --max-drop, FAIL when it lies beyond it, UNRESOLVED (exit
    1 too) when the run cannot tell. Decodes with REF's own sampling settings unless --greedy."""
    from r1v_quant.evaluate.bench import bench_report, bench_runner, format_bench
    from r1v_quant.evaluate.bench import save_responses as save
    from r1v_quant.evaluate.ppl import evaluate_models

    rt = _runtime_options(
        threads, gpu_layers, torch_device, torch_dtype, o["batch_size"], o["parallel"], max_tiles
    )
    bench = _load_benches(benches, o["limit"], o["seed"], o["skip_bad"], o["stratify"])
    needs_images = any(it.images for it in bench.items)
    ref_art, arts = _resolve(ref, cands, needs_images=needs_images, progress=not as_json)
    servers = [a.name for a in arts if a.backend == "openai"]
    if max_tiles is not None and servers:
        raise R1VError(f"--max-tiles cannot reach {servers[0]}: a server tiles images itself")
    decoding = _decoding(ref_art, o)
    runs = evaluate_models(
        ref_art,
        arts,
        [],
        per_model=bench_runner(bench.items, decoding, progress=not as_json, max_drop=max_drop),
        gen_budget=decoding.max_tokens,
        runtime=rt,
        progress=not as_json,
    )
    pairs = [(r.artifact.describe(), r.bench) for r in runs]
    if save_responses is not None:
        save(save_responses, pairs)
    report = bench_report(bench, pairs, max_drop=max_drop, seed=o["seed"], decoding=decoding)
    report["runtime"] = rt.describe()
    report["preflight"] = {r.artifact.name: r.artifact.extra.get("preflight") for r in runs}
    _emit(report, as_json, format_bench(report))
    if not report["passed"]:
        sys.exit(1)


@click.command("check")
@_models
@click.option(
    "--out",
    required=True,
    type=click.Path(path_type=Path),
    help="Report folder (new or empty): report.md, report.json, quality_vs_size.png.",
)
@click.option(
    "--set",
    "set_name",
    default="heldout",
    show_default=True,
    help="Built-in windows (text + image answers); 'none' for --text only.",
)
@_windows
@click.option(
    "--bench",
    "benches",
    multiple=True,
    default=("builtin:tiny",),
    show_default=True,
    help="Benchmark(s) (see `eval bench`; builtin:tiny is synthetic: reported, never written into a model "
    "card); 'none' to skip.",
)
@_bench_opts
@click.option(
    "--max-kld", type=float, default=0.05, show_default=True, help="Gate: mean KLD per window kind."
)
@click.option(
    "--max-ppl-ratio", type=float, default=1.05, show_default=True, help="Gate: PPL ratio per kind."
)
@click.option(
    "--min-top1", type=float, default=90.0, show_default=True, help="Gate: same top token, percent."
)
@click.option(
    "--max-drop",
    type=float,
    default=1.0,
    show_default=True,
    help="Gate: benchmark accuracy drop, points, ruled out with 95 % confidence (else FAIL / UNRESOLVED).",
)
@click.option(
    "--update-cards",
    is_flag=True,
    help="Write the quality table into each candidate folder's model card (README.md) when it has one.",
)
@_runtime
@click.option("--json", "as_json", is_flag=True)
def check_command(
    ref: str,
    cands: tuple[str, ...],
    out: Path,
    set_name: str,
    text_file: Path | None,
    ctx: int,
    stride: int | None,
    chunks: int,
    n_text: int,
    n_image: int,
    benches: tuple[str, ...],
    max_kld: float,
    max_ppl_ratio: float,
    min_top1: float,
    max_drop: float,
    threads: int | None,
    gpu_layers: int,
    torch_device: str,
    torch_dtype: str,
    update_cards: bool,
    as_json: bool,
    **o: Any,
) -> None:
    """The release gate: ppl / KLD (text + image windows) and benchmark deltas for every candidate, gates
    applied, report written to OUT. Exit 1 when any candidate fails a gate."""
    from r1v_quant.evaluate.check import Gates, format_markdown, run_check, write_report
    from r1v_quant.evaluate.ppl import WindowSpec
    from r1v_quant.util.atomic import check_output_dir
    from r1v_quant.util.outputs import claim_output

    check_output_dir(out)  # fail now, not after the measurements
    with claim_output(out):  # OUT is this run's until its report is written
        from r1v_quant.evaluate.server_backend import is_server_spec

        if any(is_server_spec(c) for c in cands):
            raise R1VError("check needs each candidate's logits (KLD): evaluate a server with `eval bench`")
        set_opt = None if set_name == "none" else set_name
        if set_opt is None and text_file is None:
            raise R1VError("nothing to score: --set none needs --text FILE")
        bench = (
            None
            if benches == ("none",)
            else _load_benches(benches, o["limit"], o["seed"], o["skip_bad"], o["stratify"])
        )
        needs_images = set_opt is not None or bool(bench and any(it.images for it in bench.items))
        rt = _runtime_options(threads, gpu_layers, torch_device, torch_dtype, o["batch_size"], o["parallel"])
        ref_art, arts = _resolve(ref, cands, needs_images=needs_images, progress=not as_json)
        decoding = _decoding(ref_art, o)
        ws = WindowSpec(set_opt, text_file, ctx, stride, n_text, n_image, chunks)
        gates = Gates(max_kld=max_kld, max_ppl_ratio=max_ppl_ratio, min_top1=min_top1, max_drop=max_drop)
        command = (
            "r1v-quant " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            if sys.argv[1:2] == ["check"]
            else ""
        )
        report = run_check(
            ref_art,
            arts,
            ws,
            bench,
            gates,
            max_tokens=decoding.max_tokens,
            seed=o["seed"],
            runtime=rt,
            progress=not as_json,
            command=command,
            decoding=decoding,
        )
        report["runtime"] = rt.describe()
        write_report(report, out)
    if update_cards:
        from r1v_quant.evaluate.check import update_cards as write_cards

        report["cards_updated"] = [str(p) for p in write_cards(report)]
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
    else:
        summary = format_markdown(report).split("## KL divergence")[0].rstrip()
        click.echo(summary)
        click.echo(f"\nreport written to {out}/ (report.md, report.json, quality_vs_size.png)")
    if not report["passed"]:
        sys.exit(1)
