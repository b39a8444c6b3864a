"""Embedding store: ``embeddings.npy`` (N x D, memory-mapped), ``index.parquet`` and ``meta.json``.

Row i of ``embeddings.npy`` is the i-th ``ok`` row of the manifest. Writers (one per shard) fill disjoint,
batch-aligned row ranges and commit their progress atomically: the rows are flushed to disk (msync) first,
then a small progress record is atomically replaced. After a kill at any moment a re-run continues from the
last commit; because batches are aligned to multiples of the batch size from row 0, every row is computed in
the same batch as in an uninterrupted single-process run, so the result is bitwise identical.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from . import config
from .errors import UserError
from .fileio import atomic_write_json, locked

EMBEDDINGS = "embeddings.npy"
INDEX = "index.parquet"
META = "meta.json"
PROGRESS = "progress"
INDEX_COLUMNS = ["row", "user", "board", "pin", "category", "path", "embedded", "reason"]


def rows_sha256(ok_rows: pd.DataFrame) -> str:
    """Identity of the rows to embed: their paths, sizes and mtimes, in order."""
    h = hashlib.sha256()
    for path, size, mtime in zip(ok_rows["path"], ok_rows["bytes"], ok_rows["mtime_ns"]):
        h.update(f"{path}\t{size}\t{mtime}\n".encode())
    return h.hexdigest()


def shard_range(n_rows: int, batch_size: int, index: int, count: int) -> tuple[int, int]:
    """Contiguous, batch-aligned row range [lo, hi) of shard ``index`` out of ``count``."""
    if count < 1 or not 0 <= index < count:
        raise UserError(f"extract.shard.index={index} must be in [0, extract.shard.count={count})")
    n_batches = -(-n_rows // batch_size)
    lo_b, hi_b = index * n_batches // count, (index + 1) * n_batches // count
    return min(lo_b * batch_size, n_rows), min(hi_b * batch_size, n_rows)


#: Fingerprint keys added after the first stores were written, with the value those stores were made with: a
#: store whose fingerprint lacks such a key matches a run with that value (so it can still be resumed).
FINGERPRINT_DEFAULTS = {"decode": "cpu", "micro_batch": None, "runtime": "torch", "request_rows": None}


def _filled(fingerprint: dict) -> dict:
    return {**FINGERPRINT_DEFAULTS, **fingerprint}


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def describe_mismatch(stored: dict, wanted: dict) -> str:
    diffs = [f"{k}: stored {stored.get(k)!r}, now {wanted.get(k)!r}"
             for k in sorted(set(stored) | set(wanted)) if stored.get(k) != wanted.get(k)]
    return "; ".join(diffs[:6]) + (" ..." if len(diffs) > 6 else "")


def read_records(folder: Path) -> list[dict]:
    """The progress records of the store at ``folder`` (one per shard that has committed)."""
    return [json.loads(p.read_text()) for p in sorted((Path(folder) / PROGRESS).glob("rows_*.json"))]


def merge_records(records: list[dict], n_rows: int) -> tuple[np.ndarray, dict[int, str]]:
    """(rows done: bool array, failures {row: reason}) merged over ``records``."""
    done = np.zeros(n_rows, dtype=bool)
    failures: dict[int, str] = {}
    for rec in records:
        done[rec["lo"]:rec["done"]] = True
        failures.update({int(k): v for k, v in rec["failures"].items() if int(k) < rec["done"]})
    return done, failures


class EmbeddingStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = json.loads((self.folder / META).read_text())
        self.array = np.load(self.folder / EMBEDDINGS, mmap_mode="r+")

    # --- creation -------------------------------------------------------------------------------------

    @classmethod
    def open_or_create(cls, folder: Path, index: pd.DataFrame, dim: int, dtype: str, meta: dict,
                       fingerprint: dict, overwrite: bool = False) -> EmbeddingStore:
        """Open the store at ``folder`` if its fingerprint matches, else create it (``overwrite`` replaces a
        store made with another config or manifest; without it such a store is refused)."""
        folder = Path(folder)
        with locked(folder):
            meta_path = folder / META
            if meta_path.is_file():
                stored = json.loads(meta_path.read_text())
                if "fingerprint" in stored and _filled(stored["fingerprint"]) == _filled(fingerprint):
                    return cls(folder)
                if not overwrite:
                    raise UserError(
                        f"{folder} holds embeddings made with another config or manifest "
                        f"({describe_mismatch(_filled(stored.get('fingerprint', {})), _filled(fingerprint))}); "
                        "re-run with the original settings to resume, or add extract.overwrite=true to replace them"
                    )
            for name in (META, INDEX, EMBEDDINGS):  # meta first: a half-replaced store is never taken as valid
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            shutil.rmtree(folder / PROGRESS, ignore_errors=True)
            arr = np.lib.format.open_memmap(folder / EMBEDDINGS, mode="w+", dtype=np.dtype(dtype),
                                            shape=(len(index), dim))
            arr.flush()
            del arr
            idx = index.copy()
            idx["embedded"] = False
            idx["reason"] = "not embedded yet"
            idx[INDEX_COLUMNS].to_parquet(folder / INDEX, index=False)
            (folder / PROGRESS).mkdir()
            atomic_write_json(meta_path, {**meta, "fingerprint": fingerprint, "rows": len(index), "dim": dim,
                                          "dtype": dtype, "rows_done": 0, "rows_failed": 0, "complete": False,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            _fsync_dir(folder)
        return cls(folder)

    # --- progress -------------------------------------------------------------------------------------

    def _record_path(self, lo: int, hi: int) -> Path:
        return self.folder / PROGRESS / f"rows_{lo:010d}_{hi:010d}.json"

    def progress(self, lo: int, hi: int) -> dict:
        try:
            return json.loads(self._record_path(lo, hi).read_text())
        except FileNotFoundError:
            return {"lo": lo, "hi": hi, "done": lo, "failures": {}, "elapsed_s": 0.0, "batches": 0}

    def commit(self, record: dict) -> None:
        """Make rows [lo, record['done']) durable, then record that they are."""
        self.array.flush()  # msync: the rows are on disk before the record says so
        path = self._record_path(record["lo"], record["hi"])
        atomic_write_json(path, record)
        _fsync_dir(path.parent)

    # --- completion -----------------------------------------------------------------------------------

    def records(self) -> list[dict]:
        return read_records(self.folder)

    def coverage(self) -> tuple[np.ndarray, dict[int, str]]:
        """(rows done: bool array, failures {row: reason}) merged over every progress record."""
        return merge_records(self.records(), self.meta["rows"])

    def finalize(self, extra_meta: dict | None = None) -> dict:
        """Rewrite ``index.parquet`` (embedded flags, failure reasons) and ``meta.json`` from the progress
        records. Any shard may call it; the store is complete once every row is done."""
        with locked(self.folder):
            done, failures = self.coverage()
            index = pd.read_parquet(self.folder / INDEX)
            embedded = done.copy()
            reason = np.where(done, "", "not embedded yet").astype(object)
            for row, why in failures.items():
                embedded[row] = False
                reason[row] = why
            index["embedded"], index["reason"] = embedded, reason
            tmp = self.folder / f".{INDEX}.tmp{os.getpid()}"
            index.to_parquet(tmp, index=False)
            os.replace(tmp, self.folder / INDEX)
            meta = json.loads((self.folder / META).read_text())
            records = self.records()
            meta.update(extra_meta or {})
            meta.update({
                "rows_done": int(done.sum()),
                "rows_failed": len(failures),
                "complete": bool(done.all()),
                "shards": [{k: r[k] for k in ("lo", "hi", "done", "elapsed_s", "batches")} for r in records],
                "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            })
            atomic_write_json(self.folder / META, meta)
            self.meta = meta
        return meta


def open_embeddings(folder: Path) -> tuple[np.ndarray, pd.DataFrame, dict]:
    """Read a store back: (embeddings memory-mapped read-only, index, meta)."""
    folder = Path(folder)
    if not (folder / META).is_file():
        raise UserError(f"no embeddings in {folder}")
    meta = json.loads((folder / META).read_text())
    return np.load(folder / EMBEDDINGS, mmap_mode="r"), pd.read_parquet(folder / INDEX), meta


def extract_command(cfg: DictConfig) -> str:
    b = cfg.backbone
    parts = ["python -m pinterest_cls.extract"]
    parts.append(f"backbone=timm backbone.model={b.model}" if b.get("kind") == "timm" else f"backbone={b.name}")
    if cfg.data.root:
        parts.append(f"data.root={cfg.data.root} data.layout={cfg.data.layout}")
    parts.append(f"paths.work={config.work_dir(cfg)}")
    return " ".join(parts)


def open_store(cfg: DictConfig):
    """(embeddings memory-mapped, index, meta, folder) for this config's backbone, with clear errors."""
    folder = config.embeddings_dir(cfg)
    if not (folder / META).is_file():
        raise UserError(f"no embeddings for backbone {cfg.backbone.name} in {folder}; "
                        f"run first: {extract_command(cfg)}")
    emb, index, meta = open_embeddings(folder)
    if not meta.get("complete"):
        raise UserError(f"embeddings in {folder} are incomplete ({meta.get('rows_done')}/{meta.get('rows')} rows "
                        f"done); finish them (extract resumes): {extract_command(cfg)}")
    return emb, index, meta, folder


def load_xy(emb: np.ndarray, rows: pd.DataFrame) -> np.ndarray:
    """Only the sampled rows are read from the memory-mapped array."""
    return np.asarray(emb[rows["row"].to_numpy()], dtype=np.float32)
