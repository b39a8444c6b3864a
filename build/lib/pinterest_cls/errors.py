"""User-facing errors and the wrapper that turns them into a one-line message and a non-zero exit."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable)

#: Exit status of a verb stopped by bad input (a usage error, as in argparse).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input that the user can fix: the message names the file or key and what to do."""


def user_errors_exit(fn: F) -> F:
    """Decorate a Hydra task function: a :class:`UserError` prints ``error: <message>`` and exits 2.

    Hydra catches ``Exception`` and prints a stack trace; ``SystemExit`` passes through it, so the user
    sees one line and the shell sees a non-zero status.
    """

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            sys.exit(EXIT_USER_ERROR)

    return wrapper  # type: ignore[return-value]
