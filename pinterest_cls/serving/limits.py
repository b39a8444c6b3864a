"""What the served model accepts from a client, set on the server: how many rows, how many bytes, how many pixels,
and which folder (if any) it may read files from. Everything a client sends is hostile until checked.

The settings are environment variables of the ``mlflow models serve`` process, read when the model loads:

- ``PINTEREST_CLS_SERVE_MAX_ROWS``: images per request (default 64);
- ``PINTEREST_CLS_SERVE_MAX_IMAGE_BYTES``: bytes per image, decoded (default 16 MiB);
- ``PINTEREST_CLS_SERVE_MAX_BODY_BYTES``: bytes per request body (default 32 MiB);
- ``PINTEREST_CLS_SERVE_MAX_PIXELS``: pixels per image, judged from its header before it is decoded (default: the
  store's ``scan.max_pixels``);
- ``PINTEREST_CLS_SERVE_ROOT``: a folder; ``path`` input is read only inside it (no ``..``, no symlink that leads
  out of it). Unset (the default), the server reads no file a client names: it takes image bytes only.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from pinterest_cls.core.errors import UserError

MAX_ROWS, MAX_IMAGE_BYTES, MAX_BODY_BYTES = "PINTEREST_CLS_SERVE_MAX_ROWS", "PINTEREST_CLS_SERVE_MAX_IMAGE_BYTES", \
    "PINTEREST_CLS_SERVE_MAX_BODY_BYTES"
MAX_PIXELS, ROOT = "PINTEREST_CLS_SERVE_MAX_PIXELS", "PINTEREST_CLS_SERVE_ROOT"
DEFAULTS = {MAX_ROWS: 64, MAX_IMAGE_BYTES: 16 << 20, MAX_BODY_BYTES: 32 << 20}


@dataclass(frozen=True)
class ServeLimits:
    """The limits of one server; ``root`` None: no ``path`` input."""

    max_rows: int = DEFAULTS[MAX_ROWS]
    max_image_bytes: int = DEFAULTS[MAX_IMAGE_BYTES]
    max_body_bytes: int = DEFAULTS[MAX_BODY_BYTES]
    max_pixels: int | None = None
    root: Path | None = None

    @classmethod
    def from_environment(cls, max_pixels: int | None = None) -> ServeLimits:
        """The limits the environment sets (``max_pixels``: the default pixel limit, the store's)."""
        def number(name: str, default: int | None) -> int | None:
            value = os.environ.get(name, "").strip()
            if not value:
                return default
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{name}={value!r} must be a whole number >= 1")
            return int(value)

        root = os.environ.get(ROOT, "").strip()
        if root and not Path(root).is_dir():
            raise UserError(f"{ROOT}={root} is not a folder; give the folder whose files the server may read")
        return cls(number(MAX_ROWS, DEFAULTS[MAX_ROWS]), number(MAX_IMAGE_BYTES, DEFAULTS[MAX_IMAGE_BYTES]),
                   number(MAX_BODY_BYTES, DEFAULTS[MAX_BODY_BYTES]), number(MAX_PIXELS, max_pixels),
                   Path(root).resolve() if root else None)

    def allowed_file(self, given: str) -> tuple[Path | None, str]:
        """(the file a ``path`` row names, "") when the server may read it, else (None, the reason, which names no
        server path)."""
        if self.root is None:
            return None, f"path input is off on this server (it takes image bytes in the column image; {ROOT} " \
                         "allows path input inside a folder)"
        if not given or "\x00" in given:
            return None, "no path given"
        path = Path(given)
        if ".." in path.parts:
            return None, "path leads outside the served folder ('..')"
        candidate = path if path.is_absolute() else self.root / path
        try:  # where it leads first (symlinks followed), so that nothing is said of files outside the folder
            resolved = candidate.resolve()
        except (OSError, RuntimeError):
            return None, "path cannot be resolved"
        if not resolved.is_relative_to(self.root):
            return None, "path leads outside the served folder"
        if not resolved.is_file():
            return None, "file not found"
        return resolved, ""
