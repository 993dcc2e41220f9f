"""`r1v-quant gguf`: the language model as a llama.cpp GGUF plus the vision tower + mlp1 as an mmproj GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import click

from r1v_quant.errors import R1VError
from r1v_quant.hub import model_argument, model_name
from r1v_quant.model_card import write_gguf_card

from .quantize import GGUF_TYPES, normalize_type


def gguf_output_path(model: Path, out_dir: Path, gguf_type: str) -> Path:
    """`DIR/<model dir name>-<TYPE>.gguf`, llama.cpp's usual naming."""
    return Path(out_dir) / f"{model_name(model)}-{normalize_type(gguf_type)}.gguf"


@click.command("gguf")
@model_argument()
@click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
@click.option(
    "--type",
    "gguf_type",
    default="F16",
    show_default=True,
    metavar="TYPE",
    help=f"One of {', '.join(GGUF_TYPES)} (K-quants and IQ4 via llama.cpp's quantizer).",
)
@click.option(
    "--threads", type=int, default=0, show_default=True, help="llama.cpp quantizer threads (0: all)."
)
@click.option("--flavor", type=click.Choice(["r1v", "r1v2", "r1v3"]), default=None)
@click.option(
    "--mmproj-type",
    type=click.Choice(["F16", "F32", "Q8_0", "none"], case_sensitive=False),
    default="F16",
    show_default=True,
    help="Type of the vision tower + mlp1 mmproj GGUF ('none': language model only).",
)
@click.option(
    "--position-fix",
    type=click.Choice(["auto", "shift", "none"]),
    default="auto",
    show_default=True,
    help="Position-row order for llama.cpp's CLS-last InternVL graph (auto: detect the installed llama.cpp).",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="`r1v-quant calibrate` output: its mean x² per column is llama.cpp's importance matrix.",
)
@click.option(
    "--activation-aware",
    is_flag=True,
    help="Also fold per-channel scales chosen from --calib into the weights (exact at 16-bit).",
)
@click.option(
    "--modality-weights",
    type=click.Choice(["auto", "balanced", "uniform", "text"]),
    default="auto",
    show_default=True,
    help="How vision / prompt / response tokens weigh in the --calib statistics, as in `awq`: auto = "
    "measured per-layer sensitivity (the calibration's sensitivity.json), balanced = each modality "
    "equally, uniform = every token once, text = vision tokens ignored.",
)
@click.option(
    "--split-max-size",
    default=None,
    metavar="SIZE",
    help="Split the language-model GGUF into shards of at most SIZE (e.g. 50G), llama.cpp's naming.",
)
@click.option("--json", "as_json", is_flag=True)
def gguf_command(
    model: Path,
    out_dir: Path,
    gguf_type: str,
    threads: int,
    flavor: str | None,
    mmproj_type: str,
    position_fix: str,
    calib: Path | None,
    activation_aware: bool,
    modality_weights: str,
    split_max_size: str | None,
    as_json: bool,
) -> None:
    """Write MODEL as DIR/<name>-<TYPE>.gguf (arch qwen2) and DIR/mmproj-<name>-<MMPROJ_TYPE>.gguf."""
    from .gguf_llm import export_llm_gguf  # torch & co. load only when the command runs

    out = gguf_output_path(model, out_dir, gguf_type)
    mm_out = None
    if mmproj_type.lower() != "none":
        mm_out = Path(out_dir) / f"mmproj-{model_name(model)}-{mmproj_type.upper()}.gguf"
        if mm_out.exists():
            raise R1VError(f"{mm_out}: already exists")
    from r1v_quant.calibration.store import parse_size

    split = parse_size(split_max_size) if split_max_size else 0
    if split_max_size and not split:
        raise R1VError("--split-max-size must be positive")
    report = {
        "llm": export_llm_gguf(
            model,
            out,
            gguf_type,
            progress=not as_json,
            nthread=threads,
            flavor=flavor,
            calib=calib,
            activation_aware=activation_aware,
            modality_weights=modality_weights,
            split_max_size=split or 0,
        )
    }
    if mm_out is not None:
        from .gguf_mmproj import export_mmproj_gguf

        report["mmproj"] = export_mmproj_gguf(
            model, mm_out, mmproj_type.upper(), position_fix=position_fix, flavor=flavor
        )
    opts = {"type": gguf_type, "mmproj_type": mmproj_type, "position_fix": position_fix, "flavor": flavor}
    write_gguf_card(out_dir, model, report, opts)
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for part in report.values():
        more = len(part.get("files", [])) - 1
        click.echo(
            f"wrote {part['path']}{f' and {more} more shards' if more > 0 else ''} ({part['type']}, "
            f"{part['tensors']} tensors, {part['bytes'] / 1024**2:.1f} MiB, {part['seconds']} s)"
        )
    if "imatrix" in report["llm"]:
        imatrix = report["llm"]["imatrix"]["path"]
        click.echo(f"wrote {imatrix} (importance matrix, for llama-quantize --imatrix)")
