"""A small tokenizer built exactly like Qwen2's, for tiny replicas of the R1V checkpoints.

Same normalizer, pre-tokenizer regex, byte-level BPE and added tokens as the real models, only with a vocab
trained on a small corpus, so tests exercise the same code paths (and llama.cpp's ``qwen2`` pre-tokenizer
splits text the same way) without a 7 MB tokenizer.json.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer

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
from r1v_quant.util.errors import R1VError

# Qwen2's pre-tokenizer split; llama.cpp's "qwen2" pre-tokenizer uses the same expression (spelled with
# case classes instead of (?i:...)), so a GGUF of this tokenizer splits text identically.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)

# Added tokens in id order after the BPE vocab, as (content, special). Every flavour carries all of them so
# any flavour's chat template tokenises into single ids. <think>/</think> are not special, as in Qwen/QwQ:
# skip_special_tokens must keep them so reasoning can still be split off after decoding.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    (ENDOFTEXT, True),
    (IM_START, True),
    (IM_END, True),
    (DS_BOS, True),
    (DS_EOS, True),
    (DS_USER, True),
    (DS_ASSISTANT, True),
    (THINK_START, False),
    (THINK_END, False),
    *((tok, True) for tok in INTERNVL_TOKENS),
)

# bos/eos/pad and context length of each released checkpoint's tokenizer_config.json.
_FLAVOR_TOKENS: dict[str, dict[str, Any]] = {
    "r1v": {"bos_token": DS_BOS, "eos_token": DS_EOS, "pad_token": DS_EOS, "model_max_length": 16384},
    "r1v2": {"bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT, "model_max_length": 131072},
    "r1v3": {"bos_token": None, "eos_token": IM_END, "pad_token": ENDOFTEXT, "model_max_length": 16384},
}


def tiny_corpus_extra() -> list[str]:
    """Lines of Chinese, code, numbers, emoji and whitespace to mix into a training corpus for merges."""
    return [
        "图中显示了一个三角形，求它的面积。",
        "这张图片里有几只猫？请一步一步思考。",
        "答案是 42。我们先计算 6 乘以 7，得到四十二。",
        "视觉语言模型把图像和文字一起理解。",
        "def area(base: float, height: float) -> float:\n    return 0.5 * base * height\n",
        "for i in range(10):\n    print(i, i ** 2)\n",
        'if __name__ == "__main__":\n\tmain()\n',
        "x = [1, 2, 3]; y = {'a': 1, \"b\": 2.5}  # comment",
        "3.14159 2.71828 1e-6 -17 +42 100% 1,234,567 0x1F 2025-07-15 12:30:45",
        "The answer is 37 * 45 = 1665. So the area is 1665 cm^2.",
        "Let me think step by step. First, 12 + 30 = 42; then 42 / 6 = 7.",
        "I'll check: it's 5, they're equal, we've done it, you'd agree, I'm sure.",
        "Emoji 🙂🚀 and symbols ∑ ∫ √ π ≤ ≥ ≠ → ← °C €",
        "   indented    text\twith\ttabs\n\n\nand blank lines  ",
    ]


def _new_tokenizer() -> Tokenizer:
    # Mirrors Qwen2's tokenizer.json component by component.
    tok = Tokenizer(
        models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    # No BOS template: prompts carry their BOS text themselves (r1v's template writes it literally).
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    return tok


def _dump_json(path: Path, obj: Any) -> None:
    # Fixed formatting and key order so the same corpus always gives byte-identical files.
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_tiny_tokenizer(out_dir: Path, flavor: str, corpus: Iterable[str], vocab_size: int = 4096) -> None:
    """Train a Qwen2-style byte-level BPE on ``corpus`` and write a complete HF tokenizer to ``out_dir``.

    ``vocab_size`` counts the added tokens too (they take the last ids, as in Qwen2); a corpus too small to
    fill it gives a smaller vocab. Writes tokenizer.json, tokenizer_config.json (with the flavour's chat
    template), special_tokens_map.json and added_tokens.json; loadable by R1VTokenizer and, offline, by
    ``transformers.AutoTokenizer``.
    """
    fmt = get_chat_format(flavor)  # validates the flavour name
    special = _FLAVOR_TOKENS[flavor]
    n_base = vocab_size - len(ADDED_TOKENS)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if n_base < len(alphabet):
        raise R1VError(
            f"vocab_size {vocab_size} is too small: it needs >= {len(alphabet) + len(ADDED_TOKENS)}"
        )

    tok = _new_tokenizer()
    # The full 256-symbol byte alphabet makes every string encodable, whatever the corpus covered.
    trainer = BpeTrainer(
        vocab_size=n_base,
        min_frequency=2,
        show_progress=False,
        initial_alphabet=alphabet,
        special_tokens=[],
    )
    tok.train_from_iterator((line for line in corpus), trainer=trainer)
    for content, is_special in ADDED_TOKENS:
        token = AddedToken(
            content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=is_special
        )
        # add_special_tokens vs add_tokens is what sets the "special" flag in tokenizer.json.
        if is_special:
            tok.add_special_tokens([token])
        else:
            tok.add_tokens([token])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Round-trip through json to pin indentation/key order instead of relying on Tokenizer.save's format.
    tokenizer_json = json.loads(tok.to_str())
    # The Python ByteLevel decoder takes no options and serialises GPT-2's defaults; Qwen2's file spells
    # them out as False (decoding is the same either way, only the file differs).
    tokenizer_json["decoder"] = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    _dump_json(out_dir / "tokenizer.json", tokenizer_json)

    ids = {content: tok.token_to_id(content) for content, _ in ADDED_TOKENS}
    added_tokens_decoder = {
        str(ids[content]): {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": is_special,
        }
        for content, is_special in ADDED_TOKENS
    }
    # Special tokens beyond bos/eos/pad, as the real checkpoints list them (InternVL adds its 9 here).
    extra_special = [
        c for c, s in ADDED_TOKENS if s and c not in (special["bos_token"], special["eos_token"])
    ]
    config: dict[str, Any] = {
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added_tokens_decoder,
        "additional_special_tokens": extra_special,
        "bos_token": special["bos_token"],
        "chat_template": fmt.chat_template,
        "clean_up_tokenization_spaces": False,
        "eos_token": special["eos_token"],
        "errors": "replace",
        "model_max_length": special["model_max_length"],
        "pad_token": special["pad_token"],
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2TokenizerFast",
        "unk_token": None,
    }
    _dump_json(out_dir / "tokenizer_config.json", config)

    special_map: dict[str, Any] = {"additional_special_tokens": extra_special}
    for key in ("bos_token", "eos_token", "pad_token"):
        if special[key] is not None:
            special_map[key] = {
                "content": special[key],
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
            }
    _dump_json(out_dir / "special_tokens_map.json", special_map)
    _dump_json(out_dir / "added_tokens.json", dict(sorted(ids.items(), key=lambda kv: kv[1])))
