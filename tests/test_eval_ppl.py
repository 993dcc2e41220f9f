"""`eval ppl` on the tiny replica: windows, reference store, KLD against an independent computation,
same-architecture / same-tokenizer refusals."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from eval_helpers import perturbed_copy

from r1v_quant.cli.main import main
from r1v_quant.data.evalset import text_windows, window_logits, window_targets
from r1v_quant.evaluate.backends import check_compatible
from r1v_quant.evaluate.metrics import kld_summary, token_kld
from r1v_quant.evaluate.ppl import RefStore, WindowSpec, build_windows, evaluate_models
from r1v_quant.model.artifact import resolve_artifact, resolve_reference
from r1v_quant.model.reference import R1VModel
from r1v_quant.runtime.options import RuntimeOptions
from r1v_quant.util.errors import R1VError


def test_text_windows_layout() -> None:
    ids = list(range(100, 200))
    ws = text_windows(ids, 20, bos=7)
    assert [w.input_ids[1].item() for w in ws] == [101, 121, 141, 161, 181]
    assert all(w.input_ids[0].item() == 7 and len(w.input_ids) == 20 for w in ws)
    # llama-perplexity: the second half is scored, positions 10..18 predict tokens 11..19
    assert ws[0].score.nonzero().flatten().tolist() == list(range(10, 19))
    assert window_targets(ws[:1])[0].tolist() == list(range(111, 120))
    # stride 5: every token after the first window's context is scored exactly once
    strided = text_windows(ids, 20, 5)
    targets = torch.cat(window_targets(strided)).tolist()
    assert targets == list(range(115, 200))
    assert len(text_windows(ids, 20, 5, max_windows=3)) == 3
    with pytest.raises(R1VError, match="fewer than one window"):
        text_windows(ids[:10], 20)


def test_ref_store_roundtrip() -> None:
    ws = text_windows(list(range(64)), 16)
    lp = torch.log_softmax(torch.randn(int(ws[0].score.sum()), 9), -1)
    with RefStore(ws, 9) as store:
        assert store.dtype == "float32"
        store.put(0, lp)
        assert torch.equal(store.get(0), lp)
        where = store.dir
    assert not where.exists()
    with RefStore(ws, 9, "float16") as store:
        store.put(0, lp)
        assert torch.allclose(store.get(0), lp, atol=1e-2) and not torch.equal(store.get(0), lp)


@pytest.fixture(scope="module")
def noisy_dir(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return perturbed_copy(tiny_dir, tmp_path_factory.mktemp("noisy") / "tiny-noisy", noise=0.5)


def test_kld_pipeline_matches_direct_computation(tiny_dir: Path, noisy_dir: Path) -> None:
    """One model at a time through the store gives what holding both models' logits gives."""
    ref, cand = resolve_reference(tiny_dir), resolve_artifact(noisy_dir)
    check_compatible(ref, cand, needs_images=True)
    ws = WindowSpec(n_text=3, n_image=1)
    windows = build_windows(ref, ws)
    assert [w.kind for w in windows] == ["text"] * 3 + ["image"]
    assert windows[-1].images and windows[-1].pixel_values is not None
    runs = evaluate_models(ref, [cand, ref], windows)
    ref_run, cand_run, self_run = runs
    direct_ref = window_logits(R1VModel.from_checkpoint(tiny_dir), windows)
    direct_cand = window_logits(R1VModel.from_checkpoint(noisy_dir), windows)
    targets = window_targets(windows)
    for kind, idx in (("text", [0, 1, 2]), ("image", [3]), ("all", [0, 1, 2, 3])):
        r = torch.cat([direct_ref[i] for i in idx])
        c = torch.cat([direct_cand[i] for i in idx])
        want = kld_summary(token_kld(r, c), r, c, torch.cat([targets[i] for i in idx]))
        got = cand_run.ppl[kind]
        for key in ("tokens", "kld_mean", "kld_max", "same_top_pct", "ppl_ref", "ppl_cand", "dp_rms_pct"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-9), (kind, key)
        assert ref_run.ppl[kind]["ppl"] == pytest.approx(want["ppl_ref"], rel=1e-6)
        assert self_run.ppl[kind]["kld_max"] < 1e-9 and self_run.ppl[kind]["same_top_pct"] == 100.0
    assert cand_run.ppl["all"]["kld_mean"] > 1e-4  # the noise is visible


def test_incompatible_candidates_refused(tiny_dir: Path, tiny_rms_dir: Path, tmp_path: Path) -> None:
    ref = resolve_reference(tiny_dir)
    with pytest.raises(R1VError, match="flavour"):
        check_compatible(ref, resolve_artifact(tiny_rms_dir), needs_images=False)
    # same weights, a tokenizer with two vocabulary entries swapped
    other = tmp_path / "other-tok"
    shutil.copytree(tiny_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = "e", "t"
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(R1VError, match="tokenizer differs from the reference"):
        check_compatible(ref, resolve_artifact(other), needs_images=False)
    with pytest.raises(R1VError, match="must be a checkpoint folder"):
        resolve_reference(_fake_gguf(tmp_path))


def _fake_gguf(tmp: Path) -> Path:
    gguf = pytest.importorskip("gguf")
    path = tmp / "fake-F16.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_block_count(4)
    w.add_embedding_length(256)
    w.add_token_list(["a", "b"])
    w.add_string("r1v_quant.flavor", "r1v")
    w.add_file_type(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return path


def test_gguf_metadata_mismatch_refused(tiny_dir: Path, tmp_path: Path) -> None:
    cand = resolve_artifact(_fake_gguf(tmp_path))
    assert (cand.backend, cand.layers, cand.hidden, cand.vocab, cand.quant) == ("llama.cpp", 4, 256, 2, "F16")
    with pytest.raises(R1VError, match="vocabulary size 2 differs from the reference's"):
        check_compatible(resolve_reference(tiny_dir), cand, needs_images=False)


def test_cli_ppl_text_file_and_errors(tiny_dir: Path, tmp_path: Path) -> None:
    from r1v_quant.data.synthdata import text_problems

    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(p.question + "\n" + p.response() for p in text_problems(40, 5)))
    runner = CliRunner()
    res = runner.invoke(
        main,
        [
            "eval",
            "ppl",
            "--ref",
            str(tiny_dir),
            "--cand",
            str(tiny_dir),
            "--text",
            str(text),
            "--ctx",
            "128",
            "--chunks",
            "3",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.output)
    assert rep["windows"]["corpus"] == 3 and rep["windows"]["ctx"] == 128
    if not torch.cuda.is_available():  # auto: CPU float32 here
        assert rep["runtime"]["torch_device"] == "cpu" and rep["runtime"]["torch_dtype"] == "float32"
    s = rep["candidates"][0]["kinds"]["corpus"]
    assert s["tokens"] == 3 * 63 and s["kld_max"] < 1e-9 and s["ppl_ratio"] == pytest.approx(1.0)
    # a perplexity, not a NaN or an overflow (the replica is trained on its responses only, so on plain
    # text outside its chat template it is no better than a guess: its prompts were never a target)
    assert 1.0 < rep["reference"]["ppl"]["corpus"]["ppl"] < math.inf
    bad = runner.invoke(
        main, ["eval", "ppl", "--ref", str(tiny_dir), "--cand", str(tmp_path / "nope"), "--set", "heldout"]
    )
    assert bad.exit_code == 2 and "no such model" in bad.output
    neither = runner.invoke(main, ["eval", "ppl", "--ref", str(tiny_dir), "--cand", str(tiny_dir)])
    assert neither.exit_code == 2 and "--set heldout" in neither.output


def test_torch_backend_in_bfloat16(tiny_dir: Path, noisy_dir: Path) -> None:
    """--torch-dtype bfloat16 (what a 38B reference runs in on a GPU) on the CPU: the same pipeline, a
    reference perplexity within 1 % of float32's, and the candidate's KLD against it within 25 %."""
    ref, cand = resolve_reference(tiny_dir), resolve_artifact(noisy_dir)
    windows = build_windows(ref, WindowSpec(n_text=2, n_image=1))
    fp32 = evaluate_models(ref, [cand], windows, runtime=RuntimeOptions(torch_device="cpu"))
    bf16 = evaluate_models(
        ref, [cand, ref], windows, runtime=RuntimeOptions(torch_device="cpu", torch_dtype="bfloat16")
    )
    for kind in ("text", "image"):
        assert bf16[0].ppl[kind]["ppl"] == pytest.approx(fp32[0].ppl[kind]["ppl"], rel=0.01)  # measured 0.1 %
        assert bf16[2].ppl[kind]["kld_max"] < 1e-9  # the reference against itself, both in bf16
    assert bf16[1].ppl["all"]["kld_mean"] == pytest.approx(fp32[1].ppl["all"]["kld_mean"], rel=0.25)  # 11 %


def test_runtime_options_placement_and_errors(tiny_dir: Path) -> None:
    device, dtype = RuntimeOptions(torch_device="cpu").torch_placement()
    assert (device.type, dtype) == ("cpu", torch.float32)
    assert RuntimeOptions(torch_device="cpu", torch_dtype="bfloat16").torch_placement()[1] == torch.bfloat16
    with pytest.raises(R1VError, match="expected auto, cpu, cuda"):
        RuntimeOptions(torch_device="meta").torch_placement()
    if torch.cuda.is_available():
        return
    with pytest.raises(R1VError, match="no CUDA device"):
        RuntimeOptions(torch_device="cuda").torch_placement()
    res = CliRunner().invoke(
        main, ["eval", "ppl", "--ref", str(tiny_dir), "--cand", str(tiny_dir), "--set", "heldout",
               "--torch-device", "cuda:0"],
    )  # fmt: skip
    assert res.exit_code == 2 and res.output.startswith("error: --torch-device cuda:0")
    assert len(res.output.strip().splitlines()) == 1
