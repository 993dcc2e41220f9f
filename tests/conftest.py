"""Shared fixtures: the tiny replica is built once per test session (about a minute on 2 cores)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default trained replica: flavour r1v, layernorm ViT (llama.cpp-comparable), seed 0."""
    from r1v_quant.tiny import TinyOptions, build_tiny

    out = tmp_path_factory.mktemp("tiny") / "r1v-tiny"
    build_tiny(out, TinyOptions())
    return out


@pytest.fixture(scope="session")
def tiny_rms_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained RMSNorm (InternViT-6B style) replica, flavour r1v3: fast, for layout/forward checks."""
    from r1v_quant.tiny import TinyOptions, build_tiny

    out = tmp_path_factory.mktemp("tiny-rms") / "r1v3-tiny"
    build_tiny(out, TinyOptions(flavor="r1v3", vit="rms", steps=0, seed=1))
    return out


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
