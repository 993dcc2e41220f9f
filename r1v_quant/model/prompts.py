"""Chat prompts for the three Skywork-R1V releases.

Each release speaks the chat format of the LLM it was built from; the differences are pure data, so each
flavour is one frozen :class:`ChatFormat` in :data:`CHAT_FORMATS`:

* ``r1v``  (DeepSeek-R1-Distill-Qwen):
  ``<｜begin▁of▁sentence｜>{sys}<｜User｜>\\n{q}<｜Assistant｜><think>\\n``
* ``r1v2`` (QwQ-32B): ChatML, generation prompt ``<|im_start|>assistant\\n<think>\\n``
* ``r1v3`` (InternVL ``internvl2_5`` + think): the same ChatML shape, stop on ``<|im_end|>`` only

The Jinja chat template written into ``tokenizer_config.json`` is generated from the same fields, so
:func:`build_prompt` and :func:`render_chat_template` cannot drift apart. It takes a message's content as a
string or as OpenAI / transformers typed parts (``{"type": "text", "text": …}``, ``{"type": "image"}`` or
``{"type": "image_url", …}``), an image part becoming ``<image>``. The GGUF carries the same template with
llama.cpp's media marker ``<__media__>`` for an image part (``gguf_chat_template``): llama.cpp's multimodal
front ends (libmtmd, llama-cpp-python's ``MTMDChatHandler``, llama-server) put an image where it stands.

Rules shared by both renderers (as in the released DeepSeek-R1 / QwQ templates):

* an optional system message may only come first; then user and assistant strictly alternate, starting
  with the user;
* completed assistant turns *before the last message* lose their reasoning (everything up to ``</think>``
  and the newlines after it), because the models were trained on histories without it; the last message is
  rendered verbatim, so ``add_generation_prompt=False`` with a final ``<think>…</think>answer`` turn gives
  the full sequence a calibration or scoring pass needs;
* with ``add_generation_prompt=True`` the last message must be the user's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from r1v_quant.util.errors import R1VError

# Token strings shared by all flavours (InternVL image tokens, reasoning delimiters).
IMAGE_PLACEHOLDER = "<image>"
IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
THINK_START = "<think>"
THINK_END = "</think>"
# InternVL adds these 9 tokens to every base tokenizer (train/constants.py), in this order.
INTERNVL_TOKENS: tuple[str, ...] = (
    IMG_START,
    IMG_END,
    IMG_CONTEXT,
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
# One 448x448 tile becomes 256 <IMG_CONTEXT> tokens after the 0.5 pixel shuffle: (448/14)^2 * 0.25.
TOKENS_PER_TILE = 256
MTMD_MARKER = "<__media__>"  # libmtmd's default media marker: where llama.cpp puts an image's embeddings

# DeepSeek's special tokens use FULLWIDTH VERTICAL LINE (U+FF5C) and LOWER ONE EIGHTH BLOCK (U+2581);
# spelled with escapes so an editor cannot silently turn them into ASCII look-alikes.
DS_BOS = "<\uff5cbegin\u2581of\u2581sentence\uff5c>"
DS_EOS = "<\uff5cend\u2581of\u2581sentence\uff5c>"
DS_USER = "<\uff5cUser\uff5c>"
DS_ASSISTANT = "<\uff5cAssistant\uff5c>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"

_ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatFormat:
    """How one flavour lays out a conversation; every difference between flavours lives here."""

    name: str
    description: str
    bos: str  # literal text at the very start of every prompt ("" for ChatML)
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str  # opens every assistant turn, including the generation slot
    assistant_suffix: str  # closes a finished assistant turn in the history
    think_open: str  # appended to the generation prompt to start the reasoning block
    stop_tokens: tuple[str, ...]  # token strings that end generation
    default_system: str | None = None  # used when the conversation has no system message
    chat_template: str = field(init=False, repr=False, compare=False)
    gguf_chat_template: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Derived, not hand-written: the Jinja templates are generated from the fields above.
        object.__setattr__(self, "chat_template", _make_jinja_template(self, IMAGE_PLACEHOLDER))
        object.__setattr__(self, "gguf_chat_template", _make_jinja_template(self, MTMD_MARKER))

    def generation_prompt(self, think: bool = True) -> str:
        """The text that opens the assistant's reply (with ``<think>\\n`` unless ``think`` is False)."""
        return self.assistant_prefix + (self.think_open if think else "")


# Jinja template generation (the tokenizer_config.json side of each ChatFormat).


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (Jinja unescapes literals with Python's unicode-escape)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


class _Expr(str):
    """A Jinja expression, as opposed to literal text, inside :func:`_cat`."""


def _cat(*parts: str) -> str:
    """A Jinja concatenation of literal texts and :class:`_Expr` expressions, leaving out empty literals."""
    return " + ".join(p if isinstance(p, _Expr) else _lit(p) for p in parts if p)


def _make_jinja_template(fmt: ChatFormat, image_marker: str) -> str:
    """Generate the chat template that renders exactly like :func:`build_prompt` (string contents).

    ``enable_thinking=false`` (the kwarg Qwen3-style templates use) drops ``<think>\\n`` like ``think=False``.
    A content may be a list of typed parts: text parts in order, an image part as `image_marker`.
    """
    first_content, content = _Expr("text_of(messages[0]['content'])"), _Expr("text_of(message['content'])")
    lines = [
        f"{{#- Skywork {fmt.name}: {fmt.description}; generated by r1v_quant.model.prompts -#}}",
        "{%- macro text_of(content) -%}",
        "{%- if content is string -%}{{- content -}}",
        "{%- else -%}{%- for part in content -%}",
        "{%- if part['type'] == 'text' -%}{{- part['text'] -}}",
        f"{{%- elif part['type'] in ('image', 'image_url') -%}}{{{{- {_lit(image_marker)} -}}}}",
        "{%- endif -%}{%- endfor -%}{%- endif -%}",
        "{%- endmacro -%}",
        "{%- if not messages -%}",
        "{{- raise_exception('a prompt needs at least one message') -}}",
        "{%- endif -%}",
    ]
    if fmt.bos:
        lines.append(f"{{{{- {_lit(fmt.bos)} -}}}}")
    lines += [
        "{%- if messages[0]['role'] == 'system' -%}",
        f"{{{{- {_cat(fmt.system_prefix, first_content, fmt.system_suffix)} -}}}}",
        "{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}",
    ]
    if fmt.default_system is not None:
        lines.append(f"{{{{- {_cat(fmt.system_prefix, fmt.default_system, fmt.system_suffix)} -}}}}")
    lines += [
        "{%- set loop_messages = messages -%}",
        "{%- endif -%}",
        "{%- if not loop_messages -%}",
        "{{- raise_exception('a prompt needs at least one user message after the system message') -}}",
        "{%- endif -%}",
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') -%}",
        "{{- raise_exception('after an optional first system message, user and assistant must alternate, "
        "starting with the user') -}}",
        "{%- endif -%}",
        "{%- if message['role'] == 'user' -%}",
        f"{{{{- {_cat(fmt.user_prefix, content, fmt.user_suffix)} -}}}}",
        "{%- else -%}",
        "{%- set content = text_of(message['content']) -%}",
        f"{{%- if not loop.last and {_lit(THINK_END)} in content -%}}",
        f"{{%- set content = content.split({_lit(THINK_END)})[-1].lstrip('\\n') -%}}",
        "{%- endif -%}",
        f"{{{{- {_cat(fmt.assistant_prefix, _Expr('content'), fmt.assistant_suffix)} -}}}}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{%- if loop_messages[-1]['role'] != 'user' -%}",
        "{{- raise_exception('add_generation_prompt needs the last message to be the user\\'s') -}}",
        "{%- endif -%}",
        f"{{{{- {_lit(fmt.assistant_prefix)} -}}}}",
        "{%- if enable_thinking is not defined or enable_thinking -%}",
        f"{{{{- {_lit(fmt.think_open)} -}}}}",
        "{%- endif -%}",
        "{%- endif -%}",
    ]
    return "\n".join(lines) + "\n"


_CHATML = {
    "bos": "",
    "system_prefix": f"{IM_START}system\n",
    "system_suffix": f"{IM_END}\n",
    "user_prefix": f"{IM_START}user\n",
    "user_suffix": f"{IM_END}\n",
    "assistant_prefix": f"{IM_START}assistant\n",
    "assistant_suffix": f"{IM_END}\n",
    "think_open": f"{THINK_START}\n",
}

CHAT_FORMATS: dict[str, ChatFormat] = {
    "r1v": ChatFormat(
        name="r1v",
        description="Skywork-R1V-38B (DeepSeek-R1-Distill-Qwen-32B LLM)",
        bos=DS_BOS,
        system_prefix="",
        system_suffix="",
        # Skywork's own prompt puts a newline after <｜User｜> (unlike plain DeepSeek-R1).
        user_prefix=f"{DS_USER}\n",
        user_suffix="",
        assistant_prefix=DS_ASSISTANT,
        assistant_suffix=DS_EOS,
        think_open=f"{THINK_START}\n",
        stop_tokens=(DS_EOS, ENDOFTEXT),
    ),
    "r1v2": ChatFormat(
        name="r1v2",
        description="Skywork-R1V2-38B (QwQ-32B LLM, ChatML)",
        stop_tokens=(IM_END, ENDOFTEXT),
        **_CHATML,
    ),
    "r1v3": ChatFormat(
        name="r1v3",
        description="Skywork-R1V3-38B (InternVL3 internvl2_5 ChatML + <think>)",
        # InternVL's chat() stops on template.sep.strip() == <|im_end|> only.
        stop_tokens=(IM_END,),
        **_CHATML,
    ),
}


def get_chat_format(flavor: str) -> ChatFormat:
    """The :class:`ChatFormat` of ``flavor``; an unknown name is a one-line :class:`R1VError`."""
    try:
        return CHAT_FORMATS[flavor]
    except KeyError:
        known = ", ".join(sorted(CHAT_FORMATS))
        raise R1VError(f"unknown chat flavour {flavor!r} (known: {known})") from None


def strip_reasoning(content: str) -> str:
    """Drop a finished reasoning block from an assistant message (history turns are shown without it)."""
    if THINK_END in content:
        return content.split(THINK_END)[-1].lstrip("\n")
    return content


def _check_messages(messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool) -> None:
    if not messages:
        raise R1VError("a prompt needs at least one message")
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg or "content" not in msg:
            raise R1VError(f"message {i} must be a dict with 'role' and 'content'")
        if msg["role"] not in _ROLES:
            raise R1VError(
                f"message {i} has unknown role {msg['role']!r} (expected one of {', '.join(_ROLES)})"
            )
        if not isinstance(msg["content"], str):
            raise R1VError(f"message {i} content must be a string, got {type(msg['content']).__name__}")
    start = 1 if messages[0]["role"] == "system" else 0
    turns = messages[start:]
    if not turns:
        raise R1VError("a prompt needs at least one user message after the system message")
    for i, msg in enumerate(turns, start=start):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise R1VError(
                f"message {i} is {msg['role']!r} but {expected!r} was expected: an optional system message "
                "comes first, then user and assistant alternate starting with the user"
            )
    if add_generation_prompt and turns[-1]["role"] != "user":
        raise R1VError("add_generation_prompt=True needs the last message to be the user's")


def build_prompt(
    flavor: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    think: bool = True,
) -> str:
    """Render ``messages`` (``{"role", "content"}`` dicts) in the chat format of ``flavor``.

    ``think=False`` leaves ``<think>\\n`` out of the generation prompt. Images stay as ``<image>``
    placeholders; see :func:`expand_image_tokens`.
    """
    fmt = get_chat_format(flavor)
    _check_messages(messages, add_generation_prompt)
    parts = [fmt.bos]
    turns = list(messages)
    if turns[0]["role"] == "system":
        parts += [fmt.system_prefix, turns[0]["content"], fmt.system_suffix]
        turns = turns[1:]
    elif fmt.default_system is not None:
        parts += [fmt.system_prefix, fmt.default_system, fmt.system_suffix]
    for i, msg in enumerate(turns):
        if msg["role"] == "user":
            parts += [fmt.user_prefix, msg["content"], fmt.user_suffix]
        else:
            last = i == len(turns) - 1
            content = msg["content"] if last else strip_reasoning(msg["content"])
            parts += [fmt.assistant_prefix, content, fmt.assistant_suffix]
    if add_generation_prompt:
        parts.append(fmt.generation_prompt(think))
    return "".join(parts)


def place_images(text: str, n_images: int) -> str:
    """A user turn with one ``<image>`` per attached image: without any tag the images go before the text
    (InternVL's rule), otherwise the tags must match the images one to one."""
    tags = text.count(IMAGE_PLACEHOLDER)
    if tags == 0:
        return f"{IMAGE_PLACEHOLDER}\n" * n_images + text
    if tags != n_images:
        raise R1VError(
            f"the message has {tags} {IMAGE_PLACEHOLDER} tag(s) but {n_images} image(s) are attached"
        )
    return text


def image_placeholder(num_tiles: int, tokens_per_tile: int = TOKENS_PER_TILE) -> str:
    """The text an ``<image>`` tag expands to: ``<img>`` + ``<IMG_CONTEXT>``×(tiles·256) + ``</img>``."""
    if num_tiles < 1:
        raise R1VError(f"an image needs at least one tile, got {num_tiles}")
    if tokens_per_tile < 1:
        raise R1VError(f"tokens per tile must be positive, got {tokens_per_tile}")
    return IMG_START + IMG_CONTEXT * (num_tiles * tokens_per_tile) + IMG_END


def expand_image_tokens(
    prompt: str, tiles_per_image: Sequence[int], tokens_per_tile: int = TOKENS_PER_TILE
) -> str:
    """Replace each ``<image>``, in order, by its tiles' placeholder (`image_placeholder`). Splitting first
    means an expanded placeholder can never be mistaken for another tag."""
    pieces = prompt.split(IMAGE_PLACEHOLDER)
    if len(pieces) - 1 != len(tiles_per_image):
        raise R1VError(
            f"the prompt has {len(pieces) - 1} {IMAGE_PLACEHOLDER} tag(s) but {len(tiles_per_image)} "
            "image(s) were given; they must match one to one"
        )
    out = [pieces[0]]
    for tiles, rest in zip(tiles_per_image, pieces[1:], strict=True):
        out += [image_placeholder(tiles, tokens_per_tile), rest]
    return "".join(out)


def split_thinking(text: str, *, think_opened: bool = True) -> tuple[str, str]:
    """Split generated text into ``(thinking, answer)``, both stripped.

    The generation prompt already opened ``<think>``, so the text normally reads
    ``reasoning\\n</think>\\n\\nanswer``. A model that writes ``</think>`` more than once is answered by
    what follows the last one (what R1's own template keeps of an assistant turn, and what benchmark
    scoring reads). Without ``</think>`` the model never finished thinking (token budget ran out):
    everything is thinking and the answer is empty, unless ``think_opened=False`` (a ``think=False``
    prompt), where text without a reasoning block is all answer.
    """
    body = text.lstrip()
    if body.startswith(THINK_START):  # the model (or a think=False prompt) opened the block itself
        body = body[len(THINK_START) :]
        think_opened = True
    if THINK_END in body:
        thinking, answer = body.rsplit(THINK_END, 1)
        return thinking.strip(), answer.strip()
    if think_opened:
        return body.strip(), ""
    return "", body.strip()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # Like transformers: no HTML escaping, unlike Jinja's built-in tojson.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    # Same environment as transformers' apply_chat_template, so a template renders identically in both.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    bos_token: str = "",
    eos_token: str = "",
    **kwargs: Any,
) -> str:
    """Render a Hugging Face chat template the way ``transformers`` does, without importing it.

    Extra keyword arguments become template variables (e.g. ``enable_thinking=False``). A template that
    calls ``raise_exception`` surfaces as :class:`R1VError`.
    """
    try:
        return _compile(template).render(
            messages=[dict(m) for m in messages],
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
            **kwargs,
        )
    except jinja2.exceptions.TemplateError as exc:
        raise R1VError(f"chat template: {exc}") from exc
