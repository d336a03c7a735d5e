"""Writing output files safely: atomic replacement, the user's umask, and output paths checked up front.

* :func:`atomic_path` yields a temporary path next to the target; on success it is renamed over the
  target in one step (readers never see half a file), on failure it is removed (no partial file).
  The result gets the permissions the user's umask gives a new file (0644 under umask 022), not
  ``tempfile.mkstemp``'s private 0600.
* :func:`check_output_file` / :func:`check_output_dir` are called by every CLI before its long work
  starts: an output path that cannot be written (read-only folder, a file where a folder is needed or
  the other way round, a full disk) is a :class:`~core.errors.UserError` naming the path and the fix.
  Permissions are probed by creating (and removing) a small file, since root ignores mode bits.

This lives in :mod:`matchers` (the lowest layer) so that match plots use it too; :mod:`core.io`
re-exports it.
"""

from __future__ import annotations

import contextlib
import errno
import glob
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError, errno_of, os_error_reason


# ---------------------------------------------------------------------------------------------- umask
def _umask_at_import() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK_AT_IMPORT = _umask_at_import()


def current_umask() -> int:
    """The process umask, read without changing it (``/proc/self/status``; else the one at import)."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _UMASK_AT_IMPORT


def new_file_mode() -> int:
    """The mode ``open(path, 'w')`` would give a new file: 0o666 less the umask."""
    return 0o666 & ~current_umask()


# --------------------------------------------------------------------------------------------- atomic
@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename.

    The file gets the umask's permissions; on any failure the temporary file is removed. OS errors
    about the temporary file are re-raised naming ``path`` (the file the user asked for).
    """
    path = Path(path)
    temp_path: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        temp_path = Path(temp)
        os.close(handle)
        yield temp_path
        os.chmod(temp_path, new_file_mode())
        os.replace(temp_path, path)
        remove_stale_temps(path)
    except OSError as error:
        code = errno_of(error)
        named = str(error.filename) if error.filename is not None else ""
        # write() on a full disk names no file: it is the temporary file's
        unnamed_write = error.filename is None and code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        if (
            temp_path is not None
            and code is not None
            and (named == str(temp_path) or str(temp_path) in str(error) or unnamed_write)
        ):
            raise OSError(code, os.strerror(code), str(path)) from error
        raise
    finally:
        if temp_path is not None:
            with contextlib.suppress(OSError):
                if temp_path.exists() or temp_path.is_symlink():
                    temp_path.unlink()


def remove_stale_temps(path: str | Path) -> None:
    """Remove the temporary files of ``path`` that writers killed before their rename left behind
    (``atomic_path`` calls it once ``path`` is in place)."""
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.{'?' * 8}.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as temp:
        temp.write_text(text)


# ------------------------------------------------------------------------------------- output checks
def _nearest_existing(path: Path) -> tuple[Path, list[Path]]:
    """The deepest existing ancestor-or-self of ``path`` and the missing components below it."""
    missing: list[Path] = []
    current = path
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    return current, missing[::-1]


def _probe_writable(folder: Path) -> OSError | None:
    """None when a file can be created (and removed) in ``folder``; else the error that stopped it."""
    if not os.access(folder, os.W_OK | os.X_OK):
        code = errno.EROFS if _read_only_fs(folder) else errno.EACCES
        return OSError(code, os.strerror(code), str(folder))
    try:
        handle, temp = tempfile.mkstemp(prefix=".write-test-", suffix=".tmp", dir=folder)
    except OSError as error:
        return error
    os.close(handle)
    with contextlib.suppress(OSError):
        os.unlink(temp)
    return None


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


def _free_bytes(folder: Path) -> int | None:
    try:
        stat = os.statvfs(folder)
    except (OSError, AttributeError):
        return None
    return stat.f_bavail * stat.f_frsize


def _human(size: int) -> str:
    value = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} bytes"


def _check_parent_chain(path: Path, option: str, wanted: str) -> Path:
    """Fail when a component above ``path`` is a file or the nearest existing folder is not writable;
    returns the nearest existing folder (where new files or folders would be created)."""
    existing, missing = _nearest_existing(path.parent if path.parent != path else path)
    if not existing.is_dir():
        raise UserError(
            f"{path}: {existing} is a file, not a folder, so {wanted} cannot be created below it; "
            f"choose {option} outside it"
        )
    problem = _probe_writable(existing)
    if problem is not None:
        target = f"cannot create {missing[0]}: " if missing else ""
        raise UserError(
            f"{path}: {target}{existing} is not writable ({os_error_reason(problem)}); choose {option} in a "
            f"folder you can write to, or make {existing} writable"
        )
    return existing


def _check_space(path: Path, folder: Path, needed: int | None, option: str) -> None:
    if not needed:
        return
    free = _free_bytes(folder)
    if free is not None and free < needed:
        raise UserError(
            f"{path}: only {_human(free)} free on the file system of {folder}, about {_human(needed)} needed; "
            f"free some space or choose {option} on another disk"
        )


def check_output_file(
    path: str | Path, option: str = "the output path", needed_bytes: int | None = None, example: str | None = None
) -> Path:
    """Check, before long work, that the file ``path`` can be written (atomically, by rename).

    ``option`` names the flag in messages (e.g. ``"--output"``); ``example``: a file name suggested when
    ``path`` is a folder (e.g. ``"submission.csv"``). Fails (:class:`UserError`) when
    ``path`` is a folder, a component above it is a file, the folder it goes to cannot be written or
    created, or (``needed_bytes``) the file system has less room. Creates nothing. Returns ``path``.
    """
    path = Path(path)
    if path.is_dir():
        hint = f", e.g. {path / example}" if example else " (a name inside it, or elsewhere)"
        raise UserError(f"{path}: is a folder, but {option} needs a file; give a file path{hint}")
    if os.path.lexists(path) and not path.is_file() and not path.is_symlink():
        raise UserError(f"{path}: exists and is not a regular file; choose another {option}")
    folder = _check_parent_chain(path, option, "the file")
    _check_space(path, folder, needed_bytes, option)
    return path


def check_output_dir(path: str | Path, option: str = "the output folder", needed_bytes: int | None = None) -> Path:
    """Check, before long work, that folder ``path`` exists and is writable, or can be created.

    Fails (:class:`UserError`) when ``path`` is a file, a component above it is a file, or it (or
    the folder it would be created in) cannot be written; with ``needed_bytes``, when the file system
    has less room. Creates nothing. Returns ``path``.
    """
    path = Path(path)
    if os.path.lexists(path) and not path.is_dir():
        raise UserError(
            f"{path}: is a file, but {option} needs a folder; give a folder path (new or existing) "
            f"or move the file away"
        )
    if path.is_dir():
        problem = _probe_writable(path)
        if problem is not None:
            raise UserError(
                f"{path}: the folder is not writable ({os_error_reason(problem)}); choose {option} "
                f"in a place you can write to, or make {path} writable"
            )
        folder = path
    else:
        folder = _check_parent_chain(path, option, "the folder")
    _check_space(path, folder, needed_bytes, option)
    return path


def text_records(path: str | Path, layout: str) -> Iterator[tuple[str, str, list[str]]]:
    """The records of a text file of one record per line (query lists, pose files), as ``(where, line, fields)``
    with ``where`` = ``path:line number``; blank lines and ``#`` comments skipped. ``layout`` (e.g.
    ``'name qw qx qy qz tx ty tz'``) names the expected fields in the error for a missing file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: not found; expected lines '{layout}'")
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield f"{path}:{number}", line, line.split()
