"""`eval ppl`: perplexity of the reference and each candidate on identical token windows, and llama.cpp-style
KL divergence of each candidate against the reference.

Windows (r1v_quant.data.evalset): `heldout` = generated text problems and questions about rendered pictures in
the model's template, scored on the answer tokens (so "image" windows measure what the model says after
seeing the image); a text file = llama-perplexity chunks (second half scored). Token ids come from the
reference's tokenizer; every candidate's tokenizer is checked to agree.

Models are evaluated one at a time. The reference's log-probabilities at the scored positions are kept in
a temporary folder (one memory-mapped .npy per window; float16 when float32 would pass `REF_F32_LIMIT`,
as llama.cpp's --kl-divergence-base file does), so candidates are compared without the reference loaded.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from r1v_quant.data.evalset import Window, heldout_windows, text_windows, window_targets
from r1v_quant.evaluate.backend_protocol import Backend
from r1v_quant.evaluate.metrics import concat_stats, summarize, token_stats
from r1v_quant.model.artifact import Artifact
from r1v_quant.runtime.options import RuntimeOptions
from r1v_quant.util.errors import R1VError

REF_F32_LIMIT = 4 * 1024**3  # bytes of stored reference log-probs above which float16 is used
SETS = ("heldout",)
KIND_ORDER = ("text", "image", "corpus")


@dataclass
class WindowSpec:
    """Which windows to score: a built-in set and/or a text file."""

    set_name: str | None = "heldout"
    text_file: Path | None = None
    ctx: int = 2048
    stride: int | None = None
    n_text: int = 16
    n_image: int = 16
    max_windows: int = 0  # text-file windows (0: all)
    max_tiles: int | None = None  # heldout images: tile cap (None: the checkpoint's)

    def describe(self) -> dict[str, Any]:
        return {
            "set": self.set_name,
            "text_file": str(self.text_file) if self.text_file else None,
            "ctx": self.ctx,
            "stride": self.stride or self.ctx,
            "n_text": self.n_text,
            "n_image": self.n_image,
            "max_tiles": self.max_tiles,
        }


def build_windows(ref: Artifact, ws: WindowSpec) -> list[Window]:
    """The scored windows in the reference's tokenization ("text", "image" and "corpus" kinds)."""
    from r1v_quant.model.prompts import get_chat_format
    from r1v_quant.model.spec import load_spec
    from r1v_quant.model.tokenizer import R1VTokenizer

    if ws.set_name is None and ws.text_file is None:
        raise R1VError("nothing to score: pass --text FILE and/or --set heldout")
    windows: list[Window] = []
    if ws.set_name is not None:
        if ws.set_name not in SETS:
            raise R1VError(f"unknown window set {ws.set_name!r} (known: {', '.join(SETS)})")
        windows += heldout_windows(
            ref.path, load_spec(ref.path), n_text=ws.n_text, n_image=ws.n_image, max_tiles=ws.max_tiles
        )
    if ws.text_file is not None:
        try:
            text = Path(ws.text_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise R1VError(f"cannot read --text {ws.text_file}: {e}") from None
        tok = R1VTokenizer.from_dir(ref.path)
        bos_text = get_chat_format(ref.flavor).bos
        bos = tok.token_to_id(bos_text) if bos_text else None
        for w in text_windows(tok.encode(text), ws.ctx, ws.stride, bos=bos, max_windows=ws.max_windows):
            w.kind = "corpus"
            windows.append(w)
    return windows


class RefStore:
    """The reference's log-probabilities at each window's scored positions, on disk, memory-mapped."""

    def __init__(self, windows: list[Window], vocab: int, dtype: str = "auto"):
        n_tokens = sum(int(w.score.sum()) for w in windows)
        if dtype == "auto":
            dtype = "float32" if n_tokens * vocab * 4 <= REF_F32_LIMIT else "float16"
        self.dtype = np.dtype(dtype)
        self.dir = Path(tempfile.mkdtemp(prefix="r1v-ref-logprobs-"))

    def put(self, i: int, logprobs: torch.Tensor) -> None:
        np.save(self.dir / f"{i}.npy", logprobs.float().numpy().astype(self.dtype))

    def get(self, i: int) -> torch.Tensor:
        return torch.from_numpy(np.load(self.dir / f"{i}.npy", mmap_mode="r").astype(np.float32))

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RefStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kinds(windows: list[Window]) -> list[str]:
    present = {w.kind for w in windows}
    return [k for k in KIND_ORDER if k in present] + sorted(present - set(KIND_ORDER))


def reference_pass(
    backend: Backend, windows: list[Window], store: RefStore, *, progress: bool = False
) -> dict[str, Any]:
    """Score the reference, keep its log-probs; returns its perplexity per kind (and "all")."""
    targets = window_targets(windows)
    nll: dict[str, list[torch.Tensor]] = {}
    for i, w in enumerate(
        tqdm(windows, desc=f"ppl {backend.artifact.name}", unit="win", disable=not progress)
    ):
        store.put(i, backend.logprobs(w))
        # from the stored values, exactly as candidate_pass reads them (so both report one reference PPL)
        lp = torch.log_softmax(store.get(i).double(), -1)
        nll.setdefault(w.kind, []).append(-lp.gather(-1, targets[i][:, None])[:, 0])
    out: dict[str, Any] = {}
    for kind in [*_kinds(windows), "all"]:
        parts = [t for k, v in nll.items() if kind in (k, "all") for t in v]
        x = torch.cat(parts)
        out[kind] = {"tokens": x.numel(), "ppl": float(torch.exp(x.mean()))}
    return out


def candidate_pass(
    backend: Backend, windows: list[Window], store: RefStore, *, progress: bool = False
) -> dict[str, dict[str, float]]:
    """KLD / Δp / top-token / PPL statistics of a candidate against the stored reference, per kind and all."""
    targets = window_targets(windows)
    per: dict[str, list[dict[str, torch.Tensor]]] = {}
    for i, w in enumerate(
        tqdm(windows, desc=f"ppl {backend.artifact.name}", unit="win", disable=not progress)
    ):
        cand = backend.logprobs(w)
        ref = store.get(i)
        if cand.shape != ref.shape:
            raise R1VError(
                f"{backend.artifact.path}: logits of shape {tuple(cand.shape)} where the reference gives "
                f"{tuple(ref.shape)}"
            )
        per.setdefault(w.kind, []).append(token_stats(ref, cand, targets[i]))
    out = {kind: summarize(concat_stats(per[kind])) for kind in _kinds(windows)}
    out["all"] = summarize(concat_stats([s for k in per for s in per[k]]))
    return out


@dataclass
class ModelRun:
    """Everything measured on one model while it is loaded."""

    artifact: Artifact
    ppl: dict[str, Any] = field(default_factory=dict)  # reference: per-kind ppl; candidate: summaries
    bench: list[Any] = field(default_factory=list)


def n_ctx_for(windows: list[Window], gen_budget: int = 0, cap: int | None = None) -> int:
    """llama.cpp context size that fits the longest window and a prompt plus the generation budget, at
    most `cap` (the model's trained context) for the generation part: an answer's budget then shrinks to
    what the context leaves after its prompt."""
    longest = max((len(w.input_ids) for w in windows), default=0)
    gen = 4096 + gen_budget if gen_budget else 0
    if cap:
        gen = min(gen, cap)
    return max(longest, gen, 512)


def evaluate_models(
    ref: Artifact,
    cands: list[Artifact],
    windows: list[Window],
    *,
    per_model: Callable[[Backend, bool], list[Any]] | None = None,
    gen_budget: int = 0,
    runtime: RuntimeOptions | None = None,
    ref_dtype: str = "auto",
    progress: bool = False,
) -> list[ModelRun]:
    """Open each model in turn (reference first), score the windows and run `per_model(backend, is_ref)`
    (the benchmark) while it is loaded. Returns one ModelRun per model, the reference first."""
    from r1v_quant.evaluate.backends import check_runtime_tokenizer, open_backend

    n_ctx = n_ctx_for(windows, gen_budget, ref.spec.llm.max_position_embeddings if ref.spec else None)
    runs: list[ModelRun] = []
    with RefStore(windows, ref.vocab, ref_dtype) as store:
        for k, art in enumerate([ref, *cands]):
            backend = open_backend(art, n_ctx=n_ctx, runtime=runtime)
            try:
                if k:
                    check_runtime_tokenizer(ref, backend)
                run = ModelRun(art)
                if windows:
                    run.ppl = (reference_pass if k == 0 else candidate_pass)(
                        backend, windows, store, progress=progress
                    )
                if per_model is not None:
                    run.bench = per_model(backend, k == 0)
                runs.append(run)
            finally:
                backend.close()
    return runs


def ppl_report(ref_run: ModelRun, cand_runs: list[ModelRun], windows: list[Window], ws: WindowSpec) -> dict:
    kinds = _kinds(windows)
    return {
        "windows": {
            **ws.describe(),
            **{k: sum(w.kind == k for w in windows) for k in kinds},
        },
        "reference": {**ref_run.artifact.describe(), "ppl": ref_run.ppl},
        "candidates": [{**r.artifact.describe(), "kinds": r.ppl} for r in cand_runs],
    }


def format_ppl(report: dict) -> str:
    """A llama-perplexity-like text summary: one block per candidate."""
    ref = report["reference"]
    lines = [f"reference {ref['artifact']} ({ref['backend']}, {ref['quant']})"]
    for kind, v in ref["ppl"].items():
        lines.append(f"  PPL {kind:<6} {v['ppl']:10.4f}   ({v['tokens']} tokens)")
    for c in report["candidates"]:
        lines.append("")
        lines.append(
            f"candidate {c['artifact']} ({c['backend']}, {c['quant']}, {c['size_bytes'] / 1e6:.1f} MB)"
        )
        for kind, s in c["kinds"].items():
            lines.append(
                f"  [{kind}] tokens {s['tokens']}  PPL {s['ppl_cand']:.4f} ± {s['ppl_cand_stderr']:.4f}  "
                f"ratio {s['ppl_ratio']:.4f} ± {s['ppl_ratio_stderr']:.4f}"
            )
            lines.append(
                f"      KLD mean {s['kld_mean']:.6f} ± {s['kld_stderr']:.6f}  median {s['kld_median']:.6f}  "
                f"p99 {s['kld_p99']:.6f}  p99.9 {s['kld_p999']:.6f}  max {s['kld_max']:.6f}"
            )
            lines.append(
                f"      same top {s['same_top_pct']:.2f} ± {s['same_top_stderr']:.2f} %  "
                f"Δp mean {s['dp_mean_pct']:+.3f} ± {s['dp_mean_stderr']:.3f} %  "
                f"RMS {s['dp_rms_pct']:.3f} %  p1 {s['dp_p1_pct']:+.3f}  p99 {s['dp_p99_pct']:+.3f} %"
            )
    return "\n".join(lines)
