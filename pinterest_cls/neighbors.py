"""k-nearest-neighbour graphs over stored embeddings with faiss, read block by block from a memory map.

:class:`FaissNeighbors` answers like scikit-learn's ``NearestNeighbors`` (``n_neighbors``, ``metric``,
``kneighbors``) so that libraries that take a fitted neighbour object (cleanlab's outlier scores) use a faiss graph
instead of building their own. Cosine distances over L2-normalised rows: exact (``IndexFlatIP``) up to
``exact_max`` rows, else an inverted file with 8-bit scalar quantisation (``IndexIVFScalarQuantizer``), which
holds a million 1280-d rows in 1.3 GB; no N x N matrix is ever built.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator

import numpy as np


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


def blocks(X, rows: np.ndarray | None = None, block: int = 8192) -> Iterator[tuple[int, np.ndarray]]:
    """(first position, unit-length float32 rows) of ``X`` (or ``X[rows]``), ``block`` rows at a time."""
    n = len(X) if rows is None else len(rows)
    for lo in range(0, n, block):
        yield lo, unit_rows(read_rows(X, lo, min(n, lo + block), rows))


class FaissNeighbors:
    """Cosine k-nearest neighbours with faiss, in the shape of ``sklearn.neighbors.NearestNeighbors``.

    ``fit(X, rows=None)`` indexes ``X`` (or ``X[rows]``; a memory map is read in blocks). ``kneighbors()`` (or
    ``kneighbors(X)`` with the very array fitted, as cleanlab calls it) gives every fitted row's neighbours other
    than itself, computed once; ``kneighbors(Q)`` with other rows searches them. Distances are ``1 - cosine``.
    """

    metric = "cosine"

    def __init__(self, n_neighbors: int = 10, exact_max: int = 20000, nprobe: int = 8, block: int = 8192,
                 seed: int = 0, progress=None):
        self.n_neighbors, self.exact_max, self.nprobe = n_neighbors, exact_max, nprobe
        self.block, self.seed, self.progress = block, seed, progress

    def _build(self, X, rows, n: int, d: int):
        import faiss

        if n <= self.exact_max:
            return faiss.IndexFlatIP(d), "flat"
        nlist = int(min(4 * np.sqrt(n), n // 8))
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, nlist, faiss.ScalarQuantizer.QT_8bit,
                                              faiss.METRIC_INNER_PRODUCT)
        index.cp.min_points_per_centroid = 8  # a sample of 32 points per list trains it; no faiss warning
        pick = np.sort(np.random.default_rng(self.seed).choice(n, min(n, 32 * nlist), replace=False))
        index.train(unit_rows(read_rows(X, 0, len(pick), pick if rows is None else np.asarray(rows)[pick])))
        index.nprobe = min(nlist, self.nprobe)
        return index, f"ivf{nlist}-sq8 nprobe={index.nprobe}"

    def fit(self, X, rows: np.ndarray | None = None) -> FaissNeighbors:
        n = len(X) if rows is None else len(rows)
        self.n_samples_fit_, d = n, X.shape[1]
        self.index_, self.kind_ = self._build(X, rows, n, d)
        for _, x in blocks(X, rows, self.block):
            self.index_.add(x)
        self._fit_X, self._rows, self.graph_ = X, rows, None
        return self

    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        sims, ids = self.index_.search(x, min(k, self.n_samples_fit_))
        return sims, ids.astype(np.int64)

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
