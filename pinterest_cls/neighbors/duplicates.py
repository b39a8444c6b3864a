"""Copies of a pin on several boards (repins): exact copies by content digest, near copies (re-encoded,
resized, lightly cropped) by embedding similarity, and the two ways a split keeps them on one side.

Near copies come from a k-nearest-neighbour search with faiss over L2-normalised embeddings, in blocks, so a
million pins need k x N similarities, never an N x N matrix. Pins joined by an exact or a near copy form a
duplicate group (connected components).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pinterest_cls.neighbors.faiss_index import FaissNeighbors


def pairs_from_graph(sims: np.ndarray, ids: np.ndarray, threshold: float) -> pd.DataFrame:
    """Pairs of rows (``a < b``) joined in a k-nearest-neighbour graph (``FaissNeighbors.self_graph``) with cosine
    similarity at least ``threshold``: columns ``a, b, similarity``, most similar first."""
    rows = np.arange(len(ids))[:, None].repeat(ids.shape[1], axis=1)
    keep = (sims >= threshold) & (ids >= 0)
    a, b = np.minimum(rows[keep], ids[keep]), np.maximum(rows[keep], ids[keep])
    pairs = pd.DataFrame({"a": a, "b": b, "similarity": sims[keep]})
    return pairs.sort_values("similarity", ascending=False).drop_duplicates(["a", "b"]).reset_index(drop=True)


def near_pairs(emb: np.ndarray, threshold: float, k: int = 10, block: int = 8192) -> pd.DataFrame:
    """Pairs of rows (``a < b``) whose cosine similarity is at least ``threshold``, among each row's ``k``
    nearest neighbours (the policy's index: exact up to ``faiss_index.EXACT_MAX`` rows): columns ``a, b,
    similarity``."""
    nn = FaissNeighbors(k, block=block).fit(emb)
    return pairs_from_graph(*nn.self_graph(), threshold)


def exact_pairs(digests) -> pd.DataFrame:
    """Pairs of rows with the same content digest (each row to the first of its digest): columns ``a, b``.
    Missing digests pair with nothing."""
    d = pd.Series(np.asarray(digests, dtype=object))
    d = d[d.notna() & (d != "")]
    first = d.groupby(d).transform(lambda s: s.index[0])
    mask = first.index != first.to_numpy()
    return pd.DataFrame({"a": first[mask].to_numpy().astype(np.int64), "b": first.index[mask].to_numpy()})


def components(n: int, pairs: pd.DataFrame) -> np.ndarray:
    """Connected component of each of ``n`` nodes under the edges ``pairs`` (columns a, b)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    a, b = pairs["a"].to_numpy(np.int64), pairs["b"].to_numpy(np.int64)
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def duplicate_groups(digests, emb: np.ndarray | None, threshold: float | None, k: int = 10,
                     near: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pin: ``group`` (-1 for a pin with no copy; else an id shared by its copies), ``kind``
    (``exact``: it has a byte-identical copy; ``near``: only copies found by similarity; ``""``), and the
    edges behind them (``pairs``, in ``DataFrame.attrs``). Near pairs are searched in ``emb`` unless given."""
    n = len(digests)
    exact = exact_pairs(digests)
    if near is None:
        near = near_pairs(emb, threshold, k) if emb is not None and threshold is not None and n > 1 else \
            pd.DataFrame(columns=["a", "b", "similarity"])
    edges = pd.concat([exact.assign(kind="exact"), near.assign(kind="near")], ignore_index=True)
    comp = components(n, edges)
    sizes = np.bincount(comp, minlength=n)
    group = np.where(sizes[comp] > 1, comp, -1)
    kind = np.full(n, "", dtype=object)
    kind[group >= 0] = "near"
    in_exact = np.unique(np.concatenate([exact["a"].to_numpy(), exact["b"].to_numpy()])).astype(np.int64)
    kind[in_exact] = "exact"
    out = pd.DataFrame({"group": group, "kind": kind})
    out.attrs["pairs"] = edges
    return out


def link_boards(boards: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Per pin, the id of its linked board group: boards that share a duplicate group are joined (connected
    components over boards), so a split of whole linked groups keeps every copy on one side."""
    board_ids, board_of = np.unique(boards, return_inverse=True)
    has = groups >= 0
    frame = pd.DataFrame({"board": board_of[has], "group": groups[has]})
    first = frame.groupby("group")["board"].transform("first")
    edges = pd.DataFrame({"a": first.to_numpy(), "b": frame["board"].to_numpy()})
    comp = components(len(board_ids), edges[edges["a"] != edges["b"]])
    return comp[board_of]


def leaked(train: np.ndarray, test: np.ndarray, groups: np.ndarray) -> int:
    """Test pins with a copy (same duplicate group) on the training side."""
    trained = np.unique(groups[train][groups[train] >= 0])
    return int(np.isin(groups[test], trained).sum())


def drop_train_copies(train: np.ndarray, test: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(training positions kept, training positions dropped): a training pin is dropped when a copy of it (same
    duplicate group) is on the test side."""
    tested = np.unique(groups[test][groups[test] >= 0])
    dropped = np.isin(groups[train], tested) & (groups[train] >= 0)
    return train[~dropped], train[dropped]


def keep_one(positions: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(positions kept, positions dropped): of each duplicate group among ``positions``, only its first pin (in the
    order given) is kept; pins without copies (group -1) are all kept."""
    g = groups[positions]
    first = ~pd.Series(g).duplicated().to_numpy() | (g < 0)
    return positions[first], positions[~first]
