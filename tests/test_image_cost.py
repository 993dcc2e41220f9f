"""Image cost on CPUs: the tile cap (`--max-tiles`) through every tiler, and the time to first token `plan`
puts beside each configuration whose vision tower runs on a CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from r1v_quant.cli.main import main
from r1v_quant.model.artifact import Geometry
from r1v_quant.model.presets import preset_spec
from r1v_quant.plan.image_cost import CPU_GFLOPS, check_max_tiles, tiles_per_image, ttft_estimate
from r1v_quant.plan.planner import format_plan, plan
from r1v_quant.plan.roofline import prefill_flops_per_token, vision_flops_per_tile
from r1v_quant.util.errors import R1VError

ROOT = Path(__file__).resolve().parents[1]


def test_tiles_per_image_keeps_the_thumbnail_rule() -> None:
    assert [tiles_per_image(n) for n in (1, 2, 6, 12)] == [1, 3, 7, 13]
    assert tiles_per_image(6, thumbnail=False) == 6
    check_max_tiles(None)
    for bad in (0, -3):
        with pytest.raises(R1VError, match=f"--max-tiles must be at least 1 \\(got {bad}\\)"):
            check_max_tiles(bad)


def test_internvit_6b_tile_costs_12_tflop() -> None:
    g = Geometry.from_spec(preset_spec("r1v-38b"))
    assert (
        11.5e12 < vision_flops_per_tile(g) < 12.5e12
    )  # 5.5 B matmul weights x 1,025 positions x 2 + attention
    assert 60e9 < prefill_flops_per_token(g, 1000) < 70e9  # ~2 x 32 B


def test_ttft_by_hand_and_its_scope() -> None:
    g = Geometry.from_spec(preset_spec("r1v-38b"))
    row = {"runtime": "llama.cpp", "llm_format": "Q4_K_M", "vision_format": "Q8_0", "llm_device": "cpu",
           "vision_device": "cpu"}  # fmt: skip
    t = ttft_estimate(g, row, tiles=5, question_tokens=64, cpu_gflops=100.0)
    assert t is not None and t["prefill_tokens"] == 5 * 256 + 64
    assert t["vision_s"] == pytest.approx(5 * vision_flops_per_tile(g) / 100e9, abs=0.05)
    assert t["prefill_s"] == pytest.approx(prefill_flops_per_token(g, 1344) * 1344 / 100e9, abs=0.05)
    assert t["ttft_s"] == pytest.approx(t["vision_s"] + t["prefill_s"], abs=0.1)
    # the decoder on a GPU: only the vision tower's time is counted; the tower on a GPU: not estimated
    assert ttft_estimate(g, {**row, "llm_device": "gpu"}, tiles=5)["prefill_s"] is None  # type: ignore[index]
    assert ttft_estimate(g, {**row, "vision_device": "gpu"}, tiles=5) is None


def test_plan_reports_ttft_on_cpu_devices() -> None:
    full = plan(preset="r1v-38b", devices=["cpu:32GB", "gpu:48GB"], ctx=4096)
    capped = plan(preset="r1v-38b", devices=["cpu:32GB"], ctx=4096, max_tiles=4)
    assert full["tiles"] == 13 and capped["tiles"] == 5 and capped["image_cost"]["max_tiles"] == 4
    cpu = full["devices"][0]["recommendations"][0]["ttft"]
    assert cpu["tiles"] == 13 and cpu["vision_s"] > 0 and cpu["prefill_s"] > 0
    small = capped["devices"][0]["recommendations"][0]["ttft"]
    assert small["ttft_s"] < cpu["ttft_s"] and small["prefill_tokens"] == 5 * 256 + 64
    gpu_best = full["devices"][1]["recommendations"][0]
    assert gpu_best["vision_device"] == "gpu" and gpu_best["ttft"] is None
    text = format_plan(full)
    assert "time to first token, one image of 13 tiles" in text and "vision" in text


def test_plan_cli_max_tiles_and_errors() -> None:
    r = CliRunner().invoke(main, ["plan", "--preset", "r1v-38b", "--device", "cpu:32GB", "--max-tiles", "1",
                                  "--cpu-gflops", "500", "--json"])  # fmt: skip
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert data["tiles"] == 1 and data["image_cost"]["cpu_gflops"] == 500
    assert "500 GFLOP/s" in data["devices"][0]["recommendations"][0]["ttft"]["vision_rate"]
    for args, needle in (
        (["--max-tiles", "0"], "--max-tiles must be at least 1"),
        (["--cpu-gflops", "0"], "--cpu-gflops must be positive"),
    ):
        r = CliRunner().invoke(main, ["plan", "--preset", "r1v-38b", "--device", "cpu:32GB", *args])
        assert r.exit_code == 2 and needle in r.stderr and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["chat", "--gguf", "nowhere", "--max-tiles", "0", "-p", "hi"],
        ["eval", "ppl", "--ref", "nowhere", "--cand", "nowhere", "--set", "heldout", "--max-tiles", "0"],
        [
            "eval",
            "bench",
            "--ref",
            "nowhere",
            "--cand",
            "nowhere",
            "--bench",
            "builtin:tiny",
            "--max-tiles",
            "-1",
        ],
    ],
)
def test_max_tiles_below_one_is_a_one_line_error(args: list[str]) -> None:
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 2, r.output
    assert "--max-tiles must be at least 1" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_cpu_rates_are_the_benchmark_s() -> None:
    """The rates the planner uses are the ones bench/vision_cost.py measured (when its result is here)."""
    path = ROOT / "bench" / "results" / "vision_cost.json"
    if not path.is_file():
        pytest.skip("bench/results/vision_cost.json is not present")
    measured = json.loads(path.read_text())["vit6b"]["scaled"]["backends"]
    for name, gflops in CPU_GFLOPS.items():
        assert gflops == pytest.approx(measured[name]["unloaded_gflops_per_s"], rel=0.01), name


def test_torch_backend_caps_the_tiles(tiny_dir: Path) -> None:
    """eval's torch backend and build_inputs tile a 2:1 picture as 2 x 1 + thumbnail, or as one tile."""
    from r1v_quant.data.synthdata import render_shape
    from r1v_quant.evaluate.backend_protocol import GenRequest
    from r1v_quant.evaluate.backends import TorchBackend
    from r1v_quant.model.artifact import resolve_artifact
    from r1v_quant.runtime.options import RuntimeOptions

    wide = render_shape("red", "circle", (896, 448))
    art = resolve_artifact(tiny_dir)
    lengths = {}
    for cap in (None, 1):
        be = TorchBackend(art, RuntimeOptions(torch_device="cpu", max_tiles=cap))
        embeds, ids = be._embeds(GenRequest("<image>\nWhat colour is the shape?", [wide], 0))
        lengths[cap] = len(ids)
        assert embeds.shape[0] == len(ids)
        be.close()
    assert lengths[None] - lengths[1] == 2 * 256  # 3 tiles vs 1, 256 tokens each
