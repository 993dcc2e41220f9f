"""Cached activations under a memory budget: tensors beyond the budget spill to raw files on disk.

Spilling writes the tensor's exact bytes and reads them back unchanged, so results computed from spilled
activations are bit-identical to in-memory ones. Only the cached activations count against the budget;
the one layer being run and the sample in flight are the working set on top of it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from r1v_quant.util.errors import R1VError

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1024,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_size(text: str | int | None) -> int | None:
    """'2GB' -> 2e9, '512MiB' -> 512·2^20, '1.5g', a plain byte count; None / '' -> no budget."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise R1VError(f"cannot read memory size {text!r} (examples: 2GB, 512MiB, 1.5G, 100000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


AUTO = "auto"
NO_BUDGET = ("none", "off", "unlimited")


def parse_max_memory(text: str | int | None) -> int | str | None:
    """--max-memory: "auto" -> "auto" (job_plan fits the budget to this machine's available memory);
    "none" / "off" / "unlimited" / None -> None (no budget: every activation stays in RAM); a size ->
    bytes ("0": spill everything)."""
    if isinstance(text, str) and text.strip().lower() == AUTO:
        return AUTO
    if isinstance(text, str) and text.strip().lower() in NO_BUDGET:
        return None
    try:
        return parse_size(text)
    except R1VError:
        raise R1VError(
            f"cannot read memory size {text!r} for --max-memory (auto, none, or a size: 2GB, 512MiB, 0)"
        ) from None


@dataclass(frozen=True)
class _Spilled:
    path: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class ActivationStore:
    """Named lists of per-sample tensors; `budget` bytes stay in RAM, the rest go to `spill_dir`."""

    def __init__(self, budget: int | None = None, spill_dir: Path | str | None = None):
        if budget is not None and budget < 0:
            raise R1VError("--max-memory must not be negative")
        if budget is not None and spill_dir is None:
            raise R1VError("a memory budget needs a spill directory")
        self.budget = budget
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._items: dict[tuple[str, int], torch.Tensor | _Spilled] = {}
        self.mem_bytes = 0
        self.peak_mem_bytes = 0
        self.disk_bytes = 0
        self.peak_disk_bytes = 0
        self.spilled_total = 0  # bytes ever written to disk
        self._serial = 0

    def put(self, name: str, index: int, tensor: torch.Tensor) -> None:
        self.delete(name, index)
        t = tensor.detach().contiguous()
        nbytes = t.numel() * t.element_size()
        if self.budget is None or self.mem_bytes + nbytes <= self.budget:
            self._items[(name, index)] = t
            self.mem_bytes += nbytes
            self.peak_mem_bytes = max(self.peak_mem_bytes, self.mem_bytes)
            return
        assert self.spill_dir is not None
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._serial += 1
        path = self.spill_dir / f"{name}-{index}-{self._serial}.bin"
        try:
            # Raw bytes via a uint8 view: exact for every dtype (numpy has no bfloat16).
            t.reshape(-1).view(torch.uint8).numpy().tofile(path)
        except OSError as e:
            raise R1VError(f"cannot spill activations to {path.parent}: {e.strerror or e}") from None
        self._items[(name, index)] = _Spilled(path, t.dtype, tuple(t.shape), nbytes)
        self.disk_bytes += nbytes
        self.spilled_total += nbytes
        self.peak_disk_bytes = max(self.peak_disk_bytes, self.disk_bytes)

    def get(self, name: str, index: int) -> torch.Tensor:
        item = self._items[(name, index)]
        if isinstance(item, torch.Tensor):
            return item
        raw = torch.from_numpy(np.fromfile(item.path, dtype=np.uint8))
        return raw.view(item.dtype).reshape(item.shape)

    def is_spilled(self, name: str, index: int) -> bool:
        return isinstance(self._items[(name, index)], _Spilled)

    def delete(self, name: str, index: int) -> None:
        item = self._items.pop((name, index), None)
        if isinstance(item, torch.Tensor):
            self.mem_bytes -= item.numel() * item.element_size()
        elif isinstance(item, _Spilled):
            item.path.unlink(missing_ok=True)
            self.disk_bytes -= item.nbytes

    def drop(self, name: str) -> None:
        for key in [k for k in self._items if k[0] == name]:
            self.delete(*key)

    def rename(self, old: str, new: str) -> None:
        """Move list `old` to `new` without copying (e.g. this layer's outputs become the next inputs)."""
        self.drop(new)
        for key in [k for k in self._items if k[0] == old]:
            self._items[(new, key[1])] = self._items.pop(key)

    def close(self) -> None:
        for key in list(self._items):
            self.delete(*key)
        if self.spill_dir is not None:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


class ActivationList:
    """A sequence view of one named list in a store: `acts[j]` is sample j's tensor (read back if spilled)."""

    def __init__(self, store: ActivationStore, name: str, length: int):
        self.store, self.name, self._len = store, name, length

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, j: int) -> torch.Tensor:
        if not 0 <= j < self._len:
            raise IndexError(j)
        return self.store.get(self.name, j)

    def __setitem__(self, j: int, value: torch.Tensor) -> None:
        if not 0 <= j < self._len:
            raise IndexError(j)
        self.store.put(self.name, j, value)

    def __iter__(self) -> Iterator[torch.Tensor]:
        for j in range(self._len):
            yield self[j]
