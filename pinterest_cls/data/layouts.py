"""The layouts of an export: walkers that list its candidate pins (``data.layout`` -> ``WALKERS``)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from pinterest_cls.core.errors import UserError

LAYOUTS = ("pinterest", "imagefolder", "csv")
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".jfif"}


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


def file_stat(path: Path) -> tuple[int | None, int | None]:
    """(size in bytes, mtime in ns) of ``path``, or (None, None) where it cannot be read."""
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
                    c.bytes, c.mtime_ns = file_stat(image)
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
                c.bytes, c.mtime_ns = file_stat(path)
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
            c.bytes, c.mtime_ns = file_stat(path)
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
