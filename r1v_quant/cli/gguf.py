"""`r1v-quant gguf`: the language model as a llama.cpp GGUF plus the vision tower + mlp1 as an mmproj GGUF."""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from r1v_quant.cli.params import model_argument
from r1v_quant.exporters.model_card import CARD_NAME, GGUF_MANIFEST, write_gguf_card
from r1v_quant.exporters.quantize import GGUF_TYPES, normalize_type
from r1v_quant.util.atomic import write_text_atomic
from r1v_quant.util.errors import R1VError, os_error
from r1v_quant.util.hub import model_name
from r1v_quant.util.outputs import claim_output
from r1v_quant.util.signals import deferred_interrupt

STAGING_PREFIX = ".r1v-staging-"  # a run's unfinished files, inside the output folder
JOURNAL = ".r1v-publish.json"  # the files a run is renaming into place; gone once its manifest is written


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
    type=click.Choice(["F16", "F32", "Q8_0", "Q4_0", "none"], case_sensitive=False),
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
    from r1v_quant.calibration.store import parse_size

    split = parse_size(split_max_size) if split_max_size else 0
    if split_max_size and not split:
        raise R1VError("--split-max-size must be positive")
    opts = {"type": gguf_type, "mmproj_type": mmproj_type, "position_fix": position_fix, "flavor": flavor}
    report = export_gguf_folder(
        model,
        out_dir,
        gguf_type,
        mmproj_type=None if mmproj_type.lower() == "none" else mmproj_type.upper(),
        progress=not as_json,
        card_options=opts,
        nthread=threads,
        flavor=flavor,
        position_fix=position_fix,
        calib=calib,
        activation_aware=activation_aware,
        modality_weights=modality_weights,
        split_max_size=split,
    )
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


def export_gguf_folder(
    model: Path,
    out_dir: Path,
    gguf_type: str,
    *,
    mmproj_type: str | None = "F16",
    progress: bool = True,
    card_options: dict[str, Any] | None = None,
    nthread: int = 0,
    flavor: str | None = None,
    position_fix: str = "auto",
    calib: Path | None = None,
    activation_aware: bool = False,
    modality_weights: str = "auto",
    split_max_size: int = 0,
) -> dict[str, Any]:
    """What `gguf` does: the language-model GGUF and the mmproj into OUT_DIR, published together.

    The folder is owned by this run (r1v_quant.util.outputs.claim_output) from before the first check to after
    the manifest: a second run into it fails at once. Both files are written into a private staging
    folder inside OUT_DIR and renamed into place together with the manifest and the card, with Ctrl-C
    held off meanwhile, after a journal naming the final files; a run killed while publishing is undone
    by the next run into the folder (`recover_folder`). So a run leaves either all its files, with their
    manifest entries, or none of them.
    """
    from r1v_quant.exporters.gguf_llm import export_llm_gguf
    from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf, mmproj_bytes_planned
    from r1v_quant.exporters.model_card import read_gguf_manifest
    from r1v_quant.model.spec import load_spec

    out = gguf_output_path(model, out_dir, gguf_type)
    with claim_output(out_dir, folder=True):
        recover_folder(out_dir)
        read_gguf_manifest(out_dir)  # a foreign gguf_export.json is refused before any work
        mm_out = None
        extra = 0
        if mmproj_type is not None:
            mm_out = Path(out_dir) / f"mmproj-{model_name(model)}-{mmproj_type}.gguf"
            if mm_out.exists():
                raise R1VError(f"{mm_out}: already exists (choose another --out or remove it)")
            extra = mmproj_bytes_planned(load_spec(model, flavor=flavor), mmproj_type)
        try:
            staging = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX, dir=out_dir))
        except OSError as e:
            raise os_error(e, out_dir, "write into the output folder") from None
        try:
            report: dict[str, Any] = {
                "llm": export_llm_gguf(
                    model,
                    out,
                    gguf_type,
                    progress=progress,
                    nthread=nthread,
                    flavor=flavor,
                    calib=calib,
                    activation_aware=activation_aware,
                    modality_weights=modality_weights,
                    split_max_size=split_max_size,
                    staging=staging,
                    extra_bytes=extra,
                )
            }
            if mm_out is not None:
                report["mmproj"] = export_mmproj_gguf(
                    model,
                    mm_out,
                    mmproj_type or "F16",
                    position_fix=position_fix,
                    flavor=flavor,
                    staging=staging,
                )
            staged = [Path(f) for part in report.values() for f in part.pop("staged")]
            publish_together(
                Path(out_dir), staged, lambda: write_gguf_card(out_dir, model, report, card_options or {})
            )
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return report


def publish_together(out_dir: Path, staged: list[Path], write_manifest: Callable[[], object]) -> None:
    """Rename `staged` into OUT_DIR and update the manifest and card, all or nothing.

    A journal names the files and the manifest / card as they were; Ctrl-C is held off until the end and
    then undoes the whole step, as does any failure; a run killed meanwhile is undone by the next one.
    """
    from r1v_quant.exporters.gguf_llm import publish

    journal = out_dir / JOURNAL
    saved = {n: _read_or_none(out_dir / n) for n in (GGUF_MANIFEST, CARD_NAME)}
    names = [p.name for p in staged]
    try:
        with deferred_interrupt():
            write_text_atomic(journal, json.dumps({"files": names, "restore": saved}) + "\n")
            publish(staged, out_dir)  # the first LLM shard (what users open) last
            write_manifest()
            journal.unlink()
    except BaseException as e:
        _undo(out_dir, names, saved)
        journal.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise os_error(e, out_dir, "publish the GGUF files") from None
        raise


def _read_or_none(path: Path) -> str | None:
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _undo(out_dir: Path, names: list[str], saved: dict[str, str | None]) -> list[str]:
    """Remove the published `names` and put the manifest and card back as they were."""
    removed = []
    for name in names:
        target = out_dir / Path(str(name)).name  # names only: never outside the folder
        if target.is_file():
            target.unlink()
            removed.append(target.name)
    for name, text in saved.items():
        target = out_dir / Path(str(name)).name
        if text is None:
            target.unlink(missing_ok=True)
        else:
            write_text_atomic(target, text)
    return removed


def recover_folder(out_dir: Path) -> None:
    """Undo what a killed run left in OUT_DIR (called under the folder's lock): the files it was publishing
    when it died, with the manifest and card as they were (from its journal), and its staging folders."""
    journal = Path(out_dir) / JOURNAL
    if journal.exists():
        names: list[str] = []
        saved: dict[str, str | None] = {}
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError, AttributeError):
            data = json.loads(journal.read_text(encoding="utf-8"))  # damaged: only the staging goes
            names = [str(n) for n in data["files"]]
            saved = {k: v for k, v in data["restore"].items() if k in (GGUF_MANIFEST, CARD_NAME)}
        removed = _undo(Path(out_dir), names, saved)
        journal.unlink()
        if removed:
            click.echo(
                f"note: removed {', '.join(removed)}: an earlier run into {out_dir} died publishing them",
                err=True,
            )
    for stale in Path(out_dir).glob(f"{STAGING_PREFIX}*"):
        shutil.rmtree(stale, ignore_errors=True)
