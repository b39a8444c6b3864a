"""Embedding store: ``embeddings.npy`` (N x D, memory-mapped), ``index.parquet`` and ``meta.json``.

Row i of ``embeddings.npy`` is the i-th ``ok`` row of the manifest. Writers (one per shard) fill disjoint,
batch-aligned row ranges and commit their progress atomically: the rows are flushed to disk (msync) first,
then a small progress record is atomically replaced. After a kill at any moment a re-run continues from the
last commit; because batches are aligned to multiples of the batch size from row 0, every row is computed in
the same batch as in an uninterrupted single-process run, so the result is bitwise identical.

``meta.json`` is read in one place, ``read_meta``, into a ``StoreMeta``: typed fields with their
defaults, and a ``format_version``. A store written before format versions were recorded (format 0) is migrated
on reading: the keys added since get the values those stores were made with. A store of a newer format than
this code knows is refused, with the command that re-extracts it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.cli import command
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json, locked, slurm_states

EMBEDDINGS = "embeddings.npy"
INDEX = "index.parquet"
META = "meta.json"
PROGRESS = "progress"
INDEX_COLUMNS = ["row", "user", "board", "pin", "category", "path", "embedded", "reason"]
#: The format of ``meta.json`` this code writes; 0 is a store from before formats were recorded.
FORMAT_VERSION = 1


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
    """A store being written: its memory-mapped array (read-write), progress records and metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
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
                stored = read_meta(folder).fingerprint
                if stored == _filled(fingerprint):
                    return cls(folder)
                if not overwrite:
                    raise UserError(
                        f"{folder} holds embeddings made with another config or manifest "
                        f"({describe_mismatch(stored, _filled(fingerprint))}); "
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
            atomic_write_json(meta_path, {"format_version": FORMAT_VERSION, **meta, "fingerprint": fingerprint,
                                          "rows": len(index), "dim": dim, "dtype": dtype, "rows_done": 0,
                                          "rows_failed": 0, "complete": False,
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
        return merge_records(self.records(), self.meta.rows)

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
            meta = read_meta(self.folder).to_dict()
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
            self.meta = StoreMeta.from_dict(meta)
        return meta




# --- meta.json, typed -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractRecord:
    """How a store's rows were computed (``meta.json``'s ``extract``): what ``predict``, ``search`` and the served
    model reproduce to embed new images like the store's pins. The defaults are the values of stores written
    before each key was recorded."""

    seed: int = 0
    draft: bool = True
    amp: str | None = None  # bf16 | fp16 | fp32; None: not recorded (a store from before precisions were)
    batch_size: int | None = None
    max_pixels: int | None = None
    decode: str = "cpu"
    micro_batch: int | None = None
    runtime: str = "torch"
    request_rows: int | None = None


@dataclass(frozen=True)
class StoreMeta:
    """A store's ``meta.json``: the fields code reads, typed, and the whole record (``to_dict``)."""

    backbone: str
    rows: int
    dim: int
    dtype: str
    fingerprint: dict
    extract: ExtractRecord
    backbone_config: dict = field(default_factory=dict)
    timm_id: str | None = None
    weights: str | None = None
    weights_sha256: str | None = None
    data_root: str | None = None
    rows_done: int = 0
    rows_failed: int = 0
    complete: bool = False
    created: str | None = None
    format_version: int = FORMAT_VERSION
    record: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def batch_size(self) -> int:
        """The batch size the rows were computed with: the shard boundaries depend on it."""
        return int(self.extract.batch_size or self.fingerprint["batch_size"])

    @property
    def rows_sha256(self) -> str:
        """The identity of the embedded rows."""
        return str(self.fingerprint.get("rows_sha256", ""))

    def to_dict(self) -> dict:
        """``meta.json`` as written, migrated to this format."""
        return dict(self.record)

    @classmethod
    def from_dict(cls, raw: dict, source: str = META) -> StoreMeta:
        """``raw`` (a ``meta.json``) migrated to ``FORMAT_VERSION`` and typed; ``source`` names it in errors."""
        version = int(raw.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise UserError(f"{source} is of store format {version}, newer than this pinterest_cls reads "
                            f"({FORMAT_VERSION}); upgrade pinterest_cls, or re-extract with extract.overwrite=true")
        migrated = {**raw, "format_version": FORMAT_VERSION,
                    "fingerprint": {**FINGERPRINT_DEFAULTS, **raw.get("fingerprint", {})}}
        known = {f.name for f in dataclasses.fields(ExtractRecord)}
        extract = ExtractRecord(**{k: v for k, v in (raw.get("extract") or {}).items() if k in known})
        migrated["extract"] = {**dataclasses.asdict(extract), **(raw.get("extract") or {})}
        try:
            return cls(backbone=str(raw["backbone"]), rows=int(raw["rows"]), dim=int(raw["dim"]),
                       dtype=str(raw["dtype"]), fingerprint=migrated["fingerprint"], extract=extract,
                       backbone_config=dict(raw.get("backbone_config") or {}), timm_id=raw.get("timm_id"),
                       weights=raw.get("weights"), weights_sha256=raw.get("weights_sha256"),
                       data_root=raw.get("data_root"), rows_done=int(raw.get("rows_done", 0)),
                       rows_failed=int(raw.get("rows_failed", 0)), complete=bool(raw.get("complete", False)),
                       created=raw.get("created"), record=migrated)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source} is not a store's meta.json (missing or bad {exc}); re-extract the store "
                            "with extract.overwrite=true") from None


def read_meta(folder: Path) -> StoreMeta:
    """The store's ``meta.json``, typed (the one reader of it)."""
    path = Path(folder) / META
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no embeddings in {folder} (no {META})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); re-extract "
                        "the store with extract.overwrite=true") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a store's meta.json; re-extract the store with extract.overwrite=true")
    return StoreMeta.from_dict(raw, str(path))


# --- reading a store back ---------------------------------------------------------------------------------------


@dataclass
class Store:
    """A finished embedding store, read back: the vectors (memory-mapped, read-only), the pins they belong to
    (``index.parquet``: row, user, board, pin, category, path, embedded, reason) and its metadata.

    >>> store = open_store("work/demo/embeddings/efficientnet_lite0")
    >>> store.vectors.shape, store.pins["category"].nunique(), store.meta.backbone
    """

    folder: Path
    vectors: np.ndarray
    pins: pd.DataFrame
    meta: StoreMeta

    def embedded(self) -> pd.DataFrame:
        """The pins whose row holds a vector (failed rows hold zeros)."""
        return self.pins[self.pins["embedded"]].reset_index(drop=True)

    def vectors_of(self, pins: pd.DataFrame) -> np.ndarray:
        """float32 vectors of ``pins`` (rows of ``pins``); only those rows are read from disk."""
        return np.asarray(self.vectors[pins["row"].to_numpy()], dtype=np.float32)

    def find_pin(self, pin: str, key: str = "pin") -> int:
        """The row of an embedded pin given as ``user/board/pin``, ``board/pin`` or a bare pin id (ids may
        contain "/" themselves); ``key`` names the setting in errors."""
        index = self.pins
        p = index["pin"].astype(str)
        board_pin = index["board"].astype(str) + "/" + p
        full = index["user"].astype(str) + "/" + board_pin
        hits = index[index["embedded"] & ((p == pin) | (board_pin == pin) | (full == pin))]
        if hits.empty:
            raise UserError(f"{key}={pin} is not an embedded pin of {self.folder}; give user/board/pin "
                            "(see index.parquet)")
        if len(hits) > 1:
            first = hits.iloc[0]
            raise UserError(f"{key}={pin} matches {len(hits)} pins; give user/board/pin, e.g. "
                            f"{key}={first['user']}/{first['board']}/{first['pin']}")
        return int(hits["row"].iloc[0])


def open_store(folder: str | Path) -> Store:
    """Read the store in ``folder`` back (any state; ``StoreMeta.complete`` says whether it is finished)."""
    folder = Path(folder)
    meta = read_meta(folder)
    return Store(folder, np.load(folder / EMBEDDINGS, mmap_mode="r"), pd.read_parquet(folder / INDEX), meta)


def backbone_args(backbone: dict) -> list[str]:
    """The ``backbone=...`` arguments that select ``backbone`` (a backbone config) on the command line."""
    name = str(backbone.get("name"))
    if (Path(config.CONF_DIR) / "backbone" / f"{name}.yaml").is_file():
        return [f"backbone={name}"]
    if backbone.get("kind") == "timm":
        return ["backbone=timm", f"backbone.model={backbone.get('model')}"]
    return [f"backbone={backbone.get('kind', name)}"]


def extract_command(backbone: dict, data_root: str | None, *extra: str) -> str:
    """The extract command line that (re)makes the store of ``backbone`` from ``data_root``, with ``extra``
    arguments."""
    return command("extract", [*backbone_args(backbone), *([f"data.root={data_root}"] if data_root else []),
                               *extra])


def store_for(cfg: DictConfig) -> Store:
    """The finished store of this config's backbone, or a one-line error with the command that makes it."""
    folder = config.embeddings_dir(cfg)
    bcfg = {"name": str(cfg.backbone.name), "kind": cfg.backbone.get("kind"), "model": cfg.backbone.get("model")}
    data_root = config.select(cfg, "data.root")
    how = extract_command(bcfg, data_root, *([f"data.layout={cfg.data.layout}"] if data_root else []),
                          f"paths.work={config.work_dir(cfg)}")
    if not (folder / META).is_file():
        raise UserError(f"no embeddings for backbone {cfg.backbone.name} in {folder}; run first: {how}")
    store = open_store(folder)
    if not store.meta.complete:
        raise UserError(f"embeddings in {folder} are incomplete ({store.meta.rows_done}/{store.meta.rows} rows "
                        f"done); finish them (extract resumes): {how}")
    return store


# --- progress of the shards ---------------------------------------------------------------------------------------


def rerun_command(meta: StoreMeta, index: int, count: int) -> str:
    """The extract command line that runs shard ``index`` of ``count`` of this store alone, with the store's own
    settings whatever the defaults are now (the shard boundaries depend on the batch size)."""
    args = [f"extract.batch_size={meta.batch_size}"]
    if meta.extract.micro_batch is not None:
        args.append(f"extract.micro_batch={meta.extract.micro_batch}")
    if meta.extract.decode != "cpu":
        args.append(f"extract.decode={meta.extract.decode}")
    bcfg = {**meta.backbone_config, "name": meta.backbone}
    return extract_command(bcfg, meta.data_root, *args, f"extract.shard.count={count}",
                           f"extract.shard.index={index}")


def store_status(folder: Path) -> dict:
    """{backbone, state, rows, rows_done, rows_failed, shards: [{index, count, lo, hi, done, state, ...}]}."""
    if not (folder / META).is_file():
        return {"backbone": folder.name, "folder": str(folder), "state": "not started", "rows": None,
                "rows_done": 0, "rows_failed": 0, "shards": []}
    meta = read_meta(folder)
    records = read_records(folder)
    done, failures = merge_records(records, meta.rows)
    by_range = {(r["lo"], r["hi"]): r for r in records}
    counts = sorted({r["shard"][1] for r in records if "shard" in r}) or ([1] if not records else [])
    shards, seen = [], set()
    for count in counts:
        for index in range(count):
            lo, hi = shard_range(meta.rows, meta.batch_size, index, count)
            seen.add((lo, hi))
            shards.append(_shard_entry(meta, index, count, lo, hi, by_range.get((lo, hi))))
    for (lo, hi), rec in sorted(by_range.items()):  # records from a sharding that no longer matches
        if (lo, hi) not in seen:
            shards.append(_shard_entry(meta, None, None, lo, hi, rec))
    _add_slurm_states(shards)
    n_done = int(done.sum())
    state = "complete" if n_done == meta.rows else ("partial" if n_done else "not started")
    return {"backbone": meta.backbone, "folder": str(folder), "state": state, "rows": meta.rows,
            "rows_done": n_done, "rows_failed": len(failures), "shards": shards}


def _shard_entry(meta, index, count, lo, hi, rec) -> dict:
    done = (rec["done"] - lo) if rec else 0
    state = "done" if done >= hi - lo else ("partial" if done else "not started")
    entry = {"index": index, "count": count, "lo": lo, "hi": hi, "done": done, "state": state,
             "elapsed_s": rec["elapsed_s"] if rec else 0.0, "slurm_job": (rec or {}).get("slurm_job")}
    if state != "done" and index is not None:
        entry["rerun"] = rerun_command(meta, index, count)
    return entry


def _add_slurm_states(shards: list[dict]) -> None:
    """An unfinished shard that last committed from a SLURM job gets that job's state while SLURM's queue holds
    it (``slurm_state``: RUNNING, PENDING, ...)."""
    jobs = [sh["slurm_job"] for sh in shards if sh["slurm_job"] and sh["state"] != "done"]
    states = slurm_states(jobs)
    for sh in shards:
        if sh["slurm_job"] in states and sh["state"] != "done":
            sh["slurm_state"] = states[sh["slurm_job"]]
