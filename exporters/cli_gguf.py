"""`r1v-quant gguf`: the language model as a llama.cpp GGUF. Registered in r1v_quant.cli with add_command."""

from __future__ import annotations

import json
from pathlib import Path

import click

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
@click.option("--json", "as_json", is_flag=True)
def gguf_command(
    model: Path, out_dir: Path, gguf_type: str, threads: int, flavor: str | None, as_json: bool
) -> None:
    """Write the language model of MODEL as DIR/<name>-<TYPE>.gguf (llama.cpp arch qwen2)."""
    from .gguf_llm import export_llm_gguf  # torch & co. load only when the command runs

    out = gguf_output_path(model, out_dir, gguf_type)
    report = export_llm_gguf(model, out, gguf_type, progress=not as_json, nthread=threads, flavor=flavor)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(
            f"wrote {report['path']} ({report['type']}, {report['tensors']} tensors, "
            f"{report['bytes'] / 1024**2:.1f} MiB, {report['seconds']} s)"
        )
