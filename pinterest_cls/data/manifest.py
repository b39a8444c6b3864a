"""The manifest: an export's candidate pins (``pinterest_cls.data.layouts``), each verified by decoding it, as
``manifest.parquet`` with ``categories.json`` and ``scan_report.json``; and reading it back.

The manifest is the single list of pins every later verb reads: one row per pin, in a deterministic order
(sorted by user, board, pin), with a status (``ok`` | ``corrupt`` | ``missing`` | ``rejected``) and a
human-readable reason, and the sha256 of each ok file's bytes (exact copies of a pin share it).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json, available_cpus, file_sha256, locked, process_pool
from pinterest_cls.core.progress import progress_bar
from pinterest_cls.data.demo import ensure_demo_export
from pinterest_cls.data.images import DEFAULT_MAX_PIXELS, verify_image
from pinterest_cls.data.layouts import Candidate, file_stat, walk_export

log = logging.getLogger(__name__)

STATUSES = ("ok", "corrupt", "missing", "rejected")
MANIFEST = "manifest.parquet"
CATEGORIES = "categories.json"
SCAN_REPORT = "scan_report.json"
COLUMNS = [
    "user", "board", "pin", "category", "path", "status", "reason",
    "width", "height", "bytes", "format", "mtime_ns", "digest",
]


def _verify_one(args) -> tuple:
    """(status, reason, width, height, format, digest): ``digest`` is the sha256 of an ok file's bytes, which
    identifies exact copies (a repin of the same file on another board)."""
    path, full, allow_truncated, max_pixels = args
    v = verify_image(path, full=full, allow_truncated=allow_truncated, max_pixels=max_pixels)
    return v.status, v.reason, v.width, v.height, v.format, file_sha256(path) if v.status == "ok" else None


@dataclass
class ScanSettings:
    full: bool = True
    allow_truncated: bool = False
    max_pixels: int = DEFAULT_MAX_PIXELS
    workers: int | None = None  # None = all cores

    def verdict_key(self) -> dict:
        """What a stored verdict depends on (besides the file itself)."""
        return {"full": self.full, "allow_truncated": self.allow_truncated, "max_pixels": self.max_pixels}


def previous_verdicts(out_dir: Path, settings: ScanSettings) -> dict[str, tuple]:
    """Verdicts of the last scan, by path, when it used the same settings; {} otherwise."""
    manifest, report = out_dir / MANIFEST, out_dir / SCAN_REPORT
    try:
        old_settings = json.loads(report.read_text())["settings"]
        old = pd.read_parquet(manifest)
    except (OSError, ValueError, KeyError):
        return {}
    if {k: old_settings.get(k) for k in settings.verdict_key()} != settings.verdict_key():
        return {}
    if "digest" not in old.columns:  # a manifest from before digests were recorded: verify again
        return {}
    old = old[old["status"].isin(["ok", "corrupt"]) & old["bytes"].notna()]
    return {
        r.path: (int(r.bytes), int(r.mtime_ns), r.status, r.reason, r.width, r.height, r.format, r.digest)
        for r in old.itertuples(index=False)
    }


def verify_candidates(candidates: list[Candidate], settings: ScanSettings, previous: dict,
                      progress: bool = True) -> tuple[list[tuple], int]:
    """Verdict tuples (status, reason, width, height, format, digest) aligned with ``candidates``; and how many
    were reused from ``previous`` (same path, size and mtime) without a decode."""
    results: list[tuple | None] = [None] * len(candidates)
    todo: list[int] = []
    reused = 0
    for i, c in enumerate(candidates):
        if c.status is not None:
            results[i] = (c.status, c.reason, None, None, None, None)
            continue
        old = previous.get(c.path)
        if old is not None and old[0] == c.bytes and old[1] == c.mtime_ns:
            results[i] = old[2:]
            reused += 1
        else:
            todo.append(i)
    args = [(candidates[i].path, settings.full, settings.allow_truncated, settings.max_pixels) for i in todo]
    workers = settings.workers or available_cpus()
    bar = progress_bar(len(todo), "verify", "img", progress and bool(todo), leave=True)
    if workers <= 1 or len(todo) < 64:
        verdicts = map(_verify_one, args)
        for i, v in zip(todo, verdicts):
            results[i] = v
            bar.update()
    else:
        chunksize = max(1, min(256, len(todo) // (workers * 16)))
        with process_pool(workers) as pool:
            for i, v in zip(todo, pool.map(_verify_one, args, chunksize=chunksize)):
                results[i] = v
                bar.update()
    bar.close()
    return results, reused  # type: ignore[return-value]


def build_manifest(candidates: list[Candidate], verdicts: list[tuple]) -> pd.DataFrame:
    rows = []
    for c, (status, reason, width, height, fmt, digest) in zip(candidates, verdicts):
        rows.append((c.user, c.board, c.pin, c.category, c.path, status, reason or "",
                     width, height, c.bytes, fmt, c.mtime_ns, digest))
    df = pd.DataFrame(rows, columns=COLUMNS)
    for col in ("width", "height", "bytes", "mtime_ns"):
        df[col] = df[col].astype("Int64")
    df["format"] = df["format"].astype("string")
    df["digest"] = df["digest"].astype("string")
    return df


def categories_of(manifest: pd.DataFrame) -> dict[str, int]:
    """Accepted categories (those with at least one ``ok`` pin), sorted, with their integer index."""
    names = sorted(manifest.loc[manifest["status"] == "ok", "category"].unique())
    return {name: i for i, name in enumerate(names)}


def write_manifest(out_dir: Path, manifest: pd.DataFrame) -> None:
    tmp = out_dir / f".{MANIFEST}.tmp{os.getpid()}"
    manifest.to_parquet(tmp, index=False)
    os.replace(tmp, out_dir / MANIFEST)


def load_manifest(out_dir: Path) -> pd.DataFrame:
    path = Path(out_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"no manifest at {path}; run `python -m pinterest_cls.scan` for this data first")
    return pd.read_parquet(path)


def summarize(manifest: pd.DataFrame) -> dict:
    ok = manifest[manifest["status"] == "ok"]
    per_category = {}
    for cat, group in manifest[manifest["status"] != "rejected"].groupby("category", sort=True):
        per_category[cat] = {"ok": int((group["status"] == "ok").sum()), "total": int(len(group))}
    reasons = Counter(r for r in manifest["reason"] if r)
    return {
        "pins": int(len(manifest)),
        "status": {s: int((manifest["status"] == s).sum()) for s in STATUSES},
        "reasons": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "categories": per_category,
        "ok_bytes": int(ok["bytes"].sum()) if len(ok) else 0,
    }


def run_scan(root: Path, out_dir: Path, layout: str, reject: list[str], data_cfg,
             settings: ScanSettings, incremental: bool = True, progress: bool = True) -> dict:
    """Walk, verify and write ``manifest.parquet``, ``categories.json`` and ``scan_report.json``.

    Returns the report (also written to disk).
    """
    t0 = time.perf_counter()
    walk = walk_export(root, layout, reject, data_cfg)
    if not walk.candidates:
        expected = {
            "pinterest": "<root>/<user>/per_board/<board>/<pin>/" + str(data_cfg.image_name),
            "imagefolder": "<root>/<class>/<image>",
            "csv": "rows in the table",
        }[layout]
        raise UserError(f"no pins found in data.root={root} with data.layout={layout} (expected {expected}); "
                        "check data.root and data.layout")
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = previous_verdicts(out_dir, settings) if incremental else {}
    verdicts, reused = verify_candidates(walk.candidates, settings, previous, progress=progress)
    manifest = build_manifest(walk.candidates, verdicts)
    categories = categories_of(manifest)
    write_manifest(out_dir, manifest)
    atomic_write_json(out_dir / CATEGORIES, categories)
    elapsed = time.perf_counter() - t0
    checked = sum(1 for c in walk.candidates if c.status is None)
    report = {
        "root": str(root),
        "layout": layout,
        "settings": settings.verdict_key() | {"workers": settings.workers or available_cpus()},
        **summarize(manifest),
        "accepted_categories": len(categories),
        "decoded": checked - reused,
        "reused": reused,
        "skipped_users": walk.skipped_users,
        "stray_files": len(walk.stray_files),
        "elapsed_s": round(elapsed, 3),
        "files_per_s": round(checked / elapsed, 1) if elapsed > 0 else None,
        "manifest_sha256": file_sha256(out_dir / MANIFEST),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    atomic_write_json(out_dir / SCAN_REPORT, report)
    return report


def format_report(report: dict, out_dir: Path) -> str:
    """The printed summary: counts per status, reason and category, time and rate."""
    lines = [f"scan of {report['root']} (layout {report['layout']}): {report['pins']} pins"]
    lines.append("  status:   " + ", ".join(f"{s} {n}" for s, n in report["status"].items()))
    if report["reasons"]:
        lines.append("  reasons:")
        lines += [f"    {n:6d}  {r}" for r, n in report["reasons"].items()]
    lines.append(f"  categories ({report['accepted_categories']} accepted; ok / pins):")
    lines += [f"    {v['ok']:6d} / {v['total']:<6d} {c or '(none)'}" for c, v in report["categories"].items()]
    if report["skipped_users"]:
        lines.append(f"  users without per_board (skipped): {', '.join(report['skipped_users'])}")
    if report["stray_files"]:
        lines.append(f"  stray files ignored: {report['stray_files']}")
    lines.append(f"  verified {report['decoded']} files, reused {report['reused']} unchanged verdicts, "
                 f"{report['elapsed_s']:.2f} s, {report['files_per_s'] or 0:.0f} files/s")
    lines.append(f"  wrote {out_dir / MANIFEST}, {CATEGORIES}, {SCAN_REPORT}")
    return "\n".join(lines)


def settings_from(cfg: DictConfig) -> ScanSettings:
    verify = config.select(cfg, "scan.verify")
    if verify not in ("full", "header"):
        raise UserError(f"scan.verify={verify!r} must be 'full' (decode every pixel) or 'header'")
    return ScanSettings(
        full=verify == "full",
        allow_truncated=bool(config.select(cfg, "scan.allow_truncated")),
        max_pixels=int(config.select(cfg, "scan.max_pixels")),
        workers=config.select(cfg, "scan.workers"),
    )


def scan_export(cfg: DictConfig, progress: bool = True) -> dict:
    """Scan the export that ``cfg`` describes (its ``data``, ``paths`` and ``scan`` keys) into its work folder;
    return the report."""
    settings = settings_from(cfg)
    root = data_root(cfg)
    out_dir = config.data_dir(cfg)
    report = run_scan(
        root, out_dir, str(config.select(cfg, "data.layout")),
        list(config.select(cfg, "data.reject_categories")), cfg.data, settings,
        incremental=bool(config.select(cfg, "scan.incremental")), progress=progress,
    )
    return report


def check_root(cfg: DictConfig) -> Path | None:
    """``data.root`` resolved (None when unset: the demo), or a one-line error when it does not exist."""
    root = config.select(cfg, "data.root")
    if root in (None, ""):
        return None
    path = Path(os.path.expanduser(str(root))).resolve()
    if not path.exists():
        raise UserError(f"data.root={root} does not exist; point data.root at an export (or leave it unset to use "
                        "the embedded demo data)")
    return path


def data_root(cfg: DictConfig) -> Path:
    """The export to read: ``data.root``, or the demo export (generated on first use)."""
    return check_root(cfg) or ensure_demo_export(config.work_dir(cfg) / config.DEMO_NAME / "export")



def ok_rows(cfg: DictConfig):
    """The manifest's ok rows (running ``scan`` first when there is no manifest yet)."""
    out = config.data_dir(cfg)
    if not (out / MANIFEST).is_file():
        data_root(cfg)  # a missing export fails here, before a folder (and its lock) is made for it
    with locked(out):  # parallel shard jobs: the first scans, the others wait and read its manifest
        if not (out / MANIFEST).is_file():
            log.info(f"No manifest in {out}: scanning first.")
            report = scan_export(cfg)
            print(format_report(report, out), flush=True)
    _check_scanned_root(cfg, out)
    manifest = load_manifest(out)
    ok = manifest[manifest["status"] == "ok"].reset_index(drop=True)
    if ok.empty:
        raise UserError(f"the manifest {out / MANIFEST} has no ok pins to embed; see scan_report.json")
    return manifest, ok


#: The export's boards without an accepted category, as a data set of their own: ``<paths.data>/uncategorised/``.
UNCATEGORISED = "uncategorised"


def uncategorised_dir(cfg: DictConfig) -> Path:
    return config.data_dir(cfg) / UNCATEGORISED


def scan_uncategorised(cfg: DictConfig, progress: bool = True) -> Path | None:
    """The pins of the manifest's uncategorised boards (no ``board_category.txt``, an empty one, or a rejected
    category such as "Other"), verified as ``scan`` verifies pins, as the manifest of a data set of their own in
    ``<paths.data>/uncategorised/`` (``category``: the board's own text, empty where it has none). The export's
    manifest is left as it is. None where there are no such boards."""
    out = config.data_dir(cfg)
    rows = load_manifest(out)
    rows = rows[rows["status"] == "rejected"]
    if rows.empty:
        return None
    candidates = []
    for r in rows.itertuples(index=False):
        c = Candidate(r.user, r.board, r.pin, r.category, r.path)
        c.bytes, c.mtime_ns = file_stat(Path(r.path))
        if c.bytes is None:
            c.status, c.reason = "missing", "no image file in pin folder"
        candidates.append(c)
    sub = uncategorised_dir(cfg)
    sub.mkdir(parents=True, exist_ok=True)
    settings = settings_from(cfg)
    with locked(sub):
        verdicts, _ = verify_candidates(candidates, settings, previous_verdicts(sub, settings), progress=progress)
        manifest = build_manifest(candidates, verdicts)
        write_manifest(sub, manifest)
        atomic_write_json(sub / CATEGORIES, {})
        atomic_write_json(sub / SCAN_REPORT, {"root": str(data_root(cfg)), "layout": str(cfg.data.layout),
                                              "settings": settings.verdict_key(), **summarize(manifest),
                                              "uncategorised_boards_of": str(out / MANIFEST),
                                              "manifest_sha256": file_sha256(sub / MANIFEST)})
    return sub


def _check_scanned_root(cfg: DictConfig, out: Path) -> None:
    """The manifest in ``out`` must be the scan of ``data.root``: another export under the same ``data.name``
    would otherwise be embedded as the old one's pins and categories."""
    report = out / SCAN_REPORT
    if config.select(cfg, "data.root") in (None, "") or not report.is_file():
        return
    scanned = json.loads(report.read_text()).get("root")
    root = data_root(cfg)
    if scanned and Path(scanned) != root:
        raise UserError(f"{out / MANIFEST} is the scan of {scanned}, not of data.root={root}; scan this export "
                        f"first (python -m pinterest_cls.scan data.root={root} data.name=...), under a "
                        "data.name of its own, or with the same data.name to replace the old scan")


def pin_digests(cfg: DictConfig, frame: pd.DataFrame) -> np.ndarray:
    """The scan's content digest of each pin of ``frame`` (by path; None where the manifest has none)."""
    digests = np.full(len(frame), None, dtype=object)
    manifest_path = config.data_dir(cfg) / MANIFEST
    if manifest_path.is_file():
        manifest = load_manifest(config.data_dir(cfg))
        if "digest" in manifest.columns:
            digests = frame["path"].map(manifest.set_index("path")["digest"]).to_numpy(dtype=object)
    if pd.isna(digests).all():
        log.warning(f"note: {manifest_path} has no content digests (scanned before they were recorded): exact copies "
                    "are found only as near copies; re-run scan to record them")
    return digests
