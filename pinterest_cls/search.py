"""``python -m pinterest_cls.search query=IMAGE k=10 backbone=NAME``: the pins most similar to an image (or to a
pin of the manifest) by cosine similarity over a backbone's stored embeddings.

The faiss index is built once and saved beside the embeddings (``search_index/``): exact (flat inner product)
up to ``search.exact_max`` vectors, IVF or HNSW beyond (``search.index``), with its recall@k against exact
search measured on a sample of stored vectors and reported.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
import numpy as np
import pandas as pd
from omegaconf import DictConfig

from . import config
from .catalog import file_sha256
from .errors import UserError, user_errors_exit
from .store import META

INDEX_DIR = "search_index"


def _normalized(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


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
    vectors = _normalized(emb[rows])
    index, kind = build_index(vectors, str(s.index), int(s.exact_max))
    info = {"settings": settings, "kind": kind, "n": int(len(rows)), "dim": int(vectors.shape[1]),
            "build_s": round(time.perf_counter() - t0, 3)}
    if kind != "flat":
        k = int(s.recall_k)
        info[f"recall_at_{k}"] = recall_at_k(index, vectors, k, int(s.recall_queries))
        print(f"{kind} index: recall@{k} against exact search = {info[f'recall_at_{k}']:.4f} "
              f"({s.recall_queries} stored vectors as queries)", flush=True)
    out.mkdir(exist_ok=True)
    faiss.write_index(index, str(out / "index.faiss"))
    np.save(out / "rows.npy", rows)
    (out / "index.json").write_text(json.dumps(info, indent=2))
    print(f"built a {kind} index of {len(rows)} vectors in {info['build_s']:.2f} s -> {out}", flush=True)
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
    from .extract import backbone_from_meta, embed_paths

    backbone = backbone_from_meta(meta)
    vec, reasons = embed_paths(backbone, [str(path)], batch_size=1, workers=0,
                               amp=meta.get("extract", {}).get("amp", "auto"),
                               draft=meta.get("extract", {}).get("draft", True), dtype=meta.get("dtype"))
    if reasons[0]:
        raise UserError(f"query={q} is not an image ({reasons[0]})")
    return vec, str(path), None


def contact_sheet(query_path: str, hits: pd.DataFrame, path: Path, thumb: int = 160) -> Path:
    """The query and its neighbours side by side, with rank, score and category."""
    from PIL import Image, ImageDraw

    from .images import ImageDecodeError, load_rgb

    tiles = [(query_path, "query")] + [(r.path, f"#{r.rank} {r.score:.3f}\n{r.category}") for r in hits.itertuples()]
    cols = min(len(tiles), 6)
    rows = -(-len(tiles) // cols)
    sheet = Image.new("RGB", (cols * (thumb + 8) + 8, rows * (thumb + 40) + 8), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (p, label) in enumerate(tiles):
        x, y = 8 + (i % cols) * (thumb + 8), 8 + (i // cols) * (thumb + 40)
        try:
            im = load_rgb(p, min_size=thumb)
            im.thumbnail((thumb, thumb))
            sheet.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except ImageDecodeError:
            draw.rectangle([x, y, x + thumb, y + thumb], outline="red")
        draw.text((x, y + thumb + 2), label, fill="black")
    sheet.save(path)
    return path


def search(cfg: DictConfig) -> pd.DataFrame:
    from .train import open_store

    emb, index_df, meta, folder = open_store(cfg)
    index, rows, info = load_or_build(folder, emb, index_df, cfg)
    vec, desc, query_row = query_vector(cfg, emb, index_df, meta)
    k = int(cfg.k)
    if k < 1:
        raise UserError(f"k={k} must be >= 1")
    scores, ids = index.search(_normalized(vec), min(len(rows), k + (query_row is not None)))
    found = [(float(s), int(rows[i])) for s, i in zip(scores[0], ids[0]) if i >= 0 and rows[i] != query_row][:k]
    by_row = index_df.set_index("row")
    hits = pd.DataFrame([{"rank": r + 1, "score": s, **{c: by_row.at[row, c] for c in
                                                       ("user", "board", "pin", "category", "path")}}
                         for r, (s, row) in enumerate(found)])
    out = config.job_output_dir()
    hits.to_csv(out / "neighbors.csv", index=False)
    query_path = str(cfg.query) if cfg.query is not None else str(by_row.at[query_row, "path"])
    contact_sheet(query_path, hits, out / "contact_sheet.png")
    print(f"{k} nearest pins to {desc} ({info['kind']} index over {info['n']} {cfg.backbone.name} embeddings):")
    print(hits.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out / 'neighbors.csv'} and {out / 'contact_sheet.png'}", flush=True)
    return hits


@hydra.main(config_path=config.CONF_DIR, config_name="search", version_base="1.3")
@user_errors_exit
def main(cfg: DictConfig) -> None:
    search(cfg)


if __name__ == "__main__":
    main()
