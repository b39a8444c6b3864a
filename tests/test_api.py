"""The Python API a notebook uses (docs/python-api.md), on the demo's real tiny-model store and a real train run."""

import numpy as np
import pandas as pd
import pytest
from sklearn.model_selection import GridSearchCV, StratifiedGroupKFold
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer

import pinterest_cls as pc
from pinterest_cls.embed.embedder import backbone_from_meta
from pinterest_cls.train import train

from .helpers import TINY, make_cfg

STORE = ("demo", "embeddings", "test_efficientnet")


def test_every_public_name_loads_and_says_what_it_is():
    for name in pc.__all__:
        value = getattr(pc, name)
        assert name == "__version__" or (value.__doc__ or "").strip(), name
    with pytest.raises(AttributeError):
        pc.nothing_of_the_kind  # noqa: B018


def test_a_store_opened_from_python_gives_features_and_labels(tiny_demo):
    store = pc.open_store(tiny_demo.joinpath(*STORE))
    pins = store.embedded()
    X, y = store.vectors_of(pins), pins["category"].to_numpy()
    assert X.shape == (147, store.meta.dim) and X.dtype == np.float32 and len(set(y)) == 4


def test_images_embedded_like_the_store_match_its_rows(tiny_demo, tmp_path):
    store = pc.open_store(tiny_demo.joinpath(*STORE))
    paths = list(store.pins["path"][:5])
    embed = pc.Embedder.for_store(backbone_from_meta(store.meta), store.meta)
    again, reasons = embed(paths, workers=0)
    rows = np.asarray(store.vectors[:5], dtype=np.float32)
    cos = (again * rows).sum(1) / np.linalg.norm(again, axis=1) / np.linalg.norm(rows, axis=1)
    assert reasons == [""] * 5 and cos.min() > 0.999
    (tmp_path / "notes.jpg").write_text("not an image")
    features, why = pc.embed_images("test_efficientnet", [paths[0], str(tmp_path / "notes.jpg")], workers=0)
    assert why == ["", "cannot identify image file"] and features.shape == (2, store.meta.dim)
    assert not features[1].any() and features[0].any()


def test_a_train_run_loads_as_an_end_to_end_model(demo_work):
    result = train(make_cfg("train", [f"paths.work={demo_work}", *TINY, "classifier=logreg", "classifier.grid.C=[1]",
                                      "train.n_jobs=1", "train.log_pipeline=false"]))
    model = pc.load_pipeline(result["run_id"], f"sqlite:///{demo_work}/mlflow.db", workers=0)
    run_preds = pd.read_csv(result["output_dir"] / "predictions.csv")
    frame = model.predict_paths(list(run_preds["path"]))
    assert list(frame["prediction"]) == list(run_preds["prediction"]) and (frame["status"] == "ok").all()


def test_the_estimators_compose_with_scikit_learn(tiny_demo):
    store = pc.open_store(tiny_demo.joinpath(*STORE))
    pins = store.embedded()
    X, y = store.vectors_of(pins), pins["category"].to_numpy()
    knn = make_pipeline(Normalizer(), pc.FaissKNN(k=10, weights="softmax"))
    search = GridSearchCV(knn, {"faissknn__k": [5, 10]}, cv=StratifiedGroupKFold(3), scoring="f1_macro")
    search.fit(X, y, groups=pins["board"])
    assert search.best_params_["faissknn__k"] in (5, 10) and 0 <= search.best_score_ <= 1
    assert set(pc.TorchMLP(max_epochs=5, random_state=0).fit(X, y).predict(X)) <= set(y)
    assert len(set(pc.FaissKMeans(n_clusters=4, random_state=0).fit_predict(X))) == 4
