"""Streaming checkpoint IO: memory-mapped safetensors shards, one tensor or one layer at a time.

Nothing here ever holds a whole checkpoint: `Checkpoint.get` maps one tensor out of its shard and
`Checkpoint.layer` returns one decoder (or ViT) layer. Checkpoints are read as data only: safetensors and
JSON, never pickle and never remote code.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from r1v_quant.model.spec import LLM_PREFIX, VIT_PREFIX, ModelSpec, load_spec
from r1v_quant.util.atomic import atomic_file
from r1v_quant.util.errors import CheckpointError, R1VError, os_error
from r1v_quant.util.finite import check_finite
from r1v_quant.util.hub import snapshot_blobs

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

TORCH_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
DTYPE_BYTES = {k: v.itemsize for k, v in TORCH_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    shard: str
    start: int = 0  # absolute byte offset of the data in the shard file
    end: int = 0

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPE_BYTES.get(self.dtype, 4)


MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
# Non-persistent buffers some exports carry; nothing reads them (RoPE is computed), so they may be present.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def _open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, refusing anything but a regular file (a FIFO would block forever)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise CheckpointError(f"missing shard {path.name} (named in the index)") from None
    except OSError as e:
        raise os_error(e, path, "read the shard") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise CheckpointError(f"{path.name}: not a regular file (refused)")
    return fd


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header and check it the way the safetensors library does.

    The header is a JSON object; every entry but `__metadata__` (a string -> string object) has a known
    `dtype`, a `shape` of non-negative integers and `data_offsets` [begin, end] whose length matches
    dtype x shape; sorted by offset, the tensors tile the data area exactly (no gap, no overlap, nothing
    after the last one). A file shorter than its header promises is reported as truncated.
    """
    fd = _open_regular(path)
    try:
        with os.fdopen(fd, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path.name}: truncated safetensors file (no header)")
            (n,) = struct.unpack("<Q", raw)
            if n > size - 8 or n > MAX_HEADER_BYTES:
                raise CheckpointError(f"{path.name}: truncated or corrupt safetensors header")
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicates)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path.name}: corrupt safetensors header (not JSON)") from None
    except ValueError as e:
        raise CheckpointError(f"{path.name}: corrupt safetensors header ({e})") from None
    except OSError as e:
        raise os_error(e, path, "read the shard") from None
    data_len = size - 8 - n
    spans = _check_entries(path.name, header)
    end = max((stop for _, stop, _ in spans), default=0)
    if end > data_len:
        raise CheckpointError(
            f"{path.name}: truncated shard ({size} bytes on disk, header promises {8 + n + end})"
        )
    offset = 0
    for begin, stop, name in spans:
        if begin != offset:
            what = "overlaps the previous tensor" if begin < offset else "leaves a gap before it"
            raise CheckpointError(f"{path.name}: corrupt safetensors header (tensor {name!r} {what})")
        offset = stop
    if offset != data_len:
        raise CheckpointError(
            f"{path.name}: corrupt safetensors header ({data_len - offset} bytes after the last tensor)"
        )
    header["__data_start__"] = 8 + n
    return header


def _check_entries(shard: str, header: Any) -> list[tuple[int, int, str]]:
    """Each entry's shape, dtype and byte range; returns the ranges sorted by offset."""

    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"{shard}: corrupt safetensors header ({what})")

    if not isinstance(header, dict):
        raise bad(f"a JSON {type(header).__name__}, not an object")
    meta = header.get("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise bad("__metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise bad(f"entry {name!r} has no {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in TORCH_DTYPES:
            raise CheckpointError(f"{shard}: tensor {name!r} has a bad dtype or size (dtype {dtype!r})")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise bad(f"entry {name!r} has shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
            raise bad(f"entry {name!r} has data_offsets {offsets!r}")
        begin, stop = offsets
        if stop < begin or stop - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(f"{shard}: tensor {name!r} has a bad dtype or size")
        spans.append((begin, stop, name))
    return sorted(spans)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _inside(root: Path, rel: str) -> Path:
    """Check a shard name from an index, refusing anything that escapes the model directory.

    Refused: absolute names, names climbing out with `..`, and files whose symlinks lead outside. The one
    exception is the Hugging Face cache, where every file of a snapshot links into its repo's blob store
    (`models--org--name/snapshots/<sha>/x -> ../../blobs/<hash>`).
    """
    if not isinstance(rel, str):
        raise CheckpointError(f"index names a shard that is not a file name: {rel!r}")
    target = (root / rel).resolve()
    allowed = [root.resolve(), snapshot_blobs(root)]
    climbs = os.path.normpath(rel).split(os.sep)[0] == ".."
    if os.path.isabs(rel) or climbs or not any(a is not None and a in target.parents for a in allowed):
        raise CheckpointError(f"index names a shard outside the model directory: {rel!r} (refused)")
    return root / rel


class Checkpoint:
    """A model directory: config.json + safetensors shards (+ index), opened lazily and memory-mapped."""

    def __init__(self, path: Path | str, *, flavor: str | None = None, require_weights: bool = True):
        self.path = Path(path)
        if not self.path.exists():
            raise CheckpointError(f"{self.path}: no such directory")
        self.spec: ModelSpec = load_spec(self.path, flavor=flavor)
        self._infos: dict[str, TensorInfo] = {}
        self.weight_map = self._read_weight_map()
        self.has_weights = False
        if self.weight_map is None:
            if require_weights:
                raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_NAME}")
            self.weight_map = {}
        else:
            self.has_weights = self._scan_shards(require_weights)

    # -- discovery ---------------------------------------------------------------------------------------
    def _read_weight_map(self) -> dict[str, str] | None:
        index = self.path / INDEX_NAME
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                wm = data["weight_map"]
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
                raise CheckpointError(f"{index.name}: not a valid safetensors index") from None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError(
                    f"{index.name}: not a valid safetensors index ('weight_map' must map tensor names to "
                    f"shard file names, {_found(wm)})"
                )
            for shard in set(wm.values()):
                _inside(self.path, shard)
                if shard.endswith(PICKLE_SUFFIXES):
                    raise CheckpointError(f"index names pickle weights {shard!r}: refused (never unpickled)")
            return dict(wm)
        if (self.path / SINGLE_NAME).exists():
            header = read_header(_inside(self.path, SINGLE_NAME))  # a link leading outside: never opened
            return {k: SINGLE_NAME for k in header if k not in ("__metadata__", "__data_start__")}
        pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"{self.path}: only pickle weights ({pickles[0]}): refused, pickle can run code on load; "
                "convert to safetensors first"
            )
        return None

    def _scan_shards(self, require: bool) -> bool:
        shards = sorted(set(self.weight_map.values()))
        present = [s for s in shards if (self.path / s).is_file()]
        if not present and not require:
            return False  # a config + index only directory (e.g. to inspect the real 38B layout)
        for shard in shards:
            header = read_header(_inside(self.path, shard))
            base = header.pop("__data_start__")
            for name, meta in header.items():
                if name != "__metadata__":
                    b, e = meta["data_offsets"]
                    if name in self._infos:
                        other = self._infos[name].shard
                        raise CheckpointError(f"tensor {name!r} is stored twice ({other} and {shard})")
                    info = TensorInfo(name, meta["dtype"], tuple(meta["shape"]), shard, base + b, base + e)
                    self._infos[name] = info
        for name, shard in self.weight_map.items():
            info = self._infos.get(name)
            if info is None or info.shard != shard:
                raise CheckpointError(
                    f"index names tensor {name!r} in {shard}, but the shard does not hold it"
                )
        return True

    # -- access ------------------------------------------------------------------------------------------
    def names(self) -> list[str]:
        return list(self.weight_map)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
        return self._infos[name]

    def get(self, name: str) -> torch.Tensor:
        """One tensor, copied out of a short-lived memory map of its byte range.

        The map is closed right after the copy, so the shard's pages never stay mapped into this process:
        resident memory tracks the tensors the caller keeps, not the shards it has read (a long-lived
        mmap of a 4 GB shard would keep every touched page counted in RSS).
        """
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name!r} is not in the checkpoint")
        info = self.info(name)
        dtype = TORCH_DTYPES[info.dtype]
        if info.end == info.start:
            return torch.empty(info.shape, dtype=dtype)
        page = mmap.ALLOCATIONGRANULARITY
        offset = info.start // page * page
        with (
            open(self.path / info.shard, "rb") as f,
            mmap.mmap(f.fileno(), info.end - offset, access=mmap.ACCESS_READ, offset=offset) as mm,
        ):
            buf = bytearray(mm[info.start - offset : info.end - offset])
        t = torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
        check_finite(t, f"tensor {name!r} ({info.shard})", "the checkpoint is damaged")
        return t

    def get_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        return {n: self.get(n) for n in names}

    def with_prefix(self, prefix: str) -> dict[str, torch.Tensor]:
        """All tensors under `prefix.` with the prefix stripped (ignorable buffers left out)."""
        p = prefix + "."
        return {
            n[len(p) :]: self.get(n)
            for n in self.weight_map
            if n.startswith(p) and not n.endswith(IGNORED_SUFFIXES)
        }

    def layer(self, i: int, *, vision: bool = False) -> dict[str, torch.Tensor]:
        """One decoder layer (or ViT layer): the unit of streaming."""
        prefix = f"{VIT_PREFIX if vision else LLM_PREFIX}.{i}"
        out = self.with_prefix(prefix)
        if not out:
            raise CheckpointError(f"layer {prefix} is not in the checkpoint")
        return out

    def iter_layers(self, *, vision: bool = False) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        n = self.spec.vision.num_layers if vision else self.spec.llm.num_layers
        for i in range(n):
            yield i, self.layer(i, vision=vision)

    def validate(self) -> None:
        """Exactly the tensors the spec describes (plus ignorable buffers), each with the expected shape.

        Checked against the index's names, so a tensor the index forgets is missing even when its shard
        holds it; shapes are checked where the shards are present.
        """
        if self.spec.is_quantized:
            return  # quantized checkpoints are validated by their own loader
        shapes = self.spec.tensor_shapes()
        missing = [n for n in shapes if n not in self.weight_map]
        if missing:
            raise CheckpointError(f"checkpoint lacks {_some(missing)} (required by config.json)")
        extra = [n for n in self.weight_map if n not in shapes and not n.endswith(IGNORED_SUFFIXES)]
        if extra:
            raise CheckpointError(
                f"checkpoint holds {_some(extra)}, which config.json does not describe (another "
                "architecture, or a damaged index?)"
            )
        for name, shape in shapes.items():
            info = self._infos.get(name)
            if info is not None and info.shape != shape:
                raise CheckpointError(
                    f"tensor {name!r} has shape {list(info.shape)}, config implies {list(shape)}"
                )

    def total_bytes(self) -> int:
        return sum(i.nbytes for i in self._infos.values())


def _found(wm: Any) -> str:
    return f"found a {type(wm).__name__}" if not isinstance(wm, dict) else "found other values"


def _some(names: list[str]) -> str:
    """For a message: "tensor 'a'", "tensors 'a', 'b', 'c'", "tensors 'a', 'b', 'c' and 9 more"."""
    shown = ", ".join(repr(n) for n in names[:3])
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"tensor{'s' if len(names) > 1 else ''} {shown}{more}"


def open_checkpoint(path: Path | str, *, flavor: str | None = None, validate: bool = True) -> Checkpoint:
    ckpt = Checkpoint(path, flavor=flavor)
    if validate:
        ckpt.validate()
    return ckpt


class ShardedWriter:
    """Write tensors into size-capped safetensors shards + index, each shard renamed into place when full.

    Shards are written as `model-XXXXX.safetensors.partial` and renamed to the final
    `model-0000i-of-0000N.safetensors` names (N is only known at the end) by `close()`, which writes the
    index last: a directory without an index is never mistaken for a finished checkpoint.
    """

    def __init__(self, out_dir: Path | str, *, max_shard_bytes: int = 4 * 1024**3):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        # one key only: safetensors writes metadata keys in hash order, so more keys break "same
        # input, same bytes" (provenance goes in the reports instead)
        self.metadata = {"format": "pt"}
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._shards: list[tuple[Path, list[str]]] = []
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._pending or any(name in names for _, names in self._shards):
            raise R1VError(f"tensor {name!r} written twice")
        t = tensor.detach().contiguous().cpu()
        check_finite(t, f"output tensor {name!r}", "nothing was written")
        nbytes = t.numel() * t.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self.flush()
        self._pending[name] = t
        self._pending_bytes += nbytes
        self._total += nbytes

    def add_many(self, tensors: dict[str, torch.Tensor]) -> None:
        for k, v in tensors.items():
            self.add(k, v)

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f"model-{len(self._shards) + 1:05d}.safetensors.partial"
        with atomic_file(path) as tmp:
            save_file(self._pending, str(tmp), metadata=self.metadata)
        self._shards.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        self.flush()
        n = len(self._shards)
        weight_map: dict[str, str] = {}
        for i, (path, names) in enumerate(self._shards, 1):
            final = f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(path, self.out_dir / final)
            weight_map.update({k: final for k in names})
        index = {"metadata": {"total_size": self._total}, "weight_map": dict(sorted(weight_map.items()))}
        with atomic_file(self.out_dir / INDEX_NAME) as tmp:
            tmp.write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
