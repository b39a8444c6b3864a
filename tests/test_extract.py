"""extract: row alignment, per-row failures, kill -9 resume, shards, refusal on mismatch, MLflow run."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.images import load_rgb
from pinterest_cls.data.manifest import load_manifest
from pinterest_cls.embed.backbones import build_backbone
from pinterest_cls.extract import extract

from .helpers import TINY, faults, make_cfg, make_pinterest_export, read_store, run_verb

#: The tiny model in small batches, in this process, without MLflow.
SMALL = [*TINY, "extract.batch_size=4", "extract.workers=0", "mlflow.enabled=false"]


@pytest.fixture
def export(tmp_path):
    boards = {("ann", "b1"): "cats", ("ann", "b2"): "dogs", ("bob", "b3"): "cats", ("bob", "b4"): "Other"}
    return make_pinterest_export(tmp_path / "exp", boards, pins_per_board=8, size=(120, 160))


def cfg_for(work, export, *extra):
    return make_cfg("extract", [f"paths.work={work}", f"data.root={export}", *SMALL, *extra])


def store_of(work, name="test_efficientnet"):
    return read_store(work / "exp" / "embeddings" / name)


def test_rows_align_with_manifest_and_failures_stay_in_their_row(tmp_path, export):
    work = tmp_path / "w"
    cfg = cfg_for(work, export, "extract.amp=off", "store.dtype=float32")
    from pinterest_cls.scan import scan

    scan(cfg, progress=False)
    ok = load_manifest(work / "exp").query("status == 'ok'").reset_index(drop=True)
    broken = ok.loc[5, "path"]  # changed after the scan: now unreadable
    with open(broken, "wb") as f:
        f.write(b"this is no longer a jpeg")
    # 1 of 24 rows failing is over the default extract.max_failed_fraction (1 %): an error, the rows kept
    with pytest.raises(UserError, match=r"^test_efficientnet: 1 of 24 rows of shard 0/1 rows \[0, 24\) failed "
                                        r"\(4.2% > extract.max_failed_fraction=0.01\): 'cannot identify image file' "
                                        r"x1; the committed rows are kept"):
        extract(cfg, progress=False)
    assert store_of(work)[2]["rows_done"] == 24
    accepting = cfg_for(work, export, "extract.amp=off", "store.dtype=float32", "extract.max_failed_fraction=0.05")
    meta = extract(accepting, progress=False)  # accepted: the finished store is not recomputed
    assert meta["extract"]["amp"] == "fp32"  # the precision used, not the setting
    emb, index, _ = store_of(work)
    assert emb.shape == (24, meta["dim"]) and emb.dtype == np.float32 and len(index) == len(ok)
    assert list(index["path"]) == list(ok["path"])
    assert meta["complete"] and meta["rows_failed"] == 1
    assert not index.loc[5, "embedded"] and index.loc[5, "reason"] == "cannot identify image file"
    assert index.drop(index=5)["embedded"].all()
    assert not emb[5].any()
    torch.manual_seed(0)
    b = build_backbone(cfg.backbone)
    for row in (0, 4, 6, 23):  # each row holds the features of its own image, not a neighbour's
        x = b.transform(load_rgb(ok.loc[row, "path"], min_size=b.resize_size)).unsqueeze(0)
        with torch.inference_mode():
            expected = b.model(x)[0].numpy()
        np.testing.assert_allclose(emb[row], expected, rtol=1e-4, atol=1e-4)
    # a re-run of a complete store does nothing and keeps it
    before = emb.copy()
    assert extract(accepting, progress=False)["complete"]
    np.testing.assert_array_equal(store_of(work)[0], before)


def test_resume_after_kill_is_bitwise_identical(tmp_path, export):
    args = [f"data.root={export}", *SMALL, "extract.workers=2", "extract.commit_every=2"]
    full = run_verb("extract", f"paths.work={tmp_path / 'a'}", *args, cwd=tmp_path)
    assert full.returncode == 0, full.stderr
    reference = np.load(tmp_path / "a" / "exp" / "embeddings" / "test_efficientnet" / "embeddings.npy")
    work = tmp_path / "b"
    for kill_after, committed in [(3, 8), (1, 8)]:  # killed once after a commit, once before the next
        proc = run_verb("extract", f"paths.work={work}", *args, cwd=tmp_path, env=faults(kill_after=kill_after))
        assert proc.returncode == -signal.SIGKILL
        meta = json.loads((work / "exp" / "embeddings" / "test_efficientnet" / "meta.json").read_text())
        records = list((work / "exp" / "embeddings" / "test_efficientnet" / "progress").glob("*.json"))
        assert len(records) == 1 and json.loads(records[0].read_text())["done"] == committed
        assert not meta["complete"]
    proc = run_verb("extract", f"paths.work={work}", *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "resuming shard 0/1 rows [0, 24) at row 8" in proc.stdout
    emb, index, meta = store_of(work)
    assert meta["complete"] and index["embedded"].all()
    assert emb.tobytes() == reference.tobytes()


def test_a_stop_signal_commits_the_written_rows_and_the_rerun_resumes(tmp_path, export):
    """SIGTERM (scancel, a SLURM requeue) and SIGINT (Ctrl-C), sent to extract's whole process group after its
    2nd batch, stop it after that batch with every written row committed (the regular commits are every 4
    batches), a message and exit status 128 + the signal, without a traceback; each rerun resumes where the last
    stopped, and the store ends bitwise equal. (SIGUSR2 takes the same path; under
    submitit it also requeues the job: tests/test_slurm.py.)"""
    args = [f"data.root={export}", *SMALL, "extract.workers=2", "extract.commit_every=4", "extract.threads=1"]
    before = torch.get_num_threads()
    extract(cfg_for(tmp_path / "a", export, "extract.threads=1"), progress=False)
    assert torch.get_num_threads() == before  # extract.threads is the run's, not the caller's afterwards
    work = tmp_path / "b"
    for sig, committed in ((signal.SIGTERM, 8), (signal.SIGINT, 16)):
        proc = subprocess.run([sys.executable, "-m", "pinterest_cls.extract", f"paths.work={work}", *args],
                              cwd=tmp_path, env=dict(os.environ, **faults(signal_after=(2, sig))),
                              capture_output=True, text=True, timeout=300, start_new_session=True)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 128 + sig, out[-2000:]
        assert (f"{signal.Signals(sig).name}: stopped after committing every written row (shard 0/1 rows [0, 24): "
                f"test_efficientnet {committed}/24 rows)") in out
        assert "Traceback" not in out and "killed by signal" not in out, out[-2000:]
        (record,) = [json.loads(p.read_text()) for p in (work / "exp" / "embeddings" / "test_efficientnet" /
                                                         "progress").glob("*.json")]
        assert record["done"] == committed
        assert committed == 8 or f"resuming shard 0/1 rows [0, 24) at row {committed - 8}" in out
    rerun = run_verb("extract", f"paths.work={work}", *args, cwd=tmp_path)
    assert rerun.returncode == 0 and "resuming shard 0/1 rows [0, 24) at row 16" in rerun.stdout
    assert store_of(work)[0].tobytes() == store_of(tmp_path / "a")[0].tobytes()


def test_shards_equal_a_single_run(tmp_path, export):
    extract(cfg_for(tmp_path / "single", export), progress=False)
    single = store_of(tmp_path / "single")[0].copy()
    work = tmp_path / "sharded"
    m1 = extract(cfg_for(work, export, "extract.shard.index=1", "extract.shard.count=2"), progress=False)
    assert not m1["complete"] and m1["rows_done"] == 12
    emb, index, _ = store_of(work)
    assert list(index["embedded"]) == [False] * 12 + [True] * 12
    m0 = extract(cfg_for(work, export, "extract.shard.index=0", "extract.shard.count=2"), progress=False)
    assert m0["complete"] and m0["rows_done"] == 24
    assert store_of(work)[0].tobytes() == single.tobytes()
    with pytest.raises(UserError, match=r"extract.shard.index=2 must be in \[0, extract.shard.count=2\)"):
        extract(cfg_for(work, export, "extract.shard.index=2", "extract.shard.count=2"), progress=False)


def test_refuses_a_store_made_with_other_settings(tmp_path, export):
    work = tmp_path / "w"
    extract(cfg_for(work, export), progress=False)
    before = store_of(work)[0].copy()
    with pytest.raises(UserError, match=r"input_size: stored 64, now 72.*extract.overwrite=true"):
        extract(cfg_for(work, export, "backbone.image_size=72"), progress=False)
    assert store_of(work)[0].tobytes() == before.tobytes()  # nothing lost
    meta = extract(cfg_for(work, export, "backbone.image_size=72", "extract.overwrite=true"), progress=False)
    assert meta["complete"] and meta["fingerprint"]["input_size"] == 72


def test_another_export_under_the_same_data_name_is_not_embedded_as_the_scanned_one(tmp_path, export):
    work = tmp_path / "w"
    extract(cfg_for(work, export), progress=False)  # data.name: the root folder's name, "exp"
    other = make_pinterest_export(tmp_path / "elsewhere" / "exp", {("cy", "b9"): "birds"}, pins_per_board=4)
    before = store_of(work)[0].copy()
    with pytest.raises(UserError, match=rf"manifest.parquet is the scan of {export}, not of data.root={other}; "
                                        r"scan this export first"):
        extract(cfg_for(work, other), progress=False)
    assert store_of(work)[0].tobytes() == before.tobytes()
    from pinterest_cls.scan import scan

    scan(cfg_for(work, other), progress=False)  # its own scan replaces the old one: then it is embedded
    meta = extract(cfg_for(work, other, "extract.overwrite=true"), progress=False)
    assert meta["complete"] and meta["rows"] == 4


def test_cli_errors_and_mlflow_run(tmp_path, export):
    proc = run_verb("extract", f"paths.work={tmp_path}", "backbone=resnet_nope", cwd=tmp_path)
    assert proc.returncode == 2
    assert "backbone=resnet_nope: no such backbone (options: convnext_base," in proc.stderr
    proc = run_verb("extract", f"paths.work={tmp_path}", "backbone=convnext_tiny",
                    "backbone.weights=/nonexistent/w.safetensors", cwd=tmp_path)
    assert proc.returncode == 2 and "backbone.weights=/nonexistent/w.safetensors does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr

    import mlflow

    work = tmp_path / "w"
    extract(cfg_for(work, export, "mlflow.enabled=true"), progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{work}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["exp"], output_format="list")
    assert len(runs) == 1
    run = runs[0]
    assert run.data.params["backbone"] == "test_efficientnet" and run.data.params["image_size"] == "64"
    assert run.data.metrics["failed"] == 0 and run.data.metrics["images_per_s"] > 0
    arts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert any(p.endswith(".png") for p in arts)
    assert (work / "mlartifacts" / "exp").is_dir()


def test_a_missing_export_leaves_no_folder_behind(tmp_path):
    work = tmp_path / "work"
    with pytest.raises(UserError, match="data.root=.*missing does not exist"):
        extract(make_cfg("extract", [f"paths.work={work}", f"data.root={tmp_path / 'missing'}",
                                     "mlflow.enabled=false"]), progress=False)
    assert not (work / "missing").exists()


class _SignalDisposition(torch.utils.data.Dataset):
    """Each item: how the worker process that loads it handles SIGTERM and SIGUSR2."""

    def __len__(self):
        return 4

    def __getitem__(self, i):
        return torch.tensor([int(signal.getsignal(signal.SIGTERM) == signal.SIG_IGN),
                             int(signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN)])


def test_loader_workers_ignore_the_signals_slurm_sends_to_every_process_of_a_job():
    """SLURM signals every process of a job it cancels, requeues or warns of its time limit; a worker killed by
    it would fail the main process while it waits for a batch, before the main process could commit."""
    from pinterest_cls.data.loader import make_loader

    batches = list(make_loader(_SignalDisposition(), batch_size=1, workers=2, pin_memory=False))
    assert torch.cat(batches).tolist() == [[1, 1]] * 4


def test_a_second_writer_of_a_shard_names_the_holder_and_stops(tmp_path, export):
    """Two runs of one shard at once (an easy mistake with SLURM): the second does no work and says who holds the
    rows; once the holder is gone (here it finishes), the shard is free again."""
    args = [f"paths.work={tmp_path / 'w'}", f"data.root={export}", *SMALL, "extract.commit_every=1"]
    release = tmp_path / "release"  # the first run holds its rows, after one batch, until this file exists
    first = subprocess.Popen([sys.executable, "-m", "pinterest_cls.extract", *args], cwd=tmp_path,
                             env=dict(os.environ, **faults(hold_until=release)), stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    lock = tmp_path / "w" / "exp" / "embeddings" / "test_efficientnet" / "progress" / "rows_0000000000_0000000024.lock"
    deadline = time.time() + 120
    while not (lock.is_file() and lock.read_text().startswith("pid")):
        assert first.poll() is None and time.time() < deadline, first.stdout.read()
        time.sleep(0.2)
    second = run_verb("extract", *args, cwd=tmp_path)
    assert second.returncode == 2 and len(second.stderr.strip().splitlines()) == 1
    assert f"rows [0, 24) of {lock.parent.parent} are being embedded by pid {first.pid} on " in second.stderr
    release.touch()
    assert first.wait(timeout=300) == 0
    done = run_verb("extract", *args, cwd=tmp_path)
    assert done.returncode == 0 and "already done" in done.stdout + done.stderr


def test_a_store_made_before_extract_resize_reads_as_pil_and_is_resumed_only_with_it(tmp_path, export):
    from pinterest_cls.data.metadata import read_meta
    from pinterest_cls.embed.embedder import Embedder, backbone_from_meta

    work = tmp_path / "w"
    extract(cfg_for(work, export, "extract.resize=pil", "extract.commit_every=1", "extract.shard.count=2"),
            progress=False)  # half the rows, resized by Pillow
    folder = work / "exp" / "embeddings" / "test_efficientnet"
    raw = json.loads((folder / "meta.json").read_text())
    assert raw["fingerprint"]["resize"] == raw["extract"]["resize"] == raw["preprocessing"]["resize"] == "pil"
    for part in ("fingerprint", "extract", "preprocessing"):  # as a store from before the option was written
        del raw[part]["resize"]
    (folder / "meta.json").write_text(json.dumps(raw))
    meta = read_meta(folder)
    assert meta.extract.resize == "pil" and meta.fingerprint["resize"] == "pil"
    backbone = backbone_from_meta(meta)  # predict, search and the served model resize as its rows were
    assert backbone.info["resize"] == "pil"
    before = (folder / "embeddings.npy").read_bytes()
    with pytest.raises(UserError, match=r"resize: stored 'pil', now 'tensor'.*re-run with the original settings"):
        extract(cfg_for(work, export, "extract.shard.count=2", "extract.shard.index=1"),
                progress=False)  # the default is the tensor resize
    assert (folder / "embeddings.npy").read_bytes() == before  # nothing written is lost
    other_half = ["extract.resize=pil", "extract.shard.count=2", "extract.shard.index=1"]
    done = extract(cfg_for(work, export, *other_half), progress=False)  # continued with its own resize
    assert done["complete"] and done["last_run"]["rows"] == 12
    emb, index, _ = store_of(work)
    paths = list(index["path"][[0, 20]])  # a row of the first run and one of the resumed run
    again, _ = Embedder.for_store(backbone, read_meta(folder), "cpu")(paths, workers=0)
    assert again.tobytes() == np.asarray(emb[[0, 20]], np.float32).tobytes()
    with pytest.raises(UserError, match=r"resizes with 'tensor', its store's pins with extract.resize='pil'"):
        Embedder.for_store(build_backbone(TINY[0].split("=")[1]), read_meta(folder))


def test_opencv_decodes_plain_jpegs_to_pillows_pixels_at_every_draft_scale(tmp_path):

    from PIL import Image
    from sklearn.datasets import load_sample_images

    from pinterest_cls.data.loader import PinDataset

    paths = []
    for k, photo in enumerate(load_sample_images().images):  # real photographs, 640 x 427
        for size in [(640, 427), (1100, 736), (1920, 1281)]:
            for quality, subsampling in [(90, 2), (95, 1), (75, 0)]:  # 4:2:0, 4:2:2, 4:4:4
                path = tmp_path / f"p{k}_{size[0]}_{subsampling}.jpg"
                Image.fromarray(photo).resize(size, Image.BICUBIC).save(path, quality=quality,
                                                                        subsampling=subsampling)
                paths.append(str(path))
    others = {"png": "PNG", "progressive": "JPEG", "gray": "JPEG", "rotated": "JPEG"}
    for name, fmt in others.items():  # files the OpenCV path leaves to Pillow
        image = Image.fromarray(load_sample_images().images[0]).convert("L" if name == "gray" else "RGB")
        exif = Image.Exif()
        exif[0x0112] = 6 if name == "rotated" else 1
        image.save(tmp_path / f"{name}.img", fmt, progressive=name == "progressive", exif=exif)
        paths.append(str(tmp_path / f"{name}.img"))
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(Path(paths[0]).read_bytes()[:-5000])
    paths.append(str(truncated))
    as_array = lambda image: np.asarray(image)  # noqa: E731  the decoded pixels, untouched
    sizes = [None, 256, 224, 160, 64]  # DCT scales 1, 2, 4 and 8 on these sizes
    pillow = PinDataset(paths, range(len(paths)), [as_array] * len(sizes), sizes)
    opencv = PinDataset(paths, range(len(paths)), [as_array] * len(sizes), sizes, opencv=True)
    scales = set()
    for row in range(len(paths)):
        a, b = pillow.decode_row(row), opencv.decode_row(row)
        assert a[2] == b[2]  # the same failure, or none
        if a[1] is None:
            continue
        for x, y in zip(a[1], b[1]):
            assert x.shape == y.shape and np.array_equal(x, y), (paths[row], x.shape)
        used = opencv._opencv_images(row) is not None
        assert used == (row < len(paths) - len(others) - 1), paths[row]  # plain JPEGs only
        if used:
            scales |= {round(1100 / x.shape[1]) for x in a[1] if "1100" in paths[row]}
    assert scales == {1, 2, 4, 8}
    assert pillow.decode_row(len(paths) - 1)[1] is None  # the truncated JPEG fails in both


def test_extract_decode_opencv_writes_the_store_of_decode_cpu(tmp_path):
    common = [f"paths.work={tmp_path}", *TINY, "extract.workers=0", "mlflow.enabled=false",
              "extract.calibrate.pins=0"]
    cpu = extract(make_cfg("extract", common), progress=False)  # the demo: every kind of broken pin
    opencv = extract(make_cfg("extract", [*common, "extract.decode=opencv",
                                          "paths.embeddings=${paths.work}/${data.name}/opencv"]), progress=False)
    assert cpu["fingerprint"]["decode"] == "cpu" and opencv["fingerprint"]["decode"] == "opencv"
    a, index_a, _ = read_store(tmp_path / "demo" / "embeddings" / "test_efficientnet")
    b, index_b, _ = read_store(tmp_path / "demo" / "opencv" / "test_efficientnet")
    assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
    assert list(index_a["reason"]) == list(index_b["reason"])
    with pytest.raises(UserError, match=r"extract.decode='pillow' must be cpu .*, opencv .* or gpu"):
        extract(make_cfg("extract", [*common, "extract.decode=pillow"]), progress=False)


def test_batch_norms_are_folded_by_default_and_a_store_made_before_resumes_only_unfolded(tmp_path, export):
    from pinterest_cls.data.metadata import read_meta
    from pinterest_cls.embed.embedder import Embedder, backbone_from_meta

    work = tmp_path / "w"
    folder = work / "exp" / "embeddings" / "test_efficientnet"
    extract(cfg_for(work, export), progress=False)
    meta = read_meta(folder)
    assert meta.fingerprint["fold_bn"] is True and meta.extract.fold_bn is True
    folded_rows = np.asarray(store_of(work)[0], np.float32).copy()
    extract(cfg_for(work, export, "extract.fold_bn=false", "extract.overwrite=true"), progress=False)
    plain_rows = np.asarray(store_of(work)[0], np.float32).copy()
    assert folded_rows.tobytes() != plain_rows.tobytes()  # other rounding, the same features
    cos = (folded_rows * plain_rows).sum(1) / np.linalg.norm(folded_rows, axis=1) / np.linalg.norm(plain_rows, axis=1)
    assert cos.min() > 0.9999  # float32 rounding (0.99996 seen)

    extract(cfg_for(work, export, "extract.fold_bn=false", "extract.overwrite=true", "extract.commit_every=1",
                    "extract.shard.count=2"), progress=False)  # half the rows, unfolded
    raw = json.loads((folder / "meta.json").read_text())
    for part in ("fingerprint", "extract"):  # as a store from before the option was written
        del raw[part]["fold_bn"]
    (folder / "meta.json").write_text(json.dumps(raw))
    assert read_meta(folder).extract.fold_bn is False
    before = (folder / "embeddings.npy").read_bytes()
    with pytest.raises(UserError, match=r"fold_bn: stored False, now True.*re-run with the original settings"):
        extract(cfg_for(work, export, "extract.shard.count=2", "extract.shard.index=1"), progress=False)
    assert (folder / "embeddings.npy").read_bytes() == before  # nothing written is lost
    done = extract(cfg_for(work, export, "extract.fold_bn=false", "extract.shard.count=2", "extract.shard.index=1"),
                   progress=False)
    assert done["complete"]
    emb, index, _ = store_of(work)
    assert np.asarray(emb, np.float32).tobytes() == plain_rows.tobytes()
    meta = read_meta(folder)
    paths = list(index["path"][[0, 20]])  # predict, search and the served model embed as its rows were
    again, _ = Embedder.for_store(backbone_from_meta(meta), meta, "cpu")(paths, workers=0)
    assert again.tobytes() == plain_rows[[0, 20]].tobytes()
    with pytest.raises(UserError, match=r"extract.fold_bn=maybe must be true or false"):
        extract(cfg_for(work, export, "extract.fold_bn=maybe"), progress=False)
