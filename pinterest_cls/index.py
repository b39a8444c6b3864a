"""Similarity search over a store: faiss indexes (exact or IVF), their recall, and the query vector."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd
from omegaconf import DictConfig

from .embedding import Embedder, backbone_from_meta
from .errors import UserError
from .fileio import file_sha256
from .images import ImageDecodeError, load_rgb
from .neighbors import unit_rows
from .store import META

log = logging.getLogger(__name__)

INDEX_DIR = "search_index"  # beside the store


def _exact(vectors: np.ndarray):
    import faiss

    index = faiss.IndexFlatIP(vectors.shape[1])
    index.add(vectors)
    return index


def build_index(vectors: np.ndarray, kind: str, exact_max: int, seed: int = 0):
    """(faiss index over L2-normalised vectors, kind used)."""
    import faiss

    n, d = vectors.shape
    if kind == "auto":
        kind = "flat" if n <= exact_max else "ivf"
    if kind == "flat":
        return _exact(vectors), kind
    if kind == "ivf":
        nlist = int(max(1, min(4 * np.sqrt(n), n // 39)))
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        rng = np.random.default_rng(seed)
        train = vectors[rng.choice(n, min(n, 256 * nlist), replace=False)]
        index.train(train)
        index.add(vectors)
        index.nprobe = max(1, nlist // 8)
        return index, kind
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = 128
        index.add(vectors)
        return index, kind
    raise UserError(f"search.index={kind!r} must be one of: auto, flat, ivf, hnsw")


def recall_at_k(index, vectors: np.ndarray, k: int, queries: int, seed: int = 0) -> float:
    """Share of exact top-k neighbours that ``index`` returns, over a sample of stored vectors as queries."""
    rng = np.random.default_rng(seed)
    q = vectors[rng.choice(len(vectors), min(queries, len(vectors)), replace=False)]
    k = min(k, len(vectors))
    _, exact = _exact(vectors).search(q, k)
    _, approx = index.search(q, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, exact)]))


def load_or_build(folder: Path, emb, index_df: pd.DataFrame, cfg: DictConfig):
    """The saved index for this store (rebuilt when the store or the index settings changed)."""
    import faiss

    s = cfg.search
    meta_sha = file_sha256(folder / META)
    out = folder / INDEX_DIR
    info_path = out / "index.json"
    settings = {"kind": str(s.index), "exact_max": int(s.exact_max), "store_meta_sha256": meta_sha}
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("settings") == settings:
            return faiss.read_index(str(out / "index.faiss")), np.load(out / "rows.npy"), info
    rows = index_df.loc[index_df["embedded"], "row"].to_numpy()
    if len(rows) == 0:
        raise UserError(f"no embedded rows in {folder}")
    t0 = time.perf_counter()
    vectors = unit_rows(emb[rows])
    index, kind = build_index(vectors, str(s.index), int(s.exact_max))
    info = {"settings": settings, "kind": kind, "n": int(len(rows)), "dim": int(vectors.shape[1]),
            "build_s": round(time.perf_counter() - t0, 3)}
    if kind != "flat":
        k = int(s.recall_k)
        info[f"recall_at_{k}"] = recall_at_k(index, vectors, k, int(s.recall_queries))
        log.info(f"{kind} index: recall@{k} against exact search = {info[f'recall_at_{k}']:.4f} "
              f"({s.recall_queries} stored vectors as queries)")
    out.mkdir(exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    np.save(out / "rows.npy", rows)
    (out / "index.json").write_text(json.dumps(info, indent=2))
    log.info(f"built a {kind} index of {len(rows)} vectors in {info['build_s']:.2f} s -> {out}")
    return index, rows, info


def query_vector(cfg: DictConfig, emb, index_df: pd.DataFrame, meta: dict) -> tuple[np.ndarray, str, int | None]:
    """(query vector, description, row of the query pin or None)."""
    q = cfg.query
    pin = cfg.pin
    if (q is None) == (pin is None):
        raise UserError("give exactly one of query=IMAGE (an image file) or pin=USER/BOARD/PIN (a pin of the manifest)")
    if pin is not None:
        # a pin id may be given alone, as board/pin, or as user/board/pin (ids may contain "/" themselves)
        p = index_df["pin"].astype(str)
        board_pin = index_df["board"].astype(str) + "/" + p
        full = index_df["user"].astype(str) + "/" + board_pin
        wanted = str(pin)
        hits = index_df[index_df["embedded"] & ((p == wanted) | (board_pin == wanted) | (full == wanted))]
        if hits.empty:
            raise UserError(f"pin={pin} is not an embedded pin of {cfg.data.name}; give user/board/pin "
                            "(see index.parquet)")
        if len(hits) > 1:
            first = hits.iloc[0]
            raise UserError(f"pin={pin} matches {len(hits)} pins; give user/board/pin, e.g. "
                            f"pin={first['user']}/{first['board']}/{first['pin']}")
        row = int(hits["row"].iloc[0])
        return np.asarray(emb[[row]], dtype=np.float32), f"pin {pin} ({hits['path'].iloc[0]})", row
    path = Path(str(q)).expanduser()
    if not path.is_file():
        raise UserError(f"query={q} is not a file")
    try:  # decoded once before the model is built, so a file that is not an image fails at once
        load_rgb(path)
    except ImageDecodeError as exc:
        raise UserError(f"query={q} is not an image ({exc})") from None
    backbone = backbone_from_meta(meta)
    vec, reasons = Embedder.for_store(backbone, meta)([str(path)], batch_size=1, workers=0)
    if reasons[0]:
        raise UserError(f"query={q} is not an image ({reasons[0]})")
    return vec, str(path), None
