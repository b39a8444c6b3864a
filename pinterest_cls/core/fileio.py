"""Files and processes: locks, atomic writes, content hashes, and the CPUs and process start method to use."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import multiprocessing
import os
import shutil
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


@contextlib.contextmanager
def locked(folder: Path, name: str = ".lock"):
    """An exclusive lock on ``folder``, held on the file ``name`` in it (parallel jobs may start at the same
    moment). Not re-entrant: nested locks must use different names."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / name, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def mp_context():
    """The multiprocessing context for worker pools: fork on Linux (as PyTorch's DataLoader has always used
    there), the platform default elsewhere. Explicit, because a job started by a launcher (joblib's loky
    workers) has a different default start method that cannot start ordinary child processes."""
    if sys.platform.startswith("linux"):
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context()


def process_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """A pool of ``workers`` processes (``mp_context``; default: one per CPU) whose numerical libraries run one
    thread each. Each worker is meant to have a CPU to itself; a BLAS or OpenMP pool as wide as the machine in every
    worker oversubscribes the CPUs, and its threads then wait on each other (on 2 cores, OpenBLAS's threads in the
    pixel check's forked workers made it 4.3x slower)."""
    return ProcessPoolExecutor(max_workers=workers, mp_context=mp_context(), initializer=_one_thread_each)


_LIMITS = []


def _one_thread_each() -> None:
    from threadpoolctl import threadpool_limits

    _LIMITS.append(threadpool_limits(limits=1))  # kept: the limits hold for the worker's life
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)


def available_cpus() -> int:
    """CPUs this process may run on (a SLURM allocation or taskset, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 2


def slurm_job_id() -> str | None:
    """This process's SLURM job (``12_3`` for task 3 of array job 12), or None outside SLURM."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return os.environ.get("SLURM_JOB_ID") or None


def slurm_states(jobs: list[str]) -> dict[str, str]:
    """{job id: state} of those of ``jobs`` that SLURM's queue still holds (RUNNING, PENDING, ...); empty
    where SLURM is not installed or does not answer."""
    if not jobs or shutil.which("squeue") is None:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-o", "%i %T", "-j", ",".join(jobs)], capture_output=True, text=True,
                             timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    return dict(line.split(maxsplit=1) for line in out.splitlines() if " " in line)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())
