"""The checkpoint's tokenizer, read with the ``tokenizers`` library alone (no transformers at runtime).

Reads ``tokenizer.json`` plus, when present, ``tokenizer_config.json`` (bos/eos strings, chat template),
``chat_template.jinja`` (where newer transformers save the template) and ``generation_config.json``
(extra eos ids). Token ids are always looked up, never assumed: the three R1V releases use three
different base tokenizers, so ``<IMG_CONTEXT>`` and friends sit at different ids.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from r1v_quant.model.prompts import IMG_CONTEXT, IMG_END, IMG_START, THINK_END, THINK_START, get_chat_format
from r1v_quant.util.errors import R1VError


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a checkpoint file, or a one-line R1VError."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise R1VError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise R1VError(f"{path} is not a JSON object")
    return data


def _token_text(value: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a plain string or an AddedToken dict."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _chat_template_of(config: dict[str, Any], directory: Path) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if isinstance(template, str):
        return template
    jinja_file = directory / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    return None


def _eos_ids_of(generation_config: dict[str, Any]) -> list[int]:
    eos = generation_config.get("eos_token_id")
    if isinstance(eos, int):
        return [eos]
    if isinstance(eos, list):
        return [i for i in eos if isinstance(i, int)]
    return []


class R1VTokenizer:
    """A checkpoint's tokenizer: encode/decode, special-token ids, stop ids and chat template."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        *,
        config: dict[str, Any] | None = None,
        generation_config: dict[str, Any] | None = None,
        chat_template: str | None = None,
        source: Path | None = None,
    ) -> None:
        self._tok = tokenizer
        self._config = dict(config or {})
        self._generation_config = dict(generation_config or {})
        self.chat_template: str | None = chat_template
        self.source = source

    @classmethod
    def from_dir(cls, path: str | Path) -> R1VTokenizer:
        """Load from a checkpoint (or tokenizer) directory holding ``tokenizer.json``."""
        directory = Path(path)
        tokenizer_file = directory / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise R1VError(
                f"no tokenizer.json in {directory} (a slow-only tokenizer with just vocab.json/merges.txt "
                "must first be re-saved as a fast tokenizer)"
            )
        try:
            tokenizer = Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # the Rust side raises a bare Exception for malformed files
            raise R1VError(f"cannot load {tokenizer_file}: {exc}") from exc
        config_file = directory / "tokenizer_config.json"
        config = read_json(config_file) if config_file.is_file() else {}
        gen_file = directory / "generation_config.json"
        generation_config = read_json(gen_file) if gen_file.is_file() else {}
        return cls(
            tokenizer,
            config=config,
            generation_config=generation_config,
            chat_template=_chat_template_of(config, directory),
            source=directory,
        )

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """Ids of ``text``: special and added tokens in it map to their single ids; no BOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def __len__(self) -> int:
        # Full vocab including added tokens (the embedding table must have at least this many rows).
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (e.g. for GGUF export of vocab and merges)."""
        return self._tok

    # ------------------------------------------------------------------ special tokens

    @property
    def img_context_id(self) -> int | None:
        return self.token_to_id(IMG_CONTEXT)

    @property
    def img_start_id(self) -> int | None:
        return self.token_to_id(IMG_START)

    @property
    def img_end_id(self) -> int | None:
        return self.token_to_id(IMG_END)

    @property
    def think_start_id(self) -> int | None:
        # None for R1V3, whose tokenizer has no <think> token (it is spelled with ordinary BPE pieces).
        return self.token_to_id(THINK_START)

    @property
    def think_end_id(self) -> int | None:
        return self.token_to_id(THINK_END)

    @property
    def bos_token(self) -> str | None:
        return _token_text(self._config.get("bos_token"))

    @property
    def eos_token(self) -> str | None:
        return _token_text(self._config.get("eos_token"))

    @property
    def pad_token(self) -> str | None:
        return _token_text(self._config.get("pad_token"))

    def stop_ids(self, flavor: str) -> list[int]:
        """Ids that end generation, without duplicates: the flavour's stop tokens present in this vocab, then
        generation_config's ``eos_token_id`` entries (tokenizer_config's eos only if both give nothing)."""
        fmt = get_chat_format(flavor)
        ids: list[int] = []
        for token in fmt.stop_tokens:
            token_id = self.token_to_id(token)
            if token_id is not None:
                ids.append(token_id)
        ids += _eos_ids_of(self._generation_config)
        if not ids and self.eos_token is not None and self.token_to_id(self.eos_token) is not None:
            ids.append(self.token_to_id(self.eos_token))  # last resort: the tokenizer's own eos
        if not ids:
            raise R1VError(
                f"none of the {flavor} stop tokens ({', '.join(fmt.stop_tokens)}) is in the vocab of "
                f"{self.source or 'this tokenizer'} and no eos id is configured: wrong flavour?"
            )
        return list(dict.fromkeys(ids))

    def __repr__(self) -> str:
        return f"R1VTokenizer(source={str(self.source)!r}, vocab={len(self)})"
