"""What this process uses: peak resident memory and the memory the machine has left (Linux /proc, with fallbacks)."""

from __future__ import annotations

import resource
from pathlib import Path


def proc_mb(path: str, field: str) -> float | None:
    """A ``field:  <n> kB`` line of a /proc file, in MB (None where the file or the field is missing)."""
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (MB): VmHWM of its own address space.

    ``ru_maxrss`` is only the fallback: Linux carries the high-water mark of the pre-exec address space (the forked
    copy of a parent process) over ``execve``, so every child would report at least its parent's RSS.
    """
    peak = proc_mb("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def available_memory_mb() -> float | None:
    """Memory the machine can still give (MemAvailable), or None where unknown."""
    return proc_mb("/proc/meminfo", "MemAvailable")


__all__ = ["available_memory_mb", "peak_rss_mb", "proc_mb"]
