"""``python -m pinterest_cls.search query=IMAGE k=10 backbone=NAME``: the pins most similar to an image (or to a
pin of the manifest) by cosine similarity over a backbone's stored embeddings.

The faiss index is built once by the package's index policy and saved beside the embeddings (``search_index/``):
exact up to ``neighbors.faiss_index.EXACT_MAX`` vectors, an inverted file beyond (or ``search.index=flat|ivf|
hnsw``), with its recall@k against exact search measured on a sample of stored vectors and reported.
"""

from __future__ import annotations

import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.metadata import META
from pinterest_cls.data.store import store_for
from pinterest_cls.embed.embedder import embed_file
from pinterest_cls.embed.quantization import INT8_DIR
from pinterest_cls.neighbors.faiss_index import load_or_build, search_batched, unit_rows
from pinterest_cls.track.plots import contact_sheet


def search(cfg: DictConfig) -> pd.DataFrame:
    """The ``k`` nearest pins of ``query`` (an image file) or ``pin`` (a stored pin); written to
    ``neighbors.csv`` and ``contact_sheet.png`` in the job folder."""
    k = int(cfg.k)
    if k < 1:
        raise UserError(f"k={k} must be >= 1")
    if (cfg.query is None) == (cfg.pin is None):
        raise UserError("give exactly one of query=IMAGE (an image file) or pin=USER/BOARD/PIN (a pin of the manifest)")
    store = store_for(cfg)
    by_row = store.pins.set_index("row")
    if cfg.pin is not None:
        query_row = store.find_pin(str(cfg.pin))
        vec = store.vectors_of(by_row.loc[[query_row]].reset_index())
        desc = f"pin {cfg.pin} ({by_row.at[query_row, 'path']})"
    else:  # a bad query fails before any index or model
        query_row, desc = None, str(cfg.query)
        vec = embed_file(store.meta, str(cfg.query), int8_dir=store.folder / INT8_DIR)
    s = cfg.search
    rows = store.embedded()["row"].to_numpy()
    index, rows, info = load_or_build(store.folder, store.vectors, rows, str(s.index), int(s.recall_k),
                                      int(s.recall_queries), store.folder / META)
    scores, ids = search_batched(index, unit_rows(vec), min(len(rows), k + (query_row is not None)))
    found = [(float(v), int(rows[i])) for v, i in zip(scores[0], ids[0]) if i >= 0 and rows[i] != query_row][:k]
    hits = pd.DataFrame([{"rank": r + 1, "score": v, **{c: by_row.at[row, c] for c in
                                                       ("user", "board", "pin", "category", "path")}}
                         for r, (v, row) in enumerate(found)])
    out = config.job_output_dir()
    hits.to_csv(out / "neighbors.csv", index=False)
    query_path = str(cfg.query) if cfg.query is not None else str(by_row.at[query_row, "path"])
    query_label = "" if query_row is None else f"{by_row.at[query_row, 'pin']}\n{by_row.at[query_row, 'category']}"
    contact_sheet(query_path, hits, out / "contact_sheet.png", query_label=query_label)
    print(f"{k} nearest pins to {desc} ({info['index']} index over {info['n']} {cfg.backbone.name} embeddings):")
    print(hits.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"wrote {out / 'neighbors.csv'} and {out / 'contact_sheet.png'}", flush=True)
    return hits


@verb_main("search")
def main(cfg: DictConfig) -> None:
    search(cfg)


if __name__ == "__main__":
    main()
