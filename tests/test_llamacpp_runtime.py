"""llama.cpp runtime: the reference token stream with InternVL-tiled image embeddings, KV reuse by turn."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from r1v_quant.data.synthdata import render_shape  # noqa: E402
from r1v_quant.exporters.gguf_llm import export_llm_gguf  # noqa: E402
from r1v_quant.exporters.gguf_mmproj import export_mmproj_gguf  # noqa: E402
from r1v_quant.model.artifact import find_gguf_pair  # noqa: E402
from r1v_quant.model.checkpoint import open_checkpoint  # noqa: E402
from r1v_quant.model.reference import R1VModel, build_inputs  # noqa: E402
from r1v_quant.runtime.llamacpp import LlamaCppRuntime  # noqa: E402
from r1v_quant.runtime.sampling import sample_token  # noqa: E402
from r1v_quant.util.errors import R1VError  # noqa: E402

pytestmark = pytest.mark.llamacpp
QUESTION = "What color is the shape in the image?"


@pytest.fixture(scope="module")
def exported(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rt")
    export_llm_gguf(tiny_dir, out / "r1v-tiny-F16.gguf", "F16", progress=False)
    export_mmproj_gguf(tiny_dir, out / "mmproj-r1v-tiny-F16.gguf", "F16")
    return out


@pytest.fixture(scope="module")
def runtime(exported: Path):
    gguf, mmproj = find_gguf_pair(exported)
    with LlamaCppRuntime(gguf, mmproj, n_ctx=4096, n_threads=2) as rt:
        yield rt


@pytest.fixture(scope="module")
def reference(tiny_dir: Path) -> R1VModel:
    return R1VModel.from_checkpoint(open_checkpoint(tiny_dir))


def test_prompt_is_the_reference_token_stream(runtime: LlamaCppRuntime, tiny_dir: Path) -> None:
    spec = open_checkpoint(tiny_dir).spec
    img = render_shape("red", "triangle").resize((600, 300))  # non-square: several tiles + thumbnail
    ids_ref, pixels, _ = build_inputs(tiny_dir, spec, QUESTION, [img])
    ids, embeds = runtime.prompt([{"role": "user", "content": QUESTION}], [img])
    assert ids == ids_ref[0].tolist()
    assert embeds is not None and embeds.shape == (pixels.shape[0] * spec.num_image_token, runtime.n_embd)
    assert runtime.flavor == spec.flavor


def test_image_logits_and_greedy_answer_match_torch(
    runtime: LlamaCppRuntime, reference: R1VModel, tiny_dir: Path
) -> None:
    img = render_shape("blue", "circle")
    ids_ref, pixels, _ = build_inputs(tiny_dir, reference.spec, QUESTION, [img])
    ids, embeds = runtime.prompt([{"role": "user", "content": QUESTION}], [img])
    want = reference(ids_ref, pixels)[0].numpy()
    got = runtime.logits(ids, embeds)
    assert got.shape == want.shape
    assert (got.argmax(-1) == want.argmax(-1)).mean() == 1.0
    assert np.abs(got - want).max() < 0.5  # F16 weights and F16 vision tower against float32

    mine = runtime.generate(ids, embeds, max_new_tokens=32)
    theirs = reference.generate(ids_ref, pixels, max_new_tokens=32, stop_ids=runtime.stop_ids)
    assert mine.tokens == theirs.tokens and mine.stopped == theirs.stopped
    assert "blue" in runtime.detokenize(mine.tokens)


def test_text_logits_match_torch(runtime: LlamaCppRuntime, reference: R1VModel, tiny_dir: Path) -> None:
    ids_ref, _, _ = build_inputs(tiny_dir, reference.spec, "What is 12 + 30?", [])
    want = reference(ids_ref)[0].numpy()
    got = runtime.logits(ids_ref[0].tolist())
    assert np.abs(got - want).max() < 0.05


def test_second_turn_reuses_the_cache_and_equals_a_fresh_run(
    runtime: LlamaCppRuntime, exported: Path
) -> None:
    img = render_shape("green", "square")
    first = [{"role": "user", "content": f"<image>\n{QUESTION}"}]
    ids, embeds = runtime.prompt(first, [img])
    r1 = runtime.generate(ids, embeds, max_new_tokens=24)
    turn2 = [*first, {"role": "assistant", "content": runtime.detokenize(r1.tokens)},
             {"role": "user", "content": "What shape is it?"}]  # fmt: skip
    ids2, embeds2 = runtime.prompt(turn2, [img])
    r2 = runtime.generate(ids2, embeds2, max_new_tokens=24)
    assert r2.timings["n_reused"] > embeds.shape[0]  # the image was not decoded again
    assert r2.timings["n_reused"] + r2.timings["n_prompt"] == len(ids2)

    gguf, mmproj = find_gguf_pair(exported)
    with LlamaCppRuntime(gguf, mmproj, n_ctx=4096, n_threads=2) as fresh:
        again = fresh.generate(ids2, embeds2, max_new_tokens=24)
    assert again.timings["n_reused"] == 0
    assert again.tokens == r2.tokens


def test_tokenizer_and_detokenizer_round_trip(runtime: LlamaCppRuntime) -> None:
    text = "<think>\n3 + 4 = 7</think>\n\n答案是 7"
    assert runtime.detokenize(runtime.tokenize(text)) == text


def test_sampling() -> None:
    logits = np.array([0.0, 5.0, 1.0, -2.0], np.float32)
    assert sample_token(logits, 0.0, 1.0, np.random.default_rng(0)) == 1
    draws = [sample_token(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(200)]
    assert set(draws) > {1} and draws == [
        sample_token(logits, 1.0, 1.0, np.random.default_rng(s)) for s in range(200)
    ]
    # at temperature 5 the probabilities are .18 .49 .22 .12: top-p 0.5 keeps the two largest
    assert {sample_token(logits, 5.0, 0.5, np.random.default_rng(s)) for s in range(100)} == {1, 2}


def test_bad_inputs(runtime: LlamaCppRuntime, exported: Path, tmp_path: Path) -> None:
    img = render_shape("red", "circle")
    with pytest.raises(R1VError, match="2 <image> tag"):
        runtime.prompt([{"role": "user", "content": "<image><image> hi"}], [img])
    with pytest.raises(R1VError, match="IMG_CONTEXT"):
        ids, _ = runtime.prompt([{"role": "user", "content": "<image> hi"}], [img])
        runtime.logits(ids)
    with pytest.raises(R1VError, match="do not fit"):
        runtime.logits([1] * 5000)
    gguf, _ = find_gguf_pair(exported)
    with LlamaCppRuntime(gguf, n_ctx=512, n_threads=1) as text_only, pytest.raises(R1VError, match="mmproj"):
        text_only.prompt([{"role": "user", "content": "hi"}], [img])
    with pytest.raises(R1VError, match="no such"):
        find_gguf_pair(tmp_path / "missing")
    with pytest.raises(R1VError, match="expected one language-model"):
        find_gguf_pair(tmp_path)
    assert find_gguf_pair(gguf) == (gguf, None)
