"""Copies of a pin on several boards (repins): exact copies by content digest, near copies (re-encoded, resized,
cropped) by embedding similarity verified on the pixels, and the two ways a split keeps them on one side. One
implementation (``find_copies``) serves ``train`` and ``audit``.

Near-copy candidates come from a k-nearest-neighbour search with faiss over L2-normalised embeddings, in blocks, so
a million pins need k x N similarities, never an N x N matrix. The threshold is the store's own, calibrated by
``extract`` on synthetic copies of its pins (``embed.calibration``), or one the user gives. Each candidate pair is
then verified on its two files (``data.pixel_match``): only candidates' files are read. Pins joined by an exact or
a verified near copy form a duplicate group (connected components).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.metadata import StoreMeta, read_calibration
from pinterest_cls.data.pixel_match import ScoreCache
from pinterest_cls.neighbors.faiss_index import FaissNeighbors

#: ``repins.threshold``: the store's calibrated threshold, or exact copies only.
AUTO, OFF = "auto", "off"
#: The policy's source where ``threshold: auto`` finds no calibration of the store.
NOT_CALIBRATED = "store not calibrated"


@dataclass(frozen=True)
class CopyPolicy:
    """How near copies are found: above ``threshold`` (embedding cosine; None: exact copies only) among ``k``
    neighbours, verified on the pixels at ``min_score`` when ``verify``. ``source``: ``calibrated`` (the store's
    own), ``given`` (the user's), ``off``, or why there is none (``not calibrated``)."""

    threshold: float | None
    source: str
    verify: bool
    min_score: float
    k: int
    calibration: dict = field(default_factory=dict, compare=False)

    @property
    def checks_pixels(self) -> bool:
        """Whether near candidates are looked for and verified on their files (what a progress bar counts)."""
        return self.threshold is not None and self.verify

    def describe(self) -> str:
        """What a run's protocol says of it: ``exact``, ``exact + near calibrated, verified``, ``exact + near >= 0.95
        given, verified`` (the calibrated value is the backbone's, so it is a param, not part of the protocol)."""
        if self.threshold is None:
            return "exact" if self.source == OFF else f"exact ({self.source})"
        near = "near calibrated" if self.source == "calibrated" else f"near >= {self.threshold:g} given"
        return f"exact + {near}, {'verified' if self.verify else 'unverified'}"

    def params(self) -> dict:
        """What a run records of it."""
        out = {"repins_threshold": self.threshold, "repins_threshold_source": self.source,
               "repins_verify": self.verify, "repins_min_pixel_score": self.min_score if self.verify else None}
        for key in ("recall_verified", "false_pair_rate", "false_pair_rate_verified"):
            if key in self.calibration:
                value = self.calibration[key]
                out.update({f"repins_calibration_{key}_{k}": v for k, v in value.items()} if isinstance(value, dict)
                           else {f"repins_calibration_{key}": value})
        return out


def copy_policy(repins, folder: Path | None = None, meta: StoreMeta | None = None) -> CopyPolicy:
    """The policy the ``repins`` config node asks for on the store at ``folder``: ``threshold: auto`` takes the
    store's calibration (exact copies only, said so, where it has none), a number is used as given, ``off``
    leaves near copies out."""
    t = repins.threshold
    verify, min_score, k = bool(repins.verify), float(repins.min_pixel_score), int(repins.k)
    if t is None or str(t).lower() in (OFF, "null", "none", "false"):
        return CopyPolicy(None, OFF, verify, min_score, k)
    if str(t).lower() == AUTO:
        found = read_calibration(folder, meta) if folder is not None and meta is not None else None
        if found is None:
            return CopyPolicy(None, NOT_CALIBRATED, verify, min_score, k)
        return CopyPolicy(float(found["threshold"]), "calibrated", verify, min_score, k, found)
    try:
        value = float(t)
    except (TypeError, ValueError):
        raise UserError(f"repins.threshold={t!r} must be auto (the store's calibration), off, or a cosine "
                        "similarity such as 0.95") from None
    if not -1 <= value <= 1:
        raise UserError(f"repins.threshold={value:g} must be a cosine similarity between -1 and 1")
    return CopyPolicy(value, "given", verify, min_score, k)


def calibration_note(folder: Path, meta: StoreMeta, backbone: str) -> str:
    """Why ``threshold: auto`` found no calibration of the store in ``folder``, and what to do."""
    if str(meta.weights or "").startswith("random"):
        return (f"note: {folder} holds features of random weights, which are not calibrated: exact copies only "
                "(repins.threshold=<cosine> looks for near copies anyway)")
    return (f"note: {folder} has no near-copy calibration of its embeddings: exact copies only. Calibrate it once "
            f"with python -m pinterest_cls.extract backbone={backbone} (a complete store is not embedded again), "
            "or give repins.threshold=<cosine>")


def possible_descriptions(repins) -> list[str]:
    """What a run with the ``repins`` settings records of its copies (``CopyPolicy.describe``), whatever the store:
    with ``threshold: auto``, on a calibrated store and on one that is not, in that order."""
    wanted = copy_policy(repins)
    if wanted.source != NOT_CALIBRATED:
        return [wanted.describe()]
    calibrated = CopyPolicy(1.0, "calibrated", wanted.verify, wanted.min_score, wanted.k)
    return [calibrated.describe(), wanted.describe()]


def pairs_from_graph(sims: np.ndarray, ids: np.ndarray, threshold: float) -> pd.DataFrame:
    """Pairs of rows (``a < b``) joined in a k-nearest-neighbour graph (``FaissNeighbors.self_graph``) with cosine
    similarity at least ``threshold``: columns ``a, b, similarity``, most similar first."""
    rows = np.arange(len(ids))[:, None].repeat(ids.shape[1], axis=1)
    keep = (sims >= threshold) & (ids >= 0)
    a, b = np.minimum(rows[keep], ids[keep]), np.maximum(rows[keep], ids[keep])
    pairs = pd.DataFrame({"a": a, "b": b, "similarity": sims[keep]})
    return pairs.sort_values("similarity", ascending=False).drop_duplicates(["a", "b"]).reset_index(drop=True)


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


def find_copies(digests, paths, policy: CopyPolicy, vectors=None, rows: np.ndarray | None = None,
                graph: tuple[np.ndarray, np.ndarray] | None = None, progress=None,
                cache: ScoreCache | None = None) -> pd.DataFrame:
    """Duplicate groups of ``n`` pins by ``policy``: exact copies by their ``digests``; near copies among each pin's
    ``policy.k`` neighbours at cosine >= ``policy.threshold`` (the k-NN ``graph`` given, or searched in
    ``vectors[rows]``), verified on their files ``paths`` when ``policy.verify``. One row per pin (``group``,
    ``kind``); ``attrs``: ``pairs`` (the edges: a, b, kind, similarity, pixel_score), ``candidates`` and
    ``rejected`` (near candidates, and those the pixels refused). ``cache``: pixel scores kept by the files'
    digests (``data.pixel_match.ScoreCache``)."""
    n = len(digests)
    near = pd.DataFrame(columns=["a", "b", "similarity", "pixel_score"])
    candidates = rejected = 0
    if policy.threshold is not None and n > 1:
        if graph is None:
            graph = FaissNeighbors(min(policy.k, n - 1)).fit(vectors, rows).self_graph()
        cand = pairs_from_graph(*graph, policy.threshold)
        d = np.asarray(digests, dtype=object)
        same = pd.notna(d[cand["a"]]) & (d[cand["a"]] == d[cand["b"]])
        cand = cand[~same].reset_index(drop=True)  # exact copies need no look at their pixels
        candidates = len(cand)
        if policy.verify and candidates:
            if progress is not None:
                progress.reset(total=candidates)
            p, a, b = np.asarray(paths, dtype=object), cand["a"].to_numpy(), cand["b"].to_numpy()
            cand["pixel_score"] = (cache or ScoreCache(None)).scores(p[a], p[b], d[a], d[b], policy.min_score,
                                                                     progress)
            kept = cand["pixel_score"] >= policy.min_score
            rejected, cand = int((~kept).sum()), cand[kept].reset_index(drop=True)
        near = cand
    found = duplicate_groups(digests, near)
    found.attrs.update(candidates=candidates, rejected=rejected)
    return found


def duplicate_groups(digests, near: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per pin: ``group`` (-1 for a pin with no copy; else an id shared by its copies), ``kind``
    (``exact``: it has a byte-identical copy; ``near``: only near copies; ``""``), and the edges behind them
    (``pairs``, in ``DataFrame.attrs``): the exact pairs of equal ``digests`` and the ``near`` pairs given."""
    n = len(digests)
    exact = exact_pairs(digests)
    if near is None:
        near = pd.DataFrame(columns=["a", "b", "similarity"])
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
