"""File-state and content stamps: how a step knows its earlier output is still valid (resume, reuse).

A stamp is a short sha1 of a JSON payload (configs, file states, names); it changes when anything the
output depends on changes. A file's state is its size and modification time: cheap, and what make uses.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any


def digest(payload: Any, length: int = 16) -> str:
    """A ``length``-hex-digit sha1 of ``payload`` as sorted JSON (paths and other objects as ``str``)."""
    return text_digest([json.dumps(payload, sort_keys=True, default=str)], length)


def text_digest(parts: Iterable[str], length: int = 16) -> str:
    """A ``length``-hex-digit sha1 of the concatenated ``parts`` (streamed: long lists need no joined copy)."""
    hasher = hashlib.sha1()
    for part in parts:
        hasher.update(part.encode())
    return hasher.hexdigest()[:length]


def file_state(path: str | Path) -> list[int] | None:
    """``[size, mtime_ns]`` of a file, or None when it cannot be read (absent, no permission)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return None
    return [stat.st_size, stat.st_mtime_ns]


def file_digest(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """sha1 of a file's bytes (for inputs whose content, not just state, decides the output)."""
    hasher = hashlib.sha1()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(chunk_bytes), b""):
            hasher.update(chunk)
    return hasher.hexdigest()
