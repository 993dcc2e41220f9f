"""Calibration: multimodal long-reasoning sets, rendering, and layer-by-layer activation statistics.

Installed as `r1v_quant.calibration`. What quantizers call:
  calibrate(...)              -> writes stats.safetensors + report.json, returns the report
  CalibrationStats.load(dir)  -> per-linear mean_abs / sum_sq / max_abs / count by modality
  prepare(...) + iter_layers(...) -> one LayerCapture per decoder layer (layer, inputs, outputs, stats)
"""

from r1v_quant.calibration.capture import LayerCapture, iter_layers, load_decoder_layer
from r1v_quant.calibration.dataset import CalibrationSet, Sample, Turn, write_set
from r1v_quant.calibration.default_set import build_default_set
from r1v_quant.calibration.loaders import load_set
from r1v_quant.calibration.pipeline import Prepared, calibrate, prepare
from r1v_quant.calibration.render import MODALITIES, CalibrationWarning, RenderedSample, Renderer
from r1v_quant.calibration.stats import LINEAR_GROUPS, CalibrationStats, LayerStats
from r1v_quant.calibration.store import ActivationStore, parse_size

__all__ = [
    "LINEAR_GROUPS",
    "MODALITIES",
    "ActivationStore",
    "CalibrationSet",
    "CalibrationStats",
    "CalibrationWarning",
    "LayerCapture",
    "LayerStats",
    "Prepared",
    "RenderedSample",
    "Renderer",
    "Sample",
    "Turn",
    "build_default_set",
    "calibrate",
    "iter_layers",
    "load_decoder_layer",
    "load_set",
    "parse_size",
    "prepare",
    "write_set",
]
