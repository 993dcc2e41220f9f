"""CLI: commands run end to end on the replica; user mistakes are one line, exit 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from r1v_quant.data.synthdata import render_shape


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "r1v_quant.cli.main", *args], capture_output=True, text=True, timeout=600
    )


def test_inspect_json(tiny_dir: Path) -> None:
    r = run("inspect", str(tiny_dir), "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["flavor"] == "r1v" and set(data["dtypes"]) == {"BF16"}
    assert set(data["params"]) >= {"vision", "projector", "decoder", "embeddings"}


def test_inspect_text(tiny_dir: Path) -> None:
    r = run("inspect", str(tiny_dir))
    assert r.returncode == 0 and "InternViT" in r.stdout and "awq-int4-g128" in r.stdout


def test_generate_with_image(tiny_dir: Path, tmp_path: Path) -> None:
    img = tmp_path / "g.png"
    render_shape("green", "circle").save(img)
    r = run(
        "generate",
        str(tiny_dir),
        "--image",
        str(img),
        "-p",
        "What shape is in the image?",
        "--json",
        "--max-new-tokens",
        "40",
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["image_tiles"] == 1 and "circle" in out["answer"]


@pytest.mark.parametrize(
    "args,needle",
    [
        (("inspect", "/nonexistent/model"), "no such directory"),
        (("generate", "{tiny}", "-p", "hi", "--image", "/nonexistent.png"), "nonexistent.png"),
        (("tiny", "{tiny}"), "not empty"),
    ],
)
def test_user_errors_are_one_line(args: tuple[str, ...], needle: str, tiny_dir: Path) -> None:
    r = run(*(a.format(tiny=tiny_dir) for a in args))
    assert r.returncode == 2
    assert "Traceback" not in r.stderr and needle in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_corrupt_image_is_one_line(tiny_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    r = run("generate", str(tiny_dir), "-p", "hi", "--image", str(bad))
    assert r.returncode == 2 and "Traceback" not in r.stderr
