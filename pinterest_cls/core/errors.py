"""User-facing errors: the command line (``pinterest_cls.core.cli``) prints them as one line and exits 2."""

from __future__ import annotations

#: Exit status of a verb stopped by bad input (a usage error, as in argparse).
EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input that the user can fix: the message names the file or key and what to do."""
