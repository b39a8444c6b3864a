"""SLURM for real: a one-node cluster (experiments/slurm/local_cluster.sh: munge, slurmctld, slurmd, slurmdbd)
runs the launchers' jobs. Sharded extraction as a job array equals a local run bit for bit; a requeued
(preempted) shard commits, is requeued and resumes from its last commit without recomputing a committed row; a
job that reaches its time limit is resubmitted and finishes; a train sweep logs into a real tracking server."""

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest

from pinterest_cls.data.demo import ensure_demo_export
from pinterest_cls.data.store import read_records
from pinterest_cls.extract import extract
from pinterest_cls.status import status

from .helpers import REPO, faults, free_port, make_cfg, serving

pytestmark = pytest.mark.slurm

SCRIPT = REPO / "experiments" / "slurm" / "local_cluster.sh"
STORE = ("exp", "embeddings", "test_efficientnet")
EXTRACT = ["backbone=test_efficientnet", "extract.batch_size=8", "extract.workers=1", "extract.threads=1",
           "extract.commit_every=1"]
#: small requests, so that both shards of a sweep run at once on two cores
JOBS = ["hydra/launcher=slurm_cpu", "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2",
        "hydra.launcher.timeout_min=10"]


@pytest.fixture(scope="module")
def slurm():
    """The local cluster, started by the script (which installs slurm-wlm, munge, slurmdbd and MariaDB with
    apt if they are missing) and stopped afterwards unless it was already running."""
    if shutil.which("slurmctld") is None and os.geteuid() != 0:
        pytest.skip("SLURM is not installed and this is not root (experiments/slurm/README.md)")
    was_running = "slurmctld: running" in subprocess.run([SCRIPT, "status"], capture_output=True, text=True).stdout
    proc = subprocess.run([SCRIPT, "start"], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    conf = subprocess.run([SCRIPT, "env"], capture_output=True, text=True).stdout.strip().split("=", 1)[1]
    yield {"SLURM_CONF": conf}
    if not was_running:
        subprocess.run([SCRIPT, "stop"], capture_output=True, timeout=120)


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return ensure_demo_export(tmp_path_factory.mktemp("slurm_export") / "exp")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, export):
    """The store of one local, unsharded run (as the SLURM jobs: one model thread)."""
    work = tmp_path_factory.mktemp("slurm_reference") / "work"
    extract(make_cfg("extract", [f"paths.work={work}", f"data.root={export}", *EXTRACT, "mlflow.enabled=false"]),
            progress=False)
    return work


def _verb(verb: str, *args: str, slurm: dict, cwd: Path, env: dict | None = None, wait: bool = True,
          timeout: float = 600):
    cmd = [sys.executable, "-m", f"pinterest_cls.{verb}", *args]
    full = dict(os.environ, PYTHONUNBUFFERED="1", **slurm, **(env or {}))
    if wait:
        return subprocess.run(cmd, cwd=cwd, env=full, capture_output=True, text=True, timeout=timeout)
    return subprocess.Popen(cmd, cwd=cwd, env=full, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _sacct(slurm: dict, job: str, timeout: float = 60) -> list[tuple[str, str]]:
    """(job id, state) of every attempt of ``job``'s array tasks (requeued attempts too), once none is still
    running: a job's result is written before its process has ended and SLURM has accounted for it."""
    deadline = time.time() + timeout
    while True:
        out = subprocess.run(["sacct", "-X", "--duplicates", "-n", "-P", "-j", job, "-o", "JobID,State"],
                             capture_output=True, text=True, env=dict(os.environ, **slurm), check=True).stdout
        states = [tuple(line.split("|")) for line in out.split()]
        if time.time() > deadline or not any(s in ("RUNNING", "PENDING", "COMPLETING") for _, s in states):
            return states
        time.sleep(1)


def _job_folders(work: Path, array: bool = True) -> list[Path]:
    """The submitit folders of the sweep's jobs, named by SLURM job id: 12_0, 12_1 for the tasks of array job 12,
    12 for a job of its own."""
    folders = sorted(p for p in (work / "hydra").glob("extract-multirun/*/.submitit/*") if p.is_dir())
    return [p for p in folders if ("_" in p.name) == array]


def _store(work: Path) -> Path:
    return work.joinpath(*STORE)


def _assert_same_store(work: Path, reference: Path) -> None:
    got, want = np.load(_store(work) / "embeddings.npy"), np.load(_store(reference) / "embeddings.npy")
    assert got.tobytes() == want.tobytes()


def test_sharded_extract_runs_as_a_slurm_job_array_equal_to_a_local_run(slurm, export, reference, tmp_path):
    work = tmp_path / "work"
    proc = _verb("extract", "-m", f"paths.work={work}", f"data.root={export}", *EXTRACT, "extract.shard.count=2",
                 "extract.shard.index=0,1", *JOBS, "mlflow.enabled=false", slurm=slurm, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    jobs = [p.name for p in _job_folders(work)]
    array = jobs[0].split("_")[0]
    assert sorted(jobs) == [f"{array}_0", f"{array}_1"]  # one SLURM array, one task per shard
    assert sorted(_sacct(slurm, array)) == [(f"{array}_0", "COMPLETED"), (f"{array}_1", "COMPLETED")]
    assert "Bypassing sacct error" not in proc.stdout + proc.stderr  # the cluster keeps accounts
    _assert_same_store(work, reference)


def test_a_requeued_shard_commits_resumes_and_recomputes_no_committed_row(slurm, export, reference, tmp_path,
                                                                          monkeypatch):
    work = tmp_path / "work"
    sweep = _verb("extract", "-m", f"paths.work={work}", f"data.root={export}", *EXTRACT, "extract.shard.count=2",
                  "extract.shard.index=0,1", *JOBS, "mlflow.enabled=false", slurm=slurm, cwd=tmp_path,
                  env=faults(delay_s=0.5), wait=False)
    # wait until shard 0 (rows 0-71) has committed a batch, then requeue it as a preemption would
    deadline = time.time() + 240
    while time.time() < deadline:
        records = [r for r in read_records(_store(work)) if r["lo"] == 0] if _store(work).is_dir() else []
        if records and records[0]["done"] >= 8:
            break
        time.sleep(0.5)
    else:
        sweep.kill()
        pytest.fail("shard 0 never committed a batch: " + sweep.stdout.read()[-2000:])
    array = _job_folders(work)[0].name.split("_")[0]
    # status shows which SLURM job runs the unfinished shard
    monkeypatch.setenv("SLURM_CONF", slurm["SLURM_CONF"])
    (store,) = status(make_cfg("status", [f"paths.work={work}", f"data.root={export}"]))
    shard0 = next(sh for sh in store["shards"] if sh["index"] == 0)
    assert (shard0["slurm_job"], shard0["slurm_state"]) == (f"{array}_0", "RUNNING")
    subprocess.run(["scontrol", "requeue", f"{array}_0"], env=dict(os.environ, **slurm), check=True)
    out, _ = sweep.communicate(timeout=400)
    assert sweep.returncode == 0, out[-3000:]
    _assert_same_store(work, reference)
    states = _sacct(slurm, array)
    assert (f"{array}_0", "REQUEUED") in states and (f"{array}_0", "COMPLETED") in states, states
    log = next(work.glob(f"hydra/extract-multirun/*/.submitit/{array}_0/*_log.out")).read_text()
    stopped = re.search(r"SIGTERM: stopped after committing every written row .* test_efficientnet (\d+)/72 rows",
                        log)
    assert stopped, log[-2000:]
    committed = int(stopped.group(1))
    assert committed >= 8 and f"resuming shard 0/2 rows [0, 72) at row {committed}" in log
    # the second attempt embedded exactly the rows that were not committed: its batch timings start there
    timings = _store(work) / "timings" / f"rows_0000000000_0000000072_from_{committed:010d}.csv"
    assert pd.read_csv(timings)["images"].sum() == 72 - committed


def test_a_job_at_its_time_limit_is_resubmitted_and_finishes(slurm, export, reference, tmp_path):
    """submitit asks SLURM for SIGUSR2 30 s before the 2-minute limit; extract commits, submitit requeues the
    job (up to max_num_timeout times), and the next attempt resumes.

    SLURM may send the signal up to 60 s earlier than asked (sbatch --signal): with a 1-minute limit it once came
    2 s after the start, before submitit had installed its handler, and killed the job. A 2-minute limit puts the
    earliest signal at 30 s, after start-up; 5 s per batch (95 s in all) makes sure at least one attempt stops,
    and up to 6 requeues cover signals that all come early."""
    work = tmp_path / "work"
    proc = _verb("extract", "-m", f"paths.work={work}", f"data.root={export}", *EXTRACT, *JOBS,
                 "hydra.launcher.timeout_min=2", "hydra.launcher.signal_delay_s=30", "hydra.launcher.max_num_timeout=6",
                 "mlflow.enabled=false", slurm=slurm, cwd=tmp_path, env=faults(delay_s=5.0), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    _assert_same_store(work, reference)
    (job,) = _job_folders(work, array=False)
    log = "".join(p.read_text() for p in sorted(job.glob("*_log.*")))
    stops = [int(n) for n in re.findall(r"SIGUSR2: stopped after committing every written row .* (\d+)/147 rows", log)]
    assert stops and "this job is timed-out" in log and "Requeued job" in log, log[-2000:]
    for committed in stops:  # each attempt resumed where the one before it stopped
        assert f"resuming shard 0/1 rows [0, 147) at row {committed} " in log
    # every stop was a requeue, and the last attempt completed (SLURM may still record it FAILED when the time
    # limit's SIGUSR2 reaches srun just after the work is done; the job's result is what counts)
    attempts = [s for _, s in _sacct(slurm, job.name)]
    assert attempts.count("REQUEUED") == len(stops) == len(attempts) - 1, attempts
    assert log.rstrip().endswith("Exiting after successful completion") or "Job completed successfully" in log
    # the last attempt embedded only the rows left after the last stop
    timings = _store(work) / "timings" / f"rows_0000000000_0000000147_from_{stops[-1]:010d}.csv"
    assert pd.read_csv(timings)["images"].sum() == 147 - stops[-1]


def test_a_train_sweep_on_slurm_logs_four_runs_into_a_tracking_server(slurm, export, reference, tmp_path):
    port = free_port()
    server = tmp_path / "server"
    server.mkdir()
    with serving(["mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--backend-store-uri",
                  f"sqlite:///{server}/mlflow.db", "--artifacts-destination", str(server / "artifacts"),
                  "--workers", "1"], port, "/health", cwd=server, timeout=180):
        uri = f"http://127.0.0.1:{port}"
        proc = _verb("train", "-m", f"paths.work={reference}", f"data.root={export}", "backbone=test_efficientnet",
                     "classifier=svm,knn,logreg,random_forest", "train.cv_folds=2",
                     "train.n_jobs=1", "train.bootstrap=100", "train.log_pipeline=false", *JOBS,
                     f"mlflow.tracking_uri={uri}", "mlflow.experiment=slurm", slurm=slurm, cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        mlflow.set_tracking_uri(uri)
        every = mlflow.search_runs(experiment_names=["slurm"], output_format="list")
        runs = [r for r in every if r.data.tags["verb"] == "train"]
        (parent,) = [r for r in every if r.data.tags["verb"] == "sweep"]
        assert sorted(r.data.tags["classifier"] for r in runs) == ["knn", "logreg", "random_forest", "svm"]
        assert all(r.info.status == "FINISHED" and r.data.tags["mlflow.parentRunId"] == parent.info.run_id
                   for r in runs)
        assert parent.info.status == "FINISHED"
        # each ran as a SLURM job: the job folders are named by SLURM job ids
        jobs = sorted(p.name for p in reference.glob("hydra/train-multirun/*/.submitit/*_*") if p.is_dir())
        assert len(jobs) == 4 and len({j.split("_")[0] for j in jobs}) == 1
