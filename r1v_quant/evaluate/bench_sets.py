"""Benchmark items for `eval bench`: multiple-choice and free-answer questions, with or without images.

builtin:tiny      SYNTHETIC: generated questions about rendered pictures (colour, shape, which of two shapes
                  is larger) plus small reasoning problems, the tasks the tiny replica was trained on, so it
                  scores well above chance
FILE.jsonl        one item per line; the shapes of MATH-Vision (question, options, answer letter, image,
                  subject), PuzzleVQA (image, question, options, answer = an option, category), GSM8K
                  (question, answer ending in "#### N"), MATH-500 / AIME (problem, answer, subject), or the
                  generic question / answer / options / image(s) / category / kind / instruction; image
                  paths are relative to the file's folder
FILE.tsv          VLMEvalKit TSV (r1v_quant.evaluate.bench_formats): base64 images (Python-literal lists
for several),
                  options in A-J columns or a `choices` literal, hint, MathVista's question/answer types
FILE.json         LogicVista's dataset.json, We-Math's testmini.json, or a JSON list of generic rows
FILE.parquet      the Hub's MathVista / MMMU parquet files (read offline with pyarrow)
DIR               every file of those types in it
NAME:PATH         a named preset (mathvista, mathvision, mmmu, logicvista, wemath, math500, aime, gsm8k): the
                  benchmark's own files as published, found under PATH (bench_formats.PRESETS)

Each question gets its options listed as "A. ..." and an instruction to reason and put the final answer in
\\boxed{} (a row's "instruction" replaces it; "" for none). Image tags (`<image>`, `<image1>`, `<image 2>`)
stay where they stand and become the `<image>` placeholders of the prompt, each numbered tag taking that
image; images no tag names go before the text. A row that cannot become an item (malformed JSON, no
question or answer, an answer that is not one of the options, a missing or undecodable image) is reported
with its file and line; the load fails unless `skip_bad`, which drops those rows and keeps the report.
"""

from __future__ import annotations

import ast
import io
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.evaluate.answers import KINDS, LETTERS, parse_number
from r1v_quant.model.preprocess import ImageSource
from r1v_quant.util.errors import R1VError

BENCH_SEED = 90_101  # differs from the training, calibration and held-out seeds
BUILTIN = {"builtin:tiny": (32, 32)}  # name -> (text items, image items)
MC_INSTRUCTION = "Answer with the option's letter from the given choices and put it within \\boxed{}."
FREE_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
MULTI_INSTRUCTION = (
    "One or more options may be correct. Put the letters of all correct options, separated by commas, "
    "within \\boxed{}."
)
IMAGE_PLACEHOLDER = "<image>"
IMAGE_PLACEHOLDER_LINE = "<image>\n"
_IMAGE_TAG = re.compile(r"<image\s*(\d*)>")
_MULTI_ANSWER = re.compile(r"\(?[A-J]\)?(?:\s*(?:,|;|&|and)\s*\(?[A-J]\)?)+")


@dataclass
class BenchItem:
    id: str
    question: str  # the user turn: `<image>` placeholders (one per image), options and instruction included
    answer: str  # gold: an option letter for "mc", letters "A,C" for "multi"
    kind: str  # answers.KINDS
    category: str
    images: list[ImageSource] = field(default_factory=list)  # in the order of the question's placeholders
    options: list[str] = field(default_factory=list)
    where: str = ""  # file:line
    accept: list[str] = field(default_factory=list)  # further gold answers the benchmark accepts
    decimals: int | None = None  # numeric answers also match when equal at this precision (MathVista)


@dataclass(frozen=True)
class BadRow:
    where: str
    reason: str


@dataclass
class BenchSet:
    name: str
    items: list[BenchItem]
    bad: list[BadRow] = field(default_factory=list)
    total_rows: int = 0
    synthetic: bool = False  # generated items (builtin:*): never a benchmark result to publish

    def categories(self) -> list[str]:
        return sorted({i.category for i in self.items})


class _Bad(Exception):
    """A row that cannot become an item; the message is the reason."""


def builtin_set(name: str) -> BenchSet:
    from r1v_quant.data.synthdata import image_problems, text_problems

    n_text, n_image = BUILTIN[name]
    items = [
        BenchItem(f"text-{k}", p.question, p.answer, p.grading, p.kind, where=f"{name}:text:{k}")
        for k, p in enumerate(text_problems(n_text, BENCH_SEED))
    ]
    for k, p in enumerate(image_problems(n_image, BENCH_SEED + 1)):
        items.append(
            BenchItem(
                f"image-{k}",
                f"<image>\n{p.question}",
                p.answer,
                "numeric" if p.answer.isdigit() else "text",
                p.task,
                images=[p.render()],
                where=f"{name}:image:{k}",
            )
        )
    return BenchSet(name, items, [], len(items), synthetic=True)


def load_jsonl(path: Path) -> BenchSet:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    out = BenchSet(path.stem, [], [], len(lines))
    for n, line in enumerate(lines, 1):
        where = f"{path.name}:{n}"
        try:
            if not line.strip():
                raise _Bad("empty row")
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _Bad(f"not valid JSON ({e.msg} at column {e.colno})") from None
            out.items.append(row_to_item(row, path.parent, where, path.stem))
        except _Bad as e:
            out.bad.append(BadRow(where, str(e)))
    return out


def _check_image(source: Any, base: Path) -> ImageSource:
    """A path (relative to `base`) or encoded bytes that PIL can decode; anything else is a bad row."""
    from PIL import Image

    if isinstance(source, str):
        p = Path(source)
        p = p if p.is_absolute() else base / p
        if not p.is_file():
            raise _Bad(f"image {source} not found")
        source = p
    elif not isinstance(source, bytes):
        raise _Bad(f"image entry of type {type(source).__name__} (expected a path)")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as im:
            im.verify()
    except Exception as e:  # PIL raises many unrelated types for undecodable data
        name = source if isinstance(source, Path) else f"<{len(source)} bytes>"
        raise _Bad(f"image {name} cannot be decoded ({type(e).__name__})") from None
    return source


def _literal(value: Any, what: str) -> Any:
    """A Python-literal list / dict written into a text cell (VLMEvalKit, MMMU's `options`), else as is."""
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return ast.literal_eval(value.strip())
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise _Bad(f"{what} starts with {value.strip()[0]!r} but is not a Python/JSON literal") from None
    return value


def _options_of(row: dict[str, Any]) -> list[str]:
    raw = _literal(row.get("options", row.get("choices")), "options") or []
    if isinstance(raw, dict):
        raw = [raw[k] for k in sorted(raw)]
    if not isinstance(raw, list | tuple):
        raise _Bad("options must be a list")
    options = [str(o) for o in raw]
    if len(options) > len(LETTERS):
        raise _Bad(f"{len(options)} options (at most {len(LETTERS)})")
    return options


def _answers_of(row: dict[str, Any]) -> tuple[str, list[str]]:
    """The gold answer and the further answers a row accepts (MMMU's open answers are sometimes a list)."""
    answer = row.get("answer")
    if isinstance(answer, str) and answer.strip().startswith("["):
        answer = _literal(answer, "answer")
    answers = list(answer) if isinstance(answer, list | tuple) else [answer]
    answers += list(row.get("accept") or [])
    out = []
    for a in answers:
        if isinstance(a, int | float) and not isinstance(a, bool):
            a = str(a)
        if isinstance(a, str) and a.strip():
            out.append(a.strip())
    if not out:
        raise _Bad("no answer")
    return out[0], out[1:]


def place_images(text: str, images: list[ImageSource]) -> tuple[str, list[ImageSource]]:
    """Image tags become `<image>` placeholders where they stand: `<imageN>` / `<image N>` places image N
    at its first tag, a bare `<image>` the next unplaced image; images no tag names go before the text.
    A tag naming an image the row lacks, or one already placed, stays as written (MATH-Vision's questions
    name inline icons `<image2>`, `<image3>` of their single figure). Returns the text and the images in
    placeholder order."""
    if not images:
        return text, []
    order: list[ImageSource] = []
    used: set[int] = set()

    def tag(m: re.Match[str]) -> str:
        if m.group(1):
            k = int(m.group(1)) - 1
        else:
            k = next((j for j in range(len(images)) if j not in used), len(images))
        if not 0 <= k < len(images) or k in used:
            return m.group(0)
        used.add(k)
        order.append(images[k])
        return IMAGE_PLACEHOLDER

    text = _IMAGE_TAG.sub(tag, text)
    rest = [im for k, im in enumerate(images) if k not in used]
    return IMAGE_PLACEHOLDER_LINE * len(rest) + text, rest + order


def row_to_item(row: Any, base: Path, where: str, source: str) -> BenchItem:
    """One benchmark row (any supported shape, as a dict) as an item; raises _Bad with the reason.

    Generic keys: question (or problem / prompt), answer (or a list of accepted answers), accept, options
    (or choices: a list, a dict by letter, or such a literal in a string), image / images, kind, decimals,
    instruction, category (or subject / type), id (or unique_id / index); n_options for a multiple-choice
    item whose options are only in the image, list_options=False when the question already lists them.
    """
    if not isinstance(row, dict):
        raise _Bad("not a JSON object")
    question = row.get("question", row.get("problem", row.get("prompt")))
    if not isinstance(question, str) or not question.strip():
        raise _Bad("no question (expected a 'question' or 'problem' string)")
    answer, accept = _answers_of(row)

    raw_images = _literal(row.get("images", row.get("image")), "image")
    if raw_images is None or raw_images == "":
        raw_images = []
    elif not isinstance(raw_images, list | tuple):
        raw_images = [raw_images]
    images = [_check_image(i, base) for i in raw_images]

    options = _options_of(row)
    n_options = row.get("n_options") or len(options)
    kind = row.get("kind")
    if "####" in answer and not options:  # GSM8K: worked solution ending in "#### N"
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        kind = kind or "numeric"
    if kind in (None, "multi") and _MULTI_ANSWER.fullmatch(answer):  # "A, C": several letters (LogicVista)
        letters = sorted(set(re.findall(r"[A-J]", answer)))
        kind, answer = "multi", ",".join(letters)
        n_options = max(n_options, LETTERS.index(letters[-1]) + 1)
    elif options:
        kind = "mc"
        answer = _gold_letter(answer, options)
    elif kind == "mc" or (kind is None and n_options):
        if not re.fullmatch(r"\(?[A-J]\)?", answer):
            raise _Bad(f"answer {answer!r} is not an option letter")
        kind, answer = "mc", answer.strip("()")
        n_options = max(n_options, LETTERS.index(answer) + 1)
        options = list(LETTERS[:n_options])
    elif kind is None:
        if "problem" in row:
            kind = "math"  # MATH-style LaTeX answer
        elif re.fullmatch(r"[-+]?[\d,]*\.?\d+", answer) and parse_number(answer) is not None:
            kind = "numeric"
        elif re.fullmatch(r"[A-Za-z][A-Za-z \-']*", answer):
            kind = "text"
        else:
            kind = "math"
    if kind not in KINDS:
        raise _Bad(f"unknown kind {kind!r} (expected one of {', '.join(KINDS)})")
    if kind == "multi" and not options:
        options = list(LETTERS[:n_options])

    text = question.strip()
    if options and kind in ("mc", "multi") and row.get("list_options", True):
        if all(o.strip().upper() == LETTERS[i] for i, o in enumerate(options)):
            text += "\nOptions: " + ", ".join(LETTERS[: len(options)]) + " (shown in the image)"
        else:
            text += "\nOptions:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    default = {"mc": MC_INSTRUCTION, "multi": MULTI_INSTRUCTION}.get(kind, FREE_INSTRUCTION)
    instruction = row.get("instruction", default)
    if not isinstance(instruction, str):
        raise _Bad("instruction must be a string")
    if instruction:
        text += "\n" + instruction
    text, images = place_images(text, images)  # after the options: MMMU puts image tags in options too
    decimals = row.get("decimals")
    if decimals is not None and not (isinstance(decimals, int) and 0 <= decimals <= 12):
        raise _Bad(f"decimals {decimals!r} must be a whole number of decimal places (0-12)")
    category = row.get("category") or row.get("subject") or row.get("type") or source
    item_id = row.get("id", row.get("unique_id", row.get("index")))
    return BenchItem(
        id=str(item_id) if item_id is not None else where,
        question=text,
        answer=answer,
        kind=kind,
        category=str(category),
        images=images,
        options=options,
        where=where,
        accept=accept,
        decimals=decimals,
    )


def _gold_letter(answer: str, options: list[str]) -> str:
    """The gold option letter: the answer is a letter ("B", "(B)") or one option's text / value."""
    m = re.fullmatch(r"\(?([A-Ja-j])\)?\.?", answer)
    if m and LETTERS.index(m.group(1).upper()) < len(options):
        return m.group(1).upper()
    hits = [i for i, o in enumerate(options) if o.strip() == answer]
    if not hits:
        a = parse_number(answer)
        if a is not None and re.fullmatch(r"[-+\d.,/\s]+", answer):
            hits = [
                i for i, o in enumerate(options) if re.fullmatch(r"[-+\d.,/\s]+", o) and parse_number(o) == a
            ]
    if len(hits) != 1:
        raise _Bad(f"answer {answer!r} is neither an option letter nor exactly one of the options")
    return LETTERS[hits[0]]
