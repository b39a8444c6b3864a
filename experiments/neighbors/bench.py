"""The package's one faiss policy (``pinterest_cls.neighbors.faiss_index``) measured on generated stores.

    python experiments/neighbors/bench.py [--sizes 100000 1000000] [--dim 1280] [--queries 1000]
        [--nprobes 4 8 16 32 64] [--folder /tmp/neighbors_bench] [--out experiments/neighbors/results/policy.csv]

For each size, a float16 ``embeddings.npy`` is written as ``extract`` writes one, with generated unit-length rows:
250-pin boards of 20 categories, each pin a category centre plus a board style plus noise, and 0.5 % near copies
(cosine about 0.997) of other pins. Then, side by side in one run:

- the exact index (flat inner product): build time, and the time of ``--queries`` seeded queries (k=10), whose
  results are the truth;
- the policy's index (``build_index(kind="auto")``, an inverted file of 8-bit codes above 20,000 rows): build time
  (training and adding, read block by block from the memory map), its size, and for each ``--nprobes`` value the
  same queries' time and recall@10 against the exact results (the policy's own value is marked);
- the neighbour graph of the audit and of repins (``FaissNeighbors``, k=10) on ``--graph`` rows of the store as
  queries: time per 1,000 rows, and the planted near copies it finds at cosine >= 0.95.

Ratios (policy / exact) are printed beside each row.
"""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import numpy as np

from pinterest_cls.neighbors import faiss_index
from pinterest_cls.neighbors.faiss_index import FaissNeighbors, build_index, search_batched

BOARD = 250


def write_vectors(path: Path, n: int, dim: int, categories: int = 20, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A float16 (n, dim) memory-mapped array of generated unit rows; returns (near-copy rows, their originals)."""
    rng = np.random.default_rng(seed)
    n_boards = -(-n // BOARD)
    centres = rng.standard_normal((categories, dim)).astype(np.float32)
    styles = rng.standard_normal((n_boards, dim)).astype(np.float32) * 0.6
    board = np.repeat(np.arange(n_boards), BOARD)[:n]
    arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=(n, dim))
    for lo in range(0, n, 65536):
        hi = min(n, lo + 65536)
        x = centres[board[lo:hi] % categories] + styles[board[lo:hi]]
        x += rng.standard_normal((hi - lo, dim), np.float32) * 1.2
        arr[lo:hi] = x / np.linalg.norm(x, axis=1, keepdims=True)
    copies = rng.choice(n, n // 200, replace=False)
    originals = rng.choice(np.setdiff1d(np.arange(n), copies), len(copies), replace=False)
    for c, o in zip(copies, originals):
        x = arr[o].astype(np.float32) + rng.standard_normal(dim).astype(np.float32) * 0.002
        arr[c] = x / np.linalg.norm(x)
    arr.flush()
    return copies, originals


def index_bytes(index) -> int:
    import faiss

    return int(faiss.serialize_index(index).size)


def measure(n: int, dim: int, folder: Path, queries: int, nprobes: list[int], graph: int) -> list[dict]:
    path = folder / f"embeddings_{n}x{dim}.npy"
    copies, originals = write_vectors(path, n, dim)
    X = np.load(path, mmap_mode="r")
    q_rows = np.sort(np.random.default_rng(1).choice(n, queries, replace=False))
    Q = np.asarray(X[q_rows], dtype=np.float32)
    rows = []

    t0 = time.perf_counter()
    exact, _ = build_index(X, kind="flat")
    exact_build = time.perf_counter() - t0
    t0 = time.perf_counter()
    _, truth = search_batched(exact, Q, 10)
    exact_query = time.perf_counter() - t0
    exact_size = index_bytes(exact)
    del exact
    rows.append({"pins": n, "dim": dim, "index": "flat (exact)", "nprobe": "", "build_s": round(exact_build, 2),
                 "index_gb": round(exact_size / 1e9, 3),
                 "query_ms_per_1000": round(1000 * exact_query / queries * 1000, 1),
                 "recall_at_10": 1.0, "policy": "yes" if faiss_index.policy_kind(n) == "flat" else ""})

    t0 = time.perf_counter()
    index, desc = build_index(X, kind="ivf")
    build = time.perf_counter() - t0
    size = index_bytes(index)
    for nprobe in nprobes:
        index.nprobe = nprobe
        t0 = time.perf_counter()
        _, got = search_batched(index, Q, 10)
        took = time.perf_counter() - t0
        recall = float(np.mean([len(set(a) & set(e)) / 10 for a, e in zip(got, truth)]))
        rows.append({"pins": n, "dim": dim, "index": desc.split(" ")[0], "nprobe": nprobe, "build_s": round(build, 2),
                     "index_gb": round(size / 1e9, 3), "query_ms_per_1000": round(1000 * took / queries * 1000, 1),
                     "recall_at_10": round(recall, 4),
                     "policy": "yes" if nprobe == faiss_index.NPROBE and faiss_index.policy_kind(n) == "ivf" else ""})
    del index

    # the neighbour graph of audit and repins, over the first `graph` rows as queries (the whole store indexed)
    t0 = time.perf_counter()
    nn = FaissNeighbors(10).fit(X)
    fit = time.perf_counter() - t0
    sub = np.arange(min(graph, n))
    t0 = time.perf_counter()
    sims, ids = nn._search(faiss_index.unit_rows(np.asarray(X[sub], dtype=np.float32)), 11)
    took = time.perf_counter() - t0
    planted = {(int(c), int(o)) for c, o in zip(copies, originals) if c < len(sub)}
    found = sum(1 for c, o in planted if any(int(j) == o and s >= 0.95 for s, j in zip(sims[c], ids[c])))
    rows.append({"pins": n, "dim": dim, "index": f"graph: {nn.kind_}", "nprobe": faiss_index.NPROBE,
                 "build_s": round(fit, 2), "index_gb": "", "query_ms_per_1000": round(1000 * took / len(sub) * 1000, 1),
                 "recall_at_10": "", "policy": "yes", "near_copies_found": f"{found}/{len(planted)}"})
    path.unlink()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--graph", type=int, default=20_000, help="rows of the store searched as the graph's queries")
    ap.add_argument("--nprobes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    ap.add_argument("--folder", type=Path, default=Path("/tmp/neighbors_bench"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "policy.csv")
    args = ap.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in args.sizes:
        measured = measure(n, args.dim, args.folder, args.queries, args.nprobes, args.graph)
        exact = measured[0]
        for r in measured:
            r["query_vs_exact"] = (round(r["query_ms_per_1000"] / exact["query_ms_per_1000"], 3)
                                   if exact["query_ms_per_1000"] else "")
            print(r, flush=True)
        rows += measured
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["pins", "dim", "index", "nprobe", "policy", "build_s", "index_gb", "query_ms_per_1000", "query_vs_exact",
              "recall_at_10", "near_copies_found"]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
