"""At scale: one decode for many backbones, shards as a joblib multirun, the status command, SLURM job
parameters, and parallel train jobs into one SQLite store and into a real MLflow tracking server."""

import os
import signal

import mlflow
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pinterest_cls.data.images import draft_scale, load_rgb, load_rgb_variants
from pinterest_cls.extract import extract
from pinterest_cls.status import status

from .helpers import faults, free_port, make_cfg, make_pinterest_export, read_store, run_verb, serving

BACKBONES = "backbones=[test_efficientnet,test_convnext,pixels]"
COMMON = ["extract.batch_size=4", "extract.amp=off", "store.dtype=float32"]


@pytest.fixture(scope="module")
def big_export(tmp_path_factory):
    """12 pins of 600x450: large enough that the backbones' JPEG draft reductions differ (1/8 for the 32 px
    pixel baseline, 1/4 for the 64 px test models)."""
    root = tmp_path_factory.mktemp("scale") / "exp"
    boards = {("ann", "b1"): "cats", ("ann", "b2"): "dogs", ("bob", "b3"): "cats", ("bob", "b4"): "dogs"}
    return make_pinterest_export(root, boards, pins_per_board=3, size=(600, 450))


def _stores(work, names):
    return {n: read_store(work / "exp" / "embeddings" / n) for n in names}


def test_one_decode_feeds_many_backbones_exactly_as_separate_runs(tmp_path, big_export):
    pin = next(big_export.rglob("*.jpg"))
    small, large = load_rgb_variants(pin, [32, 67])
    assert (draft_scale((600, 450), 32), draft_scale((600, 450), 67)) == (8, 4)
    assert small.size == (75, 57) and large.size == (150, 113)  # two reductions, two decodes
    assert small.tobytes() == load_rgb(pin, min_size=32).tobytes()
    assert large.tobytes() == load_rgb(pin, min_size=67).tobytes()

    names = ["test_efficientnet", "test_convnext", "pixels"]
    together = tmp_path / "together"
    metas = extract(make_cfg("extract", [f"paths.work={together}", f"data.root={big_export}", BACKBONES, *COMMON,
                                         "extract.workers=2", "mlflow.enabled=false"]), progress=False)
    assert sorted(metas) == sorted(names) and all(m["complete"] for m in metas.values())
    assert metas["pixels"]["last_run"]["decoded_for"] == names
    separate = tmp_path / "separate"
    for name in names:
        extract(make_cfg("extract", [f"paths.work={separate}", f"data.root={big_export}", f"backbone={name}",
                                     *COMMON, "extract.workers=0", "mlflow.enabled=false"]), progress=False)
    a, b = _stores(together, names), _stores(separate, names)
    volatile = {"created", "updated", "last_run", "shards", "manifest"}
    for name in names:
        assert sorted(p.name for p in (together / "exp" / "embeddings" / name).iterdir()) == \
            sorted(p.name for p in (separate / "exp" / "embeddings" / name).iterdir())
        assert a[name][0].shape[0] == 12 and a[name][0].tobytes() == b[name][0].tobytes()
        pd.testing.assert_frame_equal(a[name][1], b[name][1])
        assert {k: v for k, v in a[name][2].items() if k not in volatile} == \
            {k: v for k, v in b[name][2].items() if k not in volatile}
    assert a["pixels"][0].shape[1] == 32 * 32 * 3 and a["test_convnext"][0].shape[1] == 64


def test_many_backbones_resume_each_from_its_own_commit(tmp_path, big_export):
    work = tmp_path / "w"
    args = [f"paths.work={work}", f"data.root={big_export}", *COMMON, "extract.workers=0",
            "extract.commit_every=1", "mlflow.enabled=false"]
    proc = run_verb("extract", BACKBONES, *args, cwd=tmp_path, env=faults(kill_after=2))
    assert proc.returncode == -signal.SIGKILL
    # one backbone is finished alone; the next multi-backbone run skips it and resumes the others at row 4
    assert run_verb("extract", "backbone=test_convnext", *args, cwd=tmp_path).returncode == 0
    proc = run_verb("extract", BACKBONES, *args, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "test_convnext: shard 0/1 rows [0, 12) already done." in proc.stdout
    assert "test_efficientnet: resuming shard 0/1 rows [0, 12) at row 4" in proc.stdout
    reference = tmp_path / "ref"
    extract(make_cfg("extract", [f"paths.work={reference}", f"data.root={big_export}", BACKBONES, *COMMON,
                                 "extract.workers=0", "mlflow.enabled=false"]), progress=False)
    names = ["test_efficientnet", "test_convnext", "pixels"]
    for name in names:
        assert _stores(work, names)[name][0].tobytes() == _stores(reference, names)[name][0].tobytes()


def test_backbones_list_errors(tmp_path, big_export):
    base = [f"paths.work={tmp_path}", f"data.root={big_export}", "mlflow.enabled=false"]
    proc = run_verb("extract", *base, "backbones=[pixels,resnet_nope]", cwd=tmp_path)
    assert proc.returncode == 2 and "backbones entry 'resnet_nope': there is no conf/backbone/resnet_nope.yaml" \
        in proc.stderr and "convnext_base" in proc.stderr
    proc = run_verb("extract", *base, "backbones=[pixels,pixels]", cwd=tmp_path)
    assert proc.returncode == 2 and "backbones lists pixels twice" in proc.stderr
    proc = run_verb("extract", *base, "backbones=[{kind:timm}]", cwd=tmp_path)
    assert proc.returncode == 2 and "model" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.slow  # parallel launcher jobs (about 55 s): run with the slurm tests, after the main suite
def test_sharded_multirun_under_joblib_is_bitwise_a_single_run(tmp_path, big_export):
    # on CPU the features' last bits depend on the thread count: the same for the single run and each shard
    args = [f"data.root={big_export}", "backbone=test_efficientnet", *COMMON, "extract.workers=1",
            "extract.threads=1", "extract.commit_every=1", "mlflow.enabled=false"]
    single = tmp_path / "single"
    assert run_verb("extract", f"paths.work={single}", *args, cwd=tmp_path).returncode == 0
    reference = read_store(single / "exp" / "embeddings" / "test_efficientnet")[0].tobytes()

    work = tmp_path / "sharded"
    multirun = ["-m", f"paths.work={work}", *args, "extract.shard.count=2", "extract.shard.index=range(2)",
                "hydra/launcher=local", "hydra.launcher.n_jobs=2"]
    # both shard jobs are killed after their first committed batch: the sweep fails, the stores are partial
    proc = run_verb("extract", *multirun, cwd=tmp_path, env=faults(kill_after=2))
    assert proc.returncode != 0
    cfg = make_cfg("status", [f"paths.work={work}", f"data.root={big_export}"])
    (st,) = status(cfg)
    shard0, shard1 = st["shards"]  # rows [0, 4) and [4, 12): shard 1 committed its first batch, then died
    assert (shard1["index"], shard1["lo"], shard1["hi"], shard1["done"], shard1["state"]) == (1, 4, 12, 4, "partial")
    assert (shard0["lo"], shard0["hi"]) == (0, 4) and st["state"] == "partial"
    assert st["rows_done"] == 4 + shard0["done"]  # shard 0 may have finished before the sweep was stopped
    # a failed shard is re-run alone with the command status prints
    failed = shard1
    rerun = failed["rerun"].split()[3:]
    assert failed["rerun"].startswith("python -m pinterest_cls.extract backbone=test_efficientnet")
    proc = run_verb("extract", *rerun, f"paths.work={work}", *COMMON, "extract.threads=1", "mlflow.enabled=false",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_verb("status", f"paths.work={work}", f"data.root={big_export}", "status.require_complete=true",
                    cwd=tmp_path)
    assert f"shard {failed['index']}/2" in proc.stdout
    # the whole sweep again finishes what is left (a done shard only says so)
    proc = run_verb("extract", *multirun, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    proc = run_verb("status", f"paths.work={work}", f"data.root={big_export}", "status.require_complete=true",
                    cwd=tmp_path)
    assert proc.returncode == 0 and "1 of 1 stores complete" in proc.stdout
    emb, index, meta = read_store(work / "exp" / "embeddings" / "test_efficientnet")
    assert meta["complete"] and index["embedded"].all() and emb.tobytes() == reference


def test_status_lists_missing_and_partial_stores(tmp_path, big_export):
    base = [f"paths.work={tmp_path}", f"data.root={big_export}"]
    extract(make_cfg("extract", [*base, "backbone=pixels", *COMMON, "extract.workers=0", "mlflow.enabled=false",
                                 "extract.shard.count=3", "extract.shard.index=2"]), progress=False)
    proc = run_verb("status", *base, "backbones=[pixels,xception]", "status.require_complete=true", cwd=tmp_path)
    assert proc.returncode == 1
    assert "pixels" in proc.stdout and "xception  not started" in proc.stdout
    assert "shard 2/3     rows [8, 12)  4/4  done" in proc.stdout
    assert (f"run it: python -m pinterest_cls.extract backbone=pixels data.root={big_export} "
            "extract.batch_size=4 extract.shard.count=3 extract.shard.index=0") in proc.stdout
    proc = run_verb("status", f"paths.work={tmp_path / 'empty'}", f"data.root={big_export}", cwd=tmp_path)
    assert proc.returncode == 2 and "run python -m pinterest_cls.extract first" in proc.stderr


@pytest.mark.parametrize("launcher,gpus,cpus,mem,time_min", [("slurm_gpu", "1", "8", "32GB", "720"),
                                                             ("slurm_cpu", None, "8", "16GB", "240")])
def test_slurm_launcher_configs_render_job_parameters(tmp_path, monkeypatch, launcher, gpus, cpus, mem, time_min):
    """The sbatch script submitit would submit for our launcher configs, rendered without a cluster (a dummy
    `srun` on PATH), translating the config exactly as hydra-submitit-launcher does."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    verb = "extract" if launcher == "slurm_gpu" else "train"
    cfg = make_cfg(verb, [f"hydra/launcher={launcher}", "hydra.launcher.partition=part1",
                          "hydra.launcher.setup=['source ~/venv/bin/activate']"], return_hydra_config=True)
    lcfg = cfg.hydra.launcher
    assert lcfg._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    params = OmegaConf.to_container(lcfg, resolve=False)
    params.pop("_target_")
    params.pop("submitit_folder")
    executor = submitit.AutoExecutor(cluster="slurm", folder=tmp_path / "submitit",
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()
                                  if k != "name"}, name=verb)
    script = executor._executor._make_submission_file_text(f"python -m pinterest_cls.{verb}", "uid")
    lines = set(script.splitlines())
    assert f"#SBATCH --cpus-per-task={cpus}" in lines and f"#SBATCH --mem={mem}" in lines
    assert f"#SBATCH --time={time_min}" in lines and "#SBATCH --partition=part1" in lines
    assert f"#SBATCH --job-name={verb}" in lines and "source ~/venv/bin/activate" in lines
    if gpus:
        assert f"#SBATCH --gpus-per-node={gpus}" in lines
        assert executor._executor.max_num_timeout == 3  # preempted/timed-out shards are resubmitted and resume
    else:
        assert not any("gpu" in line for line in lines)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory, big_export):
    work = tmp_path_factory.mktemp("par") / "work"
    extract(make_cfg("extract", [f"paths.work={work}", f"data.root={big_export}", "backbone=test_efficientnet",
                                 *COMMON, "extract.workers=0", "mlflow.enabled=false"]), progress=False)
    return work


def _train_sweep(work, export, *extra, cwd, timeout=600):
    return run_verb("train", "-m", f"paths.work={work}", f"data.root={export}", "backbone=test_efficientnet",
                    "split=stratified", "split.test_size=0.34", "train.cv_folds=2", "train.n_jobs=1",
                    "hydra/launcher=local", *extra, cwd=cwd, timeout=timeout)


@pytest.mark.slow
def test_parallel_sweep_into_one_sqlite_store_loses_no_run(tmp_path, embedded, big_export):
    proc = _train_sweep(embedded, big_export, "classifier=svm,knn,logreg,random_forest",
                        "hydra.launcher.n_jobs=4", "train.log_pipeline=false", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "database is locked" not in proc.stderr + proc.stdout
    mlflow.set_tracking_uri(f"sqlite:///{embedded}/mlflow.db")
    runs = mlflow.search_runs(experiment_names=["exp"], filter_string="tags.verb = 'train'", output_format="list")
    assert sorted(r.data.tags["classifier"] for r in runs) == ["knn", "logreg", "random_forest", "svm"]
    assert all(r.info.status == "FINISHED" and "test_f1_macro" in r.data.metrics for r in runs)
    assert len({r.data.tags["sweep"] for r in runs}) == 1
    for r in runs:
        arts = {a.path for a in mlflow.MlflowClient().list_artifacts(r.info.run_id)}
        assert {"predictions.csv", "metrics.json", "plots"} <= arts
        assert hasattr(mlflow.sklearn.load_model(f"runs:/{r.info.run_id}/model"), "predict")


@pytest.mark.slow
def test_parallel_sweep_against_a_tracking_server(tmp_path, embedded, big_export):
    port = free_port()
    server_dir = tmp_path / "server"
    server_dir.mkdir()
    with serving(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                  "--backend-store-uri", f"sqlite:///{server_dir}/mlflow.db",
                  "--artifacts-destination", str(server_dir / "artifacts"), "--workers", "2"],
                 port, "/health", cwd=server_dir, timeout=180):
        uri = f"http://127.0.0.1:{port}"
        proc = _train_sweep(embedded, big_export, "classifier=svm,knn,logreg,random_forest", "seed=0",
                            "hydra.launcher.n_jobs=4", f"mlflow.tracking_uri={uri}", "train.log_pipeline=false",
                            cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        mlflow.set_tracking_uri(uri)
        every = mlflow.search_runs(experiment_names=["exp"], output_format="list")
        (parent,) = [r for r in every if r.data.tags["verb"] == "sweep"]  # the sweep's run, through the server
        runs = [r for r in every if r.data.tags["verb"] == "train"]
        assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in every)
        assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
        assert sorted((r.data.tags["classifier"], r.data.params["seed"]) for r in runs) == \
            sorted((c, "0") for c in ("svm", "knn", "logreg", "random_forest"))
        # artifacts went through the server into its artifact folder, not into the client's work folder
        assert len(list((server_dir / "artifacts").rglob("predictions.csv"))) == 4
        assert all(r.info.artifact_uri.startswith("mlflow-artifacts:") for r in runs)
        loaded = mlflow.sklearn.load_model(f"runs:/{runs[0].info.run_id}/model")
        assert hasattr(loaded, "predict")



def test_backbones_with_the_same_preprocessing_share_one_resized_tensor(big_export):
    import torch

    from pinterest_cls.data.loader import PinDataset, collate_pins
    from pinterest_cls.embed.backbones import build_backbone
    from pinterest_cls.embed.registry import backbone_configs

    torch.manual_seed(0)
    backbones = [build_backbone(b) for b in backbone_configs(make_cfg("extract", [BACKBONES]))]
    paths = sorted(str(p) for p in big_export.rglob("*.jpg"))[:3]
    dataset = PinDataset(paths, range(3), [b.transform for b in backbones], [b.resize_size for b in backbones])
    assert dataset.first_of == [0, 0, 2]  # the two 64 px test models resize alike; pixels (32 px) does not
    rows, pixels, failed = collate_pins([dataset[i] for i in range(3)])
    assert pixels[0] is pixels[1] and pixels[2].shape == (3, 3, 32, 32) and not failed
    for k, b in enumerate(backbones):
        for i, path in enumerate(paths):
            alone = b.transform(load_rgb(path, min_size=b.resize_size))
            assert torch.equal(pixels[k][i], alone)
