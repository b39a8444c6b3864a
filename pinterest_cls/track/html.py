"""Static HTML pages that open from disk: thumbnails written beside the page, escaped text, simple tables and
tiles. A page references only files it wrote into its own folder, so it can be copied, zipped or logged to
MLflow as one folder."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from pinterest_cls.data.images import ImageDecodeError, load_rgb

STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 3px 8px; }
th { background: #f4f4f4; } .tiles { display: flex; flex-wrap: wrap; gap: 10px; }
.tile { width: 140px; font-size: 0.8em; overflow-wrap: anywhere; }
.tile img { width: 128px; height: 128px; object-fit: cover; }
.group { border: 1px solid #ccc; padding: 6px; margin: 6px 0; } .muted { color: #777; }
.bad { color: #b00; } .good { color: #070; }
"""


def esc(value) -> str:
    return html.escape(str(value))


class Page:
    """An HTML page in ``folder`` (``<name>.html``) with its thumbnails under ``folder/thumbs/``."""

    def __init__(self, folder: Path, title: str, name: str = "index", thumb_size: int = 128):
        self.folder, self.title, self.name, self.thumb_size = Path(folder), title, name, thumb_size
        self.parts: list[str] = []
        self._thumbs: dict[str, str | None] = {}

    @property
    def path(self) -> Path:
        return self.folder / f"{self.name}.html"

    def thumbnail(self, image_path: str, key: str) -> str | None:
        """The page-relative path of a thumbnail of ``image_path`` (written once), or None if it cannot be read."""
        if key not in self._thumbs:
            rel = f"thumbs/{key}.jpg"
            try:
                im = load_rgb(image_path, min_size=self.thumb_size)
                im.thumbnail((self.thumb_size, self.thumb_size))
                (self.folder / "thumbs").mkdir(parents=True, exist_ok=True)
                im.save(self.folder / rel, "JPEG", quality=85)
                self._thumbs[key] = rel
            except (ImageDecodeError, OSError):
                self._thumbs[key] = None
        return self._thumbs[key]

    def tile(self, image_path: str, key: str, lines: list[str], classes: str = "") -> str:
        """A thumbnail with caption lines (already escaped HTML), or the caption alone if the image is gone."""
        rel = self.thumbnail(image_path, key)
        img = f'<img src="{esc(rel)}" alt="{esc(key)}">' if rel else '<div class="muted">(image unreadable)</div>'
        return f'<div class="tile {classes}">{img}<br>' + "<br>".join(lines) + "</div>"

    def heading(self, text: str, level: int = 2) -> None:
        self.parts.append(f"<h{level}>{esc(text)}</h{level}>")

    def paragraph(self, text: str, raw: bool = False) -> None:
        self.parts.append(f"<p>{text if raw else esc(text)}</p>")

    def tiles(self, tiles: list[str], classes: str = "tiles") -> None:
        self.parts.append(f'<div class="{classes}">' + "".join(tiles) + "</div>")

    def table(self, frame: pd.DataFrame, max_rows: int = 50, links: pd.DataFrame | None = None) -> None:
        """``frame`` as a table (its first ``max_rows`` rows); ``links`` (same shape: a URL or empty per cell)
        makes cells links."""
        head = "".join(f"<th>{esc(c)}</th>" for c in frame.columns)

        def cell(i: int, j: int, v) -> str:
            href = links.iat[i, j] if links is not None else None
            text = esc(_fmt(v))
            linked = isinstance(href, str) and href
            return f'<td><a href="{esc(href)}">{text}</a></td>' if linked else f"<td>{text}</td>"

        body = "".join("<tr>" + "".join(cell(i, j, v) for j, v in enumerate(row)) + "</tr>"
                       for i, row in enumerate(frame.head(max_rows).itertuples(index=False)))
        more = f'<p class="muted">{len(frame) - max_rows} more rows in the CSV</p>' if len(frame) > max_rows else ""
        self.parts.append(f"<table><tr>{head}</tr>{body}</table>{more}")

    def image(self, rel: str, alt: str, width: int | None = None) -> None:
        """A picture already in the page's folder (``rel`` relative to it)."""
        size = f' width="{width}"' if width else ""
        self.parts.append(f'<p><img src="{esc(rel)}" alt="{esc(alt)}"{size}></p>')

    def raw(self, markup: str) -> None:
        self.parts.append(markup)

    def write(self) -> Path:
        self.folder.mkdir(parents=True, exist_ok=True)
        doc = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8"><title>{esc(self.title)}</title>'
               f"<style>{STYLE}</style></head><body><h1>{esc(self.title)}</h1>\n" + "\n".join(self.parts)
               + "\n</body></html>\n")
        self.path.write_text(doc, encoding="utf-8")
        return self.path


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)
