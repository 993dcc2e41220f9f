"""`calibrate`: set -> rendered samples -> layer-by-layer capture -> stats.safetensors + report.json, and
the per-layer modality sensitivity (sensitivity.py) -> sensitivity.json.

`prepare` stops before the capture, for callers (the AWQ search) that drive `iter_layers` themselves.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from r1v_quant.calibration.capture import iter_layers
from r1v_quant.calibration.dataset import CalibrationSet
from r1v_quant.calibration.job_plan import JobPlan, check_plan, peak_rss_bytes, plan_job
from r1v_quant.calibration.loaders import load_set
from r1v_quant.calibration.render import MODALITIES, RenderedSample, Renderer
from r1v_quant.calibration.sensitivity import (
    SENSITIVITY_FILE,
    Sensitivity,
    measure_sensitivity,
    read_sensitivity,
    write_sensitivity,
)
from r1v_quant.calibration.stats import FORMAT, LINEAR_GROUPS, STATS_FILE
from r1v_quant.calibration.store import ActivationStore, parse_max_memory
from r1v_quant.model.checkpoint import Checkpoint, open_checkpoint
from r1v_quant.util.atomic import atomic_dir, check_output_dir
from r1v_quant.util.device import resolve_device
from r1v_quant.util.errors import R1VError
from r1v_quant.util.outputs import claim_output

REPORT_FILE = "report.json"
MANIFEST_COPY = "set_manifest.jsonl"


@dataclass
class Prepared:
    """Everything before the forward passes: checkpoint, set, its hash and the rendered samples."""

    ckpt: Checkpoint
    renderer: Renderer
    cset: CalibrationSet
    set_hash: str
    rendered: list[RenderedSample]


def prepare(
    model_dir: Path | str,
    set_spec: str = "default",
    samples: int = 64,
    seq_len: int = 4096,
    *,
    text_ratio: float = 0.25,
    seed: int = 0,
    flavor: str | None = None,
    progress: bool = True,
) -> Prepared:
    """Open the model, load and render the set. Every bad input fails here, before any heavy work."""
    ckpt = open_checkpoint(model_dir, flavor=flavor)
    if ckpt.spec.is_quantized:
        raise R1VError(f"{model_dir}: already quantized; calibrate the 16-bit checkpoint")
    renderer = Renderer(model_dir, ckpt.spec, seq_len)
    cset = load_set(
        set_spec,
        samples=samples,
        seq_len=seq_len,
        seed=seed,
        text_ratio=text_ratio,
        count_tokens=renderer.count_tokens,
        progress=progress,
    )
    set_hash = cset.content_hash()
    rendered = [
        renderer.render(s, cset)
        for s in tqdm(cset.samples, desc="rendering", unit="sample", disable=not progress)
    ]
    return Prepared(ckpt, renderer, cset, set_hash, rendered)


def calibrate(
    model_dir: Path | str,
    set_spec: str = "default",
    samples: int = 64,
    seq_len: int = 4096,
    out_dir: Path | str = "calibration",
    max_memory: str | int | None = "auto",
    *,
    text_ratio: float = 0.25,
    seed: int = 0,
    flavor: str | None = None,
    dtype: torch.dtype = torch.float32,
    sensitivity: bool = True,
    progress: bool = True,
    device: str | torch.device = "auto",
) -> dict[str, Any]:
    """Write `out_dir/stats.safetensors`, `report.json`, `set_manifest.jsonl` and (`sensitivity`)
    `sensitivity.json`, all at once (atomically); return the report.

    `max_memory`: "auto" (fit to this machine, job_plan.py), a size, or None / "none" (no budget). The
    plan (peak RAM, spill, FLOPs) is made after the samples are rendered and before any forward pass; a
    run that cannot fit memory or disk is refused there. `device`: auto | cpu | cuda
    (r1v_quant/util/device.py),
    where the vision tower, the capture and the sensitivity pass run; activations stay in host RAM / spill."""
    out_dir = Path(out_dir)
    check_output_dir(out_dir)  # fail before minutes of work, not after
    with claim_output(out_dir):  # a second run into the same folder fails at once
        return _calibrate(
            model_dir, set_spec, samples, seq_len, out_dir, max_memory, text_ratio=text_ratio, seed=seed,
            flavor=flavor, dtype=dtype, sensitivity=sensitivity, progress=progress, device=device,
        )  # fmt: skip


def _calibrate(
    model_dir: Path | str,
    set_spec: str,
    samples: int,
    seq_len: int,
    out_dir: Path,
    max_memory: str | int | None,
    *,
    text_ratio: float,
    seed: int,
    flavor: str | None,
    dtype: torch.dtype,
    sensitivity: bool,
    progress: bool,
    device: str | torch.device,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    dev = resolve_device(device)
    wanted = parse_max_memory(max_memory)
    prep = prepare(
        model_dir,
        set_spec,
        samples,
        seq_len,
        text_ratio=text_ratio,
        seed=seed,
        flavor=flavor,
        progress=progress,
    )
    # the spill folder lives inside the output's temporary sibling: same file system as out_dir.parent
    plan = plan_job(
        "calibrate",
        prep,
        budget=wanted,
        spill_dir=out_dir.parent,
        sensitivity=sensitivity,
        device=dev.type,
    )
    check_plan(plan)
    show_plan(plan, progress)
    budget = plan.budget
    t_prep = time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        store = ActivationStore(budget, tmp / ".spill")
        tensors: dict[str, torch.Tensor] = {}
        try:
            for cap in iter_layers(
                prep.ckpt,
                prep.renderer,
                prep.cset,
                prep.rendered,
                store,
                dtype=dtype,
                progress=progress,
                device=dev,
            ):
                assert cap.stats is not None
                tensors.update(cap.stats.tensors())
            # the loop variable keeps the last LayerCapture, and with it that decoder layer (1.95 GB at
            # 38B), alive beside the sensitivity pass's own layer: release it (measured at full width)
            cap = None
            t_capture = time.perf_counter()
            store.drop("inputs")  # the last layer's outputs: not needed by the sensitivity pass
            # measured here once, so `gguf --modality-weights auto` weighs modalities as `awq` does
            sens = (
                measure_sensitivity(prep, store, dtype=dtype, progress=progress, device=dev)
                if sensitivity
                else None
            )
        finally:
            store.close()  # also removes the spill folder before the directory is renamed into place
        seconds = time.perf_counter() - t0
        report = _report(
            prep, model_dir, set_spec, seq_len, seed, text_ratio, budget, store, seconds, t_prep - t0,
            t_capture - t_prep,
        )  # fmt: skip
        report["plan"] = plan.to_json()
        report["device"] = dev.type
        report["sensitivity"] = None
        if sens is not None:
            write_sensitivity(sens, tmp)
            report["sensitivity"] = {
                "file": SENSITIVITY_FILE,
                "samples": len(sens.samples),
                "seconds": round(seconds - (t_capture - t0), 3),
                # mean over layers of the vision / language per-token weight: how much less a vision
                # token's output error costs the answer
                "vision_over_language": round(
                    float((sens.weights[:, 0] / sens.weights[:, 2].clamp(min=1e-30)).mean()), 6
                ),
            }
        metadata = {
            "format": FORMAT,
            "set_hash": prep.set_hash,
            "model": report["model"],
            "flavor": prep.ckpt.spec.flavor,
            "info": json.dumps(
                {k: report[k] for k in ("set", "seq_len", "tokens", "layers", "linear_groups")}
            ),
        }
        save_file(tensors, str(tmp / STATS_FILE), metadata=metadata)
        (tmp / MANIFEST_COPY).write_text(prep.cset.manifest_text(), encoding="utf-8")
        (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def show_plan(plan: JobPlan, progress: bool) -> None:
    """The plan's compact block on stderr before the run (not with --json: the report carries it)."""
    if progress:
        print(plan.summary(), file=sys.stderr, flush=True)


def _report(
    prep: Prepared,
    model_dir: Path | str,
    set_spec: str,
    seq_len: int,
    seed: int,
    text_ratio: float,
    budget: int | None,
    store: ActivationStore,
    seconds: float,
    prep_seconds: float,
    capture_seconds: float,
) -> dict[str, Any]:
    rs = prep.rendered
    tokens = {m: sum(r.count(code) for r in rs) for code, m in enumerate(MODALITIES)}
    tokens["total"] = sum(r.length for r in rs)
    lengths = [r.length for r in rs]
    return {
        "model": str(Path(model_dir).resolve()),
        "flavor": prep.ckpt.spec.flavor,
        "set": {
            "source": set_spec,
            "hash": prep.set_hash,
            "samples": len(rs),
            "with_images": sum(1 for r in rs if r.image_keys),
            "text_only": sum(1 for r in rs if not r.image_keys),
            "ids": [r.id for r in rs],
        },
        "seq_len": seq_len,
        "seed": seed,
        "text_ratio": text_ratio,
        "tokens": tokens,
        "tiles": {"total": sum(sum(r.tiles) for r in rs), "per_sample": [sum(r.tiles) for r in rs]},
        "lengths": {
            "min": min(lengths),
            "max": max(lengths),
            "mean": round(sum(lengths) / len(lengths), 1),
            "per_sample": lengths,
        },
        "truncated": [r.id for r in rs if r.truncated],
        "layers": prep.ckpt.spec.llm.num_layers,
        "linear_groups": {g: list(lins) for g, (_, lins) in LINEAR_GROUPS.items()},
        "stats_file": STATS_FILE,
        "memory": {
            "max_memory_bytes": budget,
            "peak_cached_ram_bytes": store.peak_mem_bytes,
            "spilled_bytes": store.spilled_total,
            "peak_spill_disk_bytes": store.peak_disk_bytes,
            "peak_rss_bytes": peak_rss_bytes(),
        },
        "seconds": round(seconds, 3),
        "prepare_seconds": round(prep_seconds, 3),
        "tokens_per_second": round(tokens["total"] / max(capture_seconds, 1e-9), 1),  # the capture pass
    }


def calibration_sensitivity(
    calib: Path | str,
    model_dir: Path | str,
    *,
    set_hash: str,
    num_layers: int,
    flavor: str | None = None,
    scratch: Path | str | None = None,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> tuple[Sensitivity, str]:
    """The sensitivity for a `calibrate` output: (it, "calibration") when stored there, else measured now
    from `model_dir` and the set its report.json records, (it, "measured"), after checking that the set
    reloads with the recorded hash. Nothing is written into `calib` (an input). `device`: where a measurement
    runs."""
    calib = Path(calib)
    directory = calib if calib.is_dir() else calib.parent
    stored = read_sensitivity(directory, num_layers=num_layers, set_hash=set_hash)
    if stored is not None:
        return stored, "calibration"
    fix = (
        f"re-run `r1v-quant calibrate` into a new folder to store {SENSITIVITY_FILE}, "
        "or choose --modality-weights balanced, uniform or text"
    )
    try:
        report = json.loads((directory / REPORT_FILE).read_text(encoding="utf-8"))
        s = report["set"]
        args = (s["source"], int(s["samples"]), int(report["seq_len"]))
        kw = {"seed": int(report["seed"]), "text_ratio": float(report["text_ratio"])}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise R1VError(
            f"{directory}: no {SENSITIVITY_FILE} and no readable {REPORT_FILE} to rebuild the set from "
            f"({type(e).__name__}); {fix}"
        ) from None
    try:
        prep = prepare(model_dir, *args, flavor=flavor, progress=progress, **kw)
    except R1VError as e:
        raise R1VError(
            f"{directory}: no {SENSITIVITY_FILE}, and its set does not reload ({e}); {fix}"
        ) from None
    if prep.set_hash != set_hash:
        raise R1VError(
            f"{directory}: no {SENSITIVITY_FILE}, and its set {args[0]!r} now has hash {prep.set_hash[:19]}, "
            f"not the calibrated {set_hash[:19]}; {fix}"
        )
    budget = report.get("memory", {}).get("max_memory_bytes")  # the RAM the user allowed `calibrate`
    if scratch is not None:
        Path(scratch).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".r1v-sensitivity-", dir=scratch) as spill:
        store = ActivationStore(budget, Path(spill))
        try:
            sens = measure_sensitivity(prep, store, progress=progress, device=device)
        finally:
            store.close()
    if sens.weights.shape[0] != num_layers or not math.isfinite(float(sens.weights.sum())):
        raise R1VError(f"{model_dir}: measured sensitivity does not fit the statistics; {fix}")
    return sens, "measured"
