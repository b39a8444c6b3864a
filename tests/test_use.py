"""cluster, search, predict and the served pyfunc model, on tiny-model embeddings of the demo export."""

import base64
import json
import logging
import urllib.request
import warnings

import joblib
import mlflow
import numpy as np
import pandas as pd
import pytest

from pinterest_cls.cluster import cluster
from pinterest_cls.core.errors import UserError
from pinterest_cls.extract import extract
from pinterest_cls.predict import predict
from pinterest_cls.search import search
from pinterest_cls.train import train

from .helpers import TINY, free_port, make_cfg, read_store, run_verb, serving


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo export embedded (fp32, no AMP) and one train run logged to a real SQLite store."""
    work = tmp_path_factory.mktemp("use") / "work"
    extract(make_cfg("extract", [f"paths.work={work}", *TINY, "extract.amp=off", "store.dtype=float32",
                                 "extract.workers=0", "mlflow.enabled=false"]), progress=False)
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logging.getLogger("mlflow").addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = train(make_cfg("train", [f"paths.work={work}", *TINY, "classifier=logreg",
                                              "classifier.grid.C=[10]", "split=stratified", "train.n_jobs=1"]))
    finally:
        logging.getLogger("mlflow").removeHandler(handler)
    hidden = (DeprecationWarning, PendingDeprecationWarning)  # Python shows users neither by default
    result["mlflow_warnings"] = [r.getMessage() for r in records] + [
        str(w.message) for w in caught if "mlflow" in w.filename and not issubclass(w.category, hidden)]
    return work, result


def cfg(verb, work, *extra):
    return make_cfg(verb, [f"paths.work={work}", *TINY, *extra])


def test_cluster(trained):
    work, _ = trained
    r = cluster(cfg("cluster", work, "cluster.projection=pca"))
    m = r["metrics"]
    assert {"nmi", "ari", "homogeneity", "completeness", "purity", "silhouette", "objective"} <= set(m)
    assert 0 <= m["nmi"] <= 1 and -1 <= m["ari"] <= 1 and 0.25 <= m["purity"] <= 1
    comp = r["composition"]
    assert comp.shape == (4, 4) and comp.to_numpy().sum() == 147  # k defaults to the number of categories
    km = joblib.load(r["model_dir"] / "kmeans.joblib")
    emb, index, _ = read_store(work / "demo" / "embeddings" / "test_efficientnet")
    from sklearn.preprocessing import normalize

    assigned = pd.read_parquet(r["model_dir"] / "assignments.parquet")
    new = km.predict(normalize(np.asarray(emb[assigned["row"].to_numpy()])))  # assigning (new) embeddings
    assert (new == assigned["cluster"].to_numpy()).all()
    assert np.load(r["model_dir"] / "centroids.npy").shape == (4, emb.shape[1])
    for f in ("projection_by_cluster.png", "projection_by_category.png", "composition.csv"):
        assert (r["output_dir"] / f).stat().st_size > 0
    run = mlflow.get_run(r["run_id"])
    assert run.data.metrics["nmi"] == pytest.approx(m["nmi"]) and run.data.params["k"] == "4"
    tsne = cluster(cfg("cluster", work, "cluster.k=3", "mlflow.enabled=false"))
    assert tsne["composition"].shape[0] == 3


def test_search_by_image_and_by_pin(trained, tmp_path):
    work, _ = trained
    _, index, _ = read_store(work / "demo" / "embeddings" / "test_efficientnet")
    pin_path = index.loc[10, "path"]
    hits = search(cfg("search", work, f"query={pin_path}", "k=5"))
    assert len(hits) == 5 and list(hits["rank"]) == [1, 2, 3, 4, 5]
    assert hits.loc[0, "path"] == pin_path and hits.loc[0, "score"] == pytest.approx(1.0, abs=1e-4)
    assert list(hits.columns) == ["rank", "score", "user", "board", "pin", "category", "path"]
    assert (work / "demo" / "embeddings" / "test_efficientnet" / "search_index" / "index.faiss").is_file()
    user, board, pin = index.loc[10, ["user", "board", "pin"]]
    by_pin = search(cfg("search", work, f"pin={user}/{board}/{pin}", "k=3"))
    assert pin_path not in set(by_pin["path"]) and len(by_pin) == 3  # the query pin itself is left out
    with pytest.raises(UserError, match=f"pin={pin} matches 12 pins; give user/board/pin, e.g. pin="):
        search(cfg("search", work, f"pin={pin}"))
    hnsw = search(cfg("search", work, f"query={pin_path}", "k=5", "search.index=hnsw"))
    assert hnsw.loc[0, "path"] == pin_path
    info = json.loads((work / "demo" / "embeddings" / "test_efficientnet" / "search_index" / "index.json").read_text())
    assert info["kind"] == "hnsw" and 0.5 <= info["recall_at_10"] <= 1.0
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("hello")
    proc = run_verb("search", f"paths.work={work}", *TINY, f"query={not_image}", cwd=tmp_path)
    assert proc.returncode == 2 and f"query={not_image} is not an image (cannot identify image file)" in proc.stderr


def test_search_checks_its_query_before_building_the_model(trained, monkeypatch, tmp_path):
    import pinterest_cls.embed.embedder as embedder

    work, _ = trained

    def no_model(meta):
        raise AssertionError("the backbone was built for a query that is not an image")

    monkeypatch.setattr(embedder, "backbone_from_meta", no_model)
    not_image = tmp_path / "README.md"
    not_image.write_text("# not an image\n")
    with pytest.raises(UserError, match=r"query=.*README.md is not an image \(cannot identify image file\)"):
        search(cfg("search", work, f"query={not_image}"))


def test_predict_end_to_end(trained, tmp_path):
    work, result = trained
    export = work / "demo" / "export"
    frame = predict(make_cfg("predict", [f"paths.work={work}", f"run_id={result['run_id']}", f"inputs={export}",
                                         f"predict.out={tmp_path / 'p.csv'}", "predict.workers=0"]))
    pins = list(export.glob("*/per_board/*/*/pin_closeup_image.jpg"))  # every pin image of the export
    assert len(pd.read_csv(tmp_path / "p.csv")) == len(frame) == len(pins)
    failed = frame[frame.status == "failed"].set_index(frame[frame.status == "failed"]["path"].str.split("/").str[-2])
    assert failed.loc["corrupt_pin", "reason"] == "cannot identify image file"
    assert failed.loc["truncated_pin", "reason"] == "truncated JPEG"
    assert failed.loc["bomb_pin", "reason"].startswith("image larger than")
    # the run's own test predictions are reproduced end to end from the image files
    run_preds = pd.read_csv(result["output_dir"] / "predictions.csv")
    merged = run_preds.merge(frame, on="path", suffixes=("_run", ""))
    assert len(merged) == len(run_preds) and (merged["prediction_run"] == merged["prediction"]).all()
    assert {"top1_category", "top1_score", "top3_category"} <= set(frame.columns)
    ok = frame[frame.status == "ok"]
    assert (ok["top1_category"] == ok["prediction"]).all() and (ok["top1_score"] >= ok["top2_score"]).all()


def test_predict_errors(trained, tmp_path):
    work, result = trained
    proc = run_verb("predict", f"paths.work={work}", "run_id=0123456789abcdef", f"inputs={tmp_path}", cwd=tmp_path)
    assert proc.returncode == 2 and "run_id=0123456789abcdef is not a run" in proc.stderr
    cl = cluster(cfg("cluster", work, "cluster.projection=pca"))
    with pytest.raises(UserError, match="is not a train run"):
        predict(make_cfg("predict", [f"paths.work={work}", f"run_id={cl['run_id']}", f"inputs={tmp_path}"]))
    with pytest.raises(UserError, match="does not exist"):
        predict(make_cfg("predict", [f"paths.work={work}", f"run_id={result['run_id']}",
                                     f"inputs={tmp_path / 'nope'}"]))


def test_pyfunc_model_loads_and_serves(trained, tmp_path, monkeypatch):
    work, result = trained
    # logging the models warned of nothing: no pickle (skops, a model from code), type hints, an input example
    assert result["mlflow_warnings"] == []
    uri = f"sqlite:///{work}/mlflow.db"
    mlflow.set_tracking_uri(uri)
    model_uri = f"runs:/{result['run_id']}/pipeline"
    export = work / "demo" / "export"
    good = sorted(export.glob("alice/per_board/hiking/*/pin_closeup_image.jpg"))[:2]
    monkeypatch.setenv("PINTEREST_CLS_SERVE_ROOT", str(export))  # path input, inside the export only
    loaded = mlflow.pyfunc.load_model(model_uri)
    out = loaded.predict(pd.DataFrame({"path": [str(p) for p in good]}))
    assert list(out["status"]) == ["ok", "ok"]

    port = free_port()
    with serving(["mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
                  "-p", str(port)], port, "/ping", cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": uri, "PINTEREST_CLS_SERVE_ROOT": str(export)}):
        def invoke(columns, rows):
            body = json.dumps({"dataframe_split": {"columns": columns, "data": rows}}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as r:
                return json.loads(r.read())["predictions"]

        by_path = invoke(["path"], [[str(p)] for p in good])
        by_bytes = invoke(["image"], [[base64.b64encode(p.read_bytes()).decode()] for p in good])
        assert [p["prediction"] for p in by_path] == list(out["prediction"])
        assert [p["prediction"] for p in by_bytes] == list(out["prediction"])
        assert all(p["status"] == "ok" and 0 < p["score"] <= 1 for p in by_path)
