"""GGUF export of the language model: llama.cpp loads it, its logits and tokens match the torch reference."""

from __future__ import annotations

import ctypes
import json
import random
import shutil
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

gguf = pytest.importorskip("gguf")
llama_cpp = pytest.importorskip("llama_cpp")

from llama_helpers import llama_logits  # noqa: E402

from r1v_quant.cli.gguf import gguf_command, gguf_output_path  # noqa: E402
from r1v_quant.cli.main import Group  # noqa: E402
from r1v_quant.exporters import gguf_llm  # noqa: E402
from r1v_quant.exporters.gguf_llm import export_llm_gguf  # noqa: E402
from r1v_quant.exporters.gguf_vocab import CONTROL, NORMAL, USER_DEFINED  # noqa: E402
from r1v_quant.exporters.quantize import llama_quantize  # noqa: E402
from r1v_quant.model import storage  # noqa: E402
from r1v_quant.model.prompts import CHAT_FORMATS, DS_ASSISTANT, DS_BOS, DS_USER, IMG_CONTEXT, build_prompt  # noqa: E402
from r1v_quant.model.reference import R1VModel  # noqa: E402
from r1v_quant.model.spec import load_spec  # noqa: E402
from r1v_quant.model.tokenizer import R1VTokenizer  # noqa: E402
from r1v_quant.util.errors import R1VError  # noqa: E402

pytestmark = pytest.mark.llamacpp
Q = gguf.GGMLQuantizationType

PARITY_TEXTS = [
    "Hello world",
    "The answer is 37 * 45 = 1665.",
    "  leading spaces,\ttabs\t\tand\n\n\nnewlines   \n  ",
    "I'll check: it's 5, they're equal, WE'VE done it, you'D agree, I'm sure.",
    "图中显示了一个三角形，求它的面积。这张图片里有几只猫？",
    "def area(base: float, height: float) -> float:\n    return 0.5 * base * height\n",
    "3.14159 2.71828 1e-6 -17 +42 100% 1,234,567 0x1F 2025-07-15 12:30:45 1234567890",
    "Emoji 🙂🚀 and 😶‍🌫️ symbols ∑ ∫ √ π ≤ ≥ ≠ → ← °C €",
    f"<img>{IMG_CONTEXT * 7}</img>\nWhat shape is in the image?",
    f"{DS_BOS}You are helpful.{DS_USER}\nWhat is 6*7?{DS_ASSISTANT}<think>\nok</think>\n\n42",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n",
    "<quad></quad><ref>a cat</ref><box>[[1, 2, 3, 4]]</box><|endoftext|>",
    "no<think>space</think>around",
    "",
]
FUZZ_PIECES = [
    *"aXZ '’sStTdD0123456789.,;:!?-_=+*/\\()[]<>\"#%&@^`~|图的。，éßΩ🙂\u200d\u00a0١٢٣",
    *("  ", "\t", "\n", "\r\n", "\n\n", "'LL", "👍🏽", "Ünïcödé"),
    *("<think>", "</think>", IMG_CONTEXT, "<img>", "<|im_end|>", DS_USER, "<|endoftext|>"),
]


@pytest.fixture(scope="module")
def ggufs(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The replica's LLM exported once per type (all three take a few seconds)."""
    out = tmp_path_factory.mktemp("gguf")
    paths = {}
    for t in ("F16", "Q8_0", "Q4_K_M"):
        paths[t] = gguf_output_path(tiny_dir, out, t)
        report = export_llm_gguf(tiny_dir, paths[t], t, progress=False)
        assert report["type"] == t and report["bytes"] == paths[t].stat().st_size
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in paths.values())  # no temp left
    return paths


@pytest.fixture(scope="module")
def prompt_ids(tiny_dir: Path) -> list[int]:
    tok = R1VTokenizer.from_dir(tiny_dir)
    text = build_prompt("r1v", [{"role": "user", "content": "What is 12 + 30? Then divide by 6."}])
    return tok.encode(text + "Let me think step by step. First, 12 + 30 = 42; then 42 / 6 = 7.")


@pytest.fixture(scope="module")
def torch_logits(tiny_dir: Path, prompt_ids: list[int]) -> np.ndarray:
    model = R1VModel.from_checkpoint(tiny_dir)
    return model(torch.tensor([prompt_ids]))[0].numpy()


def assert_same_top1(got: np.ndarray, want: np.ndarray, rel_margin: float = 0.005) -> None:
    """Same argmax wherever the reference's top-2 gap is clear of 16-bit rounding (near-ties may flip)."""
    top2 = np.sort(want, -1)[:, -2:]
    decided = top2[:, 1] - top2[:, 0] > rel_margin * np.abs(want).max()
    assert decided.mean() >= 0.5  # the comparison must still cover most positions
    assert (got.argmax(-1) == want.argmax(-1))[decided].all()


def test_f16_logits_match_torch(
    ggufs: dict[str, Path], prompt_ids: list[int], torch_logits: np.ndarray
) -> None:
    got = llama_logits(ggufs["F16"], prompt_ids)
    assert got.shape == torch_logits.shape
    assert_same_top1(got, torch_logits)
    assert np.abs(got - torch_logits).max() < 0.01 * np.abs(torch_logits).max()


def _act_quant(x: torch.Tensor, block: int) -> torch.Tensor:
    """ggml's activation rounding before a quantized matmul: symmetric int8 per `block` values."""
    shape, x = x.shape, x.reshape(-1, block)
    d = x.abs().amax(-1, keepdim=True) / 127
    return (torch.round(x / d.clamp_min(1e-30)) * d).reshape(shape)


def gguf_weight_logits(tiny_dir: Path, path: Path, ids: list[int], act_block: int) -> np.ndarray:
    """The torch reference run with the GGUF's own (dequantized) weights and ggml's activation rounding."""
    from r1v_quant.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_dir)
    hf_name = {gguf_llm.gguf_tensor_name(n, ckpt.spec.llm.num_layers): n for n in ckpt.names()}
    model = R1VModel.from_checkpoint(ckpt)
    state = model.state_dict()
    for x in gguf.GGUFReader(path).tensors:
        name = hf_name[x.name]
        w = gguf.quants.dequantize(x.data, x.tensor_type).reshape(state[name].shape)
        state[name] = torch.tensor(w, dtype=torch.float32)
    model.load_state_dict(state)
    for mod in model.language_model.modules():
        if isinstance(mod, torch.nn.Linear):
            mod.register_forward_pre_hook(lambda m, args: (_act_quant(args[0], act_block),))
    return model(torch.tensor([ids]))[0].numpy()


# Q8_0 weights meet Q8_0 activations (blocks of 32), K-quants Q8_K activations (blocks of 256).
@pytest.mark.parametrize("gguf_type,act_block", [("Q8_0", 32), ("Q4_K_M", 256)])
def test_quantized_runs_as_its_weights_say(
    ggufs: dict[str, Path],
    tiny_dir: Path,
    prompt_ids: list[int],
    torch_logits: np.ndarray,
    gguf_type: str,
    act_block: int,
) -> None:
    got = llama_logits(ggufs[gguf_type], prompt_ids)
    assert got.shape == torch_logits.shape and np.isfinite(got).all()
    # Against the 16-bit reference the replica's outlier channels cost some top-1 agreement (llama.cpp
    # rounds activations to 8 bits per block, and one outlier sets the whole block's scale) ...
    assert (got.argmax(-1) == torch_logits.argmax(-1)).mean() >= 0.5
    # ... but with the file's own weights and that rounding emulated, torch and llama.cpp agree.
    want = gguf_weight_logits(tiny_dir, ggufs[gguf_type], prompt_ids, act_block)

    # The emulation is close, not exact (llama.cpp sums a K-quant's sub-blocks in its own order and
    # precision), so the bounds have margin over what two replicas (trained under AVX-512 and under AVX2
    # kernels: different weights) measured: the emulation leaves at most 0.27 of llama.cpp's RMS logit
    # difference to the 16-bit reference unexplained, top-1 agrees on 95.7-100 % of the positions where the
    # emulation's choice is clear (a near-tie flips with float rounding, which differs between CPUs), and
    # the largest logit difference is at most 0.18 of the largest logit.
    def rms(x: np.ndarray) -> float:
        return float(np.sqrt((x**2).mean()))

    assert rms(got - want) <= 0.35 * rms(got - torch_logits)
    top2 = np.sort(want, -1)[:, -2:]
    clear = top2[:, 1] - top2[:, 0] > 0.25
    assert clear.mean() >= 0.6
    assert (got.argmax(-1) == want.argmax(-1))[clear].mean() >= 0.9
    assert np.abs(got - want).max() < 0.25 * np.abs(want).max()


def test_tensor_types(ggufs: dict[str, Path], tiny_dir: Path) -> None:
    spec = load_spec(tiny_dir)
    types = {
        t: {x.name: x.tensor_type for x in gguf.GGUFReader(ggufs[t]).tensors}
        for t in ("F16", "Q8_0", "Q4_K_M")
    }
    names = set(types["F16"])
    assert names == set(types["Q8_0"]) == set(types["Q4_K_M"])
    assert len(names) == 3 + spec.llm.num_layers * 12
    assert {"token_embd.weight", "output_norm.weight", "output.weight", "blk.0.attn_q.bias"} <= names
    assert not any(n.startswith(("v.", "mm.")) for n in names)
    for t, expected_2d in (("F16", Q.F16), ("Q8_0", Q.Q8_0)):
        for name, qt in types[t].items():
            one_d = name.endswith((".bias", "_norm.weight"))
            assert qt == (Q.F32 if one_d else expected_2d), (t, name, qt)
    q4 = set(types["Q4_K_M"].values())
    assert Q.Q4_K in q4 and Q.Q6_K in q4  # llama.cpp's mix: Q6_K for output and some attn_v/ffn_down


def test_python_packing_matches_checkpoint(ggufs: dict[str, Path], tiny_dir: Path) -> None:
    from r1v_quant.model.checkpoint import open_checkpoint

    ckpt = open_checkpoint(tiny_dir)
    want = ckpt.get("language_model.model.layers.1.mlp.down_proj.weight").float().numpy()
    for t in ("F16", "Q8_0"):
        reader = gguf.GGUFReader(ggufs[t])
        x = next(x for x in reader.tensors if x.name == "blk.1.ffn_down.weight")
        got = gguf.quants.dequantize(x.data, x.tensor_type).reshape(want.shape)
        # bf16 -> f16 is exact except below f16's normal range (subnormal step 2^-24). Q8_0: half a step
        # d / 2 plus the scale's own f16 rounding (d x 2^-11) times the largest integer, 127
        tol = 2.0**-25 if t == "F16" else np.abs(want).max() / 127 * (0.5 + 127 * 2.0**-11)
        assert np.abs(got - want).max() <= tol


def test_python_packing_is_bit_exact_with_llama_cpp(tiny_dir: Path, tmp_path: Path) -> None:
    # Our Q8_0/Q4_0 bytes equal what libllama writes for the same F32 weights with one type everywhere.
    f32 = tmp_path / "f32.gguf"
    export_llm_gguf(tiny_dir, f32, "F32", progress=False)
    for t in ("Q8_0", "Q4_0"):
        ours, theirs = tmp_path / f"ours-{t}.gguf", tmp_path / f"llama-{t}.gguf"
        export_llm_gguf(tiny_dir, ours, t, progress=False)
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t}")
        params.pure = True  # no per-tensor mix: every 2-D weight in `t`
        assert (
            llama_cpp.llama_model_quantize(str(f32).encode(), str(theirs).encode(), ctypes.byref(params)) == 0
        )
        a = {x.name: (x.tensor_type, x.data.tobytes()) for x in gguf.GGUFReader(ours).tensors}
        b = {x.name: (x.tensor_type, x.data.tobytes()) for x in gguf.GGUFReader(theirs).tensors}
        assert a == b, t


def test_row_blocks_give_identical_file(
    tiny_dir: Path, ggufs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Converting a few rows at a time (what bounds the 38B's memory) must not change a byte.
    monkeypatch.setattr(gguf_llm, "ROW_BLOCK_BYTES", 4096)
    out = tmp_path / "small-blocks.gguf"
    export_llm_gguf(tiny_dir, out, "Q8_0", progress=False)
    assert out.read_bytes() == ggufs["Q8_0"].read_bytes()


def test_streams_one_tensor_at_a_time(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Peak memory ~ one tensor: when the next tensor is read, every earlier one has been freed.
    from r1v_quant.model.checkpoint import Checkpoint

    real_get, alive, most = Checkpoint.get, [], 0

    def get(self: Checkpoint, name: str) -> torch.Tensor:
        nonlocal most
        alive[:] = [r for r in alive if r() is not None]
        most = max(most, len(alive))
        t = real_get(self, name)
        alive.append(weakref.ref(t))
        return t

    monkeypatch.setattr(Checkpoint, "get", get)
    report = export_llm_gguf(tiny_dir, tmp_path / "s.gguf", "Q8_0", progress=False)
    assert report["tensors"] > 40 and most == 0
    names = [x.name for x in gguf.GGUFReader(tmp_path / "s.gguf").tensors]
    assert names[0] == "token_embd.weight" and names[-1] == "output.weight"  # spec order, layer by layer
    blocks = [int(n.split(".")[1]) for n in names if n.startswith("blk.")]
    assert blocks == sorted(blocks)


def test_metadata(ggufs: dict[str, Path], tiny_dir: Path) -> None:
    spec = load_spec(tiny_dir)
    tok = R1VTokenizer.from_dir(tiny_dir)
    r = gguf.GGUFReader(ggufs["Q8_0"])

    def val(key: str):
        field = r.get_field(key)
        assert field is not None, key
        return field.contents()

    m = spec.llm
    assert val("general.architecture") == "qwen2"
    assert val("general.file_type") == gguf.LlamaFileType.MOSTLY_Q8_0
    assert val("qwen2.context_length") == m.max_position_embeddings
    assert val("qwen2.embedding_length") == m.hidden_size
    assert val("qwen2.block_count") == m.num_layers
    assert val("qwen2.feed_forward_length") == m.intermediate_size
    assert val("qwen2.attention.head_count") == m.num_heads
    assert val("qwen2.attention.head_count_kv") == m.num_kv_heads
    assert val("qwen2.rope.freq_base") == pytest.approx(m.rope_theta)
    assert val("qwen2.attention.layer_norm_rms_epsilon") == pytest.approx(m.rms_eps)
    assert val("tokenizer.ggml.model") == "gpt2"
    assert val("tokenizer.ggml.pre") == "deepseek-r1-qwen"
    tokens, types = val("tokenizer.ggml.tokens"), val("tokenizer.ggml.token_type")
    assert len(tokens) == len(types) == m.vocab_size
    for text, want in (
        (IMG_CONTEXT, CONTROL),
        ("<img>", CONTROL),
        (DS_BOS, CONTROL),
        ("<think>", USER_DEFINED),
    ):
        assert tokens[tok.token_to_id(text)] == text and types[tok.token_to_id(text)] == want
    assert types[tok.encode("the")[0]] == NORMAL
    merges = json.loads((tiny_dir / "tokenizer.json").read_text())["model"]["merges"]
    assert len(val("tokenizer.ggml.merges")) == len(merges)
    assert val("tokenizer.ggml.bos_token_id") == tok.token_to_id(tok.bos_token)
    assert val("tokenizer.ggml.eos_token_id") == tok.token_to_id(tok.eos_token)
    assert val("tokenizer.ggml.padding_token_id") == tok.token_to_id(tok.pad_token)
    assert val("tokenizer.ggml.add_bos_token") is False
    # the flavour's template in its GGUF form (typed content, libmtmd's media marker for an image part)
    assert val("tokenizer.chat_template") == CHAT_FORMATS["r1v"].gguf_chat_template


def test_tokenizer_parity(ggufs: dict[str, Path], tiny_dir: Path) -> None:
    tok = R1VTokenizer.from_dir(tiny_dir)
    llm = llama_cpp.Llama(model_path=str(ggufs["F16"]), vocab_only=True, verbose=False)
    try:
        for text in PARITY_TEXTS:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), repr(text)
        ids = tok.encode(PARITY_TEXTS[-5])
        assert llm.detokenize(ids, special=True).decode() == tok.decode(ids)
        # Random mixes of the pieces the pre-tokenizer regex cares about (3000 agreed when written).
        rng = random.Random(0)
        for _ in range(300):
            text = "".join(rng.choice(FUZZ_PIECES) for _ in range(rng.randint(1, 40)))
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text), repr(text)
    finally:
        llm.close()


# -- bad inputs --------------------------------------------------------------------------------------------
def _copy_without(src: Path, dst: Path, missing: str) -> Path:
    dst.mkdir()
    for p in src.iterdir():
        if p.name != missing:
            shutil.copy(p, dst / p.name)  # a few MB; symlinked shards would be refused as outside the dir
    return dst


def test_bad_inputs(tiny_dir: Path, ggufs: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(R1VError, match="unsupported GGUF type 'Q4_K_X'"):
        export_llm_gguf(tiny_dir, tmp_path / "x.gguf", "Q4_K_X")
    with pytest.raises(R1VError, match="already exists"):
        export_llm_gguf(tiny_dir, ggufs["F16"], "F16")
    for missing in ("tokenizer.json", "tokenizer_config.json"):
        model = _copy_without(tiny_dir, tmp_path / f"no-{missing}", missing)
        with pytest.raises(R1VError, match=f"no {missing}"):
            export_llm_gguf(model, tmp_path / "y.gguf", "Q4_K_M")
    with pytest.raises(R1VError, match="no such GGUF"):
        llama_quantize(tmp_path / "missing.gguf", tmp_path / "z.gguf", "Q4_K_M")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*"))


def test_other_pretokenizer_refused(tiny_dir: Path, tmp_path: Path) -> None:
    model = _copy_without(tiny_dir, tmp_path / "gpt2-split", "tokenizer.json")
    data = json.loads((tiny_dir / "tokenizer.json").read_text())
    data["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = r"\s+|\S+"
    (model / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(R1VError, match="not Qwen2's"):
        export_llm_gguf(model, tmp_path / "y.gguf", "F16")


@pytest.mark.parametrize(
    "rope,expect",
    [
        ({"type": "dynamic", "factor": 2.0}, None),  # InternVL3's LLM config: identity below max positions
        ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, "yarn"),
        ({"rope_type": "longrope", "factor": 4.0}, "not supported"),
    ],
)
def test_rope_scaling(tiny_dir: Path, tmp_path: Path, rope: dict, expect: str | None) -> None:
    model = _copy_without(tiny_dir, tmp_path / "rope", "config.json")
    cfg = json.loads((tiny_dir / "config.json").read_text())
    cfg["llm_config"]["rope_scaling"] = rope
    (model / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "rope.gguf"
    if expect == "not supported":
        with pytest.raises(R1VError, match="not supported"):
            export_llm_gguf(model, out, "Q8_0", progress=False)
        assert not out.exists()
        return
    export_llm_gguf(model, out, "Q8_0", progress=False)
    field = gguf.GGUFReader(out).get_field("qwen2.rope.scaling.type")
    assert (field.contents() if field else None) == expect
    if expect == "yarn":
        r = gguf.GGUFReader(out)
        assert r.get_field("qwen2.rope.scaling.factor").contents() == 4.0
        assert r.get_field("qwen2.rope.scaling.original_context_length").contents() == 32768


def test_interrupted_export_leaves_nothing(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = gguf_llm._convert
    calls: list[str] = []

    def boom(ckpt, t):  # dies part-way through the tensor data
        calls.append(t.name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(ckpt, t)

    monkeypatch.setattr(gguf_llm, "_convert", boom)
    for t in ("Q8_0", "Q4_K_M"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            export_llm_gguf(tiny_dir, tmp_path / f"m-{t}.gguf", t, progress=False)
    assert list(tmp_path.iterdir()) == []


def _cli() -> Group:
    group = Group()  # the real CLI's error handling: R1VError -> one line, exit 2
    group.add_command(gguf_command)
    return group


def test_cli(tiny_dir: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    r = runner.invoke(_cli(), ["gguf", str(tiny_dir), "--out", str(tmp_path), "--type", "q8_0", "--json"])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert (
        Path(report["llm"]["path"]) == tmp_path / f"{tiny_dir.name}-Q8_0.gguf"
        and report["llm"]["tensors"] > 0
    )
    mm = Path(report["mmproj"]["path"])
    assert mm == tmp_path / f"mmproj-{tiny_dir.name}-F16.gguf" and mm.is_file()
    assert gguf.GGUFReader(mm).get_field("clip.projector_type").contents() == "internvl"
    r = runner.invoke(_cli(), ["gguf", str(tiny_dir), "--out", str(tmp_path), "--type", "Q8_0"])
    assert r.exit_code == 2 and "already exists" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(_cli(), ["gguf", str(tiny_dir), "--out", str(tmp_path), "--type", "Q7"])
    assert r.exit_code == 2 and "unsupported GGUF type" in r.output
    r = runner.invoke(_cli(), ["gguf", str(tmp_path / "nope"), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "no such directory" in r.output


def test_r1v3_flavour(tiny_rms_dir: Path, tmp_path: Path) -> None:
    # ChatML flavour: pre-tokenizer "qwen2", eos <|im_end|>, no bos in tokenizer_config (config's id is used).
    out = tmp_path / "r1v3.gguf"
    export_llm_gguf(tiny_rms_dir, out, "F16", progress=False)
    tok = R1VTokenizer.from_dir(tiny_rms_dir)
    r = gguf.GGUFReader(out)
    assert r.get_field("tokenizer.ggml.pre").contents() == "qwen2"
    assert r.get_field("tokenizer.ggml.eos_token_id").contents() == tok.token_to_id("<|im_end|>")
    assert r.get_field("tokenizer.ggml.bos_token_id").contents() == load_spec(tiny_rms_dir).llm.bos_token_id
    text = build_prompt("r1v3", [{"role": "user", "content": f"<img>{IMG_CONTEXT * 3}</img>\nHow many?"}])
    llm = llama_cpp.Llama(model_path=str(out), vocab_only=True, verbose=False)
    try:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
    finally:
        llm.close()
    # Logits on a text-only prompt (the torch reference wants pixels for <IMG_CONTEXT>).
    ids = tok.encode(build_prompt("r1v3", [{"role": "user", "content": "What is 6 * 7?"}]))
    want = R1VModel.from_checkpoint(tiny_rms_dir)(torch.tensor([ids]))[0].numpy()
    got = llama_logits(out, ids)
    assert_same_top1(got, want)
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()


@pytest.mark.parametrize("ftype", [n for n, t in storage.FILE_TYPES.items() if t.writer == "llama.cpp"])
def test_storage_registry_predicts_every_tensor_type_llama_cpp_writes(
    ggufs: dict[str, Path], tiny_dir: Path, tmp_path: Path, ftype: str
) -> None:
    # The registry's per-tensor rule (inspect / plan sizes) against libllama's own quantizer's choices.
    spec = load_spec(tiny_dir)
    out = tmp_path / f"m-{ftype}.gguf"
    llama_quantize(ggufs["F16"], out, ftype)
    got = {x.name: x.tensor_type.name for x in gguf.GGUFReader(out).tensors}
    gqa = spec.llm.num_heads // spec.llm.num_kv_heads
    shapes = spec.tensor_shapes()
    want = {}
    for hf, shape in shapes.items():
        name = gguf_llm.gguf_tensor_name(hf, spec.llm.num_layers)
        if name is not None:
            want[name] = storage.gguf_type(hf, ftype, spec.llm.num_layers, gqa=gqa, ncols=shape[-1])
    assert got == want
    # and the bytes `inspect` / `plan` predict are the bytes of the tensors written
    predicted = storage.weight_bytes(spec, ftype)
    llm_bytes = sum(v for k, v in predicted.items() if k not in ("vision", "projector"))
    assert sum(int(x.n_bytes) for x in gguf.GGUFReader(out).tensors) == llm_bytes
