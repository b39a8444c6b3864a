"""Embedding store: ``embeddings.npy`` (N x D, memory-mapped), ``index.parquet`` and ``meta.json``.

Row i of ``embeddings.npy`` is the i-th ``ok`` row of the manifest. Writers (one per shard) fill disjoint,
batch-aligned row ranges and commit their progress atomically: the rows are flushed to disk (msync) first,
then a small progress record (with the rows' checksum) is atomically replaced. After a kill at any moment a re-run
continues from the last commit; because batches are aligned to multiples of the batch size from row 0, every row
is computed in the same batch as in an uninterrupted single-process run, so the result is bitwise identical. One
writer holds a shard at a time (a lock that dies with its process).

``meta.json`` is read in one place (``data.metadata.read_meta``); the files are checked whenever a store is opened
(``data.integrity``): a damaged store is refused in one line naming the file and the command that repairs it.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.cli import command
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json, locked, slurm_states
from pinterest_cls.data.integrity import (
    EMBEDDINGS,
    INDEX,
    PROGRESS,
    check_store,
    repair_array,
    roll_back,
    rows_checksum,
    verify_checksums,
)
from pinterest_cls.data.manifest import check_root, uncategorised_dir
from pinterest_cls.data.metadata import FORMAT_VERSION, META, REEXTRACT, StoreMeta, filled, read_meta

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["row", "user", "board", "pin", "category", "path", "embedded", "reason"]


def rows_sha256(ok_rows: pd.DataFrame) -> str:
    """Identity of the rows to embed, from their content: each pin's user, board and id and the sha256 of its
    file's bytes (the scan's ``digest``), in order. The same export copied elsewhere has the same identity."""
    if "digest" not in ok_rows.columns or ok_rows["digest"].isna().any():
        raise UserError("the manifest has no content digest for some ok pins (scanned before digests were "
                        "recorded); re-run python -m pinterest_cls.scan to record them")
    h = hashlib.sha256()
    for user, board, pin, digest in zip(ok_rows["user"], ok_rows["board"], ok_rows["pin"], ok_rows["digest"]):
        h.update(f"{user}\t{board}\t{pin}\t{digest}\n".encode())
    return h.hexdigest()


def legacy_rows_sha256(ok_rows: pd.DataFrame) -> str:
    """The rows' identity as stores of format 1 and older recorded it (paths, sizes and mtimes): what ``extract``
    recognises an older store by before migrating it."""
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


@dataclass(frozen=True)
class NewStore:
    """What a writer opens a store with: the pins to embed (``index``), the array's width and dtype, the meta to
    record, the fingerprint a resume must match, and the fingerprints older formats gave the same run
    (``legacy``: a store recorded with one of them is migrated to ``fingerprint``)."""

    index: pd.DataFrame
    dim: int
    dtype: str
    meta: dict
    fingerprint: dict
    legacy: tuple[dict, ...] = ()


class EmbeddingStore:
    """A store being written: its memory-mapped array (read-write), progress records and metadata."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.meta = read_meta(self.folder)
        self.array = np.load(self.folder / EMBEDDINGS, mmap_mode="r+")

    # --- creation -------------------------------------------------------------------------------------

    @classmethod
    def open_or_create(cls, folder: Path, new: NewStore, overwrite: bool = False) -> EmbeddingStore:
        """Open the store at ``folder`` if its fingerprint matches (migrating an older format, repairing an array
        cut short), else create it (``overwrite`` replaces a store made with another config or manifest, or one
        whose metadata is damaged; without it such a store is refused)."""
        folder = Path(folder)
        with locked(folder):
            if (folder / META).is_file():
                try:
                    stored = read_meta(folder)
                except UserError:
                    if not overwrite:
                        raise
                    stored = None
                if stored is not None and cls._resumable(folder, stored, new):
                    cls._repair(folder, new)
                    return cls(folder)
                if stored is not None and not overwrite:
                    raise UserError(
                        f"{folder} holds embeddings made with another config or manifest "
                        f"({describe_mismatch(stored.fingerprint, filled(new.fingerprint))}); "
                        "re-run with the original settings to resume, or add extract.overwrite=true to replace them")
            cls._create(folder, new)
        return cls(folder)

    @staticmethod
    def _resumable(folder: Path, stored: StoreMeta, new: NewStore) -> bool:
        """Whether the stored fingerprint is this run's (an older format's fingerprint of this run too: then the
        meta.json is migrated to this format)."""
        if stored.fingerprint == filled(new.fingerprint):
            return True
        if stored.format_version < FORMAT_VERSION and any(stored.fingerprint == filled(f) for f in new.legacy):
            atomic_write_json(folder / META, {**stored.to_dict(), "format_version": FORMAT_VERSION,
                                              "fingerprint": new.fingerprint})
            log.info(f"{folder}: migrated from store format {stored.format_version} to {FORMAT_VERSION}")
            return True
        return False

    @staticmethod
    def _repair(folder: Path, new: NewStore) -> None:
        """An array cut short or missing is mended (the lost rows rolled back, to be embedded again); an index
        that cannot be read is written anew (``finalize`` rewrites its flags from the progress records)."""
        repair_array(folder, read_meta(folder))
        damage = check_store(folder)
        if damage and INDEX in damage.problem:
            log.warning(f"repairing {folder}: {damage.problem}; writing it anew")
            EmbeddingStore._write_index(folder, new.index)

    @staticmethod
    def _write_index(folder: Path, index: pd.DataFrame) -> None:
        idx = index.copy()
        idx["embedded"] = False
        idx["reason"] = "not embedded yet"
        tmp = folder / f".{INDEX}.tmp{os.getpid()}"
        idx[INDEX_COLUMNS].to_parquet(tmp, index=False)
        os.replace(tmp, folder / INDEX)

    @classmethod
    def _create(cls, folder: Path, new: NewStore) -> None:
        for name in (META, INDEX, EMBEDDINGS):  # meta first: a half-replaced store is never taken as valid
            with contextlib.suppress(FileNotFoundError):
                (folder / name).unlink()
        shutil.rmtree(folder / PROGRESS, ignore_errors=True)
        arr = np.lib.format.open_memmap(folder / EMBEDDINGS, mode="w+", dtype=np.dtype(new.dtype),
                                        shape=(len(new.index), new.dim))
        arr.flush()
        del arr
        cls._write_index(folder, new.index)
        (folder / PROGRESS).mkdir()
        atomic_write_json(folder / META, {"format_version": FORMAT_VERSION, **new.meta, "fingerprint": new.fingerprint,
                                          "rows": len(new.index), "dim": new.dim, "dtype": new.dtype, "rows_done": 0,
                                          "rows_failed": 0, "complete": False,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        _fsync_dir(folder)

    # --- one writer per shard ---------------------------------------------------------------------------

    @contextlib.contextmanager
    def claim(self, lo: int, hi: int):
        """Hold rows [lo, hi) for this process while it embeds them: a second writer of the same rows stops with a
        one-line error naming the holder (host, pid, start). The lock dies with its process (kill -9 included),
        so a holder that died never blocks the shard."""
        path = self.folder / PROGRESS / f"rows_{lo:010d}_{hi:010d}.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise UserError(f"rows [{lo}, {hi}) of {self.folder} are being embedded by {holder}; wait for it to "
                                "finish (python -m pinterest_cls.status shows the shard), or stop it") from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
            f.flush()
            try:
                yield
            finally:
                f.seek(0)
                f.truncate()
                fcntl.flock(f, fcntl.LOCK_UN)

    def verify(self, lo: int, hi: int) -> str:
        """Check the checksums of the rows committed in [lo, hi); roll back to the first range that fails, to be
        embedded again. Returns what was found ("" when all match)."""
        record = self.progress(lo, hi)
        bad, _ = verify_checksums(self.folder, [record])
        if not bad:
            return ""
        roll_back(self.folder, bad[0][0], self.meta.batch_size, only=lo)
        found = f"rows {', '.join(f'[{a}, {b})' for a, b in bad)} no longer match their checksums"
        log.warning(f"repairing {self.folder}: {found}; embedding them again")
        return found

    # --- progress -------------------------------------------------------------------------------------

    def _record_path(self, lo: int, hi: int) -> Path:
        return self.folder / PROGRESS / f"rows_{lo:010d}_{hi:010d}.json"

    def progress(self, lo: int, hi: int) -> dict:
        try:
            return json.loads(self._record_path(lo, hi).read_text())
        except FileNotFoundError:
            return {"lo": lo, "hi": hi, "done": lo, "failures": {}, "elapsed_s": 0.0, "batches": 0, "checksums": []}

    def commit(self, record: dict, since: int) -> None:
        """Make rows [lo, record['done']) durable, then record that they are, with the checksum of the rows
        [since, done) this commit adds."""
        self.array.flush()  # msync: the rows are on disk before the record says so
        if record["done"] > since:
            record.setdefault("checksums", []).append([since, record["done"],
                                                       rows_checksum(self.array, since, record["done"])])
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


def open_store(folder: str | Path, repair: str | None = None) -> Store:
    """Read the store in ``folder`` back (any state; ``StoreMeta.complete`` says whether it is finished). A store
    whose files do not hold what its metadata says is refused with a one-line error naming the file and the
    command that repairs it (``repair``, or one made from the store's own settings)."""
    folder = Path(folder)
    damage = check_store(folder)
    if damage:
        raise UserError(f"{folder} is damaged: {damage.problem}; repair it: {repair or repair_hint(folder)}")
    meta = read_meta(folder)
    return Store(folder, np.load(folder / EMBEDDINGS, mmap_mode="r"), pd.read_parquet(folder / INDEX), meta)


def repair_hint(folder: Path, verify: bool = False) -> str:
    """How to repair the store in ``folder``: its extract command (which re-embeds the rows that are no longer on
    disk and keeps the rest), or re-extraction where its metadata cannot be read."""
    try:
        meta = read_meta(folder)
    except UserError:
        return REEXTRACT
    bcfg = {**meta.backbone_config, "name": meta.backbone}
    sharded = len({(r["lo"], r["hi"]) for r in read_records(folder)}) > 1
    return extract_command(bcfg, meta.data_root, f"extract.batch_size={meta.batch_size}",
                           *(["extract.verify=true"] if verify else [])) + (
        " (for each shard: python -m pinterest_cls.status lists them)" if sharded else "")


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
    check_root(cfg)  # a data.root that does not exist says so, rather than that it has no embeddings
    folder = config.embeddings_dir(cfg)
    bcfg = {"name": str(cfg.backbone.name), "kind": cfg.backbone.get("kind"), "model": cfg.backbone.get("model")}
    root = config.select(cfg, "data.root")
    how = extract_command(bcfg, root, *([f"data.layout={cfg.data.layout}"] if root else []),
                          f"paths.work={config.work_dir(cfg)}")
    if not (folder / META).is_file():
        raise UserError(f"no embeddings for backbone {cfg.backbone.name} in {folder}; run first: {how}")
    store = open_store(folder, repair=how)
    if not store.meta.complete:
        raise UserError(f"embeddings in {folder} are incomplete ({store.meta.rows_done}/{store.meta.rows} rows "
                        f"done); finish them (extract resumes): {how}")
    return store


#: Fingerprint keys that say which rows a store holds, not how they were embedded.
ROW_KEYS = ("rows_sha256", "rows")


def uncategorised_store(cfg: DictConfig, meta: StoreMeta) -> Store:
    """The finished store of the export's uncategorised boards (``extract.uncategorised=true``) made as the store
    whose meta is ``meta`` was made (same backbone, weights, preprocessing, runtime, precision, dtype): a one-line
    error with the command otherwise."""
    folder = uncategorised_dir(cfg) / "embeddings" / meta.backbone
    how = extract_command(meta.backbone_config or {"name": meta.backbone}, meta.data_root, "extract.uncategorised=true",
                          f"paths.work={config.work_dir(cfg)}")
    if not (folder / META).is_file():
        raise UserError(f"no store of the uncategorised boards in {folder}; make it: {how}")
    store = open_store(folder, repair=how)
    if not store.meta.complete:
        raise UserError(f"the store of the uncategorised boards in {folder} is incomplete; finish it: {how}")
    differ = sorted(k for k in set(store.meta.fingerprint) | set(meta.fingerprint)
                    if k not in ROW_KEYS and store.meta.fingerprint.get(k) != meta.fingerprint.get(k))
    if differ:
        raise UserError(f"{folder} was embedded otherwise than the run's store ({', '.join(differ)} differ); make "
                        f"it again with the run's settings: {how} extract.overwrite=true")
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


def store_status(folder: Path, verify: bool = False) -> dict:
    """{backbone, state, rows, rows_done, rows_failed, shards: [{index, count, lo, hi, done, state, ...}]}; a
    damaged store's state is ``damaged``, with ``problem`` and ``repair``. ``verify``: check the checksums of the
    committed rows too (reads every row)."""
    if not (folder / META).is_file():
        return {"backbone": folder.name, "folder": str(folder), "state": "not started", "rows": None,
                "rows_done": 0, "rows_failed": 0, "shards": []}
    damage = check_store(folder)
    if damage:
        return {"backbone": folder.name, "folder": str(folder), "state": "damaged", "rows": None, "rows_done": 0,
                "rows_failed": 0, "shards": [], "problem": damage.problem, "repair": repair_hint(folder)}
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
    out = {"backbone": meta.backbone, "folder": str(folder), "state": state, "rows": meta.rows,
           "rows_done": n_done, "rows_failed": len(failures), "shards": shards}
    if verify:
        bad, unchecked = verify_checksums(folder, records)
        out["unverified_rows"] = unchecked
        if bad:
            out.update(state="damaged", repair=repair_hint(folder, verify=True),
                       problem=f"rows {', '.join(f'[{a}, {b})' for a, b in bad)} no longer match their checksums")
    return out


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
