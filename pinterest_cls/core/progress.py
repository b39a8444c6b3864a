"""Progress bars: one factory, so that every long step of every verb shows the same kind of bar (tqdm, with a
rate) and none is drawn where the caller asked for quiet.

On a terminal a bar redraws in place. Written to a file (a SLURM job's log, a redirected stderr) it is kept
(``leave``) and redrawn at most every ``FILE_INTERVAL_S`` seconds, so the file shows where each step got to and how
fast, rather than a bar cleared at 0 % or a line per refresh.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable

#: Seconds between redraws of a bar written to a file.
FILE_INTERVAL_S = 30.0


def progress_bar(total: int | None = None, desc: str = "", unit: str = "it", enabled: bool = True,
                 leave: bool = False, iterable: Iterable | None = None, smoothing: float = 0.3):
    """A tqdm bar over ``total`` items of ``unit`` (or over ``iterable``), silent unless ``enabled``; ``leave``: keep
    it on a terminal once done (it is always kept in a file)."""
    from tqdm.auto import tqdm

    to_file = not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty())
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not enabled, leave=leave or to_file,
                dynamic_ncols=True, smoothing=smoothing, mininterval=FILE_INTERVAL_S if to_file else 0.1)


def bar_factory(enabled: bool) -> Callable[[int, str, str], object]:
    """``factory(total, desc, unit)`` -> a ``progress_bar``, for library code that draws several bars."""
    return lambda total, desc, unit: progress_bar(total, desc, unit, enabled)
