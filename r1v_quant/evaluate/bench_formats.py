"""Benchmarks in the formats they are published in, as `BenchSet`s (r1v_quant.evaluate.bench_sets).

Each loader turns its format's rows into the generic row `bench_sets.row_to_item` reads, so every format
gets the same prompt layout, image placement and answer kinds:

VLMEvalKit TSV   index, question, answer; image = base64, a Python-literal list of base64 strings, or the
                 index of the row holding it; options in A-J columns or a `choices` literal (list or dict);
                 hint; MathVista's question_type / answer_type / precision / answer_option; image_path
LogicVista       data/dataset.json: an object of items keyed v1_N with imagename, question, answer (one or
                 several letters, "A, C", or a number), skill; images in data/images/
We-Math          data/testmini.json: a list with ID, question, option ("A. …;B. …"), answer, image_path
                 relative to data/ (2steps/image/…, 3steps/image/…), knowledge concept
Hub parquet      MathVista (pid, query, decoded_image, choices, answer, question_type, answer_type,
                 precision, metadata) and MMMU (id, question, options literal, image_1..image_7, answer,
                 question_type, subfield), read with pyarrow from a local copy, never downloaded
JSONL            MATH-500 / AIME / GSM8K / MATH-Vision / PuzzleVQA rows (bench_sets.load_jsonl)

`NAME:PATH` presets (PRESETS) say which of these a benchmark ships as and find its files under PATH.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from r1v_quant.evaluate.answers import LETTERS
from r1v_quant.evaluate.bench_sets import BadRow, BenchSet, _Bad, _literal, load_jsonl, row_to_item
from r1v_quant.util.errors import R1VError

SUFFIXES = (".jsonl", ".tsv", ".json", ".parquet")


def split_preset(spec: str) -> tuple[str | None, str]:
    """("mathvista", "PATH") for "mathvista:PATH"; (None, spec) for a plain path (or a Windows drive)."""
    name, sep, rest = spec.partition(":")
    if sep and name.lower() in PRESETS:
        return name.lower(), rest
    if sep and re.fullmatch(r"[a-z][a-z0-9_]+", name) and not Path(spec).exists():
        known = ", ".join(PRESETS)
        raise R1VError(f"benchmark {spec}: unknown preset {name!r} (known: {known}, or builtin:tiny)")
    return None, spec


# -- plain paths ---------------------------------------------------------------------------------------------


def load_path(path: Path) -> BenchSet:
    if not path.exists():
        raise R1VError(f"benchmark {path}: no such file or directory (or use builtin:tiny or NAME:PATH)")
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.is_file())
        if not files:
            raise R1VError(
                f"benchmark {path}: no *.jsonl, *.tsv, *.json or *.parquet file in this folder "
                "(for a published layout name its preset, e.g. logicvista:PATH)"
            )
        return merge(path.name, [load_file(f) for f in files])
    return load_file(path)


def load_file(path: Path) -> BenchSet:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path)
    if suffix == ".tsv":
        return load_tsv(path)
    if suffix == ".json":
        return load_json(path)
    if suffix == ".parquet":
        return load_parquet([path], path.stem)
    raise R1VError(f"benchmark {path}: unknown file type {suffix!r} (expected {', '.join(SUFFIXES)})")


def merge(name: str, parts: list[BenchSet]) -> BenchSet:
    out = BenchSet(name, [i for p in parts for i in p.items], [b for p in parts for b in p.bad])
    out.total_rows = sum(p.total_rows for p in parts)
    return out


def _rows_to_set(
    name: str, rows: list[tuple[str, Any]], base: Path, convert: Callable[[Any], dict[str, Any]]
) -> BenchSet:
    """Rows (where, raw) through a format's `convert` and `row_to_item`; bad rows collected."""
    out = BenchSet(name, [], [], len(rows))
    for where, raw in rows:
        try:
            out.items.append(row_to_item(convert(raw), base, where, name))
        except _Bad as e:
            out.bad.append(BadRow(where, str(e)))
    return out


def _need(row: Any, *fields: str) -> None:
    """A row of a known format missing one of its fields: a bad row naming the field."""
    if not isinstance(row, dict):
        raise _Bad(f"expected an object with {', '.join(fields)}, got {type(row).__name__}")
    for f in fields:
        if f not in row or row[f] is None:
            raise _Bad(f"missing field {f!r}")


# -- VLMEvalKit TSV ------------------------------------------------------------------------------------------


def _b64(value: str) -> bytes:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as e:
        raise _Bad(f"image column is not valid base64 ({e})") from None
    if not data:
        raise _Bad("image column is empty")
    return data


def _present(value: Any) -> bool:
    return value is not None and str(value).strip() not in ("", "nan", "None")


def load_tsv(path: Path) -> BenchSet:
    """VLMEvalKit benchmark TSV, every cell optionally quoted (a row is named by the line it starts on, the
    header being line 1)."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default cell limit
    try:
        with open(path, encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, delimiter="\t")
            rows, end = [], 1
            for row in reader:  # a quoted cell may hold newlines: a row is named by its first line
                rows.append((end + 1, row))
                end = reader.line_num
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    if rows:
        missing = [c for c in ("index", "question", "answer") if c not in rows[0][1]]
        if missing:
            raise R1VError(f"{path.name}: not a VLMEvalKit TSV: no {', '.join(missing)} column")
    by_index = {str(r.get("index")): r for _, r in rows}

    def convert(row: dict[str, Any]) -> dict[str, Any]:
        if None in row or any(v is None for v in row.values()):
            raise _Bad("wrong number of columns")
        cell = (row.get("image") or "").strip()
        if cell and len(cell) < 64 and cell in by_index and cell != str(row["index"]):
            cell = (by_index[cell].get("image") or "").strip()  # VLMEvalKit's dedup of repeated images
        encoded = _literal(cell, "image column") if cell.startswith("[") else ([cell] if cell else [])
        if not isinstance(encoded, list) or not all(isinstance(e, str) for e in encoded):
            raise _Bad("image column is not a list of base64 strings")
        images: list[Any] = [_b64(b) for b in encoded]
        if not images and _present(row.get("image_path")):
            paths = _literal(row["image_path"], "image_path")
            images = list(paths) if isinstance(paths, list) else [paths]
        question = row.get("question") or ""
        if _present(row.get("hint")):
            question = f"Hint: {row['hint']}\n{question}"
        choices = row.get("choices")
        options: Any = (
            _literal(choices, "choices")
            if _present(choices)
            else [row[c] for c in LETTERS if _present(row.get(c))]
        )
        answer = row.get("answer")
        if row.get("question_type") == "multi_choice" and _present(row.get("answer_option")):
            answer = row["answer_option"]  # MathVista: the letter beside the option's text
        out: dict[str, Any] = {
            "id": row.get("index"),
            "question": question,
            "answer": answer,
            "options": options,
            "images": images,
            "category": row.get("category") or row.get("task") or row.get("subject") or None,
        }
        # MathVista's query already lists the choices and asks for the letter
        if options and re.search(r"^Choices:|^\(A\) ", question, re.MULTILINE):
            out["list_options"] = False
        if row.get("question_type") == "free_form" or (not options and row.get("answer_type")):
            out.update(_mathvista_free(row.get("answer_type"), row.get("precision")))
        return out

    out = _rows_to_set(path.stem, [(f"{path.name}:{line}", row) for line, row in rows], path.parent, convert)
    return out


def _mathvista_free(answer_type: Any, precision: Any) -> dict[str, Any]:
    """MathVista's free-form answers: integers and floats to `precision` decimals are numbers."""
    if answer_type in ("integer", "float"):
        out: dict[str, Any] = {"kind": "numeric"}
        if answer_type == "float" and _present(precision):
            try:
                out["decimals"] = int(float(precision))
            except ValueError:
                raise _Bad(f"precision {precision!r} is not a number") from None
        return out
    return {}


# -- JSON: LogicVista, We-Math, generic lists --------------------------------------------------------------


def load_json(path: Path) -> BenchSet:
    """LogicVista's dataset.json (object of items with `imagename`), We-Math's testmini.json (list with
    `option` and `image_path`), or a list of generic rows."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    except json.JSONDecodeError as e:
        raise R1VError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    if isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        first = next(iter(data.values()))
        if "imagename" in first:
            return load_logicvista(path, data)
        raise R1VError(
            f"{path}: an object of items without 'imagename' (LogicVista's field); a generic benchmark is "
            "a list of rows with question and answer"
        )
    if isinstance(data, list):
        if data and isinstance(data[0], dict) and "option" in data[0] and "image_path" in data[0]:
            return load_wemath(path, data)
        rows = [(f"{path.name}[{i}]", r) for i, r in enumerate(data)]
        return _rows_to_set(path.stem, rows, path.parent, lambda r: r)
    raise R1VError(f"{path}: expected a list of rows or LogicVista's object of items")


_RANGE = re.compile(r"\b([A-J])\s*(?:-|–|to|through)\s*([A-J])\b")
_LISTED = re.compile(r"\b([A-J])\b(?=\s*(?:,|\)|\bor\b|$))")


def _letters_offered(question: str, answer: str) -> int:
    """How many option letters a LogicVista question offers ("A-D", "A, B, C, or D"), at least the
    answer's and four."""
    ends = [LETTERS.index(m.group(2)) + 1 for m in _RANGE.finditer(question)]
    listed = [LETTERS.index(x) + 1 for x in _LISTED.findall(question)] if not ends else []
    in_answer = [LETTERS.index(x) + 1 for x in re.findall(r"[A-J]", answer)]
    return max([4, *ends, *listed, *in_answer])


def load_logicvista(path: Path, data: dict[str, Any]) -> BenchSet:
    images = path.parent / "images"

    def convert(pair: tuple[str, Any]) -> dict[str, Any]:
        key, row = pair
        _need(row, "imagename", "question", "answer")
        answer = str(row["answer"]).strip()
        skill = row.get("skill")
        out: dict[str, Any] = {
            "id": key,
            "question": row["question"],
            "answer": answer,
            "image": str(images / row["imagename"]),
            "category": (skill[0] if isinstance(skill, list) and skill else skill) or "logicvista",
            "list_options": False,  # the options are in the image or spelled out in the question
        }
        if re.fullmatch(r"[A-J](?:\s*,\s*[A-J])*", answer):
            out["n_options"] = _letters_offered(row["question"], answer)
        return out

    rows = [(f"{path.name}:{k}", (k, v)) for k, v in data.items()]
    return _rows_to_set("logicvista", rows, path.parent, convert)


_WEMATH_OPTION = re.compile(r"(?:^|;)\s*([A-J])\.\s*")


def wemath_options(option: str) -> list[str]:
    """ "A. 300, 400;B. 400, 300; E. No correct answer" -> the option texts in letter order."""
    parts = _WEMATH_OPTION.split(option.strip())
    letters, texts = parts[1::2], [t.strip().rstrip(";").strip() for t in parts[2::2]]
    if parts[0].strip() or not letters or letters != list(LETTERS[: len(letters)]):
        raise _Bad(f"option {option[:40]!r} is not in We-Math's 'A. …;B. …' form")
    return texts


def load_wemath(path: Path, data: list[Any]) -> BenchSet:
    def convert(row: Any) -> dict[str, Any]:
        _need(row, "question", "option", "answer", "image_path")
        ident = str(row.get("ID") or row.get("key") or "")
        return {
            "id": ident or None,
            "question": row["question"],
            "options": wemath_options(str(row["option"])),
            "answer": row["answer"],
            "image": row["image_path"],  # relative to the json's folder (We-Math's data/)
            "category": ident.split("_")[0] if "_" in ident else "wemath",
        }

    rows = [(f"{path.name}[{i}]", r) for i, r in enumerate(data)]
    return _rows_to_set("wemath", rows, path.parent, convert)


# -- the Hub's parquet (MathVista, MMMU) -------------------------------------------------------------------


def _image_bytes(cell: Any) -> bytes | None:
    """An `Image` feature as the datasets library stores it in parquet: {bytes, path}."""
    if isinstance(cell, dict):
        return cell.get("bytes") or None
    return cell if isinstance(cell, bytes) else None


def _from_mathvista(row: dict[str, Any]) -> dict[str, Any]:
    _need(row, "pid", "answer", "decoded_image")
    question = row.get("query") or row.get("question")
    choices = row.get("choices")
    meta = row.get("metadata") or {}
    out: dict[str, Any] = {
        "id": row["pid"],
        "question": question,
        "answer": row["answer"],
        "options": list(choices) if choices is not None else [],
        "images": [_image_bytes(row["decoded_image"])],
        "category": meta.get("task") or meta.get("category") or "mathvista",
    }
    if row.get("query"):
        out["list_options"] = False  # the query holds the hint, the question and the choices
    if row.get("question_type") == "free_form":
        out.update(_mathvista_free(row.get("answer_type"), row.get("precision")))
    return out


def _from_mmmu(row: dict[str, Any]) -> dict[str, Any]:
    _need(row, "id", "question", "answer")
    ident = str(row["id"])
    subject = ident.split("_")[1] if ident.count("_") >= 2 else (row.get("subfield") or "mmmu")
    images = [_image_bytes(row.get(f"image_{k}")) for k in range(1, 8)]
    while images and images[-1] is None:
        images.pop()
    if any(i is None for i in images):
        raise _Bad("image columns are not filled in order (a gap before the last image)")
    is_mc = row.get("question_type", "multiple-choice") == "multiple-choice"
    return {
        "id": ident,
        "question": row["question"],
        "answer": row["answer"],
        "options": _literal(row.get("options") or "[]", "options") if is_mc else [],
        "images": images,
        "category": subject,
    }


def load_parquet(files: list[Path], name: str) -> BenchSet:
    """Hub parquet files; the shape (MathVista or MMMU) is told by the columns."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise R1VError("reading parquet needs pyarrow: pip install 'r1v-quant[calib]' (or pyarrow)") from None
    parts = []
    for f in files:
        try:
            table = pq.read_table(f)
        except (OSError, ValueError) as e:  # pyarrow's ArrowInvalid is a ValueError
            raise R1VError(f"cannot read {f}: {e}") from None
        cols = set(table.column_names)
        if {"pid", "decoded_image"} <= cols:
            convert = _from_mathvista
        elif {"id", "question", "options", "image_1"} <= cols:
            convert = _from_mmmu
        else:
            raise R1VError(
                f"{f}: unknown parquet columns {sorted(cols)[:8]} (expected MathVista's pid/decoded_image "
                "or MMMU's id/question/options/image_1)"
            )
        rows = [(f"{f.name}:{i + 1}", r) for i, r in enumerate(table.to_pylist())]
        parts.append(_rows_to_set(f.stem, rows, f.parent, convert))
    return merge(name, parts)


# -- presets -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preset:
    description: str
    find: Callable[[Path], BenchSet]


def _first(path: Path, patterns: list[str], what: str) -> Path:
    """The first existing match of `patterns` under `path` (a file is itself)."""
    if path.is_file():
        return path
    for pat in patterns:
        found = sorted(path.glob(pat))
        if found:
            return found[0]
    raise R1VError(f"{path}: no {what} here (looked for {', '.join(patterns)})")


def _tsv_or_parquet(path: Path, split: str, what: str) -> BenchSet:
    if path.is_file():
        return load_file(path)
    parquet = sorted(p for p in path.rglob("*.parquet") if p.name.startswith(split))
    if parquet:
        return load_parquet(parquet, path.name)
    return load_file(_first(path, ["*.tsv"], what))


def _jsonl_preset(kind: str | None, patterns: list[str], what: str) -> Callable[[Path], BenchSet]:
    def find(path: Path) -> BenchSet:
        f = _first(path, patterns, what)
        if kind is None:
            return load_file(f)
        bench = load_jsonl(f)
        for it in bench.items:  # the preset's answer kind (AIME answers are integers, not LaTeX)
            if it.kind != kind:
                it.kind = kind
        return bench

    return find


PRESETS: dict[str, Preset] = {
    "mathvista": Preset(
        "MathVista testmini: the Hub's data/testmini-*.parquet (AI4Math/MathVista) or VLMEvalKit's "
        "MathVista_MINI.tsv",
        lambda p: _tsv_or_parquet(p, "testmini", "MathVista parquet or TSV"),
    ),
    "mathvision": Preset(
        "MATH-Vision: the repo's data/testmini.jsonl (or test.jsonl) + images/, or VLMEvalKit's "
        "MathVision(_MINI).tsv",
        lambda p: load_file(
            _first(
                p,
                ["testmini.jsonl", "data/testmini.jsonl", "test.jsonl", "data/test.jsonl", "*.tsv"],
                "MATH-Vision jsonl or TSV",
            )  # fmt: skip
        ),
    ),
    "mmmu": Preset(
        "MMMU validation: the Hub's parquet (one folder per subject, or the merged data/validation-*), or "
        "VLMEvalKit's MMMU_DEV_VAL.tsv",
        lambda p: _tsv_or_parquet(p, "validation", "MMMU parquet or TSV"),
    ),
    "logicvista": Preset(
        "LogicVista: data/dataset.json + data/images/ (github Yijia-Xiao/LogicVista)",
        lambda p: load_file(_first(p, ["dataset.json", "data/dataset.json"], "LogicVista dataset.json")),
    ),
    "wemath": Preset(
        "We-Math testmini: data/testmini.json + data/2steps/, data/3steps/ (github We-Math/We-Math)",
        lambda p: load_file(_first(p, ["testmini.json", "data/testmini.json"], "We-Math testmini.json")),
    ),
    "math500": Preset(
        "MATH-500: test.jsonl (problem, answer, subject, level, unique_id)",
        _jsonl_preset("math", ["test.jsonl", "*.jsonl"], "MATH-500 test.jsonl"),
    ),
    "aime": Preset(
        "AIME: test.jsonl (problem, integer answer)",
        _jsonl_preset("numeric", ["test.jsonl", "*.jsonl"], "AIME test.jsonl"),
    ),
    "gsm8k": Preset(
        "GSM8K: test.jsonl (question, answer ending in '#### N')",
        _jsonl_preset("numeric", ["test.jsonl", "*.jsonl"], "GSM8K test.jsonl"),
    ),
}


def load_preset(name: str, path: Path) -> BenchSet:
    if not path.exists():
        raise R1VError(f"benchmark {name}:{path}: no such file or directory ({PRESETS[name].description})")
    bench = PRESETS[name].find(path)
    bench.name = name
    return bench
