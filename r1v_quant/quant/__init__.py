"""Quantization algorithms: activation-aware scale and clip search (the math; data movement lives in
calibration)."""
