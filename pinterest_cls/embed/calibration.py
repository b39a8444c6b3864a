"""The near-copy threshold of a store, calibrated on the store itself: a seeded sample of its pins is copied the
ways repins are (``data.copies``: re-encoded, downscaled, cropped, stretched), the copies are embedded exactly as
the store's pins were (backbone, preprocessing, runtime, precision, dtype), and their similarity to their
originals is set against each original's similarity to its nearest distinct pins in the store.

The threshold is the highest that keeps the synthetic copies' recall at ``RECALL`` (98 % of each of the
re-encoded, downscaled and stretched copies, 80 % of the crops): candidates are then verified on their pixels,
so it may be low. It is raised only where the candidate pairs it would make among distinct pins, estimated from
the sample's ``NEIGHBOURS`` nearest distinct pins, exceed the pixel check's budget (``PAIRS_PER_PIN`` per pin, at
least ``MIN_PAIR_BUDGET`` pairs; a pair that does not line up costs about 25 ms of one core); the lower recall is
then recorded and said. Recorded, on the sample: the threshold,
each kind's recall at it and after the pixel check (the end-to-end recall), the share of pins whose nearest
distinct pin is above it (the false-pair rate) and the share the pixel check lets through (an upper bound: true
repins among the store's pins count as false). ``extract`` calibrates a store once it is complete, with the
backbone it has loaded, so that ``train`` and ``audit`` never load a model; the record (``repins.json``) is keyed
by the store's fingerprint. A store of random weights (``backbone.pretrained=false``) is not calibrated: its
features mean nothing.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import numpy as np

from pinterest_cls.core.fileio import atomic_write_json
from pinterest_cls.data.copies import KINDS, synthetic_copy
from pinterest_cls.data.images import ImageDecodeError, load_rgb
from pinterest_cls.data.metadata import CALIBRATION, fingerprint_digest, read_calibration
from pinterest_cls.data.pixel_match import verify_pairs
from pinterest_cls.data.store import open_store
from pinterest_cls.embed.embedder import Embedder
from pinterest_cls.embed.quantization import INT8_DIR
from pinterest_cls.neighbors.faiss_index import blocks, unit_rows

log = logging.getLogger(__name__)

#: The recall the threshold keeps on the synthetic copies of each kind: of the crops, and of each other kind.
RECALL = {"cropped": 0.80, "other": 0.98}
#: The pixel check's budget: candidate pairs among distinct pins, per pin of the store, and at least this many.
PAIRS_PER_PIN, MIN_PAIR_BUDGET = 5.0, 5000
#: How many nearest distinct pins of each sampled pin estimate the candidates (``repins.k``'s default).
NEIGHBOURS = 10


def needs_calibration(folder: Path, meta) -> bool:
    """Whether the store in ``folder`` is complete, of real features, and has no calibration of its embeddings."""
    weights = str(meta.weights or "")
    return meta.complete and not weights.startswith("random") and read_calibration(folder, meta) is None


def calibrate(folder: Path, backbone, pins: int, seed: int, min_score: float,
              device: str = "auto") -> dict:
    """Calibrate the store in ``folder`` with ``backbone`` (the one that made it), on a seeded sample of ``pins``
    of its pins; write and return the record."""
    t0 = time.perf_counter()
    store = open_store(folder)
    pool = store.embedded()
    rng = np.random.default_rng(seed)
    sample = pool.iloc[np.sort(rng.choice(len(pool), min(pins, len(pool)), replace=False))].reset_index(drop=True)
    with tempfile.TemporaryDirectory() as tmp:
        copies = _write_copies(sample, Path(tmp), rng)
        embed = Embedder.for_store(backbone, store.meta, device, int8_dir=Path(folder) / INT8_DIR)
        feats, reasons = embed([c["path"] for c in copies], workers=0)
        ok = [i for i, r in enumerate(reasons) if not r]
        copies = [copies[i] for i in ok]
        index = np.array([c["sample"] for c in copies], dtype=np.int64)
        sims = (unit_rows(feats[ok]) * unit_rows(store.vectors_of(sample))[index]).sum(1)
        pixels = verify_pairs([c["path"] for c in copies], list(sample["path"][index]), floor=min_score)
    kinds = np.array([c["kind"] for c in copies])
    near, rows = _nearest_distinct(store, sample, NEIGHBOURS)
    budget = max(MIN_PAIR_BUDGET, PAIRS_PER_PIN * len(pool))
    threshold, wanted = _threshold(sims, kinds, near, len(pool), budget)
    above = np.flatnonzero(near[:, 0] >= threshold)
    through = verify_pairs(list(sample["path"][above]), list(store.pins.set_index("row").loc[rows[above, 0], "path"]),
                           floor=min_score)
    found = (sims >= threshold) & (pixels >= min_score)
    record = {
        "fingerprint": fingerprint_digest(store.meta.fingerprint), "threshold": round(float(threshold), 4),
        "recall": _per_kind(sims >= threshold, kinds), "recall_verified": _per_kind(found, kinds),
        "false_pair_rate": round(float(np.mean(near[:, 0] >= threshold)), 4),
        "false_pair_rate_verified": round(float(np.sum(through >= min_score)) / len(sample), 4),
        "candidate_pairs_per_pin": round(_pairs_per_pin(near, threshold), 4), "pair_budget": int(budget),
        "threshold_for_recall": round(float(wanted), 4), "min_pixel_score": min_score, "pins": len(sample),
        "copies": len(copies), "seed": seed, "kinds": list(KINDS),
        "rule": {"recall": RECALL, "pairs_per_pin": PAIRS_PER_PIN, "min_pair_budget": MIN_PAIR_BUDGET,
                 "neighbours": NEIGHBOURS},
        "seconds": round(time.perf_counter() - t0, 1)}
    atomic_write_json(Path(folder) / CALIBRATION, record)
    shown = ", ".join(f"{k} {v:.3f}" for k, v in record["recall_verified"].items())
    log.info(f"{store.meta.backbone}: near copies at cosine >= {record['threshold']}, verified on pixels >= "
             f"{min_score} (calibrated on {len(sample)} pins in {record['seconds']} s: recall {shown}; distinct pins "
             f"above it {record['false_pair_rate']:.3f}, {record['false_pair_rate_verified']:.4f} after the pixel "
             f"check) -> {folder / CALIBRATION}")
    if threshold > wanted:
        log.warning(f"note: {store.meta.backbone}'s embeddings do not set copies apart from distinct pins: the "
                    f"recall wanted needs cosine >= {wanted:.4f}, where the pixel check would take "
                    f"{_pairs_per_pin(near, wanted) * len(pool):.0f} pairs (budget {budget:.0f}); raised to "
                    f"{threshold:.4f}, at the recall above")
    return record


def _per_kind(hit: np.ndarray, kinds: np.ndarray) -> dict:
    return {k: round(float(np.mean(hit[kinds == k])), 4) for k in KINDS if np.any(kinds == k)}


def _pairs_per_pin(near: np.ndarray, threshold: float) -> float:
    """Candidate pairs among distinct pins per pin at ``threshold`` (each pair has two ends)."""
    return float((near >= threshold).sum(axis=1).mean() / 2)


def _write_copies(sample, folder: Path, rng: np.random.Generator) -> list[dict]:
    """One synthetic copy of each kind of each sampled pin, as files in ``folder``."""
    copies = []
    for i, path in enumerate(sample["path"]):
        try:
            image = load_rgb(path)
        except ImageDecodeError:  # the file changed since it was embedded: it is left out
            continue
        for kind in KINDS:
            out = folder / f"{i:05d}_{kind}.jpg"
            out.write_bytes(synthetic_copy(image, kind, rng))
            copies.append({"sample": i, "kind": kind, "path": str(out)})
    return copies


def _nearest_distinct(store, sample, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(cosines, rows), most similar first, of each sampled pin's ``k`` nearest pins that are neither itself nor
    a byte copy of it, by an exact search of the sample against the whole store, block by block (no N x N
    matrix)."""
    q = unit_rows(store.vectors_of(sample))
    rows = store.embedded()["row"].to_numpy()
    own = sample["row"].to_numpy()
    best = np.full((len(q), k), -np.inf, dtype=np.float32)
    where = np.full((len(q), k), -1, dtype=np.int64)
    for lo, x in blocks(store.vectors, rows):
        s = q @ x.T
        r = rows[lo:lo + len(x)]
        s[np.equal.outer(own, r)] = -np.inf  # the pin itself
        s[s >= 0.99999] = -np.inf  # and its byte copies, which embed alike
        top = np.argpartition(-s, min(k, s.shape[1] - 1), axis=1)[:, :k] if s.shape[1] > k else \
            np.broadcast_to(np.arange(s.shape[1]), (len(q), s.shape[1]))
        sims = np.concatenate([best, np.take_along_axis(s, top, 1)], axis=1)
        ids = np.concatenate([where, r[top]], axis=1)
        keep = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        best, where = np.take_along_axis(sims, keep, 1), np.take_along_axis(ids, keep, 1)
    return best.astype(np.float64), where


def _threshold(sims: np.ndarray, kinds: np.ndarray, near: np.ndarray, n: int, budget: float) -> tuple[float, float]:
    """(threshold, the threshold the recall alone asks for) by the rule of the module docstring (the lower order
    statistic, so that at least that share of each kind is at or above it)."""
    wanted = float(min(np.quantile(sims[kinds == k], 1 - RECALL.get(k, RECALL["other"]), method="lower")
                       for k in KINDS if np.any(kinds == k)))
    if _pairs_per_pin(near, wanted) * n <= budget:
        return wanted, wanted
    values = np.unique(near[np.isfinite(near) & (near > wanted)])
    for t in values:  # the lowest threshold within the budget
        if _pairs_per_pin(near, t) * n <= budget:
            return float(t), wanted
    return float(values[-1]) if len(values) else wanted, wanted
