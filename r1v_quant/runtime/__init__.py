"""Engines that run a model: the torch reference, llama.cpp (+ libmtmd for images), ONNX Runtime, and the
request/answer protocol they share."""
