"""Every faiss index of the package, built by one policy, and the k-nearest-neighbour graph read block by block.

The policy (one set of constants, measured in ``experiments/neighbors/README.md``):

- up to ``EXACT_MAX`` rows, exact search: a flat index (inner product, or L2);
- above, an inverted file (IVF) of ``ivf_lists`` = 4 sqrt(n) lists (at least ``MIN_TRAIN_PER_LIST``
  training rows per list), trained on a seeded sample of ``TRAIN_PER_LIST`` rows per list, holding 8-bit
  scalar-quantised codes (a million 1280-d rows in 1.3 GB), searched ``NPROBE`` lists per query.

Its users: the kNN classifier (``pinterest_cls.learn.estimators.FaissKNN``), k-means' assignment
(``pinterest_cls.learn.estimators.FaissKMeans``), ``search`` (``load_or_build``, saved beside the store),
and the neighbour graph of ``audit`` and of repins (``FaissNeighbors``). No N x N matrix is ever built.

``FaissNeighbors`` answers like scikit-learn's ``NearestNeighbors`` (``n_neighbors``, ``metric``,
``kneighbors``), so that libraries that take a fitted neighbour object (cleanlab's outlier scores) use this graph
instead of building their own.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import atomic_write_json, file_sha256

log = logging.getLogger(__name__)

# faiss announces at INFO level which CPU build it loads; a job log has no use for it
logging.getLogger("faiss.loader").setLevel(logging.WARNING)

#: Rows up to which every index is exact (flat).
EXACT_MAX = 20_000
#: An inverted file has 4 sqrt(n) lists ...
LIST_FACTOR = 4
#: ... but never fewer training rows per list than faiss asks for (it warns below 39) ...
MIN_TRAIN_PER_LIST = 39
#: ... and is trained on a seeded sample of this many rows per list (or all rows).
TRAIN_PER_LIST = 64
#: Lists searched per query.
NPROBE = 8
#: Graph neighbours (HNSW) and their search breadth, for ``search.index=hnsw``.
HNSW_M, HNSW_EF_SEARCH = 32, 128
#: What a saved index depends on: a change of policy rebuilds it.
POLICY = {"exact_max": EXACT_MAX, "list_factor": LIST_FACTOR, "min_train_per_list": MIN_TRAIN_PER_LIST,
          "train_per_list": TRAIN_PER_LIST, "nprobe": NPROBE, "codes": "sq8"}
METRICS = ("ip", "l2")


def read_rows(X, lo: int, hi: int, rows: np.ndarray | None = None) -> np.ndarray:
    """float32 copy of rows ``lo:hi`` of ``X`` (or of ``X[rows[lo:hi]]``), then the pages of a memory-mapped ``X``
    are let go, so reading a store block by block does not keep it all resident."""
    block = np.asarray(X[lo:hi] if rows is None else X[np.asarray(rows[lo:hi])], dtype=np.float32)
    mm = getattr(X, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED)
    return block


def unit_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with rows of unit length (zero rows stay zero), in place where ``x`` is float32."""
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)


def blocks(X, rows: np.ndarray | None = None, block: int = 8192, normalize: bool = True
           ) -> Iterator[tuple[int, np.ndarray]]:
    """(first position, float32 rows) of ``X`` (or ``X[rows]``), ``block`` rows at a time, of unit length unless
    ``normalize=False``."""
    n = len(X) if rows is None else len(rows)
    for lo in range(0, n, block):
        x = read_rows(X, lo, min(n, lo + block), rows)
        yield lo, unit_rows(x) if normalize else np.ascontiguousarray(x)


# --- the policy ------------------------------------------------------------------------------------------------


def ivf_lists(n: int) -> int:
    """The inverted file's list count for ``n`` rows: 4 sqrt(n), at most n / 39."""
    return int(max(1, min(LIST_FACTOR * math.sqrt(n), n // MIN_TRAIN_PER_LIST)))


def policy_kind(n: int) -> str:
    """``flat`` (exact) up to ``EXACT_MAX`` rows, else ``ivf``."""
    return "flat" if n <= EXACT_MAX else "ivf"


def _faiss_metric(metric: str):
    import faiss

    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} must be one of {METRICS}")
    return faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2


def _flat(d: int, n: int, metric: str, train: Callable[[int], np.ndarray]):
    import faiss

    return (faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)), "flat"


def _ivf(d: int, n: int, metric: str, train: Callable[[int], np.ndarray]):
    import faiss

    nlist = ivf_lists(n)
    quantizer = faiss.IndexFlatIP(d) if metric == "ip" else faiss.IndexFlatL2(d)
    index = faiss.IndexIVFScalarQuantizer(quantizer, d, nlist, faiss.ScalarQuantizer.QT_8bit, _faiss_metric(metric))
    index.cp.min_points_per_centroid = MIN_TRAIN_PER_LIST  # the sample below is large enough: no faiss warning
    index.train(train(min(n, TRAIN_PER_LIST * nlist)))
    index.nprobe = min(nlist, NPROBE)
    return index, f"ivf{nlist}-sq8 nprobe={index.nprobe}"


def _hnsw(d: int, n: int, metric: str, train: Callable[[int], np.ndarray]):
    import faiss

    index = faiss.IndexHNSWFlat(d, HNSW_M, _faiss_metric(metric))
    index.hnsw.efSearch = HNSW_EF_SEARCH
    return index, f"hnsw{HNSW_M} ef={HNSW_EF_SEARCH}"


#: An index kind -> its builder; ``auto`` is the policy (``policy_kind``).
KINDS: dict[str, Callable] = {"flat": _flat, "ivf": _ivf, "hnsw": _hnsw}


def build_index(X, rows: np.ndarray | None = None, metric: str = "ip", kind: str = "auto",
                normalize: bool = False, seed: int = 0, block: int = 8192, key: str = "index"):
    """(faiss index over ``X`` (or ``X[rows]``; a memory map is read in blocks), description). ``kind``: ``auto``
    (the policy), or one of ``KINDS``; ``normalize``: index the rows at unit length (cosine on ``ip``);
    ``key`` names the setting in errors."""
    n = len(X) if rows is None else len(rows)
    if n == 0:
        raise UserError(f"{key}: no vectors to index")
    kind = policy_kind(n) if kind == "auto" else kind
    if kind not in KINDS:
        raise UserError(f"{key}={kind!r} must be one of: auto, {', '.join(KINDS)}")

    def train(size: int) -> np.ndarray:
        pick = np.sort(np.random.default_rng(seed).choice(n, size, replace=False))
        x = read_rows(X, 0, size, pick if rows is None else np.asarray(rows)[pick])
        return unit_rows(x) if normalize else np.ascontiguousarray(x)

    index, desc = KINDS[kind](int(X.shape[1]), n, metric, train)
    for _, x in blocks(X, rows, block, normalize):
        index.add(x)
    return index, desc


def search_batched(index, queries: np.ndarray, k: int, batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of the ``k`` best rows of ``index`` for each query, ``batch`` queries at a time."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(int(k), index.ntotal)
    scores, ids = [], []
    for lo in range(0, len(queries), batch):
        s, i = index.search(queries[lo:lo + batch], k)
        scores.append(s)
        ids.append(i.astype(np.int64))
    if not scores:
        return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
    return np.concatenate(scores), np.concatenate(ids)


def recall_at_k(index, vectors: np.ndarray, k: int, queries: int, seed: int = 0, metric: str = "ip") -> float:
    """Share of the exact top-k neighbours that ``index`` returns, with a seeded sample of ``vectors`` (the
    indexed rows, in order) as queries."""
    rng = np.random.default_rng(seed)
    q = np.asarray(vectors[np.sort(rng.choice(len(vectors), min(queries, len(vectors)), replace=False))],
                   dtype=np.float32)
    k = min(k, len(vectors))
    exact, _ = build_index(vectors, metric=metric, kind="flat")
    _, truth = search_batched(exact, q, k)
    _, approx = search_batched(index, q, k)
    return float(np.mean([len(set(a) & set(e)) / k for a, e in zip(approx, truth)]))


# --- the neighbour graph -----------------------------------------------------------------------------------------


class FaissNeighbors:
    """Cosine k-nearest neighbours by the policy's index, in the shape of ``sklearn.neighbors.NearestNeighbors``.

    ``fit(X, rows=None)`` indexes ``X`` (or ``X[rows]``; a memory map is read in blocks). ``kneighbors()`` (or
    ``kneighbors(X)`` with the very array fitted, as cleanlab calls it) gives every fitted row's neighbours other
    than itself, computed once; ``kneighbors(Q)`` with other rows searches them. Distances are ``1 - cosine``.
    """

    metric = "cosine"

    def __init__(self, n_neighbors: int = 10, block: int = 8192, seed: int = 0, progress=None):
        self.n_neighbors, self.block, self.seed, self.progress = n_neighbors, block, seed, progress

    def fit(self, X, rows: np.ndarray | None = None) -> FaissNeighbors:
        self.n_samples_fit_ = len(X) if rows is None else len(rows)
        self.index_, self.kind_ = build_index(X, rows, "ip", normalize=True, seed=self.seed, block=self.block)
        self._fit_X, self._rows, self.graph_ = X, rows, None
        return self

    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return search_batched(self.index_, x, min(k, self.n_samples_fit_))

    def self_graph(self) -> tuple[np.ndarray, np.ndarray]:
        """(cosine similarities, positions), each (n, k): every fitted row's k nearest other rows, best first;
        position -1 (similarity -inf) where fewer than k were found."""
        if self.graph_ is None:
            n, k = self.n_samples_fit_, self.n_neighbors
            sims = np.full((n, k), -np.inf, dtype=np.float32)
            ids = np.full((n, k), -1, dtype=np.int64)
            for lo, x in blocks(self._fit_X, self._rows, self.block):
                s, i = self._search(x, k + 1)
                own = i == np.arange(lo, lo + len(i))[:, None]
                # drop each row itself, or the last hit where the row is not among its own hits
                drop = np.where(own.any(axis=1), own.argmax(axis=1), i.shape[1] - 1)
                keep = np.ones_like(own)
                keep[np.arange(len(i)), drop] = False
                width = min(k, i.shape[1] - 1)
                sims[lo:lo + len(i), :width] = s[keep].reshape(len(i), -1)[:, :width]
                ids[lo:lo + len(i), :width] = i[keep].reshape(len(i), -1)[:, :width]
                if self.progress is not None:
                    self.progress.update(len(i))
            ids[~np.isfinite(sims) | (ids < 0)] = -1
            self.graph_ = (sims, ids)
        return self.graph_

    def kneighbors(self, X=None, n_neighbors: int | None = None, return_distance: bool = True):
        k = int(n_neighbors or self.n_neighbors)
        if X is None or X is self._fit_X:
            if k > self.n_neighbors:
                raise ValueError(f"n_neighbors={k} exceeds the {self.n_neighbors} of the fitted graph")
            sims, ids = self.self_graph()
            sims, ids = sims[:, :k], ids[:, :k]
        else:
            sims, ids = self._search(unit_rows(X), k)
        dist = np.clip(1.0 - sims, 0.0, 2.0).astype(np.float64)
        dist[ids < 0] = 2.0
        return (dist, ids) if return_distance else ids


# --- the saved search index ------------------------------------------------------------------------------------

#: ``search``'s index, saved beside the store it covers.
SAVED_DIR = "search_index"


def load_or_build(folder: Path, vectors, rows: np.ndarray, kind: str, recall_k: int, recall_queries: int,
                  meta_file: Path):
    """(faiss index of ``vectors[rows]`` at unit length, rows, info), saved in ``folder/search_index/`` and rebuilt
    when the store (``meta_file``'s content), ``kind`` or the policy changed. An approximate index reports its
    recall@``recall_k`` against exact search on ``recall_queries`` of the stored vectors."""
    import faiss

    out = Path(folder) / SAVED_DIR
    settings = {"kind": kind, "policy": POLICY, "store_meta_sha256": file_sha256(meta_file)}
    if (out / "index.json").is_file():
        info = json.loads((out / "index.json").read_text())
        if info.get("settings") == settings:
            return faiss.read_index(str(out / "index.faiss")), np.load(out / "rows.npy"), info
    if len(rows) == 0:
        raise UserError(f"no embedded rows in {folder}")
    t0 = time.perf_counter()
    unit = unit_rows(read_rows(vectors, 0, len(rows), rows))
    used = policy_kind(len(rows)) if kind == "auto" else kind
    index, desc = build_index(unit, kind=used, key="search.index")
    info = {"settings": settings, "kind": used, "index": desc, "n": int(len(rows)), "dim": int(unit.shape[1]),
            "build_s": round(time.perf_counter() - t0, 3)}
    if info["kind"] != "flat":
        info[f"recall_at_{recall_k}"] = recall_at_k(index, unit, recall_k, recall_queries)
        log.info(f"{desc} index: recall@{recall_k} against exact search = {info[f'recall_at_{recall_k}']:.4f} "
                 f"({recall_queries} stored vectors as queries)")
    out.mkdir(exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    np.save(out / "rows.npy", rows)
    atomic_write_json(out / "index.json", info)
    log.info(f"built a {desc} index of {len(rows)} vectors in {info['build_s']:.2f} s -> {out}")
    return index, rows, info
