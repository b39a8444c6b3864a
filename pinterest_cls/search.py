"""``python -m pinterest_cls.search query=IMAGE k=10 backbone=NAME``: the pins most similar to an image (or to a
pin of the manifest) by cosine similarity over a backbone's stored embeddings.

The faiss index is built once and saved beside the embeddings (``search_index/``): exact (flat inner product)
up to ``search.exact_max`` vectors, IVF or HNSW beyond (``search.index``), with its recall@k against exact
search measured on a sample of stored vectors and reported.
"""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from . import config
from .cli import verb_main
from .errors import UserError
from .index import load_or_build, query_vector
from .neighbors import unit_rows
from .plots import contact_sheet
from .store import open_store


def search(cfg: DictConfig) -> pd.DataFrame:
    k = int(cfg.k)
    if k < 1:
        raise UserError(f"k={k} must be >= 1")
    emb, index_df, meta, folder = open_store(cfg)
    vec, desc, query_row = query_vector(cfg, emb, index_df, meta)  # a bad query fails before any index or model
    index, rows, info = load_or_build(folder, emb, index_df, cfg)
    scores, ids = index.search(unit_rows(vec), min(len(rows), k + (query_row is not None)))
    found = [(float(s), int(rows[i])) for s, i in zip(scores[0], ids[0]) if i >= 0 and rows[i] != query_row][:k]
    by_row = index_df.set_index("row")
    hits = pd.DataFrame([{"rank": r + 1, "score": s, **{c: by_row.at[row, c] for c in
                                                       ("user", "board", "pin", "category", "path")}}
                         for r, (s, row) in enumerate(found)])
    out = config.job_output_dir()
    hits.to_csv(out / "neighbors.csv", index=False)
    query_path = str(cfg.query) if cfg.query is not None else str(by_row.at[query_row, "path"])
    query_label = "" if query_row is None else f"{by_row.at[query_row, 'pin']}\n{by_row.at[query_row, 'category']}"
    contact_sheet(query_path, hits, out / "contact_sheet.png", query_label=query_label)
    print(f"{k} nearest pins to {desc} ({info['kind']} index over {info['n']} {cfg.backbone.name} embeddings):")
    print(hits.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out / 'neighbors.csv'} and {out / 'contact_sheet.png'}", flush=True)
    return hits


@verb_main("search")
def main(cfg: DictConfig) -> None:
    search(cfg)


if __name__ == "__main__":
    main()
