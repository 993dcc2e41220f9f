"""bench/gpu_check.py in its CPU mode: every step the CUDA run takes (calibrate, awq, eval in bfloat16 vs
float32, profile, GGUF through llama.cpp) on the small replica, with its comparisons and its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_cpu_mode(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--work", str(tmp_path),
         "--json", "--no-save"],
        capture_output=True, text=True, cwd=ROOT, timeout=1200,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout)
    assert res["passed"] and res["device"] == "cpu" and res["size"] == "small"
    checks = res["checks"]
    assert set(checks) == {"calibrate", "awq", "eval", "profile", "llama.cpp"}
    # both passes ran every step, each in its own process
    for step in ("calibrate", "awq", "eval", "profile"):
        assert {f"{step}/reference", f"{step}/device"} <= set(res["seconds"])
    assert checks["calibrate"]["tensors"] > 0 and checks["awq"]["tensors"] > 0
    # the device pass's eval ran in bfloat16, the reference's in float32: different numbers, within tolerance
    assert res["steps"]["device"]["eval"]["runtime"]["torch_dtype"] == "bfloat16"
    assert res["steps"]["reference"]["eval"]["runtime"]["torch_dtype"] == "float32"
    assert 0 < checks["eval"]["ref_ppl_rel_diff"] <= res["tolerances"]["ref_ppl_rel"]
    if "skipped" not in checks["llama.cpp"]:
        assert "not run" in checks["llama.cpp"]["offload"] and checks["llama.cpp"]["ppl"]["reference"]
