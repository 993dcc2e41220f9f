"""This process's memory lines from /proc/self/status (Linux)."""

from __future__ import annotations

from pathlib import Path


def proc_status(key: str) -> int | None:
    """A memory line of /proc/self/status (VmRSS, VmHWM, ...) in bytes; None where there is none."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
