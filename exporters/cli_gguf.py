"""`r1v-quant gguf`: the language model as a llama.cpp GGUF plus the vision tower + mlp1 as an mmproj GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import click

from r1v_quant.errors import R1VError

from .quantize import GGUF_TYPES, normalize_type


def gguf_output_path(model: Path, out_dir: Path, gguf_type: str) -> Path:
    """`DIR/<model dir name>-<TYPE>.gguf`, llama.cpp's usual naming."""
    return Path(out_dir) / f"{Path(model).resolve().name}-{normalize_type(gguf_type)}.gguf"


@click.command("gguf")
@click.argument("model", type=click.Path(path_type=Path))
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
@click.option("--json", "as_json", is_flag=True)
def gguf_command(
    model: Path,
    out_dir: Path,
    gguf_type: str,
    threads: int,
    flavor: str | None,
    mmproj_type: str,
    position_fix: str,
    as_json: bool,
) -> None:
    """Write MODEL as DIR/<name>-<TYPE>.gguf (arch qwen2) and DIR/mmproj-<name>-<MMPROJ_TYPE>.gguf."""
    from .gguf_llm import export_llm_gguf  # torch & co. load only when the command runs

    out = gguf_output_path(model, out_dir, gguf_type)
    mm_out = None
    if mmproj_type.lower() != "none":
        mm_out = Path(out_dir) / f"mmproj-{Path(model).resolve().name}-{mmproj_type.upper()}.gguf"
        if mm_out.exists():
            raise R1VError(f"{mm_out}: already exists")
    report = {
        "llm": export_llm_gguf(model, out, gguf_type, progress=not as_json, nthread=threads, flavor=flavor)
    }
    if mm_out is not None:
        from .gguf_mmproj import export_mmproj_gguf

        report["mmproj"] = export_mmproj_gguf(
            model, mm_out, mmproj_type.upper(), position_fix=position_fix, flavor=flavor
        )
    if as_json:
        click.echo(json.dumps(report, indent=2, default=str))
        return
    for part in report.values():
        click.echo(
            f"wrote {part['path']} ({part['type']}, {part['tensors']} tensors, "
            f"{part['bytes'] / 1024**2:.1f} MiB, {part['seconds']} s)"
        )
