"""Calibration set: chat samples (system/user/assistant turns, images per user turn) plus image bytes.

On disk a set is a folder holding `manifest.jsonl` (one sample per line) and the image files it names:

    {"id": "chart-0003", "messages": [
        {"role": "user", "content": "<image>\\nWhich bar is tallest?", "images": ["images/chart-0003.png"]},
        {"role": "assistant", "content": "<think>\\n...\\n</think>\\n\\nThe answer is C."}]}

A set is identified by a content hash over the canonical manifest lines and the bytes of every image, so
every artifact made from it (statistics, AWQ checkpoints) can record exactly which data it saw.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from r1v_quant.model.prompts import IMAGE_PLACEHOLDER
from r1v_quant.util.atomic import atomic_dir
from r1v_quant.util.errors import R1VError

MANIFEST_NAME = "manifest.jsonl"
HASH_VERSION = "r1v-quant-calibration-set/1"
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class Turn:
    role: str
    content: str
    images: tuple[str, ...] = ()  # keys into CalibrationSet.sources, in <image> order

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.images:
            d["images"] = list(self.images)
        return d


@dataclass(frozen=True)
class Sample:
    id: str
    turns: tuple[Turn, ...]

    @property
    def images(self) -> list[str]:
        return [k for t in self.turns for k in t.images]

    @property
    def has_response(self) -> bool:
        return bool(self.turns) and self.turns[-1].role == "assistant"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "messages": [t.to_json() for t in self.turns]}

    def manifest_line(self) -> str:
        # Canonical form: the hash must not depend on key order or whitespace of the source file.
        return json.dumps(self.to_json(), ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def validate_sample(sample: Sample) -> None:
    """Structural checks that need no model: roles, image positions, <image> tag counts."""
    where = f"sample {sample.id!r}"
    if not sample.turns:
        raise R1VError(f"{where}: no messages")
    for k, turn in enumerate(sample.turns):
        if turn.role not in ROLES:
            raise R1VError(
                f"{where}: message {k} has unknown role {turn.role!r} (expected {', '.join(ROLES)})"
            )
        tags = turn.content.count(IMAGE_PLACEHOLDER)
        if turn.role != "user" and (turn.images or tags):
            # The templates only place images in user turns; elsewhere they would be silently mis-rendered.
            raise R1VError(
                f"{where}: message {k} ({turn.role}) carries an image; images are allowed in user turns only"
            )
        if tags and tags != len(turn.images):
            raise R1VError(
                f"{where}: message {k} has {tags} {IMAGE_PLACEHOLDER} tag(s) but {len(turn.images)} image(s)"
            )


def sample_from_json(obj: Any, default_id: str) -> Sample:
    """A manifest line: {"id", "messages": [...]} or the shorthand {"question", "answer", "images"}."""
    if not isinstance(obj, Mapping):
        raise R1VError(f"sample {default_id}: expected a JSON object, got {type(obj).__name__}")
    sid = str(obj.get("id", default_id))
    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list):
            raise R1VError(f"sample {sid!r}: 'messages' must be a list")
        turns = []
        for k, m in enumerate(raw):
            if not isinstance(m, Mapping) or not isinstance(m.get("content"), str) or "role" not in m:
                raise R1VError(f"sample {sid!r}: message {k} needs a 'role' and a string 'content'")
            images = m.get("images") or ([m["image"]] if m.get("image") else [])
            if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
                raise R1VError(f"sample {sid!r}: message {k} 'images' must be a list of paths")
            turns.append(Turn(str(m["role"]), m["content"], tuple(images)))
    else:
        question = obj.get("question", obj.get("prompt"))
        if not isinstance(question, str):
            raise R1VError(f"sample {sid!r}: needs 'messages' or a string 'question'")
        images = obj.get("images") or ([obj["image"]] if obj.get("image") else [])
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise R1VError(f"sample {sid!r}: 'images' must be a list of paths")
        turns = []
        if isinstance(obj.get("system"), str):
            turns.append(Turn("system", obj["system"]))
        turns.append(Turn("user", question, tuple(images)))
        answer = obj.get("answer", obj.get("response"))
        if answer is not None:
            turns.append(Turn("assistant", str(answer)))
    sample = Sample(sid, tuple(turns))
    validate_sample(sample)
    return sample


@dataclass
class CalibrationSet:
    """Samples plus where each image key's bytes come from (a file path or bytes already in memory)."""

    samples: list[Sample]
    sources: dict[str, Path | bytes] = field(default_factory=dict)
    source: str = ""  # what the user asked for: "default", a path, "hf:..."

    def __post_init__(self) -> None:
        seen: set[str] = set()
        for s in self.samples:
            validate_sample(s)
            if s.id in seen:
                raise R1VError(f"duplicate sample id {s.id!r}")
            seen.add(s.id)
            for key in s.images:
                if key not in self.sources:
                    raise R1VError(f"sample {s.id!r}: image {key!r} has no source")

    def __len__(self) -> int:
        return len(self.samples)

    def image_bytes(self, key: str) -> bytes:
        src = self.sources[key]
        if isinstance(src, bytes):
            return src
        try:
            return Path(src).read_bytes()
        except FileNotFoundError:
            raise R1VError(f"image file not found: {src}") from None
        except OSError as e:
            raise R1VError(f"cannot read image {src}: {e.strerror or e}") from None

    def image_keys(self) -> list[str]:
        """Every image key once, in order of first use."""
        return list(dict.fromkeys(k for s in self.samples for k in s.images))

    def manifest_text(self) -> str:
        return "".join(s.manifest_line() + "\n" for s in self.samples)

    def content_hash(self) -> str:
        """sha256 over the canonical manifest and each image's bytes: the set's identity."""
        h = hashlib.sha256(HASH_VERSION.encode() + b"\0")
        h.update(self.manifest_text().encode())
        for key in self.image_keys():
            h.update(b"\0" + key.encode() + b"\0" + hashlib.sha256(self.image_bytes(key)).digest())
        return "sha256:" + h.hexdigest()

    def select(self, indices: Iterable[int]) -> CalibrationSet:
        samples = [self.samples[i] for i in indices]
        keys = {k for s in samples for k in s.images}
        return CalibrationSet(samples, {k: v for k, v in self.sources.items() if k in keys}, self.source)


def write_set(cset: CalibrationSet, out_dir: Path | str) -> Path:
    """Write `manifest.jsonl` + images under `out_dir` (atomically); image keys become relative paths.

    Keys that are not safe relative paths (e.g. TSV rows "tsv:12") are renamed to images/NNNN.<ext>.
    """
    out_dir = Path(out_dir)
    renamed: dict[str, str] = {}
    for n, key in enumerate(cset.image_keys()):
        p = Path(key)
        safe = not p.is_absolute() and ".." not in p.parts and ":" not in key and key.strip() == key
        renamed[key] = key if safe else f"images/{n:05d}{_ext(cset.image_bytes(key))}"
    with atomic_dir(out_dir) as tmp:
        for key, rel in renamed.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(cset.image_bytes(key))
        lines = []
        for s in cset.samples:
            turns = tuple(Turn(t.role, t.content, tuple(renamed[k] for k in t.images)) for t in s.turns)
            lines.append(Sample(s.id, turns).manifest_line() + "\n")
        (tmp / MANIFEST_NAME).write_text("".join(lines), encoding="utf-8")
    return out_dir


def read_jsonl_samples(path: Path, image_root: Path) -> tuple[list[Sample], dict[str, Path | bytes]]:
    """Samples of one JSONL file; relative image paths resolve against `image_root`."""
    samples: list[Sample] = []
    sources: dict[str, Path | bytes] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise R1VError(f"cannot read {path}: {e}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise R1VError(f"{path.name}:{n}: not valid JSON ({e.msg})") from None
        sample = sample_from_json(obj, f"{path.stem}-{n}")
        for key in sample.images:
            p = Path(key)
            sources[key] = p if p.is_absolute() else image_root / p
        samples.append(sample)
    return samples, sources


def _ext(data: bytes) -> str:
    if data.startswith(b"\x89PNG"):
        return ".png"
    if data.startswith(b"\xff\xd8"):
        return ".jpg"
    return ".img"


def merge_sets(parts: Sequence[CalibrationSet], source: str) -> CalibrationSet:
    samples: list[Sample] = []
    sources: dict[str, Path | bytes] = {}
    for p in parts:
        samples += p.samples
        sources.update(p.sources)
    return CalibrationSet(samples, sources, source)
