"""`r1v-quant awq`: calibrate, search and pack the language model, layer by layer, into an AutoAWQ checkpoint.

Data flow: calibration.prepare/iter_layers (one decoder layer resident, activations under --max-memory)
-> r1v_quant.quant.awq_search.quantize_layer (the math); the vision tower, the capture, the sensitivity
pass and the
search all run on --device (r1v_quant/util/device.py), the cached activations stay host-side
-> one packed safetensors file per finished layer in a work directory (that is what --resume continues
from) -> final checkpoint assembled with the 16-bit vision tower, mlp1, embeddings, lm_head and norms,
config.json with quantization_config, the source's tokenizer, template, preprocessor and remote-code
files copied unchanged (never executed), and quant_report.json.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from r1v_quant import __version__
from r1v_quant.exporters.awq_layers import layer_tensors, load_layer_result, load_saved_layer
from r1v_quant.exporters.awq_vision import (
    INT8_REFUSAL,
    VISION_MODES,
    VISION_WORK,
    check_vision_option,
    modules_to_not_convert,
    packed_vision_layers,
    search_vision,
    vision_config,
    vision_depth,
    vision_tensor_names,
)
from r1v_quant.exporters.model_card import CARD_NAME, awq_card, write_card
from r1v_quant.model.awq_layout import unpack_awq
from r1v_quant.model.checkpoint import INDEX_NAME, Checkpoint, ShardedWriter
from r1v_quant.model.groupwise import check_group
from r1v_quant.model.spec import LLM_PREFIX
from r1v_quant.quant.awq_search import (
    INPUT_OF,
    LINEARS,
    AWQConfig,
    ChannelStats,
    apply_quantized,
    quantize_layer,
)
from r1v_quant.util.atomic import atomic_dir, atomic_file, check_output_dir
from r1v_quant.util.errors import R1VError
from r1v_quant.util.outputs import claim_output

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".gguf")
VISION_COSINE_NOTE = 0.99  # an int4 tower below this mean embedding cosine gets a note (docs/awq.md)
MODULES_TO_NOT_CONVERT = modules_to_not_convert("16bit")  # the 16-bit tower's list; int4: awq_vision.py


@dataclass(frozen=True)
class AWQOptions:
    group_size: int = 128
    calib: str = "default"
    samples: int = 64
    seq_len: int = 4096
    text_ratio: float = 0.25
    seed: int = 0
    modality_weights: str = "auto"
    method: str = "awq"  # awq | rtn
    propagate: str = "fp"  # fp: next layer sees 16-bit outputs | quant: the quantized layer's outputs
    device: str = "auto"
    max_memory: str | None = "auto"  # auto | a size | none (calibration/store.py parse_max_memory)
    vision: str = "16bit"  # | int4: the ViT linears searched and packed too (exporters/awq_vision.py)

    def fingerprint(self, model_dir: Path) -> str:
        # everything that changes the result; --resume refuses to continue a run made with other settings
        keep = {k: v for k, v in asdict(self).items() if k not in ("device", "max_memory")}
        keep["model"] = str(Path(model_dir).resolve())
        return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def quantization_config(group_size: int, vision: str = "16bit") -> dict[str, Any]:
    return {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": group_size, "zero_point": True,
            "modules_to_not_convert": modules_to_not_convert(vision)}  # fmt: skip


def check_group_size(spec: Any, group_size: int) -> None:
    """Every quantized linear's input width must be a multiple of the group size (and the packing's 8)."""
    m = spec.llm
    widths = {"hidden": m.hidden_size, "attention": m.num_heads * m.head_dim, "FFN": m.intermediate_size}
    for what, width in widths.items():
        check_group(width, group_size, f"the {what}")
    if group_size % 8:
        raise R1VError(f"--group-size must be a multiple of 8 (the int4 packing), not {group_size}")


def _fake_quant_from_tensors(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put a saved layer result (packed linears + fp16 state) back into `layer` as fake-quant fp32."""
    q = {
        n: unpack_awq(tensors[f"{n}.qweight"], tensors[f"{n}.qzeros"], tensors[f"{n}.scales"])
        for n in LINEARS
    }
    state = {k: v for k, v in tensors.items() if not k.endswith((".qweight", ".qzeros", ".scales"))}
    dtype = next(layer.parameters()).dtype
    with torch.no_grad():
        for k, v in state.items():
            layer.get_submodule(k.rsplit(".", 1)[0]).get_parameter(k.rsplit(".", 1)[1]).copy_(v.to(dtype))
    apply_quantized(layer, q)


def quantize_awq(
    model_dir: Path | str,
    out: Path | str,
    opts: AWQOptions = AWQOptions(),
    *,
    resume: bool = False,
    progress: bool = True,
    on_layer: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict[str, Any]:
    """Run the whole AWQ job; returns the quant report. `on_layer(i, fake_quant_layer)` is for tests.

    The output is owned by this run (r1v_quant.util.outputs.claim_output) from the first check on, so a second
    run into it fails at once; every option is checked before the work folder is made, and a run that
    fails before any layer is finished removes its work folder again (a finished layer is kept for
    `--resume`).
    """
    model_dir, out = Path(model_dir), Path(out)
    check_output_dir(out)
    if opts.method not in ("awq", "rtn"):
        raise R1VError(f"unknown method {opts.method!r}")
    if opts.propagate not in ("fp", "quant"):
        raise R1VError(f"unknown --propagate {opts.propagate!r}: expected fp or quant")
    if opts.group_size <= 0:
        raise R1VError(f"--group-size must be a positive multiple of 8, not {opts.group_size}")
    if opts.vision == "int8":
        raise R1VError(INT8_REFUSAL)
    if opts.vision not in VISION_MODES:
        raise R1VError(f"unknown --vision {opts.vision!r}: expected int4 or 16bit")
    with claim_output(out):
        return _quantize_awq(model_dir, out, opts, resume=resume, progress=progress, on_layer=on_layer)


def _quantize_awq(
    model_dir: Path,
    out: Path,
    opts: AWQOptions,
    *,
    resume: bool,
    progress: bool,
    on_layer: Callable[[int, torch.nn.Module], None] | None,
) -> dict[str, Any]:
    from r1v_quant.calibration import prepare
    from r1v_quant.calibration.job_plan import check_plan, plan_job
    from r1v_quant.calibration.pipeline import show_plan
    from r1v_quant.calibration.store import parse_max_memory
    from r1v_quant.util.device import resolve_device  # shared with calibrate, eval, chat

    t0 = time.perf_counter()
    check_output_dir(out)  # again, now that this run owns the name
    device = resolve_device(opts.device)
    wanted = parse_max_memory(opts.max_memory)
    # plain rounding searches nothing: its reported loss needs no measured sensitivities
    mode = opts.modality_weights if opts.method == "awq" else "uniform"
    cfg = AWQConfig(group_size=opts.group_size, modality_weights=mode)
    work = out.parent / f".{out.name}.awq-work"
    fp = opts.fingerprint(model_dir)
    state_path = work / "state.json"
    if work.exists():
        try:
            state = json.loads(state_path.read_text()) if state_path.is_file() else {}
        except (ValueError, OSError):
            state = {}  # damaged: --resume is refused below, a fresh run starts over
        if resume and (not isinstance(state, dict) or state.get("fingerprint") != fp):
            raise R1VError(
                f"--resume: {work} was made with other settings or another model; "
                "remove it or run without --resume"
            )
    elif resume:
        raise R1VError(f"--resume: nothing to resume for {out} (no {work.name})")

    prep = prepare(
        model_dir,
        opts.calib,
        opts.samples,
        opts.seq_len,
        text_ratio=opts.text_ratio,
        seed=opts.seed,
        progress=progress,
    )
    check_group_size(prep.ckpt.spec, opts.group_size)
    check_vision_option(prep.ckpt.spec, opts.vision, opts.group_size)
    if opts.vision == "int4" and not any(r.image_keys for r in prep.rendered):
        raise R1VError(
            "--vision int4: the calibration set has no image samples to calibrate the tower on "
            "(use a set with images, or --vision 16bit)"
        )
    # memory, disk and time before anything heavy (or anything written): refuse what cannot finish
    plan = plan_job(
        "awq",
        prep,
        budget=wanted,
        spill_dir=out.parent,  # the work folder (spill + finished layers) and the output live there
        sensitivity=cfg.modality_weights == "auto",
        method=opts.method,
        device=device.type,
        propagate_quant=opts.propagate == "quant",
        group_size=opts.group_size,
    )
    check_plan(plan)
    show_plan(plan, progress)
    if work.exists() and not resume:
        shutil.rmtree(work)  # an old interrupted run: start over
    (work / "layers").mkdir(parents=True, exist_ok=True)
    try:
        state_path.write_text(json.dumps({"fingerprint": fp, "options": asdict(opts)}, indent=2))
        return _search_and_assemble(
            prep, model_dir, out, work, opts, cfg, device, plan, t0, progress=progress, on_layer=on_layer
        )
    except BaseException:
        finished = [*(work / "layers").glob("*.safetensors"), *(work / VISION_WORK).glob("*.safetensors")]
        if not finished:
            shutil.rmtree(work, ignore_errors=True)  # nothing to resume from: leave nothing behind
        raise


def _search_and_assemble(
    prep: Any,  # calibration.pipeline.Prepared
    model_dir: Path,
    out: Path,
    work: Path,
    opts: AWQOptions,
    cfg: AWQConfig,
    device: torch.device,
    plan: Any,  # calibration.job_plan.JobPlan
    t0: float,
    *,
    progress: bool,
    on_layer: Callable[[int, torch.nn.Module], None] | None,
) -> dict[str, Any]:
    from r1v_quant.calibration import ActivationStore, iter_layers
    from r1v_quant.calibration.job_plan import peak_rss_bytes
    from r1v_quant.calibration.sensitivity import modality_sensitivities  # shared with calibrate / gguf

    ckpt = prep.ckpt
    layer_reports: list[dict] = []
    store = ActivationStore(plan.budget, work / "spill")
    longest = max(r.length for r in prep.rendered)
    t_prep = time.perf_counter()
    sens = (
        modality_sensitivities(prep, store, progress, device=device)
        if cfg.modality_weights == "auto"
        else None
    )
    t_sens = time.perf_counter()
    vision = None
    if opts.vision == "int4":
        vcfg = vision_config(opts.group_size)
        try:
            vision = search_vision(prep, plan.budget, vcfg, opts.method, device, work, progress=progress)
        except BaseException:
            store.close()
            raise
        cos = vision["embedding_cosine"]["searched"]["mean"]
        if cos < VISION_COSINE_NOTE:  # the replica cannot tell how much a real tower loses: say it here
            print(
                f"note: the int4 vision tower's image embeddings reach a mean per-token cosine of {cos:.4f} "
                f"against the 16-bit tower on the calibration tiles (below {VISION_COSINE_NOTE}); consider "
                "--vision 16bit",
                file=sys.stderr,
            )
    t_vision = time.perf_counter()
    bar = tqdm(
        total=ckpt.spec.llm.num_layers, desc=f"{opts.method} search", unit="layer", disable=not progress
    )
    try:
        for cap in iter_layers(
            ckpt,
            prep.renderer,
            prep.cset,
            prep.rendered,
            store,
            collect_stats=True,
            progress=False,
            device=device,
        ):
            path = work / "layers" / f"{cap.index:05d}.safetensors"
            saved = load_saved_layer(path, cap.index)  # finished before an interruption
            if saved is not None:
                report, tensors = saved
                _fake_quant_from_tensors(cap.layer, tensors)
                report["resumed"] = True
            else:
                layer = cap.layer.to(device)  # already there: iter_layers loaded it on `device`
                cos, sin = cap.rope(longest)
                cos, sin = cos.to(device), sin.to(device)
                if device.type == "cpu":  # the store's lists: spilled samples are read back when used,
                    inputs, targets = cap.inputs, cap.outputs  # so --max-memory bounds the search too
                else:
                    inputs = [x.to(device) for x in cap.inputs]
                    targets = [y.to(device) for y in cap.outputs]
                res = quantize_layer(
                    cap.index,
                    layer,
                    inputs,
                    targets,
                    cap.modality,
                    lambda n, c=cos, s=sin: (c[:n], s[:n]),
                    cfg,
                    opts.method,
                    channel_stats=channel_stats(cap.stats) if cap.stats else None,
                    sensitivity=None if sens is None else sens[cap.index],
                )
                # the layer stays on the device: --propagate quant re-runs it there, iter_layers frees it
                res.quantized = {k: _to_cpu(v) for k, v in res.quantized.items()}
                res.state = {k: v.cpu() for k, v in res.state.items()}
                report = res.report
                with atomic_file(path) as tmp:
                    save_file(layer_tensors(res), str(tmp), metadata={"report": json.dumps(report)})
                del inputs, targets, res  # device copies of every sample: not beside the next layer
            layer_reports.append(report)
            if on_layer:
                on_layer(cap.index, cap.layer)
            if opts.propagate == "quant":
                cap.recompute_outputs()
            bar.update(1)
            bar.set_postfix(layer=cap.index, loss=f"{report['loss']:.2e}", rtn=f"{report['loss_rtn']:.2e}")
    finally:
        bar.close()
        store.close()
    t_search = time.perf_counter()
    report = _assemble(
        ckpt,
        model_dir,
        out,
        work,
        opts,
        prep.set_hash,
        layer_reports,
        timings={
            "prepare": t_prep - t0,
            "sensitivity": t_sens - t_prep,
            "vision": t_vision - t_sens,
            "search": t_search - t_vision,
        },
        progress=progress,
        extra={
            "vision": vision or {"mode": "16bit"},
            "plan": plan.to_json(),
            "memory": {
                "max_memory_bytes": plan.budget,
                "peak_cached_ram_bytes": store.peak_mem_bytes,
                "spilled_bytes": store.spilled_total,
                "peak_spill_disk_bytes": store.peak_disk_bytes,
                "peak_rss_bytes": peak_rss_bytes(),  # before assembly (which streams tensor by tensor)
            },
        },
    )
    shutil.rmtree(work, ignore_errors=True)
    return report


def channel_stats(stats) -> ChannelStats:  # stats: calibration LayerStats of the layer being searched
    """The capture pass's mean |x| per modality of each linear input: the AWQ scale statistic, all tokens."""
    from r1v_quant.calibration.render import MODALITIES
    from r1v_quant.calibration.stats import GROUP_OF_LINEAR

    t = stats.tensors()
    out = {}
    for key in sorted(set(INPUT_OF.values())):
        p = f"layers.{stats.index}.{GROUP_OF_LINEAR[key]}"
        mean = torch.stack([t[f"{p}.mean_abs.{m}"] for m in MODALITIES])
        count = torch.cat([t[f"{p}.count.{m}"] for m in MODALITIES]).float()
        out[key] = (mean, count)
    return out


def _to_cpu(qw):  # QuantizedWeight
    qw.q, qw.scales, qw.zeros = qw.q.cpu(), qw.scales.cpu(), qw.zeros.cpu()
    return qw


def _assemble(
    ckpt: Checkpoint,
    model_dir: Path,
    out: Path,
    work: Path,
    opts: AWQOptions,
    set_hash: str,
    layer_reports: list[dict],
    timings: dict[str, float],
    progress: bool,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    t0 = time.perf_counter()
    spec = ckpt.spec
    depth = vision_depth(spec) if opts.vision == "int4" else 0
    packed_vit = tuple(vision_tensor_names(depth))
    with atomic_dir(out) as tmp:
        writer = ShardedWriter(tmp, max_shard_bytes=4 * 1024**3)
        names = [
            n
            for n in ckpt.names()
            if not n.startswith(LLM_PREFIX + ".") and not (packed_vit and n.startswith(packed_vit))
        ]
        for n in tqdm(names, desc="16-bit tensors", unit="tensor", disable=not progress):
            writer.add(n, ckpt.get(n).to(torch.float16))
        for n, t in packed_vision_layers(work, depth):
            writer.add(n, t)
        for i in tqdm(range(spec.llm.num_layers), desc="packed layers", unit="layer", disable=not progress):
            _, tensors = load_layer_result(work / "layers" / f"{i:05d}.safetensors", i)
            for k, v in tensors.items():
                writer.add(f"{LLM_PREFIX}.{i}.{k}", v)
        writer.close()
        cfg = json.loads((model_dir / "config.json").read_text())
        qc = quantization_config(opts.group_size, opts.vision)
        cfg["quantization_config"] = qc  # vLLM auto-detects only the top level
        cfg["llm_config"]["quantization_config"] = qc  # LMDeploy / older loaders look here
        for c in (cfg, cfg["llm_config"], cfg["vision_config"]):
            c["torch_dtype"] = "float16"  # AWQ kernels run fp16 activations
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        copied = []
        for f in sorted(model_dir.iterdir()):
            if (
                f.is_file()
                and f.name not in ("config.json", INDEX_NAME, CARD_NAME)  # the source's card: ours below
                and not f.name.endswith(WEIGHT_SUFFIXES)
            ):
                shutil.copy2(f, tmp / f.name)
                copied.append(f.name)
        fallbacks = [r["layer"] for r in layer_reports if r.get("fallback")]
        report = {
            "producer": f"r1v-quant {__version__}",
            "source": str(model_dir.resolve()),
            "flavor": spec.flavor,
            "options": asdict(opts),
            "calibration_set_hash": set_hash,
            "quantization_config": qc,
            "layers": layer_reports,
            "fallback_layers": fallbacks,
            "loss_sum": sum(r["loss"] for r in layer_reports),
            "loss_rtn_sum": sum(r["loss_rtn"] for r in layer_reports),
            "copied_files": copied,
            "versions": {"torch": torch.__version__, "r1v_quant": __version__},
            "timings": {
                **{k: round(v, 2) for k, v in timings.items()},
                "assemble": round(time.perf_counter() - t0, 2),
            },
            **(extra or {}),
        }
        (tmp / "quant_report.json").write_text(json.dumps(report, indent=2) + "\n")
        write_card(tmp, awq_card(report, model_dir, tmp, out_name=str(out)))
    return report
