"""Catalogue an export: layouts -> candidate pins -> verified manifest (and reading it back).

The manifest is the single list of pins every later verb reads: one row per pin, in a deterministic order
(sorted by user, board, pin), with a status (``ok`` | ``corrupt`` | ``missing`` | ``rejected``) and a
human-readable reason.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from . import config
from .errors import UserError
from .fileio import atomic_write_json, available_cpus, file_sha256, mp_context
from .images import DEFAULT_MAX_PIXELS, verify_image

LAYOUTS = ("pinterest", "imagefolder", "csv")
STATUSES = ("ok", "corrupt", "missing", "rejected")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif"}

MANIFEST = "manifest.parquet"
CATEGORIES = "categories.json"
SCAN_REPORT = "scan_report.json"

COLUMNS = [
    "user", "board", "pin", "category", "path", "status", "reason",
    "width", "height", "bytes", "format", "mtime_ns", "digest",
]


@dataclass
class Candidate:
    """A pin found by a layout walker, before its image is verified."""

    user: str
    board: str
    pin: str
    category: str
    path: str
    status: str | None = None  # pre-decided: "rejected" or "missing"; None = verify the file
    reason: str = ""
    bytes: int | None = None
    mtime_ns: int | None = None


@dataclass
class Walk:
    candidates: list[Candidate] = field(default_factory=list)
    skipped_users: list[str] = field(default_factory=list)
    stray_files: list[str] = field(default_factory=list)


def category_verdict(raw: str | None, reject: list[str], source: str) -> tuple[str, str | None]:
    """(category, rejection reason or None) for a raw category string read from ``source``."""
    if raw is None:
        return "", f"no {source}"
    category = raw.strip()
    if not category:
        return "", f"empty {source}"
    if category.lower() in {r.strip().lower() for r in reject}:
        return category, f"category '{category}' rejected"
    return category, None


def _stat(path: Path) -> tuple[int | None, int | None]:
    try:
        st = path.stat()
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def _sorted_dirs_and_files(folder: Path) -> tuple[list[os.DirEntry], list[os.DirEntry]]:
    with os.scandir(folder) as it:
        entries = sorted(it, key=lambda e: e.name)
    dirs = [e for e in entries if e.is_dir() and not e.name.startswith(".")]
    files = [e for e in entries if not e.is_dir() and not e.name.startswith(".")]
    return dirs, files


def walk_pinterest(root: Path, reject: list[str], image_name: str = "pin_closeup_image.jpg") -> Walk:
    """``<root>/<user>/per_board/<board>/board_category.txt`` and ``.../<board>/<pin>/<image_name>``."""
    walk = Walk()
    users, stray = _sorted_dirs_and_files(root)
    walk.stray_files += [e.path for e in stray]
    for user in users:
        per_board = Path(user.path) / "per_board"
        if not per_board.is_dir():
            walk.skipped_users.append(user.name)
            continue
        boards, stray = _sorted_dirs_and_files(per_board)
        walk.stray_files += [e.path for e in stray]
        for board in boards:
            cat_file = Path(board.path) / "board_category.txt"
            raw = cat_file.read_text(encoding="utf-8", errors="replace") if cat_file.is_file() else None
            category, rejected = category_verdict(raw, reject, "board_category.txt")
            pins, stray = _sorted_dirs_and_files(Path(board.path))
            walk.stray_files += [e.path for e in stray if e.name != "board_category.txt"]
            for pin in pins:
                image = Path(pin.path) / image_name
                c = Candidate(user.name, board.name, pin.name, category, str(image))
                if rejected:
                    c.status, c.reason = "rejected", rejected
                elif not image.is_file():
                    c.status, c.reason = "missing", f"no {image_name} in pin folder"
                else:
                    c.bytes, c.mtime_ns = _stat(image)
                walk.candidates.append(c)
    return walk


def walk_imagefolder(root: Path, reject: list[str]) -> Walk:
    """``<root>/<class>/<image>`` (images in nested folders of a class count too). Board = class."""
    walk = Walk()
    classes, stray = _sorted_dirs_and_files(root)
    walk.stray_files += [e.path for e in stray]
    for cls in classes:
        category, rejected = category_verdict(cls.name, reject, "class folder name")
        cls_dir = Path(cls.path)
        for path in sorted(p for p in cls_dir.rglob("*") if p.is_file()):
            rel = path.relative_to(cls_dir)
            if any(part.startswith(".") for part in rel.parts):
                continue
            if path.suffix.lower() not in IMAGE_EXTENSIONS:
                walk.stray_files.append(str(path))
                continue
            c = Candidate("", cls.name, rel.as_posix(), category, str(path))
            if rejected:
                c.status, c.reason = "rejected", rejected
            else:
                c.bytes, c.mtime_ns = _stat(path)
            walk.candidates.append(c)
    return walk


def walk_table(file: Path, reject: list[str], columns: dict) -> Walk:
    """A CSV/TSV/parquet file with a path column and a label column; relative paths are relative to
    the file's folder. Optional user/board/pin columns; pin defaults to the path."""
    try:
        if file.suffix.lower() == ".parquet":
            table = pd.read_parquet(file)
        else:
            table = pd.read_csv(file, sep="\t" if file.suffix.lower() == ".tsv" else ",", dtype=str,
                                keep_default_na=False)
    except Exception as exc:
        raise UserError(f"cannot read data.root={file} as a table: {exc}") from None
    for key in ("path_column", "label_column", "user_column", "board_column", "pin_column"):
        col = columns.get(key)
        if col is not None and col not in table.columns:
            raise UserError(
                f"data.{key}='{col}' is not a column of {file} (columns: {', '.join(map(str, table.columns))})"
            )
    walk = Walk()
    base = file.parent
    for _, row in table.iterrows():
        rel = str(row[columns["path_column"]])
        path = Path(rel) if Path(rel).is_absolute() else base / rel
        label = row[columns["label_column"]]
        category, rejected = category_verdict(None if pd.isna(label) else str(label), reject,
                                              f"{columns['label_column']} value")
        user = str(row[columns["user_column"]]) if columns.get("user_column") else ""
        board = str(row[columns["board_column"]]) if columns.get("board_column") else category
        pin = str(row[columns["pin_column"]]) if columns.get("pin_column") else rel
        c = Candidate(user, board, pin, category, str(path))
        if rejected:
            c.status, c.reason = "rejected", rejected
        elif not path.is_file():
            c.status, c.reason = "missing", "file not found"
        else:
            c.bytes, c.mtime_ns = _stat(path)
        walk.candidates.append(c)
    walk.candidates.sort(key=lambda c: (c.user, c.board, c.pin, c.path))
    return walk


def _folder(root: Path, layout: str) -> Path:
    if not root.is_dir():
        raise UserError(f"data.root={root} is not a folder (data.layout={layout} expects one)")
    return root


def _walk_pinterest(root: Path, reject: list[str], data_cfg) -> Walk:
    return walk_pinterest(_folder(root, "pinterest"), reject, data_cfg.image_name)


def _walk_imagefolder(root: Path, reject: list[str], data_cfg) -> Walk:
    return walk_imagefolder(_folder(root, "imagefolder"), reject)


def _walk_csv(root: Path, reject: list[str], data_cfg) -> Walk:
    if not root.is_file():
        raise UserError(f"data.root={root} is not a file (data.layout=csv expects a CSV or parquet file)")
    columns = {k: data_cfg.get(k) for k in ("path_column", "label_column", "user_column", "board_column", "pin_column")}
    return walk_table(root, reject, columns)


#: ``data.layout`` -> the walker that lists its candidate pins.
WALKERS = {"pinterest": _walk_pinterest, "imagefolder": _walk_imagefolder, "csv": _walk_csv}


def walk_export(root: Path, layout: str, reject: list[str], data_cfg) -> Walk:
    if layout not in WALKERS:
        raise UserError(f"data.layout={layout!r} is not a layout; choose one of: {', '.join(LAYOUTS)}")
    return WALKERS[layout](root, reject, data_cfg)


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
    from tqdm.auto import tqdm

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
    bar = tqdm(total=len(todo), desc="verify", unit="img", disable=not progress or not todo,
               dynamic_ncols=True)
    if workers <= 1 or len(todo) < 64:
        verdicts = map(_verify_one, args)
        for i, v in zip(todo, verdicts):
            results[i] = v
            bar.update()
    else:
        chunksize = max(1, min(256, len(todo) // (workers * 16)))
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp_context()) as pool:
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


def load_categories(out_dir: Path) -> dict[str, int]:
    path = Path(out_dir) / CATEGORIES
    if not path.is_file():
        raise UserError(f"no {CATEGORIES} at {path}; run `python -m pinterest_cls.scan` for this data first")
    return json.loads(path.read_text())


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
    root = config.data_root(cfg)
    out_dir = config.data_dir(cfg)
    report = run_scan(
        root, out_dir, str(config.select(cfg, "data.layout")),
        list(config.select(cfg, "data.reject_categories")), cfg.data, settings,
        incremental=bool(config.select(cfg, "scan.incremental")), progress=progress,
    )
    return report
