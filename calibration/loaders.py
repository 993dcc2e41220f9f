"""Turn what the user points `--set` at into a CalibrationSet.

default           the built-in set (default_set.py)
DIR               a folder of *.jsonl manifests + the images they name (relative to DIR)
FILE.jsonl        one manifest; images relative to its folder
FILE.tsv          VLMEvalKit TSV: index, image (base64), question, answer, optional A-D options, hint
FILE.txt / DIR    plain text (a folder with no .jsonl but .txt files): chunks become user turns
hf:NAME[:SPLIT]   a Hugging Face `datasets` dataset (needs `datasets`, and the network or its cache)
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import json
import random
import sys
import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from r1v_quant.calibration.dataset import (
    CalibrationSet,
    Sample,
    Turn,
    merge_sets,
    read_jsonl_samples,
    sample_from_json,
)
from r1v_quant.calibration.default_set import build_default_set
from r1v_quant.calibration.render import CalibrationWarning
from r1v_quant.util.errors import R1VError

OPTION_COLUMNS = ("A", "B", "C", "D", "E", "F", "G", "H")
CHARS_PER_TOKEN = 3  # plain text is chunked to about seq_len tokens by this estimate


def load_set(
    spec: str,
    *,
    samples: int,
    seq_len: int,
    seed: int = 0,
    text_ratio: float = 0.25,
    count_tokens: Callable[[str], int] | None = None,
    progress: bool = False,
) -> CalibrationSet:
    """The calibration set `spec` names, cut to `samples` samples (a seeded choice when it has more)."""
    if samples < 1:
        raise R1VError(f"--samples must be at least 1 (got {samples})")
    if spec == "default":
        return build_default_set(
            samples,
            seed=seed,
            text_ratio=text_ratio,
            seq_len=seq_len,
            count_tokens=count_tokens,
            progress=progress,
        )
    if spec.startswith("hf:"):
        name, _, split = spec[3:].partition(":")
        cset = load_hf_dataset(name, split=split or "train")
    else:
        cset = load_path(Path(spec), seq_len=seq_len)
    if not cset.samples:
        raise R1VError(f"calibration set {spec!r} is empty")
    if len(cset) > samples:
        chosen = sorted(random.Random(f"r1v-quant-select/{seed}").sample(range(len(cset)), samples))
        cset = cset.select(chosen)
    elif len(cset) < samples:
        warnings.warn(
            f"calibration set {spec!r} has {len(cset)} samples, fewer than --samples {samples}: using all",
            CalibrationWarning,
            stacklevel=2,
        )
    return cset


def load_path(path: Path, *, seq_len: int = 4096) -> CalibrationSet:
    if not path.exists():
        raise R1VError(f"calibration set {path}: no such file or directory (or use --set default)")
    if path.is_dir():
        manifests = sorted(path.glob("*.jsonl"))
        if manifests:
            return merge_sets([load_jsonl(p) for p in manifests], str(path))
        texts = sorted(path.glob("*.txt"))
        if texts:
            return merge_sets([load_text(p, seq_len=seq_len) for p in texts], str(path))
        raise R1VError(f"calibration set {path}: no *.jsonl manifest or *.txt file in this folder")
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return load_jsonl(path)
    if suffix == ".tsv":
        return load_tsv(path)
    if suffix in (".txt", ".md", ".text"):
        return load_text(path, seq_len=seq_len)
    raise R1VError(f"calibration set {path}: unknown file type {suffix!r} (expected .jsonl, .tsv or .txt)")


def load_jsonl(path: Path) -> CalibrationSet:
    samples, sources = read_jsonl_samples(path, path.parent)
    # Ids must be unique across manifests of one folder: prefix with the file name when it is not "manifest".
    if path.stem != "manifest":
        samples = [Sample(f"{path.stem}/{s.id}", s.turns) for s in samples]
    return CalibrationSet(samples, sources, str(path))


def load_text(path: Path, *, seq_len: int = 4096) -> CalibrationSet:
    """Paragraphs packed into chunks of about `seq_len` tokens; each chunk is one user turn (prompt)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    limit = max(256, seq_len * CHARS_PER_TOKEN)
    chunks: list[str] = []
    cur = ""
    for para in (p.strip() for p in text.split("\n\n")):
        if not para:
            continue
        while len(para) > limit:  # a single huge paragraph: split it on the limit
            if cur:
                chunks.append(cur)
                cur = ""
            chunks.append(para[:limit])
            para = para[limit:]
        if cur and len(cur) + 2 + len(para) > limit:
            chunks.append(cur)
            cur = ""
        cur = f"{cur}\n\n{para}" if cur else para
    if cur:
        chunks.append(cur)
    samples = [Sample(f"{path.stem}/{k:05d}", (Turn("user", c),)) for k, c in enumerate(chunks)]
    return CalibrationSet(samples, {}, str(path))


def _b64(value: str, where: str) -> bytes:
    try:
        return base64.b64decode(value, validate=False)
    except (binascii.Error, ValueError) as e:
        raise R1VError(f"{where}: image column is not valid base64 ({e})") from None


def load_tsv(path: Path) -> CalibrationSet:
    """VLMEvalKit benchmark TSV. An `image` cell may be base64, a list of base64, or another row's index."""
    csv.field_size_limit(sys.maxsize)  # base64 images are far longer than csv's default cell limit
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    if rows and not {"index", "question"} <= set(rows[0]):
        raise R1VError(f"{path.name}: a VLMEvalKit TSV needs at least the columns index and question")
    by_index = {str(r["index"]): r for r in rows}
    samples: list[Sample] = []
    sources: dict[str, Path | bytes] = {}
    for n, row in enumerate(rows, 2):  # line 1 is the header
        where = f"{path.name}:{n}"
        cell = (row.get("image") or "").strip()
        if cell and len(cell) < 64 and cell in by_index and cell != str(row["index"]):
            cell = (by_index[cell].get("image") or "").strip()  # VLMEvalKit dedups repeated images this way
        try:
            encoded = json.loads(cell) if cell.startswith("[") else ([cell] if cell else [])
        except json.JSONDecodeError:
            raise R1VError(f"{where}: image column starts with '[' but is not a JSON list") from None
        keys = []
        for k, b in enumerate(encoded):
            key = f"tsv:{row['index']}:{k}"
            sources[key] = _b64(b, where)
            keys.append(key)
        question = row.get("question") or ""
        if row.get("hint"):
            question = f"Hint: {row['hint']}\n{question}"
        options = [(c, row[c]) for c in OPTION_COLUMNS if row.get(c) not in (None, "", "nan")]
        if options:
            question += "\nOptions:\n" + "\n".join(f"{c}. {v}" for c, v in options)
        turns = [Turn("user", question, tuple(keys))]
        if row.get("answer") not in (None, ""):
            turns.append(Turn("assistant", str(row["answer"])))
        samples.append(Sample(f"tsv-{row['index']}", tuple(turns)))
    return CalibrationSet(samples, sources, str(path))


def _image_bytes(value: Any, where: str) -> bytes:
    """A datasets image cell: PIL image, {"bytes": ...}, raw bytes or a path."""
    if isinstance(value, bytes | bytearray):
        return bytes(value)
    if isinstance(value, Mapping) and value.get("bytes"):
        return bytes(value["bytes"])
    if isinstance(value, Mapping) and value.get("path"):
        return Path(value["path"]).read_bytes()
    if isinstance(value, str):
        return Path(value).read_bytes()
    if hasattr(value, "save"):  # PIL image: re-encode losslessly
        buf = io.BytesIO()
        value.save(buf, format="PNG")
        return buf.getvalue()
    raise R1VError(f"{where}: cannot use image of type {type(value).__name__}")


def rows_to_set(rows: Iterable[Mapping[str, Any]], source: str) -> CalibrationSet:
    """Rows with `messages` (chat), `conversations` (ShareGPT from/value) or question/answer(/image)."""
    samples: list[Sample] = []
    sources: dict[str, Path | bytes] = {}
    roles = {
        "human": "user",
        "user": "user",
        "gpt": "assistant",
        "assistant": "assistant",
        "system": "system",
    }
    for n, row in enumerate(rows):
        sid = str(row.get("id", n))
        imgs = row.get("images") if row.get("images") is not None else row.get("image")
        imgs = [] if imgs is None else (list(imgs) if isinstance(imgs, list | tuple) else [imgs])
        keys = []
        for k, img in enumerate(imgs):
            keys.append(f"hf:{sid}:{k}")
            sources[keys[-1]] = _image_bytes(img, f"{source} row {n}")
        if "conversations" in row and "messages" not in row:
            msgs = [
                {"role": roles.get(m.get("from", ""), m.get("from")), "content": m.get("value", "")}
                for m in row["conversations"]
            ]
        elif "messages" in row:
            msgs = [dict(m) for m in row["messages"]]
        else:
            obj = {
                k: row.get(k) for k in ("question", "prompt", "answer", "response", "system") if row.get(k)
            }
            samples.append(sample_from_json({**obj, "id": sid, "images": keys}, sid))
            continue
        # Images of a chat row belong to its first user turn (LLaVA-style data puts <image> there).
        for m in msgs:
            if m.get("role") == "user":
                m["images"] = keys
                break
        samples.append(sample_from_json({"id": sid, "messages": msgs}, sid))
    return CalibrationSet(samples, sources, source)


def load_hf_dataset(name: str, *, split: str = "train", **kwargs: Any) -> CalibrationSet:
    """A `datasets` dataset (hub name or a builder such as "json" with data_files=...)."""
    try:
        import datasets
    except ImportError:
        raise R1VError("--set hf:... needs the `datasets` package (pip install datasets)") from None
    try:
        ds = datasets.load_dataset(name, split=split, **kwargs)
    except Exception as e:  # network, missing cache, bad name: all user-facing
        raise R1VError(f"cannot load dataset {name!r} split {split!r}: {' '.join(str(e).split())}") from None
    return rows_to_set(ds, f"hf:{name}:{split}")
