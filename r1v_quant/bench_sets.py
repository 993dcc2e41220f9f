"""Benchmark items for `eval bench`: multiple-choice and free-answer questions, with or without images.

builtin:tiny      generated colour/shape questions about rendered pictures plus small arithmetic (synthdata),
                  the tasks the tiny replica was trained on, so it scores well above chance
FILE.jsonl        one item per line; the shapes of MATH-Vision (question, options, answer letter, image,
                  subject), PuzzleVQA (image, question, options, answer = an option, category), GSM8K
                  (question, answer ending in "#### N") and MATH-500 (problem, answer, subject), or the
                  generic question / answer / options / image(s) / category / kind / instruction; image
                  paths are relative to the file's folder
FILE.tsv          VLMEvalKit TSV: index, image (base64, a JSON list of them, or another row's index),
                  question, answer, option columns A-H, optional hint and category
DIR               every *.jsonl and *.tsv in it

Each question gets its options listed as "A. ..." and an instruction to reason and put the final answer in
\\boxed{} (a row's "instruction" replaces it; "" for none). A row that cannot become an item (malformed
JSON, no question or answer, an answer that is not one of the options, a missing or undecodable image) is
reported with its file and line; the load fails unless `skip_bad`, which drops those rows and keeps the
report.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import random
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.answers import KINDS, LETTERS, parse_number
from r1v_quant.errors import R1VError
from r1v_quant.preprocess import ImageSource

BENCH_SEED = 90_101  # differs from the training, calibration and held-out seeds
BUILTIN = {"builtin:tiny": (32, 32)}  # name -> (text items, image items)
MC_INSTRUCTION = "Answer with the option's letter from the given choices and put it within \\boxed{}."
FREE_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_IMAGE_TAG = re.compile(r"<image\s*\d*>")


@dataclass
class BenchItem:
    id: str
    question: str  # the user turn: `<image>` placeholders (one per image), options and instruction included
    answer: str  # gold: an option letter for "mc"
    kind: str  # answers.KINDS
    category: str
    images: list[ImageSource] = field(default_factory=list)
    options: list[str] = field(default_factory=list)
    where: str = ""  # file:line


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

    def categories(self) -> list[str]:
        return sorted({i.category for i in self.items})


class _Bad(Exception):
    """A row that cannot become an item; the message is the reason."""


def load_bench(spec: str, *, limit: int = 0, seed: int = 0, skip_bad: bool = False) -> BenchSet:
    """The benchmark `spec` names; `limit` keeps a seeded random subset (in file order)."""
    bench = builtin_set(spec) if spec in BUILTIN else _load_path(Path(spec))
    if bench.bad and not skip_bad:
        shown = "; ".join(f"{b.where}: {b.reason}" for b in bench.bad[:5])
        more = f" (and {len(bench.bad) - 5} more)" if len(bench.bad) > 5 else ""
        raise R1VError(
            f"benchmark {spec}: {len(bench.bad)} bad row(s): {shown}{more}; fix them or pass --skip-bad"
        )
    if not bench.items:
        raise R1VError(f"benchmark {spec}: no usable items")
    if limit and len(bench.items) > limit:
        keep = sorted(random.Random(f"r1v-quant-bench/{seed}").sample(range(len(bench.items)), limit))
        bench.items = [bench.items[i] for i in keep]
    return bench


def builtin_set(name: str) -> BenchSet:
    from r1v_quant.synthdata import image_problems, render_shape, text_problems

    n_text, n_image = BUILTIN[name]
    items = [
        BenchItem(f"text-{k}", p.question, p.answer, "numeric", p.kind, where=f"{name}:text:{k}")
        for k, p in enumerate(text_problems(n_text, BENCH_SEED))
    ]
    for k, p in enumerate(image_problems(n_image, BENCH_SEED + 1)):
        category = "color" if "color" in p.question else "shape"
        items.append(
            BenchItem(
                f"image-{k}",
                f"<image>\n{p.question}",
                p.answer,
                "text",
                category,
                images=[render_shape(p.color, p.shape)],
                where=f"{name}:image:{k}",
            )
        )
    return BenchSet(name, items, [], len(items))


def _load_path(path: Path) -> BenchSet:
    if not path.exists():
        raise R1VError(f"benchmark {path}: no such file or directory (or use builtin:tiny)")
    if path.is_dir():
        files = sorted([*path.glob("*.jsonl"), *path.glob("*.tsv")])
        if not files:
            raise R1VError(f"benchmark {path}: no *.jsonl or *.tsv file in this folder")
        parts = [_load_file(f) for f in files]
        out = BenchSet(path.name, [i for p in parts for i in p.items], [b for p in parts for b in p.bad])
        out.total_rows = sum(p.total_rows for p in parts)
        return out
    return _load_file(path)


def _load_file(path: Path) -> BenchSet:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path)
    if suffix == ".tsv":
        return load_tsv(path)
    raise R1VError(f"benchmark {path}: unknown file type {suffix!r} (expected .jsonl or .tsv)")


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


def load_tsv(path: Path) -> BenchSet:
    """VLMEvalKit benchmark TSV (line numbers count the header as line 1)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default cell limit
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows = []
            for row in reader:
                rows.append((reader.line_num, row))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    if rows and not {"index", "question", "answer"} <= set(rows[0][1]):
        raise R1VError(f"{path.name}: a VLMEvalKit TSV needs at least the columns index, question and answer")
    by_index = {str(r.get("index")): r for _, r in rows}
    out = BenchSet(path.stem, [], [], len(rows))
    for line, row in rows:
        where = f"{path.name}:{line}"
        try:
            if None in row or any(v is None for v in row.values()):
                raise _Bad("wrong number of columns")
            cell = (row.get("image") or "").strip()
            if cell and len(cell) < 64 and cell in by_index and cell != str(row["index"]):
                cell = (by_index[cell].get("image") or "").strip()  # VLMEvalKit's dedup of repeated images
            if cell.startswith("["):
                try:
                    encoded = json.loads(cell)
                except json.JSONDecodeError:
                    raise _Bad("image column starts with '[' but is not a JSON list") from None
            else:
                encoded = [cell] if cell else []
            images: list[Any] = [_b64(b) for b in encoded]
            if not images and row.get("image_path"):
                images = [row["image_path"]]
            question = row.get("question") or ""
            if row.get("hint") and row["hint"] not in ("nan", ""):
                question = f"Hint: {row['hint']}\n{question}"
            options = [row[c] for c in LETTERS[:8] if row.get(c) not in (None, "", "nan")]
            generic = {
                "id": row.get("index"),
                "question": question,
                "answer": row.get("answer"),
                "options": options,
                "images": images,
                "category": row.get("category") or None,
            }
            out.items.append(row_to_item(generic, path.parent, where, path.stem))
        except _Bad as e:
            out.bad.append(BadRow(where, str(e)))
    return out


def _b64(value: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _Bad(f"image column is not valid base64 ({e})") from None
    if not data:
        raise _Bad("image column is empty")
    return data


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


def row_to_item(row: Any, base: Path, where: str, source: str) -> BenchItem:
    """One benchmark row (any supported JSON shape) as an item; raises _Bad with the reason."""
    if not isinstance(row, dict):
        raise _Bad("not a JSON object")
    question = row.get("question", row.get("problem", row.get("prompt")))
    if not isinstance(question, str) or not question.strip():
        raise _Bad("no question (expected a 'question' or 'problem' string)")
    answer = row.get("answer")
    if isinstance(answer, int | float) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise _Bad("no answer")
    answer = answer.strip()

    raw_images = row.get("images", row.get("image"))
    if raw_images is None or raw_images == "":
        raw_images = []
    elif not isinstance(raw_images, list):
        raw_images = [raw_images]
    images = [_check_image(i, base) for i in raw_images]

    options_raw = row.get("options", row.get("choices")) or []
    if isinstance(options_raw, dict):
        options_raw = [options_raw[k] for k in sorted(options_raw)]
    if not isinstance(options_raw, list):
        raise _Bad("options must be a list")
    options = [str(o) for o in options_raw]
    if len(options) > len(LETTERS):
        raise _Bad(f"{len(options)} options (at most {len(LETTERS)})")

    kind = row.get("kind")
    if "####" in answer and not options:  # GSM8K: worked solution ending in "#### N"
        answer = answer.rsplit("####", 1)[1].strip().replace(",", "")
        kind = kind or "numeric"
    if options:
        kind = "mc"
        answer = _gold_letter(answer, options)
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

    text = _IMAGE_TAG.sub("", question).strip() if images else question.strip()
    text = "<image>\n" * len(images) + text
    if options:
        if all(o.strip().upper() == LETTERS[i] for i, o in enumerate(options)):
            text += "\nOptions: " + ", ".join(LETTERS[: len(options)]) + " (shown in the image)"
        else:
            text += "\nOptions:\n" + "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    instruction = row.get("instruction", MC_INSTRUCTION if kind == "mc" else FREE_INSTRUCTION)
    if not isinstance(instruction, str):
        raise _Bad("instruction must be a string")
    if instruction:
        text += "\n" + instruction
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
