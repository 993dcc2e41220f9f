"""Per-layer modality sensitivity: what an output error on a vision or a language token costs the answer.

MBQ's measurement, one code path for both exporters: `awq --modality-weights auto` measures it inside its
run, `calibrate` measures it once and stores it as `sensitivity.json` next to the statistics, and
`gguf --calib DIR --modality-weights auto` reads it from there. Per decoder layer: the mean |dL/dh|² of the
response tokens' cross-entropy w.r.t. the layer's output, per token modality (capture.layer_sensitivity),
on a fixed subset of SENSITIVITY_SAMPLES calibration samples (awq.screen_samples: evenly spaced among the
samples with and without images); prompt and response pooled into one language weight
(awq.language_vision_sensitivity).

`sensitivity.json` (FORMAT):
  format         "r1v-quant-sensitivity/1"
  set_hash       the calibration set's content hash (must match stats.safetensors)
  model          the checkpoint it was measured on
  modalities     ["vision", "prompt", "response"]: the column order below
  samples        indices into the calibration set of the measured subset; sample_ids their ids
  token_counts   tokens per modality in that subset
  measured       (layers × 3) raw mean |dL/dh|² per modality
  weights        (layers × 3) per-token loss weight by modality: what `--modality-weights auto` uses
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from r1v_quant.calibration.render import MODALITIES
from r1v_quant.quant.awq_search import language_vision_sensitivity, screen_samples
from r1v_quant.util.atomic import write_text_atomic
from r1v_quant.util.errors import R1VError

SENSITIVITY_SAMPLES = 8  # calibration samples whose answer-loss gradients weigh the modalities
SENSITIVITY_FILE = "sensitivity.json"
FORMAT = "r1v-quant-sensitivity/1"


@dataclass
class Sensitivity:
    weights: torch.Tensor  # (layers, 3) float32 per-token weight by modality code (what `auto` uses)
    measured: torch.Tensor  # (layers, 3) float32 mean |dL/dh|² per modality
    token_counts: torch.Tensor  # (3,) tokens per modality in the measured subset
    samples: list[int]
    sample_ids: list[str]
    set_hash: str
    model: str = ""

    def to_json(self) -> dict[str, Any]:
        # float32 -> Python float is exact, so the weights read back bit-identical
        return {
            "format": FORMAT,
            "set_hash": self.set_hash,
            "model": self.model,
            "modalities": list(MODALITIES),
            "samples": list(self.samples),
            "sample_ids": list(self.sample_ids),
            "token_counts": [int(v) for v in self.token_counts.tolist()],
            "measured": self.measured.float().tolist(),
            "weights": self.weights.float().tolist(),
        }

    @classmethod
    def from_json(cls, data: Any, where: Path | str) -> Sensitivity:
        bad = f"{where}: not a valid sensitivity file"
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            fmt = data.get("format") if isinstance(data, dict) else None
            raise R1VError(f"{bad} (format {fmt!r}, expected {FORMAT!r})")
        if data.get("modalities") != list(MODALITIES):
            raise R1VError(f"{bad} (modalities {data.get('modalities')!r})")
        try:
            weights = torch.tensor(data["weights"], dtype=torch.float32)
            measured = torch.tensor(data["measured"], dtype=torch.float32)
            counts = torch.tensor(data["token_counts"], dtype=torch.float32)
            samples = [int(i) for i in data["samples"]]
            ids = [str(i) for i in data["sample_ids"]]
            set_hash = str(data["set_hash"])
        except (KeyError, TypeError, ValueError) as e:
            raise R1VError(f"{bad} ({type(e).__name__}: {e})") from None
        n = len(MODALITIES)
        if (
            weights.dim() != 2
            or weights.shape[1] != n
            or measured.shape != weights.shape
            or counts.shape != (n,)
        ):
            raise R1VError(f"{bad} (weights {tuple(weights.shape)}, expected (layers, {n}))")
        if not (torch.isfinite(weights).all() and (weights >= 0).all()):
            raise R1VError(f"{bad} (weights must be finite and non-negative)")
        return cls(weights, measured, counts, samples, ids, set_hash, str(data.get("model", "")))


def sensitivity_subset(masks: list[torch.Tensor]) -> list[int]:
    """The samples the sensitivity is measured on: SENSITIVITY_SAMPLES of them, spread over both kinds."""
    return screen_samples(masks, min(1.0, SENSITIVITY_SAMPLES / max(len(masks), 1)))


def measure_sensitivity(
    prep: Any,  # calibration.pipeline.Prepared (not imported: pipeline imports this module)
    store: Any,  # calibration.store.ActivationStore
    *,
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    device: torch.device | str = "cpu",
) -> Sensitivity:
    """Measure on the fixed subset of `prep`'s rendered samples (one layer resident, as `iter_layers`),
    computed on `device` (the cached activations stay in the host-side `store`)."""
    from r1v_quant.calibration.capture import layer_sensitivity

    picked = sensitivity_subset([r.modality for r in prep.rendered])
    subset = [prep.rendered[j] for j in picked]
    sens, counts = layer_sensitivity(
        prep.ckpt, prep.renderer, prep.cset, subset, store, dtype=dtype, progress=progress, device=device
    )
    return Sensitivity(
        weights=language_vision_sensitivity(sens, counts).float(),
        measured=sens.float(),
        token_counts=counts.float(),
        samples=picked,
        sample_ids=[r.id for r in subset],
        set_hash=prep.set_hash,
        model=str(Path(prep.ckpt.path).resolve()),
    )


def modality_sensitivities(
    prep: Any, store: Any, progress: bool, *, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """(layers, 3) per-modality weights for --modality-weights auto (what `awq` hands its search)."""
    return measure_sensitivity(prep, store, progress=progress, device=device).weights


def write_sensitivity(sens: Sensitivity, directory: Path | str) -> Path:
    """`directory/sensitivity.json`, written atomically (a reader never sees half a file)."""
    path = Path(directory) / SENSITIVITY_FILE
    write_text_atomic(path, json.dumps(sens.to_json(), indent=1) + "\n")  # ASCII: json escapes the rest
    return path


def read_sensitivity(
    directory: Path | str, *, num_layers: int | None = None, set_hash: str | None = None
) -> Sensitivity | None:
    """The stored sensitivity of a calibration directory; None when it has none (older `calibrate`)."""
    path = Path(directory) / SENSITIVITY_FILE
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise R1VError(f"{path}: cannot read sensitivity ({e})") from None
    sens = Sensitivity.from_json(data, path)
    if set_hash is not None and sens.set_hash != set_hash:
        raise R1VError(
            f"{path}: measured on calibration set {sens.set_hash[:19]}, the statistics on {set_hash[:19]} "
            "(files from different runs? re-run `r1v-quant calibrate`)"
        )
    if num_layers is not None and sens.weights.shape[0] != num_layers:
        raise R1VError(
            f"{path}: {sens.weights.shape[0]} decoder layers, the model has {num_layers} "
            "(from another model? run `r1v-quant calibrate` on this one)"
        )
    return sens
