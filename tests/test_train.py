"""train on real (tiny-model) embeddings of the demo export, with a real SQLite MLflow store."""

import hashlib
import json
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from pinterest_cls.core.errors import UserError
from pinterest_cls.extract import extract
from pinterest_cls.learn.estimators import FaissKNN, TorchMLP
from pinterest_cls.learn.splits import sample_rows
from pinterest_cls.train import train

from .helpers import TINY, make_cfg, run_verb, write_image

SMALL_GRIDS = {
    "svm": ["classifier.grid.C=[0.1,10]"],
    "knn": ["classifier.grid.k=[1,5]", "classifier.grid.weights=[uniform,softmax]"],
    "mlp": ["classifier.grid.batch_size=[32]", "classifier.estimator.max_epochs=60"],
    "logreg": ["classifier.grid.C=[1]"],
    "random_forest": ["classifier.grid.max_depth=[null]", "classifier.grid.max_features=[sqrt]",
                      "classifier.estimator.n_estimators=50"],
}


def train_cfg(work, *extra):
    return make_cfg("train", [f"paths.work={work}", *TINY, "train.n_jobs=1", *extra])


@pytest.mark.parametrize("name", list(SMALL_GRIDS))
def test_each_classifier_trains_and_logs_to_mlflow(demo_work, name):
    result = train(train_cfg(demo_work, f"classifier={name}", "split=stratified", *SMALL_GRIDS[name]))
    m = result["metrics"]
    assert m["test_accuracy"] > 0.6, m  # 4 well-separated categories, chance is 0.25
    for key in ("test_f1_macro", "test_balanced_accuracy", "cv_f1_macro", "test_roc_auc", "test_pr_auc",
                "test_board_accuracy", "test_recall_ocean", "test_precision_forest"):
        assert 0.0 <= m[key] <= 1.0, key
    mlflow.set_tracking_uri(f"sqlite:///{demo_work}/mlflow.db")
    run = mlflow.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["backbone"] == "test_efficientnet" and run.data.params["classifier"] == name
    assert run.data.params["split"] == "stratified" and run.data.params["preprocess"] == "l2"
    assert run.data.metrics["test_f1_macro"] == pytest.approx(m["test_f1_macro"])
    tags = run.data.tags
    assert {k: tags.get(k) for k in ("verb", "data", "backbone", "classifier", "split")} == {
        "verb": "train", "data": "demo", "backbone": "test_efficientnet", "classifier": name, "split": "stratified"}
    # opened before the fit: the run's duration holds the fit and the test predictions
    assert 0 < m["fit_time_s"] and 0 < m["predict_time_s"]
    assert (run.info.end_time - run.info.start_time) / 1000 >= m["fit_time_s"] + m["predict_time_s"]
    # the embeddings it read, as an MLflow dataset whose digest is the store's fingerprint
    store = demo_work / "demo" / "embeddings" / "test_efficientnet"
    fingerprint = json.loads((store / "meta.json").read_text())["fingerprint"]
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    (inp,) = run.inputs.dataset_inputs
    assert (inp.dataset.name, inp.dataset.digest) == ("demo/test_efficientnet", digest)
    assert json.loads(inp.dataset.source) == {"uri": store.resolve().as_uri()}
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "train"
    # every setting of the estimator, searched or not
    settings = {"svm": ["C", "max_iter", "loss"], "knn": ["k", "weights", "temperature", "metric"],
                "mlp": ["hidden", "lr", "max_epochs", "batch_size", "patience"], "logreg": ["C", "max_iter", "solver"],
                "random_forest": ["n_estimators", "max_depth", "max_features"]}[name]
    assert set(settings) <= set(run.data.params), sorted(run.data.params)
    if name == "mlp":
        assert run.data.params["max_epochs"] == "60" and run.data.params["hidden"] == "200"
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"predictions.csv", "classification_report.txt", "cv_results.csv", "plots"} <= arts
    preds = pd.read_csv(result["output_dir"] / "predictions.csv")
    assert list(preds.columns) == ["row", "user", "board", "pin", "path", "truth", "prediction", "score"]
    model = mlflow.sklearn.load_model(f"runs:/{run.info.run_id}/model")
    from .helpers import read_store

    emb, _, _ = read_store(demo_work / "demo" / "embeddings" / "test_efficientnet")
    again = model.predict(np.asarray(emb[preds["row"].to_numpy()], dtype=np.float32))
    assert list(again) == list(preds["prediction"])


def test_kfold_metrics_have_std(demo_work):
    r = train(train_cfg(demo_work, "classifier=logreg", "classifier.grid.C=[1]", "split=kfold", "split.folds=3",
                        "mlflow.enabled=false"))
    assert {"test_accuracy", "test_accuracy_std", "test_f1_macro_std"} <= set(r["metrics"])
    preds = pd.read_csv(r["output_dir"] / "predictions.csv")
    assert len(preds) == 147 and sorted(preds["fold"].unique()) == [0, 1, 2]


def test_sampling_cap_and_preprocessing(demo_work):
    r = train(train_cfg(demo_work, "classifier=logreg", "classifier.grid.C=[1]", "sampling.max_per_category=20",
                        "preprocess.steps=[standardize,pca]", "preprocess.pca_components=10", "split=stratified",
                        "mlflow.enabled=false"))
    assert r["params"]["n_samples"] == 80 and r["params"]["preprocess"] == "standardize+pca10"


def test_preprocessing_is_fitted_inside_each_cv_fold(demo_work):
    """The grid search's fold scores equal, to rounding, a scaler + PCA + classifier fitted on each fold's
    training boards alone (scored by log-loss, which any leak of the held-out fold's statistics would move)."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from pinterest_cls.data.store import store_for
    from pinterest_cls.learn.fitting import fit_grid
    from pinterest_cls.learn.splits import inner_cv

    cfg = train_cfg(demo_work, "classifier=logreg", "classifier.grid.C=[0.01,1]", "train.scoring=neg_log_loss",
                    "preprocess.steps=[standardize,pca]", "preprocess.pca_components=8")
    store = store_for(cfg)
    frame = sample_rows(store.pins, None, 1)
    X, y = store.vectors_of(frame), frame["category"].to_numpy()
    search, desc, _ = fit_grid(cfg, X, y, frame, True)
    cv, groups, _, _ = inner_cv(cfg, frame, y, True, int(cfg.seed))
    assert desc == "3-fold by board"
    for cand, params in enumerate(search.cv_results_["params"]):
        for i, (tr, va) in enumerate(cv.split(X, y, groups=groups)):
            own = make_pipeline(StandardScaler(), PCA(8, random_state=int(cfg.seed)),
                                LogisticRegression(C=params["clf__C"], max_iter=2000)).fit(X[tr], y[tr])
            expected = -log_loss(y[va], own.predict_proba(X[va]), labels=own.classes_)
            assert search.cv_results_[f"split{i}_test_score"][cand] == pytest.approx(expected, rel=1e-3, abs=1e-4)


def test_same_config_same_metrics(demo_work):
    args = ["classifier=mlp", "classifier.grid.batch_size=[32,64]", "classifier.estimator.max_epochs=30",
            "mlflow.enabled=false"]
    a, b = (train(train_cfg(demo_work, *args))["metrics"] for _ in range(2))
    timings = ("fit_time_s", "predict_time_s")  # how long it took differs; what it scored does not
    assert {k: v for k, v in a.items() if k not in timings} == {k: v for k, v in b.items() if k not in timings}


def test_train_without_a_store_names_the_extract_command(tmp_path):
    proc = run_verb("train", f"paths.work={tmp_path / 'empty'}", "backbone=convnext_base", cwd=tmp_path)
    assert proc.returncode == 2 and "no embeddings for backbone convnext_base" in proc.stderr
    assert f"run first: python -m pinterest_cls.extract backbone=convnext_base paths.work={tmp_path / 'empty'}" \
        in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,message", [
    (["classifier.grid.C=[1,-1]"], r"classifier.grid.C=-1 is invalid for LinearSVC"),
    (["classifier=knn", "classifier.grid.k=[0]"],
     r"classifier.grid.k=0 is invalid for FaissKNN: The .k. parameter of FaissKNN must be an int in the range "
     r"\[1, inf\)"),
    (["+classifier.grid.gamma=[1]"], r"classifier.grid.gamma: LinearSVC has no parameter 'gamma'"),
])
def test_a_bad_grid_is_a_one_line_error_naming_the_key(demo_work, args, message):
    with pytest.raises(UserError, match=message):
        train(train_cfg(demo_work, *args, "mlflow.enabled=false"))


def test_a_single_category_left_is_an_error(tmp_path):
    """The other category's images are all unreadable: a classifier needs two."""
    root = tmp_path / "one"
    for i in range(4):
        write_image(root / "cats" / f"{i}.jpg", seed=i)
        write_image(root / "dogs" / f"{i}.jpg", b"broken")
    work = tmp_path / "w1"
    common = [f"paths.work={work}", f"data.root={root}", "data.layout=imagefolder", *TINY]
    extract(make_cfg("extract", [*common, "mlflow.enabled=false", "extract.workers=0"]), progress=False)
    with pytest.raises(UserError, match="only 1 category left after filtering \\(cats\\)"):
        train(make_cfg("train", [*common, "mlflow.enabled=false"]))


def test_faiss_knn_agrees_with_scikit_learn():
    rng = np.random.default_rng(0)
    centers = rng.normal(size=(4, 64))
    y = rng.integers(0, 4, 600)
    X = centers[y] + rng.normal(scale=2.0, size=(600, 64))
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for weights in ("uniform", "distance"):
        ours = FaissKNN(k=7, weights=weights).fit(X[:500], y[:500]).predict(X[500:])
        ref = KNeighborsClassifier(n_neighbors=7, weights=weights, algorithm="brute").fit(X[:500], y[:500])
        assert (ours == ref.predict(X[500:])).all()
    soft = FaissKNN(k=7, weights="softmax").fit(X[:500], y[:500]).predict_proba(X[500:])
    np.testing.assert_allclose(soft.sum(axis=1), 1.0)


def test_torch_mlp_is_a_reproducible_estimator():
    from sklearn.base import clone

    rng = np.random.default_rng(1)
    X = rng.normal(size=(300, 20)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    a = TorchMLP(max_epochs=40, random_state=3).fit(X, y)
    b = clone(a).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert (a.predict(X) == y).mean() > 0.9 and a.n_epochs_ <= 40
    assert json.dumps(a.get_params())


def test_a_run_records_the_code_and_libraries_that_made_it(demo_work):
    """Read back from the real MLflow store: MLflow's source, user and git commit (the UI's columns), the package's
    version, whether the checkout had uncommitted changes, and the libraries' versions."""
    import getpass
    import importlib.metadata
    import subprocess

    import pinterest_cls
    from pinterest_cls.core.provenance import git_state

    result = train(train_cfg(demo_work, "classifier=logreg", "classifier.grid.C=[1]", "train.log_pipeline=false"))
    tags = mlflow.MlflowClient(f"sqlite:///{demo_work}/mlflow.db").get_run(result["run_id"]).data.tags
    assert tags["mlflow.source.name"] == "pinterest_cls.train" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] == getpass.getuser()
    assert tags["pinterest_cls_version"] == pinterest_cls.__version__
    for lib in ("torch", "timm", "scikit-learn", "faiss-cpu", "mlflow", "numpy"):
        assert tags[f"version.{lib}"] == importlib.metadata.version(lib), lib
    repo = Path(pinterest_cls.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert head and tags["mlflow.source.git.commit"] == head == git_state()["git_commit"]
    dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    assert tags["git_dirty"] == ("true" if dirty else "false")


def test_a_data_root_that_does_not_exist_says_so(tmp_path):
    message = (f"data.root={tmp_path / 'nope'} does not exist; point data.root at an export (or leave it unset to "
               "use the embedded demo data)")
    with pytest.raises(UserError) as err:
        train(make_cfg("train", [f"paths.work={tmp_path}", f"data.root={tmp_path / 'nope'}"]))
    assert str(err.value) == message
