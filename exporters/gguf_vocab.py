"""The checkpoint's tokenizer as GGUF metadata (llama.cpp's `gpt2` BPE vocab), read from the JSON files alone.

What llama.cpp needs, as its own converter writes it (`_set_vocab_gpt2` + `gguf.SpecialVocab`): the token
list padded to the model's vocab size, a type per token, the merges, the pre-tokenizer name, bos/eos/pad ids
and the chat template. Added tokens flagged `special` (and ones that look special, `<|…|>`/`<｜…｜>`) become
CONTROL, other added tokens (`<think>`, `</think>` in Qwen/QwQ-style vocabs) USER_DEFINED: llama.cpp always
matches USER_DEFINED text, CONTROL text only when asked to parse special tokens, which is HF's behaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1v_quant.errors import R1VError
from r1v_quant.tiny_tokenizer import QWEN2_PATTERN
from r1v_quant.tokenizer import R1VTokenizer, read_json

# `tokenizer.ggml.pre` per flavour. Both names select LLAMA_VOCAB_PRE_TYPE_QWEN2 in the llama.cpp vendored
# by llama-cpp-python 0.3.36 (src/llama-vocab.cpp), whose regex is Qwen2's split with the (?i:…)
# contractions spelled as case classes; the names only mirror what llama.cpp's converter writes for each
# base tokenizer (DeepSeek-R1-Distill-Qwen -> "deepseek-r1-qwen", QwQ / Qwen2.5 -> "qwen2").
PRE_TOKENIZER = {"r1v": "deepseek-r1-qwen", "r1v2": "qwen2", "r1v3": "qwen2"}

# gguf.TokenType values (kept as ints so this module imports without the optional gguf package).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    pre: str
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None
    chat_template: str | None


def looks_special(text: str) -> bool:
    """Added tokens some releases forget to flag as special (llama.cpp's `does_token_look_special`)."""
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def _split_pattern(pre: Any) -> str | None:
    """The regex of the first `Split` pre-tokenizer (Qwen2 wraps it in a Sequence with ByteLevel)."""
    if not isinstance(pre, dict):
        return None
    if pre.get("type") == "Sequence":
        for p in pre.get("pretokenizers", []):
            if (found := _split_pattern(p)) is not None:
                return found
        return None
    if pre.get("type") == "Split":
        return (pre.get("pattern") or {}).get("Regex")
    return None


def _check_qwen2_bpe(tok: dict[str, Any], where: Path) -> None:
    # llama.cpp re-implements the pre-tokenizer from the `pre` name, not from tokenizer.json: refuse a vocab
    # whose split differs, or the GGUF would silently tokenise text differently from the checkpoint.
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise R1VError(f"{where}: tokenizer model is {model.get('type')!r}, expected byte-level BPE")
    pattern = _split_pattern(tok.get("pre_tokenizer"))
    if pattern != QWEN2_PATTERN:
        raise R1VError(
            f"{where}: pre-tokenizer split is {pattern!r}, not Qwen2's: llama.cpp would tokenise differently"
        )


def pre_tokenizer_name(hf: R1VTokenizer, flavor: str) -> str:
    """`tokenizer.ggml.pre` as llama.cpp's converter names it: by the hash of its check text's ids when the
    vocabulary is one it knows (the real Qwen2 / DeepSeek-R1-Distill-Qwen ones), else by flavour."""
    from r1v_quant.qwen2_vocab import llamacpp_pre_name

    known = llamacpp_pre_name(lambda text: hf.backend.encode(text, add_special_tokens=True).ids)
    return known or PRE_TOKENIZER[flavor]


def _merges(model: dict[str, Any]) -> list[str]:
    merges = model.get("merges") or []
    out: list[str] = []
    for m in merges:
        if isinstance(m, str):
            out.append(m)
        elif isinstance(m, list) and len(m) == 2:
            # transformers >= 4.45 writes pairs; GGUF keeps "a b" strings with literal spaces as U+0120.
            out.append(" ".join(part.replace(" ", "\u0120") for part in m))
        else:
            raise R1VError(f"unknown merges entry {m!r} in tokenizer.json")
    return out


def load_vocab(
    model_dir: Path | str,
    *,
    flavor: str,
    vocab_size: int,
    bos_fallback: int | None = None,
    eos_fallback: int | None = None,
) -> GGUFVocab:
    """Read tokenizer.json + tokenizer_config.json of `model_dir` into GGUF vocab fields.

    `vocab_size` is the embedding table's row count (llm_config.vocab_size): ids the tokenizer does not use
    become `[PADi]` UNUSED entries, as llama.cpp requires one token per row. The fallbacks (config.json's
    ids) apply when tokenizer_config.json names no bos/eos token (QwQ's has no bos).
    """
    model_dir = Path(model_dir)
    for name in TOKENIZER_FILES:
        if not (model_dir / name).is_file():
            raise R1VError(f"{model_dir}: no {name} (GGUF export needs the checkpoint's tokenizer files)")
    if flavor not in PRE_TOKENIZER:
        raise R1VError(f"unknown flavour {flavor!r}: expected one of {', '.join(PRE_TOKENIZER)}")
    tok = read_json(model_dir / "tokenizer.json")
    hf = R1VTokenizer.from_dir(model_dir)  # bos/eos/pad strings and chat template, as the runtime reads them
    _check_qwen2_bpe(tok, model_dir / "tokenizer.json")

    by_id: dict[int, str] = {}
    types: dict[int, int] = {}
    for text, i in (tok["model"].get("vocab") or {}).items():
        by_id[int(i)] = text
        types[int(i)] = NORMAL
    for added in tok.get("added_tokens") or []:
        i, text = int(added["id"]), added["content"]
        by_id[i] = text
        types[i] = CONTROL if added.get("special") or looks_special(text) else USER_DEFINED
    if not by_id:
        raise R1VError(f"{model_dir}/tokenizer.json: empty vocab")
    if max(by_id) >= vocab_size:
        raise R1VError(
            f"tokenizer has id {max(by_id)} but the model's vocab_size is {vocab_size} (mismatched files?)"
        )
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(vocab_size)]
    token_types = [types.get(i, UNUSED) for i in range(vocab_size)]

    def special_id(key: str, text: str | None) -> int | None:
        if text is None:
            return None
        i = hf.token_to_id(text)
        if i is None:
            raise R1VError(f"tokenizer_config.json: {key} {text!r} is not in the vocab")
        return i

    bos, eos = special_id("bos_token", hf.bos_token), special_id("eos_token", hf.eos_token)
    return GGUFVocab(
        tokens=tokens,
        token_types=token_types,
        merges=_merges(tok["model"]),
        pre=pre_tokenizer_name(hf, flavor),
        bos_id=bos if bos is not None else bos_fallback,
        eos_id=eos if eos is not None else eos_fallback,
        pad_id=special_id("pad_token", hf.pad_token),
        chat_template=hf.chat_template,
    )


def add_vocab(writer: Any, vocab: GGUFVocab) -> None:
    """Write the `tokenizer.*` keys with a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    writer.add_token_merges(vocab.merges)
    if vocab.bos_id is not None:
        writer.add_bos_token_id(vocab.bos_id)
    if vocab.eos_id is not None:
        writer.add_eos_token_id(vocab.eos_id)
    if vocab.pad_id is not None:
        writer.add_pad_token_id(vocab.pad_id)
    # Never add BOS/EOS implicitly: R1VTokenizer.encode adds none, and r1v's chat template writes its BOS
    # text itself, so llama.cpp adding one would double it.
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(False)
    if vocab.chat_template:
        writer.add_chat_template(vocab.chat_template)
