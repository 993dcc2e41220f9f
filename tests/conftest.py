"""Shared fixtures: the tiny replica is built once per test session (a few minutes on 2 cores).

Set R1V_TEST_CACHE=DIR to reuse replicas across sessions while developing: they are keyed by the source of
every module that shapes them, so an edit there rebuilds. CI leaves it unset and builds fresh.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Read by the OpenMP runtime when torch loads (before any test imports it). By default its idle threads
# spin; on 2 cores shared with other work a 2-thread training step then ran 10x slower (4.0 s vs 0.43 s
# with PASSIVE, same gradient bytes): the threads wait for each other's time slices. Set it to override.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
# Modules whose code decides the replica's bytes.
_REPLICA_SOURCES = [
    "replica/build.py", "replica/train.py", "model/tiny_tokenizer.py", "data/synthdata.py", "model/llm.py",
    "model/vision.py", "model/reference.py", "model/spec.py", "model/checkpoint.py", "model/prompts.py",
    "model/preprocess.py", "model/tokenizer.py", "util/atomic.py", "model/norms.py",
]  # fmt: skip


def _build(tmp_path_factory: pytest.TempPathFactory, name: str, **opts: object) -> Path:
    from r1v_quant.replica.build import TinyOptions, build_tiny

    cache = os.environ.get("R1V_TEST_CACHE")
    if not cache:
        out = tmp_path_factory.mktemp(name) / name
        build_tiny(out, TinyOptions(**opts))  # type: ignore[arg-type]
        return out
    h = hashlib.sha256(repr(sorted(opts.items())).encode())
    for f in _REPLICA_SOURCES:
        h.update((ROOT / "r1v_quant" / f).read_bytes())
    out = Path(cache) / f"{name}-{h.hexdigest()[:16]}"
    out.parent.mkdir(parents=True, exist_ok=True)
    # one builder per replica; concurrent sessions wait for it instead of building the same thing
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not out.is_dir():
            build_tiny(out, TinyOptions(**opts))  # type: ignore[arg-type]
    return out


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default trained replica: flavour r1v, layernorm ViT (llama.cpp-comparable), seed 0."""
    return _build(tmp_path_factory, "r1v-tiny")


@pytest.fixture(scope="session")
def tiny_rms_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Untrained RMSNorm (InternViT-6B style) replica, flavour r1v3: fast, for layout/forward checks."""
    return _build(tmp_path_factory, "r1v3-tiny", flavor="r1v3", vit="rms", steps=0, seed=1)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA
