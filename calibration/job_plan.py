"""Resource preflight for the streamed jobs (`calibrate`, `awq`): peak host RAM term by term, spill to disk
under the activation budget, free disk, FLOPs and an estimated wall time — all before any heavy work.

Inputs are cheap: the checkpoint's spec and the rendered samples (token count, tiles, response tokens per
sample, known after `prepare`). Every memory term is bytes = (count from the geometry) x (bytes per
element), derived from the code it describes (capture.py, sensitivity.py, awq.py, awq_export.py) and
documented beside it, like r1v_quant/plan/memory_model.py.

Cached activations (calibration/store.py's ActivationStore) are not estimated but replayed: `_StoreReplay`
performs the jobs' exact sequence of put / delete / drop / rename calls with the tensors' byte sizes and
the store's own accounting, so its peak is the store's measured `peak_mem_bytes` (tests check equality on
the replica), and with a budget it gives the bytes that spill and when. Everything else (one layer, its
copies, the search's buffers, the lm_head) is a working set on top of the store in one phase of the job;
the predicted peak is resident terms + the largest phase (memory_model.peaks), RSS excluding page cache.

Phases: vision (ViT one layer at a time), embed (token table), capture (one decoder layer over every
sample), search (AWQ, per layer, between capture and the next layer), sensitivity (streamed backward) and
sensitivity_head (the lm_head's cross-entropy gradient).

`--device cuda`: vision, capture, sensitivity and search run on the GPU (capture.py moves each layer and
each sample there and back), so their layer and working-set terms go to the "gpu" pool (one layer + one
sample's working set; the search's own terms on top); the host keeps the store, the token table (the
embedding lookup stays host-side), each layer's 16-bit source while it is moved, and one sample's host
copies in and out. Every FLOP is then timed at the GPU rate (host <-> device copies are not timed).

`--max-memory auto` (the default): budget = MemAvailable - safety margin - the peak with an empty store,
so activations fill what is left and the rest spills. The preflight refuses, with one line, when the
spill (plus the job's outputs) does not fit the free disk at the spill location, or when the working set
alone exceeds the available memory.
"""

from __future__ import annotations

import math
import shutil
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.calibration.schedule import Backward, Forward, Head, sensitivity_schedule
from r1v_quant.model.arch import DECODER_GROUPS
from r1v_quant.model.artifact import Geometry
from r1v_quant.model.spec import ModelSpec
from r1v_quant.plan.memory_model import TORCH_CPU_BASE, MiB, Term, peaks, torch_prefill_activations
from r1v_quant.plan.roofline import vision_flops_per_tile
from r1v_quant.quant.awq_search import AWQConfig
from r1v_quant.util.errors import R1VError
from r1v_quant.util.outputs import human_bytes
from r1v_quant.util.proc import proc_status

# -- the constants that are not derived from the model ------------------------------------------------------
# Memory the auto budget leaves free: estimation error of the working-set terms, allocator fragmentation
# and the page cache the spill files pass through. 10 % of what is available, at least 512 MiB.
SAFETY_FRACTION = 0.10
SAFETY_MIN = 512 * MiB
# The AWQ search's settings (what `awq` runs: AWQConfig's defaults): loss tokens, screen and grid sizes.
_AWQ = AWQConfig()
LOSS_TOKENS, SCREEN_TOKENS, SCREEN_FRACTION, SCREEN_KEEP = (
    _AWQ.loss_tokens,
    _AWQ.screen_tokens,
    _AWQ.screen_fraction,
    _AWQ.screen_keep,
)
N_GRID, CLIP_GRID = _AWQ.n_grid, _AWQ.clip_grid
CLIP_ELEMENTS = _AWQ.clip_elements  # candidates x rows x columns of one clip chunk
SCALE_CANDIDATES = 2 * N_GRID  # act r>0 (19) + duo (20) + s = 1: 40 scored candidates
# Floating-point operations per weight of one fake quantization (min/max, scale, round, clamp, dequantize):
# counted from quant.py's _quantize_groups / dequantize, about a dozen elementwise ops.
QUANT_FLOPS_PER_WEIGHT = 12
# Resident memory the working-set terms do not name, fit on the replicas as peak RSS minus the named terms:
# RUNTIME_SLACK, torch's kernels, thread pools and oneDNN scratch on the first forward / backward
# (calibrate: 60-90 MB on the two replicas); SEARCH_SLACK on top in the AWQ search, heap that glibc keeps
# after the search's many frees of blocks below its mmap threshold (which rises to 32 MiB) (awq: 250-290
# MB in all, bench/awq_rss.py, widths 256 and 512, constant with depth). Assumed not to grow with width:
# larger buffers are mmapped and returned on free.
RUNTIME_SLACK = 64 * MiB
SEARCH_SLACK = 192 * MiB
# The fraction of this machine's fp32 matmul rate (measured in ~0.1 s before a run) each phase reaches on
# the CPU: its FLOPs are not all large matmuls (attention softmax and masks, norms, GELU / SiLU, fake
# quantization, copies). Measured by bench/full_width.py on one full-width 38B decoder layer (5120 wide,
# FFN 27648) and one InternViT-6B layer with the default set (8 samples x 1024 tokens), 2 AVX-512 threads:
# each phase's FLOPs / (its seconds x the rate the job's own planner measured). vision + capture are timed
# together (one factor); the search's 0.49 comes from the scale and clip grids' many small steps (fake
# quantization, per-candidate attention over the screened tokens). GPU rates are not scaled.
PHASE_EFFICIENCY: dict[str, float] = {"vision": 0.81, "capture": 0.81, "sensitivity": 0.79, "search": 0.49}
LOGIT_CHUNK = 512  # capture.layer_sensitivity computes logits 512 rows at a time
BYTES = {"F32": 4, "F16": 2, "BF16": 2, "float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class SampleShape:
    """What the plan needs of one rendered sample."""

    tokens: int
    tiles: int  # image tiles (0: text only)
    response: int = 0  # response tokens (the sensitivity pass's cross-entropy rows)


@dataclass
class JobPlan:
    job: str  # "calibrate" | "awq"
    terms: list[Term]
    activation_bytes: int  # cached activations' peak with no budget (the store's peak_mem_bytes)
    cache_peak_bytes: int  # cached activations' RAM peak under the budget
    budget: int | None  # bytes of activations kept in RAM (None: no budget, nothing spills)
    budget_source: str  # "auto" | "size" | "none"
    spill_bytes: int  # peak bytes on disk under the budget
    output_disk_bytes: int  # the job's own files at their peak (awq: work layers + the checkpoint)
    disk_need_bytes: int  # at most on disk at once: spill + files written meanwhile, or the outputs
    spill_dir: str
    free_disk_bytes: int | None
    available_bytes: int | None  # MemAvailable when planned
    margin_bytes: int
    working_peak: int  # predicted peak host RAM with an empty store (every non-activation term)
    peak_bytes: int  # predicted peak host RAM under the budget
    peak_phase: str
    gpu_peak_bytes: int | None
    flops: dict[str, float]
    gflops: dict[str, float]  # measured rates: "cpu", and "gpu" when the job runs there
    seconds: float
    notes: list[str] = field(default_factory=list)
    device: str = "cpu"  # where the layers run: "cpu" | "cuda"

    def to_json(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "device": self.device,
            "terms": [
                {"name": t.name, "bytes": int(t.bytes), "pool": t.pool, "phase": t.phase, "note": t.note}
                for t in self.terms
            ],
            "activation_bytes": self.activation_bytes,
            "cache_peak_bytes": self.cache_peak_bytes,
            "predicted_peak_bytes": self.peak_bytes,
            "peak_phase": self.peak_phase,
            "working_peak_bytes": self.working_peak,
            "gpu_peak_bytes": self.gpu_peak_bytes,
            "budget_bytes": self.budget,
            "budget_source": self.budget_source,
            "available_bytes": self.available_bytes,
            "margin_bytes": self.margin_bytes,
            "predicted_spill_bytes": self.spill_bytes,
            "output_disk_bytes": self.output_disk_bytes,
            "disk_need_bytes": self.disk_need_bytes,
            "spill_dir": self.spill_dir,
            "free_disk_bytes": self.free_disk_bytes,
            "flops": {k: float(f"{v:.4g}") for k, v in self.flops.items()},
            "gflops_measured": self.gflops,
            "estimated_seconds": round(self.seconds, 1),
            "notes": list(self.notes),
        }

    def summary(self) -> str:
        """The compact block printed before a run."""
        gb = lambda n: f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"  # noqa: E731
        budget = "none (nothing spills)" if self.budget is None else gb(self.budget)
        avail = "unknown" if self.available_bytes is None else gb(self.available_bytes)
        free = "unknown" if self.free_disk_bytes is None else gb(self.free_disk_bytes)
        big = sorted((t for t in self.terms if t.bytes), key=lambda t: -t.bytes)[:4]
        lines = [
            f"plan ({self.job}): peak RAM ~{gb(self.peak_bytes)} in {self.peak_phase} "
            f"(activations {gb(self.activation_bytes)} unbudgeted; available {avail})",
            "  largest terms: " + ", ".join(f"{t.name} {gb(t.bytes)}" for t in big),
            f"  --max-memory {self.budget_source}: {budget}; spill {gb(self.spill_bytes)}, disk needed "
            f"{gb(self.disk_need_bytes)} with outputs at {self.spill_dir} ({free} free)",
            f"  compute ~{sum(self.flops.values()) / 1e12:.3g} TFLOP, ~{_duration(self.seconds)} at "
            + ", ".join(f"{v:.0f} GFLOP/s ({k})" for k, v in self.gflops.items()),
        ]
        if self.gpu_peak_bytes:
            what = "one layer + one sample's working set" + (", or the search" if self.job == "awq" else "")
            lines.append(f"  GPU peak ~{gb(self.gpu_peak_bytes)} ({what}; estimate)")
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])


def _duration(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.0f} min" if s < 7200 else f"{s / 3600:.1f} h"


# -- the activation store, replayed --------------------------------------------------------------------------
class _StoreReplay:
    """ActivationStore's accounting (put / delete / drop / rename, RAM up to the budget, the rest on disk)
    without tensors: the same decisions, so the same peaks. Tracks the RAM peak per job phase."""

    def __init__(self, budget: int | None):
        self.budget = budget
        self.items: dict[tuple[str, int], tuple[int, bool]] = {}  # -> (bytes, on disk)
        self.mem = self.peak_mem = self.disk = self.peak_disk = 0
        self.phase = ""
        self.phase_peak: dict[str, int] = {}

    def set_phase(self, phase: str) -> None:
        self.phase = phase
        self.phase_peak[phase] = max(self.phase_peak.get(phase, 0), self.mem)

    def put(self, name: str, j: int, nbytes: int) -> None:
        self.delete(name, j)
        if self.budget is None or self.mem + nbytes <= self.budget:
            self.items[(name, j)] = (nbytes, False)
            self.mem += nbytes
            self.peak_mem = max(self.peak_mem, self.mem)
            self.phase_peak[self.phase] = max(self.phase_peak.get(self.phase, 0), self.mem)
        else:
            self.items[(name, j)] = (nbytes, True)
            self.disk += nbytes
            self.peak_disk = max(self.peak_disk, self.disk)

    def delete(self, name: str, j: int) -> None:
        item = self.items.pop((name, j), None)
        if item is not None:
            if item[1]:
                self.disk -= item[0]
            else:
                self.mem -= item[0]

    def drop(self, name: str) -> None:
        for key in [k for k in self.items if k[0] == name]:
            self.delete(*key)

    def rename(self, old: str, new: str) -> None:
        self.drop(new)
        for key in [k for k in self.items if k[0] == old]:
            self.items[(new, key[1])] = self.items.pop(key)


def _first_inputs(
    st: _StoreReplay, g: Geometry, samples: Sequence[SampleShape], name: str, cb: int, depth: int
) -> None:
    """capture._first_inputs: per image sample the ViT hidden states (tiles x positions x ViT width),
    replaced layer by layer, then mlp1's features (tiles x 256 x hidden) before each sample's ViT states
    are deleted; then every sample's embeddings (tokens x hidden), each after its features are deleted."""
    todo = [j for j, s in enumerate(samples) if s.tiles]
    if todo:
        st.set_phase("vision")
        for _ in range(depth + 1):  # the embeddings, then each layer's in-place update
            for j in todo:
                st.put("vit_hidden", j, samples[j].tiles * g.positions * g.vit_hidden * cb)
        for j in todo:
            st.put("image_features", j, samples[j].tiles * g.tokens_per_tile * g.hidden * cb)
            st.delete("vit_hidden", j)
    st.set_phase("embed")
    for j, s in enumerate(samples):
        st.delete("image_features", j)
        st.put(name, j, s.tokens * g.hidden * cb)


def _capture(
    st: _StoreReplay,
    g: Geometry,
    samples: Sequence[SampleShape],
    cb: int,
    depth: int,
    *,
    search: bool,
    propagate_quant: bool = False,
) -> None:
    """capture.iter_layers: per layer every sample's output joins the cached inputs; then the outputs
    become the next inputs. The AWQ search runs between (its working set sits on top of both lists)."""
    _first_inputs(st, g, samples, "inputs", cb, depth)
    for _ in range(g.llm_layers):
        st.set_phase("capture")
        for j, s in enumerate(samples):
            st.put("outputs", j, s.tokens * g.hidden * cb)
        if search:
            st.set_phase("search")
            if propagate_quant:  # recompute_outputs: each output replaced by the quantized layer's
                for j, s in enumerate(samples):
                    st.put("outputs", j, s.tokens * g.hidden * cb)
        st.drop("inputs")
        st.rename("outputs", "inputs")


def _sensitivity(st: _StoreReplay, g: Geometry, samples: Sequence[SampleShape], cb: int, depth: int) -> None:
    """capture.layer_sensitivity on the subset, walking the same schedule (calibration/schedule.py): the
    forward pass keeps every k-th layer's inputs, the head adds the gradients, each segment's inputs are
    recomputed from its checkpoint and freed on the way down. Peak about (checkpoints + k + 1) x the
    subset's states."""
    L = g.llm_layers
    size = [s.tokens * g.hidden * cb for s in samples]
    _first_inputs(st, g, samples, "sens0", cb, depth)
    st.set_phase("sensitivity")
    for step in sensitivity_schedule(L):
        if isinstance(step, Forward):
            for i, drop_input in step.layers():
                for j in range(len(samples)):
                    st.put(f"sens{i + 1}", j, size[j])
                if drop_input:
                    st.drop(f"sens{i}")
        elif isinstance(step, Head):
            st.set_phase("sensitivity_head")
            for j in range(len(samples)):
                st.put("sens_grad", j, size[j])
            st.drop(f"sens{L}")
            st.set_phase("sensitivity")
        else:
            if step.layer > 0:
                for j in range(len(samples)):
                    st.put("sens_grad", j, size[j])
            st.drop(f"sens{step.layer}")
    st.drop("sens_grad")


def replay_store(
    job: str,
    g: Geometry,
    samples: Sequence[SampleShape],
    sens_subset: Sequence[int] | None,
    budget: int | None,
    *,
    cb: int = 4,
    propagate_quant: bool = False,
    vit_depth: int | None = None,
) -> _StoreReplay:
    """The store's life in a whole job: calibrate = capture then sensitivity; awq = sensitivity (with
    --modality-weights auto) then capture + search. `vit_depth`: ViT layers run (spec.select_layer %
    (layers + 1); default all)."""
    st = _StoreReplay(budget)
    depth = g.vit_layers if vit_depth is None else vit_depth
    subset = [samples[j] for j in sens_subset] if sens_subset else []
    if job == "awq":
        if subset:
            _sensitivity(st, g, subset, cb, depth)
        _capture(st, g, samples, cb, depth, search=True, propagate_quant=propagate_quant)
    else:
        _capture(st, g, samples, cb, depth, search=False)
        st.drop("inputs")
        if subset:
            _sensitivity(st, g, subset, cb, depth)
    return st


# -- the working set of each phase ---------------------------------------------------------------------------
def _params(shapes: dict[str, tuple[int, ...]]) -> int:
    return sum(math.prod(s) for s in shapes.values())


def _linear_shapes(spec: ModelSpec) -> dict[str, tuple[int, int]]:
    return {
        k[: -len(".weight")]: s
        for k, s in spec.llm_layer_shapes().items()
        if k.endswith(".weight") and len(s) == 2
    }


def _attention_at_tokens(g: Geometry, ctx: int, t: int, cb: int) -> int:
    """awq.AttentionAtTokens over `ctx` context tokens with `t` loss-token queries. Building it holds every
    sample's normed inputs and their concatenation (2 ctx x hidden); evaluating it, the concatenation,
    rope tables cos/sin (2 ctx x head dim), K and V projections plus apply_rope's temporaries
    (rotate_half's cat, x·cos, rot·sin, sum: about 5 ctx x KV width) and q with its own (4 t x q width)."""
    kv, q = g.kv_heads * g.head_dim, g.heads * g.head_dim
    build = 2 * ctx * g.hidden
    run = ctx * (g.hidden + 2 * g.head_dim + 5 * kv) + 4 * t * q
    return max(build, run) * cb


def _search_terms(
    spec: ModelSpec, g: Geometry, samples: Sequence[SampleShape], cb: int, method: str, pool: str
) -> list[Term]:
    """awq.quantize_layer on one layer, from its code: the layer and its deepcopy (`original`, the
    round-to-nearest reference), LayerFeatures at the loss tokens, then the largest of its stages."""
    lin = _linear_shapes(spec)
    p_layer = _params(spec.llm_layer_shapes())
    p_lin = sum(o * i for o, i in lin.values())
    n_tok = sum(s.tokens for s in samples)
    t = min(LOSS_TOKENS, n_tok)
    q = g.heads * g.head_dim
    terms = [
        Term("search.layer", p_layer * cb, pool, "search", "the decoder layer being searched"),
        Term("search.reference_copy", p_layer * cb, pool, "search", "copy.deepcopy(layer): plain rounding"),
        Term(
            "search.allocator_slack", SEARCH_SLACK, "cpu", "search", "heap kept by glibc, fit on the replicas"
        ),
    ]
    attn = _attention_at_tokens(g, n_tok, t, cb)  # context up to each sample's last loss token: <= all
    check = attn + 4 * t * g.hidden * cb + 2 * p_lin  # _layer_error; uint8 codes of both candidates
    if method == "rtn":
        terms.append(Term("search.largest_stage", check, pool, "search", "rtn: _layer_error"))
        return terms
    # LayerFeatures.rows (o_proj in, gate in, down in) + attn_out + mlp_out at t tokens; Gram matrices
    # (in / gs) x gs x gs per input key: in x gs each
    rows = t * (q + 3 * g.hidden + g.ffn) * cb
    gram = (2 * g.hidden + q + g.ffn) * 128 * cb
    terms.append(
        Term(
            "search.loss_token_buffers",
            rows + gram,
            pool,
            "search",
            f"{t} loss tokens x (q {q} + 3 x hidden + ffn) + Gram matrices {gram / 1e6:.1f} MB",
        )
    )
    # _search_scales keeps `originals`, their concatenation and |w| of the group (3 copies), and scores
    # a candidate by fake-quantizing one linear at a time (w*s, its codes, dequantized, /s: ~4 copies)
    groups = {grp.scale: grp.linears for grp in DECODER_GROUPS}
    scale = (
        max(
            3 * sum(math.prod(lin[n]) for n in ns) + 4 * max(math.prod(lin[n]) for n in ns)
            for ns in groups.values()
        )
        * cb
    )
    features = attn + t * (g.hidden * 2 + g.ffn) * cb  # attention + x, x2, x3 while it lives
    # _search_clip works on chunks of rows: E = clip_grid x rows x in elements (at most clip_elements);
    # fake_quantize_ranges holds the clamped groups, the codes and two temporaries (4 E), float32
    clip = (
        4
        * 4
        * max(
            CLIP_GRID * min(o, max(1, CLIP_ELEMENTS // (CLIP_GRID * i))) * i
            for n, (o, i) in lin.items()
            if n not in ("self_attn.q_proj", "self_attn.k_proj")
        )
    )
    stages = {
        "features": features,
        "scales": max(scale, attn),
        "clip": clip,
        "check": max(0, check - rows - gram),
    }  # feats are deleted before the check
    worst = max(stages, key=lambda k: stages[k])
    terms.append(
        Term(
            "search.largest_stage",
            stages[worst],
            pool,
            "search",
            f"{worst}; " + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in stages.items()),
        )
    )
    return terms


def plan_terms(
    job: str,
    spec: ModelSpec,
    samples: Sequence[SampleShape],
    sens_subset: Sequence[int] | None,
    *,
    cb: int = 4,
    sb: int = 2,
    method: str = "awq",
    device: str = "cpu",
    base: int = TORCH_CPU_BASE,
    base_note: str = "python + torch (memory_model.TORCH_CPU_BASE)",
) -> list[Term]:
    """Every non-activation term (cb: compute bytes per element, sb: the checkpoint's stored bytes;
    base: the process before the heavy work, by default memory_model's measured python + torch)."""
    g = Geometry.from_spec(spec)
    p_layer = _params(spec.llm_layer_shapes())
    p_vit = _params(spec.vision_layer_shapes())
    n_max = max((s.tokens for s in samples), default=1)
    gpu = device == "cuda"
    run = "gpu" if gpu else "cpu"  # the pool the layers compute in
    terms = [
        Term("runtime.base", base, "cpu", "resident", base_note),
        Term("runtime.slack", RUNTIME_SLACK, "cpu", "resident", "torch first use, fit on the replicas"),
    ]
    img = [s for s in samples if s.tiles]
    if img and g.vit_layers:
        tiles = max(s.tiles for s in img)
        u = tiles * g.positions * g.vit_hidden * cb
        # vision.py VisionLayer on one sample's tiles: attention norm, qkv (3u), q/k norms, SDPA, proj;
        # MLP input, norm, fc1 + GELU (2 x ffn); the fp32 pixels; or the 16-bit source while loading
        act = max((6 + 2 * g.vit_qk_norm) * u, 2 * u + 2 * tiles * g.positions * g.vit_ffn * cb)
        pixels = tiles * 3 * g.image_size**2 * 4
        act += pixels
        terms.append(Term("vision.layer", p_vit * cb, run, "vision", "one ViT layer at the compute dtype"))
        if gpu:  # capture._loaded casts on the way to the device: the host holds the 16-bit source only
            terms.append(Term("vision.transient", act, "gpu", "vision", f"{tiles} tiles through one layer"))
            terms.append(
                Term(
                    "vision.host",
                    max(p_vit * sb, 2 * u + pixels),
                    "cpu",
                    "vision",
                    "the layer's 16-bit source while moved, or one sample's tiles in and out",
                )
            )
        else:
            terms.append(
                Term(
                    "vision.transient",
                    max(act, p_vit * sb),
                    "cpu",
                    "vision",
                    f"{tiles} tiles through one layer, or the layer's 16-bit source",
                )
            )
    terms.append(Term("embed.table", g.vocab * g.hidden * sb, "cpu", "embed", "embed_tokens as stored"))
    terms.append(Term("embed.sample", n_max * g.hidden * cb, "cpu", "embed", "one sample's embeddings"))
    terms.append(Term("capture.layer", p_layer * cb, run, "capture", "one decoder layer"))
    fwd = torch_prefill_activations(g, n_max, cb)  # memory_model: one forward over the longest sample
    sample = n_max * g.hidden * cb
    host_load = max(p_layer * sb, 2 * sample)  # on a GPU: what the host holds beside the store
    host_note = "the layer's 16-bit source while moved, or one sample's input and output host copies"
    if gpu:
        terms.append(Term("capture.transient", fwd, "gpu", "capture", f"forward over {n_max} tokens"))
        terms.append(Term("capture.host", host_load, "cpu", "capture", host_note))
    else:
        terms.append(
            Term(
                "capture.transient",
                max(fwd, p_layer * sb),
                "cpu",
                "capture",
                f"forward over {n_max} tokens, or the layer's 16-bit source while loading",
            )
        )
    if job == "calibrate":
        # stats.safetensors' tensors of every finished layer (mean_abs, sum_sq, max_abs x 3 modalities,
        # float32 per input channel of qkv, o, gate/up, down), kept until the folder is written
        stats = g.llm_layers * (2 * g.hidden + g.heads * g.head_dim + g.ffn) * 9 * 4
        terms.append(Term("calibrate.stats", stats, "cpu", "resident", "per-channel statistics"))
    if job == "awq":
        terms += _search_terms(spec, g, samples, cb, method, "gpu" if gpu else "cpu")
        if gpu:  # awq_export moves every input and target of the layer to the device
            both = 2 * sum(s.tokens for s in samples) * g.hidden * cb
            terms.append(Term("search.inputs_on_device", both, "gpu", "search", "inputs + targets"))
    if sens_subset:
        sub = [samples[j] for j in sens_subset]
        n_sub = max(s.tokens for s in sub)
        terms.append(Term("sensitivity.layer", p_layer * cb, run, "sensitivity", "one decoder layer"))
        # autograd through one layer over one sample: the forward's saved tensors plus gradient
        # temporaries, ~2 forward working sets (estimate)
        terms.append(
            Term(
                "sensitivity.backward",
                2 * torch_prefill_activations(g, n_sub, cb),
                run,
                "sensitivity",
                f"one layer's backward over {n_sub} tokens (estimate)",
            )
        )
        head = g.vocab * g.hidden
        if gpu:  # cast on the way to the device; the host holds the 16-bit source meanwhile
            terms.append(
                Term("sensitivity.lm_head", head * cb, "gpu", "sensitivity_head", "lm_head, compute dtype")
            )
            terms.append(
                Term("sensitivity.lm_head_source", head * sb, "cpu", "sensitivity_head", "its 16-bit source")
            )
            sub_sample = n_sub * g.hidden * cb  # input, output / gradient host copies of one sample
            terms.append(
                Term("sensitivity.host", max(p_layer * sb, 3 * sub_sample), "cpu", "sensitivity", host_note)
            )
        else:
            terms.append(
                Term(
                    "sensitivity.lm_head",
                    head * (cb + sb),
                    "cpu",
                    "sensitivity_head",
                    "lm_head at the compute dtype + its 16-bit source while converting",
                )
            )
        terms.append(
            Term(
                "sensitivity.logits",
                3 * LOGIT_CHUNK * g.vocab * cb,
                run,
                "sensitivity_head",
                "512-row logits, softmax and gradient",
            )
        )
    return terms


# -- FLOPs ---------------------------------------------------------------------------------------------------
def _layer_flops(spec: ModelSpec, g: Geometry, n: int) -> float:
    """One decoder layer over n tokens: 2 per linear weight per token + causal attention (QK^T and AV,
    n^2 / 2 pairs each, 2 FLOPs per multiply-add, heads x head dim)."""
    p_lin = sum(o * i for o, i in _linear_shapes(spec).values())
    return 2.0 * p_lin * n + 2.0 * g.heads * g.head_dim * n * n


def plan_flops(
    job: str,
    spec: ModelSpec,
    samples: Sequence[SampleShape],
    sens_subset: Sequence[int] | None,
    method: str = "awq",
) -> dict[str, float]:
    g = Geometry.from_spec(spec)
    L = g.llm_layers
    lin = _linear_shapes(spec)
    out: dict[str, float] = {}
    vis = vision_flops_per_tile(g) if g.vit_layers else 0.0
    out["vision"] = vis * sum(s.tiles for s in samples)
    out["capture"] = L * sum(_layer_flops(spec, g, s.tokens) for s in samples)
    if sens_subset:
        sub = [samples[j] for j in sens_subset]
        steps = sensitivity_schedule(L)
        forwards = sum(st.last - st.first for st in steps if isinstance(st, Forward))
        backwards = sum(isinstance(st, Backward) and st.layer > 0 for st in steps)
        per_layer = sum(_layer_flops(spec, g, s.tokens) for s in sub)
        # the schedule's forwards (the pass + recomputed segments) + backward (~2 forwards) of layers
        # 1..L-1; lm_head fwd + bwd
        head = 3 * 2.0 * g.vocab * g.hidden * sum(s.response for s in sub)
        out["sensitivity"] = per_layer * (forwards + 2 * backwards) + head + vis * sum(s.tiles for s in sub)
    if job == "awq":
        n_tok = sum(s.tokens for s in samples)
        t = min(LOSS_TOKENS, n_tok)
        q, kv = g.heads * g.head_dim, g.kv_heads * g.head_dim
        ctx_mean = sum(s.tokens**2 for s in samples) / max(n_tok, 1) / 2  # keys per loss token, on average

        def attention(ctx: float, tq: float) -> float:  # AttentionAtTokens: K, V over ctx, Q and SDPA at tq
            return 2 * ctx * g.hidden * 2 * kv + 2 * tq * g.hidden * q + 4 * tq * ctx_mean * q

        mlp = lambda tq: 2.0 * tq * 3 * g.hidden * g.ffn  # noqa: E731
        p_lin = sum(o * i for o, i in lin.values())
        check = attention(n_tok, t) + 2 * t * q * g.hidden + mlp(t)  # one _layer_error
        search = check + QUANT_FLOPS_PER_WEIGHT * p_lin  # plain rounding
        if method == "awq":
            screen_ctx, ts = n_tok * SCREEN_FRACTION, min(SCREEN_TOKENS, t)
            cands, fin = SCALE_CANDIDATES, SCREEN_KEEP + 1
            scales = (
                cands * attention(screen_ctx, ts)
                + fin * attention(n_tok, t)  # attn_in
                + (cands * mlp(ts) + fin * mlp(t))  # mlp_in
                + (cands * ts + fin * t) * 2 * g.ffn * g.hidden  # up_down
                + (cands + fin) * QUANT_FLOPS_PER_WEIGHT * p_lin  # fake quantization of each candidate
            )
            clipped = sum(
                math.prod(s) for n, s in lin.items() if n not in ("self_attn.q_proj", "self_attn.k_proj")
            )
            clip = CLIP_GRID * clipped * (2 * 128 + QUANT_FLOPS_PER_WEIGHT)  # dw^T G dw per candidate
            features = attention(n_tok, t) + mlp(t) + 2 * t * (2 * g.hidden + q + g.ffn) * 128
            search = features + scales + clip + 2 * check + 2 * QUANT_FLOPS_PER_WEIGHT * p_lin
        out["search"] = L * search
    return out


# -- this machine ------------------------------------------------------------------------------------------
def mem_available() -> int | None:
    """/proc/meminfo MemAvailable in bytes (what can be allocated without swapping); None when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def free_disk(path: Path | str) -> tuple[Path, int | None]:
    """(nearest existing ancestor of `path`, its free bytes)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return p, shutil.disk_usage(p).free
    except OSError:
        return p, None


def measure_cpu_gflops() -> float:
    """fp32 GEMM rate of this machine (r1v_quant/roofline.measure_matmul, kept well under a second)."""
    from r1v_quant.plan.roofline import measure_matmul

    return float(measure_matmul(n=1024, repeats=3)["fp32_gflops"])


def measure_cuda_gflops(n: int = 4096, repeats: int = 3) -> float:
    """fp32 GEMM rate of the CUDA device (torch's default: TF32 off unless the user enabled it)."""
    import torch

    a, b = torch.randn(n, n, device="cuda"), torch.randn(n, n, device="cuda")
    a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return 2 * n**3 / statistics.median(times) / 1e9


# -- the plan ------------------------------------------------------------------------------------------------
def awq_disk_bytes(spec: ModelSpec, group_size: int = 128) -> tuple[int, int]:
    """(packed layers in the work folder, the final checkpoint): per linear qweight (4 bits per weight),
    scales (fp16 per group and output) and qzeros (4 bits per group and output); everything else fp16."""
    lin = _linear_shapes(spec)
    packed = sum(o * i // 2 + (i // group_size) * o * 2 + (i // group_size) * o // 2 for o, i in lin.values())
    packed += 2 * (_params(spec.llm_layer_shapes()) - sum(o * i for o, i in lin.values()))
    layers = packed * spec.llm.num_layers
    rest = _params(spec.tensor_shapes()) - spec.llm.num_layers * _params(spec.llm_layer_shapes())
    return layers, layers + 2 * rest


def make_plan(
    job: str,
    spec: ModelSpec,
    samples: Sequence[SampleShape],
    sens_subset: Sequence[int] | None,
    *,
    budget: int | str | None,
    spill_dir: Path | str,
    cb: int = 4,
    sb: int = 2,
    method: str = "awq",
    device: str = "cpu",
    propagate_quant: bool = False,
    available: int | None | str = "measure",
    gflops: dict[str, float] | None = None,
    group_size: int = 128,
    base_rss: int | None = None,
) -> JobPlan:
    """Plan a job; `budget` is "auto", bytes, or None (no budget). `available` / `gflops`: for tests and the
    README's 38B figures (default: measured on this machine). `base_rss`: the process's resident memory
    now (interpreter, torch, tokenizer, the rendered set), else memory_model.TORCH_CPU_BASE."""
    g = Geometry.from_spec(spec)
    avail = mem_available() if available == "measure" else available
    assert not isinstance(avail, str)
    base_kw = {} if base_rss is None else {"base": base_rss, "base_note": "this process when planned (VmRSS)"}
    terms = plan_terms(job, spec, samples, sens_subset, cb=cb, sb=sb, method=method, device=device, **base_kw)
    free_at, free = free_disk(spill_dir)
    # the peak with an empty store: what must fit whatever the budget
    working = peaks(terms)
    working_cpu = working.get("cpu", 0)
    margin = max(SAFETY_MIN, int(SAFETY_FRACTION * avail)) if avail else 0
    replay = dict(cb=cb, propagate_quant=propagate_quant, vit_depth=spec.select_layer % (g.vit_layers + 1))
    unbudgeted = replay_store(job, g, samples, sens_subset, None, **replay)
    notes = []
    if budget == "auto":
        source = "auto"
        if avail is None:
            resolved: int | None = None
            notes.append("MemAvailable unknown: no budget, nothing spills")
        else:
            resolved = max(0, avail - margin - working_cpu)
    elif budget is None:
        source, resolved = "none", None
    else:
        source, resolved = "size", int(budget)
    st = unbudgeted if resolved is None else replay_store(job, g, samples, sens_subset, resolved, **replay)
    # each phase's working set on top of the store's RAM in that phase
    cache_terms = [
        Term(f"cache.{ph}", b, "cpu", ph, "cached activations in RAM (store replay)")
        for ph, b in st.phase_peak.items()
        if b
    ]
    all_terms = terms + cache_terms
    by_pool = peaks(all_terms)
    resident = sum(t.bytes for t in all_terms if t.pool == "cpu" and t.phase == "resident")
    phase_totals: dict[str, int] = {}
    for t in all_terms:
        if t.pool == "cpu" and t.phase != "resident":
            phase_totals[t.phase] = phase_totals.get(t.phase, 0) + t.bytes
    peak_phase = max(phase_totals, key=lambda k: phase_totals[k]) if phase_totals else "resident"
    layers_disk, out_disk = awq_disk_bytes(spec, group_size) if job == "awq" else (0, 0)
    if job == "awq":  # finished layers pile up beside the spill; at assembly they meet the checkpoint
        output_disk = layers_disk + out_disk
        need = max(st.peak_disk + layers_disk, output_disk)
    else:  # stats.safetensors (the calibrate.stats term's tensors) is written after the spill is gone
        output_disk = next(t.bytes for t in terms if t.name == "calibrate.stats")
        need = max(st.peak_disk, output_disk)
    peak = max(by_pool.get("cpu", resident), resident)
    if avail is not None and peak > avail and source != "auto":
        notes.append(
            f"the predicted peak {peak / 1e9:.1f} GB exceeds the {avail / 1e9:.1f} GB available: expect "
            "swapping or an out-of-memory kill (--max-memory auto fits the budget to this machine)"
        )
    flops = plan_flops(job, spec, samples, sens_subset, method)
    rates = dict(gflops) if gflops is not None else {"cpu": measure_cpu_gflops()}
    if device == "cuda" and "gpu" not in rates:
        rates["gpu"] = measure_cuda_gflops()
    # on cuda every pass runs on the GPU (vision, capture, sensitivity, search); on the CPU a given "gpu"
    # rate times the search only, as before
    on_gpu = set(flops) if device == "cuda" else {"search"}
    seconds = 0.0
    for k, f in flops.items():
        on = "gpu" if k in on_gpu and "gpu" in rates else "cpu"
        seconds += f / (rates[on] * 1e9 * (PHASE_EFFICIENCY.get(k, 1.0) if on == "cpu" else 1.0))
    plan = JobPlan(
        job=job,
        terms=all_terms,
        activation_bytes=unbudgeted.peak_mem,
        cache_peak_bytes=st.peak_mem,
        budget=resolved,
        budget_source=source,
        spill_bytes=st.peak_disk,
        output_disk_bytes=output_disk,
        disk_need_bytes=need,
        spill_dir=str(free_at),
        free_disk_bytes=free,
        available_bytes=avail,
        margin_bytes=margin,
        working_peak=working_cpu,
        peak_bytes=peak,
        peak_phase=peak_phase,
        gpu_peak_bytes=by_pool.get("gpu"),
        flops=flops,
        gflops=rates,
        seconds=seconds,
        notes=notes,
        device=device,
    )
    return plan


def check_plan(plan: JobPlan) -> None:
    """Refuse, in one line, what cannot finish: the working set alone over the available memory, or the
    spill (+ the job's outputs) over the free disk at the spill location."""
    gb = human_bytes  # "1.2 GB", "340.0 MB": a small run's sizes do not print as "0.0 GB"
    if plan.available_bytes is not None and plan.working_peak > plan.available_bytes:
        phase = max(
            (t for t in plan.terms if t.pool == "cpu" and not t.name.startswith("cache.")),
            key=lambda t: t.bytes,
        )
        raise R1VError(
            f"this {plan.job} run needs about {gb(plan.working_peak)} of RAM besides cached activations "
            f"(largest: {phase.name} {gb(phase.bytes)}), only {gb(plan.available_bytes)} is available; "
            "use fewer --samples, a shorter --seq-len"
            + (" or --device cuda" if plan.device != "cuda" else "")
        )
    need = plan.disk_need_bytes
    if plan.free_disk_bytes is not None and need > plan.free_disk_bytes:
        raise R1VError(
            f"not enough disk at {plan.spill_dir}: the run would spill {gb(plan.spill_bytes)} of activations"
            + f" and write {gb(plan.output_disk_bytes)} of outputs (at most {gb(need)} at once)"
            + f", {gb(plan.free_disk_bytes)} is free; free space there, raise --max-memory, or use fewer "
            "--samples / a shorter --seq-len"
        )


def shapes_of(rendered: Sequence[Any]) -> list[SampleShape]:
    """SampleShape of each calibration.render.RenderedSample."""
    from r1v_quant.calibration.render import RESPONSE

    return [SampleShape(r.length, sum(r.tiles), r.count(RESPONSE)) for r in rendered]


def stored_bytes(ckpt: Any) -> int:
    """Bytes per element of the checkpoint's 16-bit tensors (those the jobs load and cast)."""
    from r1v_quant.calibration.capture import EMBED_NAME

    try:
        return BYTES.get(str(ckpt.info(EMBED_NAME).dtype), 2)
    except Exception:  # noqa: BLE001 - a layout without the table: assume 16-bit
        return 2


def plan_job(
    job: str,
    prep: Any,  # calibration.pipeline.Prepared
    *,
    budget: int | str | None,
    spill_dir: Path | str,
    sensitivity: bool,
    method: str = "awq",
    device: str = "cpu",
    propagate_quant: bool = False,
    group_size: int = 128,
) -> JobPlan:
    """The plan for a prepared job (samples rendered, nothing heavy done yet)."""
    from r1v_quant.calibration.sensitivity import sensitivity_subset

    subset = sensitivity_subset([r.modality for r in prep.rendered]) if sensitivity else None
    return make_plan(
        job,
        prep.ckpt.spec,
        shapes_of(prep.rendered),
        subset,
        budget=budget,
        spill_dir=spill_dir,
        sb=stored_bytes(prep.ckpt),
        method=method,
        device=device,
        propagate_quant=propagate_quant,
        group_size=group_size,
        base_rss=current_rss_bytes(),
    )


def current_rss_bytes() -> int | None:
    """VmRSS of this process (Linux); None elsewhere."""
    return proc_status("VmRSS")


def peak_rss_bytes() -> int:
    """This process's peak resident set: VmHWM on Linux (the address space since exec: getrusage's
    ru_maxrss also keeps the peak of the process that forked this one, so a run started by a large parent
    would report the parent's peak), else ru_maxrss (KiB on Linux, bytes on macOS)."""
    import resource
    import sys

    hwm = proc_status("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)
