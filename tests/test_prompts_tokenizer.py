"""Chat formats, Jinja templates, the tiny Qwen2-style tokenizer and R1VTokenizer."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import pytest

from r1v_quant.model.prompts import (
    CHAT_FORMATS,
    DS_BOS,
    DS_EOS,
    IMG_CONTEXT,
    INTERNVL_TOKENS,
    build_prompt,
    expand_image_tokens,
    render_chat_template,
    split_thinking,
)
from r1v_quant.model.tiny_tokenizer import (
    ADDED_TOKENS,
    QWEN2_PATTERN,
    build_tiny_tokenizer,
    tiny_corpus_extra,
)
from r1v_quant.model.tokenizer import R1VTokenizer
from r1v_quant.util.errors import R1VError

FLAVORS = ("r1v", "r1v2", "r1v3")
Q = "<image>\nWhat is the area of the triangle?"

# ---------------------------------------------------------------------------------------------- prompts


def test_deepseek_tokens_use_fullwidth_bar_and_block() -> None:
    # U+FF5C FULLWIDTH VERTICAL LINE and U+2581 LOWER ONE EIGHTH BLOCK, not ASCII | and _.
    assert DS_BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
    assert DS_EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert DS_BOS == "<｜begin▁of▁sentence｜>"


def test_flavours_are_data() -> None:
    assert set(CHAT_FORMATS) == set(FLAVORS)
    assert {type(f) for f in CHAT_FORMATS.values()} == {type(CHAT_FORMATS["r1v"])}
    assert all(f.default_system is None for f in CHAT_FORMATS.values())
    assert CHAT_FORMATS["r1v"].stop_tokens == ("<｜end▁of▁sentence｜>", "<|endoftext|>")
    assert CHAT_FORMATS["r1v2"].stop_tokens == ("<|im_end|>", "<|endoftext|>")
    assert CHAT_FORMATS["r1v3"].stop_tokens == ("<|im_end|>",)
    with pytest.raises(dataclasses.FrozenInstanceError):
        CHAT_FORMATS["r1v"].bos = ""  # type: ignore[misc]


SINGLE = {
    "r1v": "<｜begin▁of▁sentence｜><｜User｜>\n<image>\nWhat is the area of the triangle?"
    "<｜Assistant｜><think>\n",
    "r1v2": "<|im_start|>user\n<image>\nWhat is the area of the triangle?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n",
    "r1v3": "<|im_start|>user\n<image>\nWhat is the area of the triangle?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n",
}
WITH_SYSTEM = {
    "r1v": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>\n<image>\nWhat is the area of the triangle?"
    "<｜Assistant｜><think>\n",
    "r1v2": "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat is the area of the triangle?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n",
    "r1v3": "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat is the area of the triangle?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n",
}
MULTI_TURN_MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": Q},
    {"role": "assistant", "content": "Half base times height.\n</think>\n\n6 cm^2"},
    {"role": "user", "content": "And doubled?"},
]
MULTI = {
    "r1v": "<｜begin▁of▁sentence｜>Be brief.<｜User｜>\n<image>\nWhat is the area of the triangle?"
    "<｜Assistant｜>6 cm^2<｜end▁of▁sentence｜><｜User｜>\nAnd doubled?<｜Assistant｜><think>\n",
    "r1v2": "<|im_start|>system\nBe brief.<|im_end|>\n"
    "<|im_start|>user\n<image>\nWhat is the area of the triangle?<|im_end|>\n"
    "<|im_start|>assistant\n6 cm^2<|im_end|>\n"
    "<|im_start|>user\nAnd doubled?<|im_end|>\n"
    "<|im_start|>assistant\n<think>\n",
}
MULTI["r1v3"] = MULTI["r1v2"]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_exact_prompts(flavor: str) -> None:
    assert build_prompt(flavor, [{"role": "user", "content": Q}]) == SINGLE[flavor]
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q}]
    assert build_prompt(flavor, system) == WITH_SYSTEM[flavor]
    # History turns lose their reasoning; the generation prompt reopens <think>.
    assert build_prompt(flavor, MULTI_TURN_MESSAGES) == MULTI[flavor]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_think_false_and_no_generation_prompt(flavor: str) -> None:
    msgs = [{"role": "user", "content": Q}]
    fmt = CHAT_FORMATS[flavor]
    with_think = build_prompt(flavor, msgs)
    without = build_prompt(flavor, msgs, think=False)
    assert with_think == without + "<think>\n"
    assert without.endswith(fmt.assistant_prefix)
    bare = build_prompt(flavor, msgs, add_generation_prompt=False)
    assert without == bare + fmt.assistant_prefix
    # A final assistant message is rendered verbatim, reasoning included (full sequences for calibration).
    full = build_prompt(
        flavor,
        [*msgs, {"role": "assistant", "content": "<think>\nx\n</think>\n\n6"}],
        add_generation_prompt=False,
    )
    assert full == bare + fmt.assistant_prefix + "<think>\nx\n</think>\n\n6" + fmt.assistant_suffix


CONVERSATIONS = [
    [{"role": "user", "content": Q}],
    [{"role": "system", "content": "You are a careful math tutor."}, {"role": "user", "content": Q}],
    MULTI_TURN_MESSAGES,
    [
        {"role": "user", "content": "Hi 'there' \\ {{ not jinja }} {% raw %}"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "图中有几只猫？\n\n"},
        {"role": "assistant", "content": "reasoning\n</think>\n\n两只。"},
        {"role": "user", "content": "<image>\n<image>\nCompare."},
    ],
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
def test_jinja_template_matches_build_prompt(flavor: str, conv: int) -> None:
    template = CHAT_FORMATS[flavor].chat_template
    msgs = CONVERSATIONS[conv]
    assert render_chat_template(template, msgs) == build_prompt(flavor, msgs)
    assert render_chat_template(template, msgs, enable_thinking=False) == build_prompt(
        flavor, msgs, think=False
    )
    # bos_token passed by the caller must not matter: the template writes its BOS literally.
    assert render_chat_template(template, msgs, bos_token=DS_BOS, eos_token=DS_EOS) == build_prompt(
        flavor, msgs
    )
    closed = [*msgs, {"role": "assistant", "content": "thinking\n</think>\n\nDone."}]
    assert render_chat_template(template, closed, add_generation_prompt=False) == build_prompt(
        flavor, closed, add_generation_prompt=False
    )
    assert render_chat_template(template, msgs, add_generation_prompt=False) == build_prompt(
        flavor, msgs, add_generation_prompt=False
    )


BAD = [
    [],
    [{"role": "assistant", "content": "first"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}],
    [{"role": "system", "content": "only system"}],
    [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],  # generation after assistant
    [{"role": "tool", "content": "x"}],
]


@pytest.mark.parametrize("flavor", FLAVORS)
@pytest.mark.parametrize("bad", range(len(BAD)))
def test_bad_role_order_raises_in_both_renderers(flavor: str, bad: int) -> None:
    with pytest.raises(R1VError):
        build_prompt(flavor, BAD[bad])
    with pytest.raises(R1VError):
        render_chat_template(CHAT_FORMATS[flavor].chat_template, BAD[bad])


def test_bad_inputs() -> None:
    with pytest.raises(R1VError, match="unknown chat flavour"):
        build_prompt("r1v9", [{"role": "user", "content": "x"}])
    with pytest.raises(R1VError, match="content must be a string"):
        build_prompt("r1v", [{"role": "user", "content": None}])
    with pytest.raises(R1VError):
        build_prompt("r1v", [{"role": "user"}])


def test_expand_image_tokens() -> None:
    out = expand_image_tokens("<image>\n<image>\nQ", [2, 1], tokens_per_tile=3)
    assert out == "<img>" + "<IMG_CONTEXT>" * 6 + "</img>\n<img>" + "<IMG_CONTEXT>" * 3 + "</img>\nQ"
    assert expand_image_tokens(Q, [1]).count(IMG_CONTEXT) == 256
    with pytest.raises(R1VError, match="1 <image> tag"):
        expand_image_tokens(Q, [1, 1])


def test_split_thinking() -> None:
    assert split_thinking("Let me see.\n</think>\n\nThe answer is 6.") == ("Let me see.", "The answer is 6.")
    assert split_thinking("<think>\nhmm\n</think>\n\n6") == ("hmm", "6")
    # Ran out of tokens mid-thought: no answer yet.
    assert split_thinking("still thinking about it") == ("still thinking about it", "")
    assert split_thinking("plain answer", think_opened=False) == ("", "plain answer")
    assert split_thinking("a</think>b</think>c") == ("a</think>b", "c")  # the last one ends the reasoning
    assert split_thinking("") == ("", "")


# -------------------------------------------------------------------------------------------- tokenizer


def _corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    text = (
        "the image shows a triangle with base and height so its area is half of their product we need to "
        "count how many cats dogs birds are in picture answer think step first then compute total number"
    )
    words = text.split(" ")
    lines = []
    for _ in range(400):
        n = rng.randint(5, 15)
        lines.append(" ".join(rng.choice(words) for _ in range(n)) + f" {rng.randint(0, 99999)}.")
    return lines + tiny_corpus_extra() * 5


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    dirs = {}
    for flavor in FLAVORS:
        d = tmp_path_factory.mktemp(f"tok_{flavor}")
        build_tiny_tokenizer(d, flavor, _corpus(), vocab_size=1000)
        dirs[flavor] = d
    return dirs


ROUND_TRIP = [
    "Hello, world! It's 2025-07-15; they're here.",
    "图中显示了一个三角形，求它的面积。答案是 42。",
    "def f(x):\n    return x ** 2  # square\n",
    "3.14159 -17 1,234,567 0x1F 1e-6",
    "emoji 🙂🚀👨‍👩‍👧 and ∑√π",
    "   leading spaces\t\ttabs\n\n\n  trailing   ",
    "mixed<think>\nreasoning\n</think>\n\nanswer<|im_end|>",
    "<img><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat is shown?",
    "Café naïve ﬁ Å",  # NFC leaves these; decomposed input would be composed
    "",
]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_round_trip(tok_dirs: dict[str, Path], flavor: str) -> None:
    tok = R1VTokenizer.from_dir(tok_dirs[flavor])
    for text in ROUND_TRIP:
        assert tok.decode(tok.encode(text)) == text, text
    # Byte-level alphabet: characters never seen in training still round-trip.
    rare = "ꙮ𝔘𓀀 Ω"
    assert tok.decode(tok.encode(rare)) == rare
    # The trained merges compress common text well below one token per byte.
    sample = "the image shows a triangle"
    assert len(tok.encode(sample)) < len(sample.encode()) / 2
    # NFC normalizer: a decomposed accent encodes like the composed character.
    assert tok.encode("Cafe\u0301") == tok.encode("Caf\u00e9")


def test_special_tokens_are_single_ids(tok_dirs: dict[str, Path]) -> None:
    tok = R1VTokenizer.from_dir(tok_dirs["r1v3"])
    base = tok.backend.get_vocab_size(with_added_tokens=False)
    for i, (content, _special) in enumerate(ADDED_TOKENS):
        ids = tok.encode(content)
        assert ids == [base + i], content  # added tokens take the last ids, in order, like Qwen2
        assert tok.id_to_token(ids[0]) == content
        assert tok.encode(f"x{content}y")[1:-1] == ids  # recognised inside text too
    assert len(tok) == base + len(ADDED_TOKENS) <= 1000
    assert tok.encode(IMG_CONTEXT * 256) == [tok.img_context_id] * 256
    assert tok.img_start_id == tok.token_to_id("<img>") is not None
    assert tok.img_end_id == tok.token_to_id("</img>") is not None
    assert tok.think_start_id is not None and tok.think_end_id is not None
    assert tok.token_to_id("<not-a-token>") is None
    # <think> is not special (as in QwQ): skip_special_tokens keeps it, drops the ChatML markers.
    ids = tok.encode("<|im_start|>assistant\n<think>\nok</think><|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nok</think>"


@pytest.mark.parametrize("flavor", FLAVORS)
def test_prompt_tokenises_cleanly(tok_dirs: dict[str, Path], flavor: str) -> None:
    tok = R1VTokenizer.from_dir(tok_dirs[flavor])
    prompt = expand_image_tokens(build_prompt(flavor, MULTI_TURN_MESSAGES), [2])
    ids = tok.encode(prompt)
    assert tok.decode(ids) == prompt
    assert ids.count(tok.img_context_id) == 512
    assert ids[-2:] == [tok.think_start_id, tok.encode("\n")[0]]
    if flavor == "r1v":
        assert ids[0] == tok.token_to_id(DS_BOS)


def test_config_and_stop_ids(tok_dirs: dict[str, Path], tmp_path: Path) -> None:
    r1v = R1VTokenizer.from_dir(tok_dirs["r1v"])
    assert r1v.bos_token == DS_BOS and r1v.eos_token == DS_EOS
    assert r1v.chat_template == CHAT_FORMATS["r1v"].chat_template
    assert r1v.stop_ids("r1v") == [r1v.token_to_id(DS_EOS), r1v.token_to_id("<|endoftext|>")]
    r1v2 = R1VTokenizer.from_dir(tok_dirs["r1v2"])
    assert r1v2.bos_token is None and r1v2.eos_token == "<|im_end|>" and r1v2.pad_token == "<|endoftext|>"
    assert r1v2.stop_ids("r1v3") == [r1v2.token_to_id("<|im_end|>")]
    with pytest.raises(R1VError, match="unknown chat flavour"):
        r1v2.stop_ids("nope")

    # generation_config eos ids are appended (deduplicated), as R1V2-AWQ lists [im_start, im_end].
    d = tmp_path / "with_gen"
    d.mkdir()
    for f in tok_dirs["r1v2"].iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    im_start, im_end = r1v2.token_to_id("<|im_start|>"), r1v2.token_to_id("<|im_end|>")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [im_start, im_end]}))
    tok = R1VTokenizer.from_dir(d)
    assert tok.stop_ids("r1v2") == [im_end, tok.token_to_id("<|endoftext|>"), im_start]

    # Newer transformers keep the template in chat_template.jinja instead of tokenizer_config.json.
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert R1VTokenizer.from_dir(d).chat_template is None
    (d / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    assert R1VTokenizer.from_dir(d).chat_template == "{{ messages[0]['content'] }}"


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(R1VError, match=str(tmp_path)):
        R1VTokenizer.from_dir(tmp_path)


def test_unknown_flavour_and_tiny_vocab(tmp_path: Path) -> None:
    with pytest.raises(R1VError, match="unknown chat flavour"):
        build_tiny_tokenizer(tmp_path, "r2", ["x"], vocab_size=1000)
    with pytest.raises(R1VError, match="too small"):
        build_tiny_tokenizer(tmp_path, "r1v", ["x"], vocab_size=100)


def test_deterministic(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    build_tiny_tokenizer(a, "r1v2", _corpus(1), vocab_size=1000)
    build_tiny_tokenizer(b, "r1v2", _corpus(1), vocab_size=1000)
    names = sorted(p.name for p in a.iterdir())
    assert names == [
        "added_tokens.json",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_tokenizer_json_is_qwen2_shaped(tok_dirs: dict[str, Path]) -> None:
    data = json.loads((tok_dirs["r1v2"] / "tokenizer.json").read_text(encoding="utf-8"))
    assert data["normalizer"] == {"type": "NFC"}
    split, byte_level = data["pre_tokenizer"]["pretokenizers"]
    assert split["type"] == "Split" and split["behavior"] == "Isolated" and split["invert"] is False
    # Qwen2's split, character for character (llama.cpp's "qwen2" pre-tokenizer is the same expression).
    expected = (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
        r"|\s*[\r\n]+|\s+(?!\S)|\s+"
    )
    assert split["pattern"]["Regex"] == QWEN2_PATTERN == expected
    assert byte_level == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    assert data["post_processor"]["type"] == "ByteLevel" and data["post_processor"]["trim_offsets"] is False
    assert data["decoder"]["type"] == "ByteLevel"
    assert data["model"]["type"] == "BPE" and data["model"]["byte_fallback"] is False
    added = {t["content"]: t["special"] for t in data["added_tokens"]}
    assert added["<think>"] is False and added["</think>"] is False
    assert all(added[t] for t in INTERNVL_TOKENS)
    cfg = json.loads((tok_dirs["r1v2"] / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["eos_token"] == "<|im_end|>" and cfg["pad_token"] == "<|endoftext|>"
    assert set(cfg["added_tokens_decoder"]) == {str(t["id"]) for t in data["added_tokens"]}


# ----------------------------------------------------------------------------------------- transformers

TRANSFORMERS_STRINGS = [
    *ROUND_TRIP,
    "<｜begin▁of▁sentence｜><｜User｜>\nhi<｜Assistant｜><think>\n",
    "a" * 50 + " " * 7 + "b",
    "<box>[[1, 2, 3, 4]]</box><ref>cat</ref><quad></quad>",
    "Cafe\u0301 decomposed",
]


@pytest.mark.parametrize("flavor", FLAVORS)
def test_transformers_autotokenizer_agrees(
    tok_dirs: dict[str, Path], flavor: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(tok_dirs[flavor]), local_files_only=True)
    tok = R1VTokenizer.from_dir(tok_dirs[flavor])
    assert len(hf) == len(tok)
    for text in TRANSFORMERS_STRINGS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text), text
        # No BOS/EOS is added by default either (the template writes r1v's BOS itself).
        assert hf(text)["input_ids"] == tok.encode(text), text
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))
    for msgs in CONVERSATIONS:
        rendered = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert rendered == build_prompt(flavor, msgs)
    assert hf.eos_token == CHAT_FORMATS[flavor].stop_tokens[0]
    assert hf.convert_tokens_to_ids(IMG_CONTEXT) == tok.img_context_id
