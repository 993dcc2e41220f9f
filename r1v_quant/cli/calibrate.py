"""`r1v-quant calibrate`: the click command (registered by r1v_quant/cli/main.py as `calibrate`)."""

from __future__ import annotations

import json
from pathlib import Path

import click

from r1v_quant.cli.params import model_argument


def _size(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:.1f} MB"


@click.command("calibrate")
@model_argument()
@click.option(
    "--set",
    "set_spec",
    default="default",
    show_default=True,
    help="default | DIR of *.jsonl + images | FILE.jsonl | VLMEvalKit FILE.tsv | FILE.txt | hf:NAME[:SPLIT]",
)
@click.option("--samples", type=int, default=64, show_default=True, help="Samples to use.")
@click.option("--seq-len", type=int, default=4096, show_default=True, help="Max tokens per sample.")
@click.option("--out", "out", type=click.Path(path_type=Path), required=True, help="Output folder (new).")
@click.option(
    "--max-memory",
    default="auto",
    show_default=True,
    help="RAM for cached activations, the rest spills to disk: auto (what this machine's available memory "
    "leaves after the run's working set and a 10%% margin), a size (2GB, 0 = spill all) or none (no budget).",
)
@click.option(
    "--text-ratio", type=float, default=0.25, show_default=True, help="Text-only share (default set)."
)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--flavor", default=None, help="r1v | r1v2 | r1v3 (default: from the checkpoint).")
@click.option(
    "--device",
    type=click.Choice(["auto", "cpu", "cuda"]),
    default="auto",
    show_default=True,
    help="Where the vision tower, the capture and the sensitivity pass run, one layer resident (auto: "
    "cuda when torch sees one); cached activations stay in RAM / spill.",
)
@click.option(
    "--sensitivity/--no-sensitivity",
    default=True,
    show_default=True,
    help="Also measure per-layer vision / language sensitivity (sensitivity.json, for `gguf "
    "--modality-weights auto`): a backward pass over 8 samples.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def calibrate_command(
    model: Path,
    set_spec: str,
    samples: int,
    seq_len: int,
    out: Path,
    max_memory: str | None,
    text_ratio: float,
    seed: int,
    flavor: str | None,
    device: str,
    sensitivity: bool,
    as_json: bool,
) -> None:
    """Capture per-layer activation statistics of MODEL on a calibration set into OUT."""
    from r1v_quant.calibration.pipeline import calibrate

    report = calibrate(
        model,
        set_spec,
        samples,
        seq_len,
        out,
        max_memory,
        text_ratio=text_ratio,
        seed=seed,
        flavor=flavor,
        sensitivity=sensitivity,
        progress=not as_json,
        device=device,
    )
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    t, mem, sens = report["tokens"], report["memory"], report["sensitivity"]
    click.echo(
        f"wrote {out}: {report['set']['samples']} samples, {t['total']} tokens "
        f"(vision {t['vision']}, prompt {t['prompt']}, response {t['response']}), "
        f"{report['layers']} layers, {report['tokens_per_second']} tokens/s, "
        f"spilled {_size(mem['spilled_bytes'])}, peak RSS {_size(mem['peak_rss_bytes'])} "
        f"(planned {_size(report['plan']['predicted_peak_bytes'])}), set {report['set']['hash'][:19]}"
        + (f", sensitivity of {sens['samples']} samples ({sens['seconds']} s)" if sens else "")
    )
