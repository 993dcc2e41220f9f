"""Fault injection: every probe of issue #19, run the way a hostile user would.

Each case asserts the exit code, exactly one `error:` line (or the right output), no traceback, and that
nothing half-written or mixed is left under a final name. The model is an untrained replica built once
for the module (seconds); each corruption works on a copy. Commands run in-process through the real CLI
(`r1v_quant.cli.main`) where that is enough, and as subprocesses for signals, concurrency and file systems
(tmpfs in a private mount namespace via `unshare`, skipped where the machine does not allow it).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from PIL import Image
from safetensors.torch import load_file, save_file

from r1v_quant.cli.main import main
from r1v_quant.model.checkpoint import INDEX_NAME
from r1v_quant.util.outputs import FOLDER_LOCK, LOCK_SUFFIX, claim_output

LLM_Q = "language_model.model.layers.1.self_attn.q_proj.weight"
VIT_FC = "vision_model.encoder.layers.0.mlp.fc1.weight"
CLI = [sys.executable, "-m", "r1v_quant.cli.main"]
needs_gguf = pytest.mark.skipif(
    not all(_m in sys.modules or __import__("importlib").util.find_spec(_m) for _m in ("gguf", "llama_cpp")),
    reason="needs the gguf extra (gguf, llama-cpp-python)",
)


# -- fixtures and helpers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained replica (random weights: every probe here is about files, not answers)."""
    from r1v_quant.replica.build import TinyOptions, build_tiny

    out = tmp_path_factory.mktemp("faults") / "m"
    build_tiny(out, TinyOptions(steps=0))
    return out


def copy_model(model: Path, dst: Path) -> Path:
    shutil.copytree(model, dst)
    return dst


def cli(*args: object) -> Result:
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error(r: Result | subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit `code`, stderr ending in exactly one `error:` line holding every needle, no traceback."""
    if isinstance(r, Result):
        rc, err = r.exit_code, r.stderr
        assert isinstance(r.exception, SystemExit), f"escaped: {r.exception!r}\n{r.output}"
    else:
        rc, err = r.returncode, r.stderr
    assert rc == code, f"exit {rc}, expected {code}:\n{err}"
    assert "Traceback" not in err and "Exception ignored" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and err.rstrip().splitlines()[-1] == lines[0], err
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    return lines[0]


def finals(folder: Path) -> list[str]:
    """What a user would take for output in `folder`: everything but leftover dot-files is listed."""
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def hidden_leftovers(parent: Path) -> list[str]:
    """Staging folders, work folders, lock files and temp files of any run below `parent`."""
    return sorted(str(p.relative_to(parent)) for p in parent.rglob(".*"))


def shard_of(model: Path, name: str) -> Path:
    return model / json.loads((model / INDEX_NAME).read_text())["weight_map"][name]


def set_value(model: Path, name: str, index: tuple[int, ...], value: float) -> None:
    shard = shard_of(model, name)
    tensors = load_file(str(shard))
    tensors[name][index] = value
    save_file(tensors, str(shard), metadata={"format": "pt"})


def rewrite_header(shard: Path, edit: Callable[[dict[str, Any]], Any], data: bytes | None = None) -> None:
    """Replace a shard's header with `edit(header)` (any JSON), keeping (or replacing) the data."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    new = json.dumps(edit(header)).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(struct.pack("<Q", len(new)) + new + (raw[8 + n :] if data is None else data))


def gguf_args(model: Path, out: Path, *extra: object) -> list[object]:
    return ["gguf", model, "--out", out, "--position-fix", "shift", *extra]


# -- 1. output folders owned by one run ----------------------------------------------------------------------
@needs_gguf
def test_second_run_into_an_owned_folder_fails_at_once(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for folder, args in (
        (True, gguf_args(model, out)),
        (False, ["onnx", model, "--out", out, "--no-verify"]),
        (False, ["awq", model, "--out", out, "--samples", 1, "--seq-len", 256, "--method", "rtn"]),
        (False, ["calibrate", model, "--out", out, "--samples", 1, "--seq-len", 256]),
    ):
        t0 = time.perf_counter()
        with claim_output(out, folder=folder):  # another run holds it
            r = cli(*args)
        one_error(r, str(out), f"another r1v-quant run (pid {os.getpid()})", "choose another --out")
        assert time.perf_counter() - t0 < 10
        assert finals(out) == [] and hidden_leftovers(tmp_path) == [], args[0]


def test_staging_left_by_a_killed_run_is_cleared_by_the_next(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    dead = tmp_path / ".x.partial-dead"  # what SIGKILL leaves of atomic_dir's staging
    (dead / "sub").mkdir(parents=True)
    (dead / "vision.onnx").write_bytes(b"half")
    r = cli("onnx", model, "--out", tmp_path / "x", "--no-verify")
    assert r.exit_code == 0, r.output
    assert hidden_leftovers(tmp_path) == [] and (tmp_path / "x" / "vision.onnx").stat().st_size > 1000


@needs_gguf
def test_concurrent_gguf_runs_never_mix_two_models(model: Path, tmp_path: Path) -> None:
    """Two sources with the same folder name (so the same output names) race into one --out: one wins,
    the other fails with one line, and the folder holds one model's LLM and mmproj with their manifest."""
    a = copy_model(model, tmp_path / "a" / "m")
    b = copy_model(model, tmp_path / "b" / "m")
    set_value(b, LLM_Q, (0, 0), 0.5)  # different weights, same names
    set_value(b, VIT_FC, (0, 0), 0.5)
    out = tmp_path / "out"
    procs = [
        subprocess.Popen(
            [*CLI, *map(str, gguf_args(src, out, "--json"))],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for src in (a, b)
    ]
    results = [(p, *p.communicate(timeout=300)) for p in procs]
    winners = [i for i, (p, _, _) in enumerate(results) if p.returncode == 0]
    assert len(winners) == 1, [(p.returncode, err[-300:]) for p, _, err in results]
    loser = results[1 - winners[0]]
    one_error(subprocess.CompletedProcess([], loser[0].returncode, loser[1], loser[2]), str(out))
    src = (a, b)[winners[0]]
    manifest = json.loads((out / "gguf_export.json").read_text())
    assert {e["source"] for e in manifest["files"].values()} == {str(src.resolve())}
    ref = tmp_path / "ref"
    assert cli(*gguf_args(src, ref)).exit_code == 0
    for name in ("m-F16.gguf", "mmproj-m-F16.gguf"):
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    assert finals(out) == ["README.md", "gguf_export.json", "m-F16.gguf", "mmproj-m-F16.gguf"]
    assert hidden_leftovers(out) == []


# -- 2. completeness -----------------------------------------------------------------------------------------
@needs_gguf
def test_index_missing_a_decoder_tensor(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "m")
    index = json.loads((m / INDEX_NAME).read_text())
    del index["weight_map"][LLM_Q]  # the shard still holds it
    (m / INDEX_NAME).write_text(json.dumps(index))
    one_error(cli("inspect", m), "lacks tensor", LLM_Q)
    out = tmp_path / "out"
    one_error(cli(*gguf_args(m, out)), "lacks tensor", LLM_Q)
    assert not out.exists(), "an empty --out stays after a failed gguf"
    assert hidden_leftovers(tmp_path) == []


def test_extra_tensor_is_named(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "m")
    shard = shard_of(m, LLM_Q)
    tensors = load_file(str(shard))
    tensors["language_model.model.layers.1.self_attn.extra.weight"] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((m / INDEX_NAME).read_text())
    index["weight_map"]["language_model.model.layers.1.self_attn.extra.weight"] = shard.name
    (m / INDEX_NAME).write_text(json.dumps(index))
    one_error(
        cli("generate", m, "-p", "hi", "--max-new-tokens", 2), "self_attn.extra.weight", "does not describe"
    )


# -- 3. finiteness -------------------------------------------------------------------------------------------
@needs_gguf
@pytest.mark.parametrize(
    ("gguf_type", "value", "word"), [("F16", float("nan"), "NaN"), ("Q8_0", float("inf"), "+Inf")]
)
def test_nonfinite_llm_weight_stops_gguf(
    model: Path, tmp_path: Path, gguf_type: str, value: float, word: str
) -> None:
    m = copy_model(model, tmp_path / "m")
    set_value(m, LLM_Q, (3, 17), value)
    out = tmp_path / "out"
    one_error(
        cli(*gguf_args(m, out, "--type", gguf_type)), f"tensor '{LLM_Q}'", f"holds {word} at index [3, 17]"
    )
    assert not out.exists() and hidden_leftovers(tmp_path) == []


@needs_gguf
def test_q8_0_scale_overflow_is_refused(model: Path, tmp_path: Path) -> None:
    """A finite weight whose Q8_0 block scale (max / 127) would not fit float16 must not become Inf."""
    m = copy_model(model, tmp_path / "m")
    set_value(m, LLM_Q, (2, 40), 1e12)
    out = tmp_path / "out"
    one_error(cli(*gguf_args(m, out, "--type", "Q8_0")), LLM_Q, "Q8_0's float16 block scales", "[2, 32]")
    one_error(cli(*gguf_args(m, out, "--type", "F16")), LLM_Q, "beyond the float16 range")
    assert not out.exists()


@needs_gguf
def test_nan_in_vision_tower_stops_mmproj_and_onnx(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "m")
    set_value(m, VIT_FC, (5, 6), float("nan"))
    out = tmp_path / "out"
    # the language model is fine and gets written first, but nothing of it may be published alone
    one_error(cli(*gguf_args(m, out)), f"tensor '{VIT_FC}'", "holds NaN at index [5, 6]")
    assert not out.exists() and hidden_leftovers(tmp_path) == []
    pytest.importorskip("onnx")
    one_error(cli("onnx", m, "--out", tmp_path / "x"), f"tensor '{VIT_FC}'", "NaN")
    assert not (tmp_path / "x").exists() and hidden_leftovers(tmp_path) == []


def test_calibrate_refuses_nonfinite_weights_and_statistics(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "nan")
    set_value(m, LLM_Q, (0, 1), float("nan"))
    out = tmp_path / "calib"
    args = ["--out", out, "--samples", 1, "--seq-len", 256, "--no-sensitivity"]
    one_error(cli("calibrate", m, *args), f"tensor '{LLM_Q}'", "NaN")
    assert not out.exists()
    # awq names the tensor too (it used to name "the inputs of decoder layer 2"); the layer it finished
    # before is kept for --resume, nothing else
    q = tmp_path / "q"
    one_error(cli("awq", m, "--out", q, *args[2:6], "--method", "rtn"), f"tensor '{LLM_Q}'", "[0, 1]")
    work = tmp_path / ".q.awq-work"
    assert not q.exists() and sorted(p.name for p in (work / "layers").iterdir()) == ["00000.safetensors"]
    shutil.rmtree(work)
    # finite weights whose activations overflow: layer 1's output is huge, layer 2's inputs are not finite
    h = copy_model(model, tmp_path / "huge")
    set_value(h, "language_model.model.layers.1.mlp.down_proj.weight", (0, slice(None)), 3e38)
    line = one_error(cli("calibrate", h, *args), "calibration statistic", "decoder layer 2's")
    assert "input" in line and "tokens" in line
    assert not out.exists() and hidden_leftovers(tmp_path) == []


# -- 4. safetensors headers, containment, odd files ----------------------------------------------------------
def _overlap(h: dict[str, Any]) -> dict[str, Any]:
    names = sorted((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"])
    a, b = names[0], names[1]
    begin, (b0, b1) = h[a]["data_offsets"][0], h[b]["data_offsets"]
    h[b]["data_offsets"] = [begin, begin + b1 - b0]  # starts where `a` does
    return h


def _negative(h: dict[str, Any]) -> dict[str, Any]:
    k = next(k for k in h if k != "__metadata__")
    h[k]["data_offsets"] = [-8, h[k]["data_offsets"][1] - 8]
    return h


def _first(h: dict[str, Any], key: str) -> dict[str, Any]:
    del h[next(k for k in h if k != "__metadata__")][key]
    return h


@pytest.mark.parametrize(
    ("edit", "needle"),
    [
        (lambda h: [h], "not an object"),
        (lambda h: _first(h, "dtype"), "no 'dtype'"),
        (lambda h: _first(h, "data_offsets"), "no 'data_offsets'"),
        (_overlap, "overlaps"),
        (_negative, "data_offsets"),
        (lambda h: {**h, "__metadata__": {"a": 1}}, "__metadata__"),
    ],
    ids=["list", "no-dtype", "no-offsets", "overlap", "negative", "metadata"],
)
def test_corrupt_header_is_one_line(model: Path, tmp_path: Path, edit: Callable, needle: str) -> None:
    m = copy_model(model, tmp_path / "m")
    shard = shard_of(m, LLM_Q)
    rewrite_header(shard, edit)
    one_error(cli("inspect", m), shard.name, needle)


def test_gaps_and_trailing_bytes_are_refused(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "m")
    shard = shard_of(m, LLM_Q)
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    rewrite_header(shard, lambda h: h, data[8 + n :] + b"\0" * 64)
    one_error(cli("inspect", m), shard.name, "64 bytes after the last tensor")


@needs_gguf
def test_overlapping_offsets_never_reach_generate_or_gguf(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "m")
    rewrite_header(shard_of(m, LLM_Q), _overlap)
    one_error(cli("generate", m, "-p", "hi", "--max-new-tokens", 2), "overlaps")
    one_error(cli(*gguf_args(m, tmp_path / "out")), "overlaps")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        (INDEX_NAME, json.dumps({"weight_map": ["a", "b"]}), "found a list"),
        (INDEX_NAME, json.dumps({"weight_map": {"a": 3}}), "not a valid safetensors index"),
        ("config.json", "[]", "expected a JSON object"),
        (
            "config.json",
            json.dumps({"architectures": ["SkyworkR1VChatModel"], "llm_config": []}),
            "llm_config",
        ),
    ],
)
def test_bad_index_and_config_are_one_line(
    model: Path, tmp_path: Path, name: str, text: str, needle: str
) -> None:
    m = copy_model(model, tmp_path / "m")
    (m / name).write_text(text)
    one_error(cli("inspect", m), needle)


def test_symlinked_single_file_is_refused_before_it_is_read(model: Path, tmp_path: Path) -> None:
    m = tmp_path / "m"
    m.mkdir()
    for f in model.iterdir():
        if not f.name.startswith("model"):
            shutil.copy(f, m / f.name)
    outside = tmp_path / "outside.bin"
    outside.write_bytes(b"\xff" * 64)  # not even a safetensors file: reading it would say "corrupt"
    (m / "model.safetensors").symlink_to(outside)
    one_error(cli("inspect", m), "outside the model directory")


def test_fifo_shard_is_refused_not_waited_on(model: Path, tmp_path: Path) -> None:
    m = copy_model(model, tmp_path / "m")
    shard = shard_of(m, LLM_Q)
    shard.unlink()
    os.mkfifo(shard)
    r = subprocess.run([*CLI, "inspect", str(m)], capture_output=True, text=True, timeout=120)
    one_error(r, shard.name, "not a regular file")


# -- 5. Ctrl-C and kill --------------------------------------------------------------------------------------
def _start(args: list[object]) -> subprocess.Popen:
    # its own session: a signal to the group reaches every process of the run, as a terminal's Ctrl-C does
    return subprocess.Popen(
        [*CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def _wait_for(proc: subprocess.Popen, ready: Callable[[], bool], timeout: float = 120) -> None:
    t0 = time.monotonic()
    while not ready():
        assert proc.poll() is None, (
            f"the run ended before the point of interest: {proc.communicate()[1][-2000:]}"
        )
        assert time.monotonic() - t0 < timeout, "point of interest never reached"
        time.sleep(0.005)


def _quantizer_running(proc: subprocess.Popen) -> bool:
    import psutil

    with contextlib.suppress(psutil.Error):
        for child in psutil.Process(proc.pid).children(recursive=True):
            if "r1v_quant.exporters.quantize" in " ".join(child.cmdline()):
                return True
    return False


@needs_gguf
def test_ctrl_c_inside_llama_cpp_quantizer(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("psutil")
    out = tmp_path / "out"
    args = gguf_args(model, out, "--type", "Q4_K_M")
    proc = _start(args)
    _wait_for(proc, lambda: _quantizer_running(proc))
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert (
        err.rstrip().splitlines()[-1] == "interrupted" and "Traceback" not in err and "Exception" not in err
    )
    assert finals(out) == [] and hidden_leftovers(tmp_path) == []
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr  # a rerun into the same folder works
    assert "m-Q4_K_M.gguf" in finals(out) and hidden_leftovers(out) == []


@needs_gguf
@pytest.mark.slow
def test_kill_mid_gguf_then_rerun(model: Path, tmp_path: Path) -> None:
    pytest.importorskip("psutil")
    out = tmp_path / "out"
    args = gguf_args(model, out, "--type", "Q4_K_M")
    proc = _start(args)
    _wait_for(proc, lambda: _quantizer_running(proc))
    os.kill(proc.pid, signal.SIGKILL)  # the run only: its quantizer child must die with it
    proc.communicate(timeout=60)
    time.sleep(0.5)
    assert [p for p in out.iterdir() if p.suffix == ".gguf"] == []
    import psutil

    assert not [p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])]
    r = subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert finals(out) == ["README.md", "gguf_export.json", "m-Q4_K_M.gguf", "mmproj-m-F16.gguf"]
    assert hidden_leftovers(out) == []  # the dead run's staging folder and lock are gone


@needs_gguf
def test_ctrl_c_while_publishing_undoes_everything(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C that lands while files are being renamed into place (held until the step ends) undoes the
    whole step: no file of the run, and the manifest and card as they were."""
    import r1v_quant.cli.gguf as cg

    out = tmp_path / "out"
    assert cli(*gguf_args(model, out, "--type", "Q8_0")).exit_code == 0
    before = {n: (out / n).read_bytes() for n in finals(out)}
    real = cg.write_gguf_card

    def interrupted(*a: Any, **k: Any) -> Any:
        os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the handler only records it
        return real(*a, **k)

    monkeypatch.setattr(cg, "write_gguf_card", interrupted)
    r = cli(*gguf_args(model, out, "--mmproj-type", "Q8_0"))
    assert r.exit_code == 130 and "interrupted" in r.stderr and "Traceback" not in r.output
    assert {n: (out / n).read_bytes() for n in finals(out)} == before and hidden_leftovers(out) == []


@needs_gguf
def test_publish_killed_midway_is_undone_by_the_next_run(model: Path, tmp_path: Path) -> None:
    from r1v_quant.cli.gguf import JOURNAL

    out = tmp_path / "out"
    assert cli(*gguf_args(model, out, "--type", "Q8_0", "--mmproj-type", "none")).exit_code == 0
    manifest = (out / "gguf_export.json").read_text()
    # what a run SIGKILLed between its renames leaves: one of its files published, journal, stale staging
    (out / "m-F16.gguf").write_bytes(b"GGUF half of a run")
    (out / JOURNAL).write_text(json.dumps({"files": ["m-F16.gguf", "mmproj-m-F16.gguf"],
                                           "restore": {"gguf_export.json": manifest}}))  # fmt: skip
    (out / ".r1v-staging-dead").mkdir()
    r = cli(*gguf_args(model, out))
    assert r.exit_code == 0, r.output
    assert "removed m-F16.gguf" in r.stderr
    assert finals(out) == ["README.md", "gguf_export.json", "m-F16.gguf", "m-Q8_0.gguf", "mmproj-m-F16.gguf"]
    assert (out / "m-F16.gguf").read_bytes()[:4] == b"GGUF" and (out / "m-F16.gguf").stat().st_size > 1000
    assert hidden_leftovers(out) == []


@pytest.mark.slow
def test_awq_sigkill_then_resume(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "q"
    args = ["awq", model, "--out", out, "--samples", 2, "--seq-len", 256, "--method", "rtn"]
    proc = _start(args)
    layers = tmp_path / ".q.awq-work" / "layers"
    _wait_for(proc, lambda: layers.is_dir() and any(layers.glob("*.safetensors")), timeout=300)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=60)
    assert not out.exists()
    r = subprocess.run(
        [*CLI, *map(str, args), "--resume", "--json"], capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["layers"][0].get("resumed") is True
    assert hidden_leftovers(tmp_path) == []


@pytest.mark.slow
def test_awq_resume_repairs_a_damaged_layer_and_matches_a_clean_run(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import r1v_quant.exporters.awq_export as ex

    opts = ["--samples", 2, "--seq-len", 256, "--method", "rtn"]
    # both runs write `--out q` from their own folder, so the recorded command lines are the same
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    assert cli("awq", model, "--out", "q", *opts).exit_code == 0
    clean = tmp_path / "a" / "q"
    monkeypatch.chdir(tmp_path / "b")
    real = ex.quantize_layer

    def stop_at_2(index: int, *a: Any, **k: Any) -> Any:
        if index == 2:
            raise KeyboardInterrupt
        return real(index, *a, **k)

    out = tmp_path / "b" / "q"
    monkeypatch.setattr(ex, "quantize_layer", stop_at_2)
    assert cli("awq", model, "--out", "q", *opts).exit_code == 130
    monkeypatch.setattr(ex, "quantize_layer", real)
    layer0 = tmp_path / "b" / ".q.awq-work" / "layers" / "00000.safetensors"
    layer0.write_bytes(layer0.read_bytes()[:100])  # truncated
    r = cli("awq", model, "--out", "q", *opts, "--resume")
    assert r.exit_code == 0, r.output
    assert "00000.safetensors is damaged" in r.stderr and "Traceback" not in r.output
    report = json.loads((out / "quant_report.json").read_text())
    assert [bool(x.get("resumed")) for x in report["layers"]] == [False, True, False, False]
    # byte-identical resume: everything but the report (timings, which layers were resumed)
    names = sorted(p.name for p in clean.iterdir() if p.name != "quant_report.json")
    assert names == sorted(p.name for p in out.iterdir() if p.name != "quant_report.json")
    for n in names:
        assert (out / n).read_bytes() == (clean / n).read_bytes(), n
    assert hidden_leftovers(tmp_path) == []


# -- 6. options, paths and file systems ----------------------------------------------------------------------
@pytest.mark.parametrize("group_size", [0, -128, 96, 100])
def test_awq_group_size_is_checked_before_any_work(model: Path, tmp_path: Path, group_size: int) -> None:
    out = tmp_path / "q"
    r = cli("awq", model, "--out", out, "--group-size", group_size, "--samples", 1, "--seq-len", 256)
    one_error(r, "group")
    assert not out.exists() and hidden_leftovers(tmp_path) == []  # no .q.awq-work, no lock


@pytest.mark.parametrize("command", ["gguf", "awq", "onnx", "calibrate"])
def test_out_that_is_or_lies_under_a_file(model: Path, tmp_path: Path, command: str) -> None:
    if command == "gguf":
        pytest.importorskip("gguf")
    if command == "onnx":
        pytest.importorskip("onnx")
    f = tmp_path / "file"
    f.write_text("x")
    one_error(cli(command, model, "--out", f), str(f), "not a directory")
    one_error(cli(command, model, "--out", f / "sub"), str(f / "sub"), "is a file, not a folder")
    assert f.read_text() == "x" and hidden_leftovers(tmp_path) == []


def test_out_in_proc_is_one_line(model: Path) -> None:
    pytest.importorskip("onnx")
    one_error(cli("onnx", model, "--out", "/proc/r1v-quant-probe"), "/proc/r1v-quant-probe")


@needs_gguf
def test_foreign_manifest_is_refused_before_any_work(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "gguf_export.json").write_text(json.dumps({"files": []}))
    one_error(cli(*gguf_args(model, out)), "gguf_export.json", "not a manifest written by r1v-quant gguf")
    assert finals(out) == ["gguf_export.json"] and hidden_leftovers(out) == []


@needs_gguf
def test_space_check_counts_the_mmproj_in_human_units(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from collections import namedtuple

    from r1v_quant.exporters.gguf_llm import plan_tensors
    from r1v_quant.exporters.gguf_mmproj import mmproj_bytes_planned
    from r1v_quant.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(model)
    llm = sum(t.nbytes for t in plan_tensors(ckpt, "F16"))
    mm = mmproj_bytes_planned(ckpt.spec, "F16")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**12, 0, llm + mm // 2))
    out = tmp_path / "out"
    line = one_error(cli(*gguf_args(model, out)), "not enough free space", "MB free", "MB needed")
    assert "0.0 GB" not in line
    assert not out.exists()


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path) -> None:
    from r1v_quant.model.preprocess import open_image

    path = tmp_path / "g16.png"
    Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I")
    assert open_image(path).getpixel((0, 0)) == (128, 128, 128)  # 32768 / 257, not clipped to 255


def test_large_calibration_set_shows_progress_and_ctrl_c_ends_it(model: Path, tmp_path: Path) -> None:
    out, log = tmp_path / "c", tmp_path / "stderr"
    args = ["calibrate", model, "--out", out, "--samples", 1_000_000, "--seq-len", 256]
    with open(log, "w") as err:
        proc = subprocess.Popen([*CLI, *map(str, args)], stderr=err, text=True, start_new_session=True)
        _wait_for(proc, lambda: "building the calibration set" in log.read_text(), timeout=60)
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    seen = log.read_text()
    assert proc.returncode == 130 and seen.rstrip().endswith("interrupted") and "Traceback" not in seen
    assert not out.exists() and hidden_leftovers(tmp_path) == []


# -- 7. real file systems: read-only and full (tmpfs in a private mount namespace) ---------------------------
def _namespace_ok() -> bool:
    if not shutil.which("unshare"):
        return False
    with tempfile.TemporaryDirectory() as d, contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = ["unshare", "-rm", "mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", d]
        return subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
    return False


def on_tmpfs(mount: Path, options: str, python: str, listing: Path) -> subprocess.CompletedProcess:
    """Run `python -c PYTHON` with a tmpfs (`options`) mounted at MOUNT, in a private mount namespace; what
    is left on it afterwards is listed into LISTING (the mount goes away with the namespace)."""
    if not _namespace_ok():
        pytest.skip("cannot mount a tmpfs here (needs unshare with user and mount namespaces)")
    mount.mkdir()
    script = (
        'mount -t tmpfs -o "$1" tmpfs "$2" || exit 99; "$3" -c "$4"; rc=$?; '
        '(cd "$2" && find . -mindepth 1 | sort) > "$5"; exit $rc'
    )
    args = [
        "unshare",
        "-rm",
        "sh",
        "-c",
        script,
        "sh",
        options,
        str(mount),
        sys.executable,
        python,
        str(listing),
    ]
    return subprocess.run(args, capture_output=True, text=True, timeout=600)


def _cli_call(args: list[object], prelude: str = "") -> str:
    return f"{prelude}\nfrom r1v_quant.cli.main import main\nmain({[str(a) for a in args]!r})"


@needs_gguf
def test_read_only_file_system(model: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    r = on_tmpfs(ro, "ro,size=1m", _cli_call(gguf_args(model, ro / "out")), tmp_path / "left")
    one_error(r, str(ro / "out"), "read-only file system")
    assert (tmp_path / "left").read_text() == ""


@needs_gguf
def test_disk_full_mid_gguf(model: Path, tmp_path: Path) -> None:
    """The up-front check is fooled (as a disk filled by someone else would), so the write itself runs out."""
    small = tmp_path / "small"
    prelude = "import r1v_quant.exporters.gguf_llm as g\ng.require_free_space = lambda *a, **k: None"
    r = on_tmpfs(small, "size=3m", _cli_call(gguf_args(model, small / "out"), prelude), tmp_path / "left")
    one_error(r, str(small / "out"), "no space left on device", "nothing was written under the final name")
    assert (tmp_path / "left").read_text() == ""  # not even the empty --out


@pytest.mark.slow
def test_disk_full_mid_awq(model: Path, tmp_path: Path) -> None:
    small = tmp_path / "small"
    prelude = "import r1v_quant.calibration.job_plan as j\nj.check_plan = lambda plan: None"
    prelude += "\nimport r1v_quant.exporters.awq_export  # noqa"
    args = ["awq", model, "--out", small / "q", "--samples", 1, "--seq-len", 256, "--method", "rtn"]
    r = on_tmpfs(small, "size=2m", _cli_call(args, prelude), tmp_path / "left")
    one_error(r, "no space left on device")
    left = (tmp_path / "left").read_text().split()
    assert not [x for x in left if x.startswith("./q")], left  # no output; the work folder may stay
    assert not [x for x in left if x.endswith((".tmp", LOCK_SUFFIX, FOLDER_LOCK))], left


def test_save_error_of_the_safetensors_writer_is_one_line(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without a tmpfs: the Rust writer's full-disk error (not an OSError) at the layer save."""
    from safetensors import SafetensorError

    import r1v_quant.exporters.awq_export as ex

    def full(*a: Any, **k: Any) -> None:
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ex, "save_file", full)
    out = tmp_path / "q"
    r = cli("awq", model, "--out", out, "--samples", 1, "--seq-len", 256, "--method", "rtn")
    one_error(r, "no space left on device")
    assert not out.exists() and hidden_leftovers(tmp_path) == []
    assert errno.ENOSPC == 28
