"""A store's ``meta.json``, read in one place (``read_meta``) into a ``StoreMeta``: typed fields with their
defaults, and a ``format_version``.

Formats: 0, a store from before format versions were recorded; 1, with ``format_version``; 2, the rows' identity
(``fingerprint.rows_sha256``) taken from their content (user, board, pin and the file's sha256), no longer from
their paths, sizes and mtimes. Reading migrates an older ``meta.json`` in memory: the keys added since get the
values those stores were made with. ``extract`` migrates the file itself when it opens such a store (the content
identity is computed from the manifest). A store of a newer format than this code knows is refused.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

from pinterest_cls.core.errors import UserError

META = "meta.json"
#: The format of ``meta.json`` this code writes.
FORMAT_VERSION = 2
#: Fingerprint keys added after the first stores were written, with the value those stores were made with: a
#: store whose fingerprint lacks such a key matches a run with that value (so it can still be resumed).
FINGERPRINT_DEFAULTS = {"decode": "cpu", "micro_batch": None, "runtime": "torch", "request_rows": None,
                        "resize": "pil", "fold_bn": False}
#: What to do with a store whose meta.json cannot be trusted.
REEXTRACT = "re-extract the store with extract.overwrite=true"


def filled(fingerprint: dict) -> dict:
    """A fingerprint with the keys added since the first stores, at the values those stores were made with."""
    return {**FINGERPRINT_DEFAULTS, **fingerprint}


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
    resize: str = "pil"  # extract.resize (embed.backbones.RESIZES); stores from before the option resized with Pillow
    int8: dict | None = None  # extract.amp=int8: the calibration's settings (embed.quantization.settings)
    fold_bn: bool = False  # extract.fold_bn: batch norms folded into their convolutions (embed.folding); not before


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
        """``meta.json`` as written, with the keys added since its format filled in."""
        return dict(self.record)

    @classmethod
    def from_dict(cls, raw: dict, source: str = META) -> StoreMeta:
        """``raw`` (a ``meta.json``) typed, the keys its format lacks filled in (``format_version`` stays the
        file's); ``source`` names it in errors."""
        version = int(raw.get("format_version", 0))
        if version > FORMAT_VERSION:
            raise UserError(f"{source} is of store format {version}, newer than this pinterest_cls reads "
                            f"({FORMAT_VERSION}); upgrade pinterest_cls, or re-extract with extract.overwrite=true")
        migrated = {**raw, "format_version": version, "fingerprint": filled(raw.get("fingerprint", {}))}
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
                       created=raw.get("created"), format_version=version, record=migrated)
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{source} is not a store's meta.json (missing or bad {exc}); {REEXTRACT}") from None


#: A store's near-copy calibration (``embed.calibration``), beside its meta.json.
CALIBRATION = "repins.json"


def fingerprint_digest(fingerprint: dict) -> str:
    """A short digest of a fingerprint: what a calibration (and MLflow's dataset input) is keyed by."""
    return hashlib.sha256(json.dumps(filled(fingerprint), sort_keys=True, default=str).encode()).hexdigest()[:16]


def read_calibration(folder: Path, meta: StoreMeta) -> dict | None:
    """The store's near-copy calibration when it was made on these very embeddings (the store's fingerprint), else
    None (none made, or made on embeddings since replaced)."""
    try:
        record = json.loads((Path(folder) / CALIBRATION).read_text())
    except (OSError, ValueError):
        return None
    return record if record.get("fingerprint") == fingerprint_digest(meta.fingerprint) else None


def read_meta(folder: Path) -> StoreMeta:
    """The store's ``meta.json``, typed (the one reader of it)."""
    path = Path(folder) / META
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no embeddings in {folder} (no {META})") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]}); {REEXTRACT}"
                        ) from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} is not a store's meta.json; {REEXTRACT}")
    return StoreMeta.from_dict(raw, str(path))


