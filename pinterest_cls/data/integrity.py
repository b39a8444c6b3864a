"""Whether a store's files hold what its ``meta.json`` and progress records say: the cheap checks made whenever a
store is opened (readable metadata, the array's header against the recorded shape and dtype, the file's size
against that header), the checksums of the committed row ranges (verified on request, after a copy between
machines), and the repair ``extract`` makes (the rows no longer on disk are rolled back, to be embedded again).

A commit records the sha256 of the rows it made durable (``checksums``: ``[start, end, sha256]`` per commit), so a
range is verified without trusting the file's neighbours. Rolling back keeps batch alignment: a range restarts at a
multiple of the batch size, so the rows embedded again come out bitwise as before.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json
from pinterest_cls.data.metadata import META, StoreMeta, read_meta

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.npy"
INDEX = "index.parquet"
PROGRESS = "progress"


def rows_checksum(array: np.ndarray, start: int, end: int) -> str:
    """The sha256 of rows ``[start, end)`` of ``array`` as stored (their bytes)."""
    return hashlib.sha256(np.ascontiguousarray(array[start:end]).tobytes()).hexdigest()


def array_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, data offset) from an ``.npy`` file's header, without reading its data."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = read(f)
        return tuple(shape), np.dtype(dtype), f.tell()


@dataclass
class Damage:
    """What is wrong with a store's files: ``problem`` (one line; "" when nothing is), and ``rows_on_disk``, the
    rows from 0 that the array still holds in full (all of them when it is whole)."""

    problem: str = ""
    rows_on_disk: int = 0
    bad_ranges: list[tuple[int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.problem)


def check_array(folder: Path, meta: StoreMeta) -> Damage:
    """The array against ``meta``: present, of the recorded shape and dtype, and as long as its header says."""
    path = Path(folder) / EMBEDDINGS
    if not path.is_file():
        return Damage(f"{path} is missing", 0)
    try:
        shape, dtype, offset = array_header(path)
    except (OSError, ValueError) as exc:
        return Damage(f"{path} has no readable array header ({type(exc).__name__})", 0)
    if shape != (meta.rows, meta.dim) or dtype != np.dtype(meta.dtype):
        return Damage(f"{path} holds {shape} {dtype}, {META} says ({meta.rows}, {meta.dim}) {meta.dtype}", 0)
    row_bytes = meta.dim * dtype.itemsize
    size = path.stat().st_size
    if size < offset + meta.rows * row_bytes:
        on_disk = max(0, (size - offset) // row_bytes) if row_bytes else 0
        return Damage(f"{path} is cut short: {size} of {offset + meta.rows * row_bytes} bytes (rows from {on_disk} "
                      "on are gone)", int(on_disk))
    return Damage("", meta.rows)


def check_store(folder: Path) -> Damage:
    """The cheap checks of a store, made whenever it is opened: ``meta.json`` readable, the array whole, the
    index readable and of the recorded length, the progress records readable."""
    folder = Path(folder)
    try:
        meta = read_meta(folder)
    except UserError as exc:
        return Damage(str(exc).split("; ")[0], 0)
    damage = check_array(folder, meta)
    if damage:
        return damage
    try:
        import pyarrow.parquet as pq

        rows = pq.ParquetFile(folder / INDEX).metadata.num_rows
    except Exception as exc:  # pyarrow raises several kinds for a damaged file
        return Damage(f"{folder / INDEX} cannot be read ({type(exc).__name__})", meta.rows)
    if rows != meta.rows:
        return Damage(f"{folder / INDEX} has {rows} rows, {META} says {meta.rows}", meta.rows)
    for record in sorted((folder / PROGRESS).glob("rows_*.json")):
        try:
            json.loads(record.read_text())
        except (OSError, ValueError) as exc:
            return Damage(f"{record} cannot be read ({type(exc).__name__})", meta.rows)
    return Damage("", meta.rows)


def verify_checksums(folder: Path, records: list[dict]) -> tuple[list[tuple[int, int]], int]:
    """(the committed row ranges whose bytes no longer match their checksum, rows committed without one)."""
    array = np.load(Path(folder) / EMBEDDINGS, mmap_mode="r")
    bad, unchecked = [], 0
    for rec in records:
        covered = 0
        for start, end, digest in rec.get("checksums", []):
            if end <= rec["done"]:
                covered += end - start
                if rows_checksum(array, start, end) != digest:
                    bad.append((start, end))
        unchecked += max(0, rec["done"] - rec["lo"] - covered)
    return sorted(bad), unchecked


def roll_back(folder: Path, limit: int, batch_size: int, only: int | None = None) -> list[tuple[int, int, int]]:
    """Make every progress record (or the one starting at row ``only``) say no more than rows below ``limit`` are
    done, restarting at a multiple of the batch size for bitwise equal re-embedding; returns (lo, old done, new
    done) of each record rolled back."""
    changed = []
    start = limit // batch_size * batch_size
    for path in sorted((Path(folder) / PROGRESS).glob("rows_*.json")):
        rec = json.loads(path.read_text())
        if rec["done"] <= start or rec["done"] <= rec["lo"] or (only is not None and rec["lo"] != only):
            continue
        new = max(rec["lo"], start)
        changed.append((rec["lo"], rec["done"], new))
        rec["done"] = new
        rec["failures"] = {k: v for k, v in rec["failures"].items() if int(k) < new}
        rec["checksums"] = [c for c in rec.get("checksums", []) if c[1] <= new]
        atomic_write_json(path, rec)
    return changed


def repair_array(folder: Path, meta: StoreMeta) -> str:
    """Mend the array of a store whose metadata is sound, so that ``extract`` embeds again what is gone: a file cut
    short is extended to its full size (its surviving rows kept), a missing or misshapen one is made anew, and the
    progress records are rolled back to the rows still on disk. Returns what was done ("" when nothing was)."""
    damage = check_array(folder, meta)
    if not damage:
        return ""
    path = Path(folder) / EMBEDDINGS
    if damage.rows_on_disk and "cut short" in damage.problem:
        _, dtype, offset = array_header(path)
        os.truncate(path, offset + meta.rows * meta.dim * dtype.itemsize)
    else:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.dtype(meta.dtype), shape=(meta.rows, meta.dim)).flush()
    changed = roll_back(folder, damage.rows_on_disk, meta.batch_size)
    what = "; ".join(f"rows [{new}, {old}) to embed again" for _, old, new in changed) or "no committed row lost"
    log.warning(f"repairing {folder}: {damage.problem}; {what}")
    return what
