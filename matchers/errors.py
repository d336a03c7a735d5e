"""User-facing errors and the CLI wrapper that turns them into one line and exit code 2.

Anything the user can fix (a missing file, bad input, weights that cannot be downloaded) raises
:class:`UserError` with a message that names the file and the fix. CLIs run their ``main`` through
:func:`run_cli`, which prints ``error: <message>`` and exits with status 2 instead of a traceback.
"""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

EXIT_USER_ERROR = 2


class UserError(Exception):
    """An error caused by input or environment that the user can fix; the message says how."""


def fail(message: str) -> NoReturn:
    """Raise a :class:`UserError` (handy in expressions and helpers)."""
    raise UserError(message)


def run_cli(main: Callable[[], object]) -> None:
    """Run a CLI entry point; user errors and Ctrl-C become one line on stderr, not a traceback."""
    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted: finished work is saved; run the same command again to resume", file=sys.stderr)
        sys.exit(130)
