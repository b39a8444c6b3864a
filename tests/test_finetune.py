"""finetune: tiny real trainings on generated arrays, IDX files and the demo export; errors."""

import gzip
import struct

import mlflow
import numpy as np
import pytest
import torch

from pinterest_cls.core.errors import UserError
from pinterest_cls.finetune import finetune
from pinterest_cls.finetuning.models import build_model
from pinterest_cls.finetuning.sources import read_idx

from .helpers import make_cfg


def patterns(n=240, size=16, chans=1, seed=0):
    """Three classes a small CNN can tell apart: horizontal stripes, vertical stripes, a bright centre."""
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 3
    yy, xx = np.mgrid[:size, :size]
    base = np.stack([(yy // 2 % 2), (xx // 2 % 2), ((abs(yy - size / 2) < 4) & (abs(xx - size / 2) < 4))]) * 180.0
    x = base[y] + rng.normal(0, 40, size=(n, size, size))
    x = np.clip(x, 0, 255).astype(np.uint8)
    x = np.repeat(x[..., None], chans, axis=-1)
    return x, y


def npz(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


FAST = ["epochs=3", "batch_size=32", "workers=0", "optim.lr=0.005", "optim.warmup_epochs=0"]


def run(tmp_path, *overrides):
    return finetune(make_cfg("finetune", [f"paths.work={tmp_path / 'work'}", *FAST, *overrides]))


def test_classification_from_scratch_logs_curves(tmp_path):
    x, y = patterns()
    labels = np.array(["horizontal", "vertical", "centre"])[y]
    r = run(tmp_path, "data=npz", f"data.root={npz(tmp_path, images=x, labels=labels)}")
    m = r["metrics"]
    assert m["test_accuracy"] > 0.85, m
    assert {"test_f1_macro", "test_precision_vertical", "test_recall_centre"} <= set(m)
    assert r["params"]["split"] == "fractions" and r["params"]["n_test"] == 48  # split.mode=auto: 0.64/0.16/0.2
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'work'}/mlflow.db")
    history = client.get_metric_history(r["run_id"], "val_loss")
    assert [h.step for h in history] == [1, 2, 3]
    arts = {a.path for a in client.list_artifacts(r["run_id"], "plots")} | \
        {a.path for a in client.list_artifacts(r["run_id"], "checkpoints")}
    assert {"plots/curves.png", "plots/confusion_matrix.png", "checkpoints/model_best.pt"} <= arts
    state = torch.load(r["output_dir"] / "model_best.pt")
    assert state["features.0.weight"].shape == (32, 1, 3, 3)


def test_regression_reports_mse_and_mae(tmp_path):
    x, _ = patterns(seed=1)
    targets = x.reshape(len(x), -1).mean(1).astype(np.float32) / 64  # mean brightness, about 1-3
    r = run(tmp_path, "data=npz", f"data.root={npz(tmp_path, images=x, targets=targets)}", "task=regression",
            "epochs=6")
    m = r["metrics"]
    assert set(m) >= {"test_mse", "test_mae"} and "test_accuracy" not in m
    assert m["test_mse"] < float(np.var(targets))  # better than predicting the mean


def test_kfold_mean_and_std(tmp_path):
    x, y = patterns(n=150)
    r = run(tmp_path, "data=npz", f"data.root={npz(tmp_path, images=x, labels=y)}", "split.mode=kfold",
            "split.folds=3", "epochs=1", "mlflow.enabled=false")
    assert len(r["histories"]) == 3 and r["params"]["n_test"] == 150
    assert {"test_accuracy", "test_accuracy_std"} <= set(r["metrics"])


def test_evaluate_test_false_never_runs_the_test_part(tmp_path, monkeypatch):
    """Choosing hyper-parameters on the validation slice: no batch of the test part goes through the model,
    the run reports the best epoch's validation scores, and training is the run that later evaluates the test."""
    import json

    import pinterest_cls.finetuning.loop as ft

    x, y = patterns()
    path = npz(tmp_path, images=x, labels=y)
    seen = []
    real = ft.run_epoch

    def spy(model, loader, *args, **kwargs):
        seen.append(len(loader.dataset))
        return real(model, loader, *args, **kwargs)

    monkeypatch.setattr(ft, "run_epoch", spy)
    blind = run(tmp_path, "data=npz", f"data.root={path}", "mlflow.enabled=false", "evaluate_test=false")
    assert set(seen) == {153, 39}  # fractions 0.64/0.16/0.2 of 240: train 153, val 39, never the test's 48
    m = blind["metrics"]
    assert not [k for k in m if k.startswith("test_")]
    best = blind["histories"][0][int(m["best_epoch"]) - 1]
    assert m["best_val_loss"] == min(r["val_loss"] for r in blind["histories"][0]) == best["val_loss"]
    assert m["best_val_accuracy"] == best["val_accuracy"]
    saved = json.loads((blind["output_dir"] / "metrics.json").read_text())
    assert saved["params"]["evaluate_test"] is False and saved["metrics"]["best_epoch"] == m["best_epoch"]
    assert not (blind["output_dir"] / "confusion_matrix.png").exists()

    seen.clear()
    full = run(tmp_path, "data=npz", f"data.root={path}", "mlflow.enabled=false")
    assert 48 in seen and full["metrics"]["test_accuracy"] > 0.85
    assert full["metrics"]["best_val_loss"] == m["best_val_loss"]
    assert [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in full["histories"]] == \
        [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in blind["histories"]]


@pytest.mark.parametrize("chans", [1, 4])
def test_in_chans(tmp_path, chans):
    """Images of 1 or 4 channels train: the stems take that many channels and the CNN learns the patterns."""
    x, y = patterns(chans=chans)
    path = npz(tmp_path, images=x, labels=y)
    r = run(tmp_path, "data=npz", f"data.root={path}", "mlflow.enabled=false")
    assert r["metrics"]["test_accuracy"] > 0.85, r["metrics"]
    assert torch.load(r["output_dir"] / "model_best.pt")["features.0.weight"].shape == (32, chans, 3, 3)
    r = run(tmp_path, "data=npz", f"data.root={path}", "epochs=1", "mlflow.enabled=false", "model=timm",
            "model.name=test_efficientnet", "model.pretrained=false", "image_size=32")
    assert r["params"]["model"] == "test_efficientnet"
    assert torch.load(r["output_dir"] / "model_best.pt")["conv_stem.weight"].shape[1] == chans


def test_pretrained_lite0_adapted_to_one_channel():
    cfg = make_cfg("finetune", ["model=timm", "model.backbone=efficientnet_lite0"])
    model, info = build_model(cfg, in_chans=1, num_outputs=10, image_size=64)
    three, _ = build_model(cfg, in_chans=3, num_outputs=10, image_size=64)
    w1, w3 = model.conv_stem.weight, three.conv_stem.weight
    assert w1.shape == (32, 1, 3, 3) and torch.allclose(w1[:, 0], w3.sum(1))  # timm's adapt_input_conv rule
    assert model.get_classifier().out_features == 10
    assert info["weights"].startswith("package:efficientnet_lite0") and len(info["mean"]) == 1


def test_same_seed_same_run(tmp_path):
    x, y = patterns(n=120)
    path = npz(tmp_path, images=x, labels=y)
    args = ["data=npz", f"data.root={path}", "epochs=2", "mlflow.enabled=false", "workers=2", "augment=affine"]
    a, b = run(tmp_path, *args), run(tmp_path, *args)

    def curves(result):
        return [[{k: v for k, v in r.items() if k != "seconds"} for r in h] for h in result["histories"]]

    assert curves(a) == curves(b)
    assert {k: v for k, v in a["metrics"].items() if k != "elapsed_s"} == \
        {k: v for k, v in b["metrics"].items() if k != "elapsed_s"}


def write_idx(path, array):
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_data_and_unreadable_idx(tmp_path):
    x, y = patterns(n=150)
    d = tmp_path / "fm"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", x[:120, ..., 0])
    write_idx(d / "train-labels-idx1-ubyte.gz", y[:120])
    write_idx(d / "t10k-images-idx3-ubyte.gz", x[120:, ..., 0])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", y[120:])
    assert read_idx(d / "train-images-idx3-ubyte.gz").shape == (120, 16, 16)
    r = run(tmp_path, "data=fashion_mnist", f"data.root={d}", "data.classes=[a,b,c]", "epochs=2",
            "mlflow.enabled=false")
    assert r["params"]["n_test"] == 30 and r["params"]["split"] == "own"  # split.mode=auto: the data's own test part
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb") as f:
        f.write(b"\x00\x00\x0d\x01garbage")
    with pytest.raises(UserError, match=r"IDX file .*t10k-labels-idx1-ubyte.gz cannot be read: bad IDX header"):
        run(tmp_path, "data=fashion_mnist", f"data.root={d}")
    with pytest.raises(UserError, match=r"IDX file .*nowhere/train-images-idx3-ubyte.gz not found"):
        run(tmp_path, "data=fashion_mnist", f"data.root={tmp_path / 'nowhere'}")


def test_idx_data_written_as_a_csv_export(tmp_path):
    """write_idx_export: the first N images of each split as PNG pins, with the class names, in the table the
    csv layout reads."""
    import pandas as pd
    from PIL import Image

    from pinterest_cls.finetuning.sources import write_idx_export

    x, y = patterns(n=50)
    d = tmp_path / "fm"
    d.mkdir()
    write_idx(d / "train-images-idx3-ubyte.gz", x[:40, ..., 0])
    write_idx(d / "train-labels-idx1-ubyte.gz", y[:40])
    write_idx(d / "t10k-images-idx3-ubyte.gz", x[40:, ..., 0])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", y[40:])
    dcfg = make_cfg("finetune", ["data=fashion_mnist", f"data.root={d}", "data.classes=[a,b,c]"]).data
    table = write_idx_export(dcfg, tmp_path / "export", {"train": 30})
    rows = pd.read_csv(table)
    assert table.name == "fashion_mnist.csv" and list(rows.columns) == ["path", "label", "split"]
    assert (rows["split"] == "train").sum() == 30 and (rows["split"] == "test").sum() == 10
    assert list(rows["label"][:3]) == [["a", "b", "c"][int(v)] for v in y[:3]]
    last = rows[rows["split"] == "test"].iloc[-1]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "export" / last["path"])), x[49, ..., 0])


def test_bad_input(tmp_path):
    x, y = patterns(n=60)
    with pytest.raises(UserError, match=r"has no array 'labels' \(data.labels_key\)"):
        run(tmp_path, "data=npz", f"data.root={npz(tmp_path, 'a.npz', images=x)}")
    with pytest.raises(UserError, match=r"model.num_classes=5 but the data has 3 classes"):
        run(tmp_path, "data=npz", f"data.root={npz(tmp_path, 'b.npz', images=x, labels=y)}", "model.num_classes=5")
    with pytest.raises(UserError, match=r"60 images"):
        run(tmp_path, "data=npz", f"data.root={npz(tmp_path, 'c.npz', images=x, labels=y[:50])}")


def test_finetune_on_the_demo_export_with_linear_probe(tmp_path):
    """During the linear-probe epochs only the new head learns: after one probe epoch every backbone parameter
    is still its initial value and the head's have moved; a following epoch trains the backbone too."""
    args = ["model=timm", "model.name=test_efficientnet", "model.pretrained=false", "image_size=32",
            "mlflow.enabled=false"]
    r = run(tmp_path, *args, "epochs=1", "linear_probe_epochs=1")
    assert r["params"]["data"] == "demo" and r["params"]["split"] == "boards"
    assert r["params"]["n_test"] == 50  # the four test boards of train's split=group, one per category
    torch.manual_seed(0)  # as finetune builds it: seed 0, 3 channels, the demo's 4 categories
    initial, _ = build_model(make_cfg("finetune", [f"paths.work={tmp_path / 'work'}", *FAST, *args]), 3, 4, 32)
    start = {k: v.detach() for k, v in initial.named_parameters()}
    head = {f"{initial.default_cfg.get('classifier', 'classifier')}.{k}" for k, _ in
            initial.get_classifier().named_parameters()}
    probed = torch.load(r["output_dir"] / "model_best.pt")
    moved = {k for k in start if not torch.equal(probed[k], start[k])}
    assert moved == head, (moved, head)
    r = run(tmp_path, *args, "epochs=2", "linear_probe_epochs=1")
    both = torch.load(r["output_dir"] / "model_best.pt")
    losses = [h["val_loss"] for h in r["histories"][0]]
    if losses[1] < losses[0]:  # the checkpoint is epoch 2's, after the backbone was unfrozen
        assert {k for k in start if not torch.equal(both[k], start[k])} > head
    else:  # epoch 1's: the probe's
        assert all(torch.equal(both[k], probed[k]) for k in start)
