"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2.

Anything the user can fix (a missing file, bad input, weights that cannot be downloaded) raises
:class:`UserError` with a message that names the file and the fix. CLIs run their ``main`` through
:func:`run_cli`, which prints ``error: <message>`` and exits with status 2 instead of a traceback.
An OS error while writing (permission denied, a folder where a file goes, a full disk, ...) is
reported the same way: ``error: <path>: <reason>; <fix>`` (:func:`os_error_message`).
"""

from __future__ import annotations

import errno
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

EXIT_USER_ERROR = 2

#: errno values of write failures the user can fix, with the fix (worded so that it also fits the rare
#: input file that fails the same way, e.g. an unreadable image)
WRITE_ERRNO_FIXES = {
    errno.EACCES: "fix its permissions, or write the outputs to a folder you can write to",
    errno.EPERM: "fix its permissions, or write the outputs to a folder you can write to",
    errno.EROFS: "the file system is read-only; write the outputs somewhere else",
    errno.EISDIR: "a folder is where a file is expected; remove it or give another file path",
    errno.ENOTDIR: "a file is where a folder is expected; remove it or give another path",
    errno.EEXIST: "something is in the way; remove it or choose another output path",
    errno.ENOSPC: "free some space (finished work is kept: run the same command again to resume) "
    "or write the outputs to another disk",
    errno.EDQUOT: "your disk quota is used up; free some space (finished work is kept: run the same "
    "command again to resume) or write the outputs elsewhere",
    errno.EFBIG: "the file is too large for this file system; write the outputs to another disk",
    errno.ENAMETOOLONG: "use a shorter output path",
}


class UserError(Exception):
    """An error caused by input or environment that the user can fix; the message says how."""


def fail(message: str) -> NoReturn:
    """Raise a :class:`UserError` (handy in expressions and helpers)."""
    raise UserError(message)


def errno_of(error: OSError) -> int | None:
    """The errno of an OS error; for libraries that put it only in the text (h5py: ``errno = 13``), from there."""
    if error.errno is not None:
        return error.errno
    found = re.search(r"errno\s*=\s*(\d+)", str(error))
    return int(found.group(1)) if found else None


def os_error_reason(error: OSError) -> str:
    """A short reason: 'permission denied', 'no space left on device', ..."""
    code = errno_of(error)
    if code is not None:
        return os.strerror(code).lower()
    return (error.strerror or str(error) or type(error).__name__).lower()


def _filename_of(error: OSError) -> str | None:
    if error.filename is not None:
        return str(error.filename)
    found = re.search(r"name\s*=\s*'([^']*)'", str(error))  # h5py: "unable to open file: name = '...'"
    return found.group(1) if found else None


def os_error_message(error: OSError) -> str | None:
    """``<path>: <reason>; <fix>`` for a write failure the user can fix; None for other OS errors."""
    code = errno_of(error)
    fix = WRITE_ERRNO_FIXES.get(code) if code is not None else None
    if fix is None:
        return None
    name = _filename_of(error)
    where = f"{name}: " if name else ""
    if error.filename2 is not None:
        where = f"{name} -> {error.filename2}: "
    return f"{where}{os_error_reason(error)}; {fix}"


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; user errors, write failures and Ctrl-C become one line on stderr, not a traceback."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except OSError as error:
        message = os_error_message(error)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
