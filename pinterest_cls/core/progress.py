"""Progress bars: one factory, so that every long step of every verb shows the same kind of bar (tqdm, with a
rate) and none is drawn where the caller asked for quiet."""

from __future__ import annotations

from collections.abc import Callable


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, leave: bool = False):
    """A tqdm bar over ``total`` items of ``unit`` (disabled, and silent, unless ``enabled``)."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave, dynamic_ncols=True)


def bar_factory(enabled: bool) -> Callable[[int, str, str], object]:
    """``factory(total, desc, unit)`` -> a ``progress_bar``, for library code that draws several bars."""
    return lambda total, desc, unit: progress_bar(total, desc, unit, enabled)
