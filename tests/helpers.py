"""What the tests share: real configs composed from conf/, small real images and exports, verbs run as a user runs
them (in a subprocess), a real server, and the fault injection of the crash-safety tests."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
from hydra import compose, initialize_config_dir
from PIL import Image

from pinterest_cls.core.config import CONF_DIR
from pinterest_cls.data.store import open_store

REPO = Path(__file__).resolve().parent.parent
#: The tiny timm test model with random weights (real decodes and a real store, features without meaning).
TINY = ["backbone=test_efficientnet"]
#: The folder whose sitecustomize.py installs the faults of :func:`faults` in a child process.
FAULTS = Path(__file__).resolve().parent / "faults"


def make_cfg(verb: str, overrides: list[str], return_hydra_config: bool = False):
    """The config ``python -m pinterest_cls.<verb> <overrides>`` would run with."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name=verb, overrides=overrides, return_hydra_config=return_hydra_config)


def run_verb(verb: str, *args: str, cwd: Path, timeout: float = 300, env: dict | None = None
             ) -> subprocess.CompletedProcess:
    """Run ``python -m pinterest_cls.<verb> args...`` in a subprocess, as a user would."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run([sys.executable, "-m", f"pinterest_cls.{verb}", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def image_bytes(fmt: str = "JPEG", size=(64, 48), seed: int = 0, mode: str = "RGB", **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    # smooth blocks compress like photos and survive JPEG
    arr = np.repeat(np.repeat(arr[::8, ::8], 8, axis=0), 8, axis=1)[: size[1], : size[0]]
    im = Image.fromarray(np.ascontiguousarray(arr)).convert(mode)
    buf = io.BytesIO()
    im.save(buf, fmt, **save)
    return buf.getvalue()


def write_image(path: Path, data: bytes | None = None, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else image_bytes(**kw))
    return path


def make_pinterest_export(root: Path, boards: dict, pins_per_board: int = 3, size=(64, 48)) -> Path:
    """``boards``: {(user, board): category or None (no board_category.txt)}."""
    for b, ((user, board), category) in enumerate(sorted(boards.items())):
        bdir = root / user / "per_board" / board
        bdir.mkdir(parents=True, exist_ok=True)
        if category is not None:
            (bdir / "board_category.txt").write_text(category)
        for p in range(pins_per_board):
            write_image(bdir / f"p{p}" / "pin_closeup_image.jpg", seed=100 * b + p, size=size)
    return root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(args: list[str], port: int, path: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    """Run ``python -m <args>`` as a server (the venv's bin on PATH, as in an activated environment: mlflow
    starts `uvicorn` from PATH) until http://127.0.0.1:port<path> answers 200; stop it afterwards."""
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               **(env or {}))
    with _server([sys.executable, "-m", *args], port, path, cwd, env, timeout) as server:
        yield server


@contextlib.contextmanager
def serving_in_shell(script: str, port: int, path: str, cwd: Path, env: dict | None = None, timeout: float = 120):
    """Run the shell command ``script`` (as a user types it: ``. .venv/bin/activate && mlflow models serve ...``)
    as a server, with the caller's environment (no venv on PATH), until http://127.0.0.1:port<path> answers."""
    with _server(["bash", "-c", script], port, path, cwd, dict(os.environ, **(env or {})), timeout) as server:
        yield server


@contextlib.contextmanager
def _server(cmd: list[str], port: int, path: str, cwd: Path, env: dict, timeout: float):
    # the server's output goes to a file: a pipe nobody reads fills up (64 kB of access log) and blocks the
    # server in the middle of a request
    log_path = Path(cwd) / f"server-{port}.log"
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server.log_path = log_path
    try:
        deadline = time.time() + timeout
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise AssertionError(log_path.read_text(errors="replace")[-3000:]) from None
                time.sleep(1)
        yield server
    finally:  # the server and what it started (mlflow starts uvicorn)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def tree_rss_bytes(pid: int) -> int:
    """Resident memory of process ``pid`` and all its descendants (from /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            rss = next(line for line in Path(f"/proc/{p}/status").read_text().splitlines() if line.startswith("VmRSS"))
            total += int(rss.split()[1]) * 1024
        except (OSError, StopIteration):
            continue
    return total


def faults(kill_after: int | None = None, signal_after: tuple[int, int] | None = None,
           delay_s: float | None = None, hold_until: Path | None = None) -> dict:
    """The environment of a child process with faults injected into extract's stream (tests/faults/): kill -9
    after batch ``kill_after``; signal ``signal_after[1]`` after batch ``signal_after[0]``; sleep ``delay_s``
    after each batch; after the first batch, wait until the file ``hold_until`` exists."""
    env = {"PYTHONPATH": os.pathsep.join([str(FAULTS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    if kill_after is not None:
        env["PINTEREST_CLS_KILL_AFTER_BATCH"] = str(kill_after)
    if signal_after is not None:
        env["PINTEREST_CLS_SIGNAL_AFTER_BATCH"] = f"{signal_after[0]}:{int(signal_after[1])}"
    if delay_s is not None:
        env["PINTEREST_CLS_BATCH_DELAY_S"] = str(delay_s)
    if hold_until is not None:
        env["PINTEREST_CLS_HOLD_UNTIL"] = str(hold_until)
    return env


def read_store(folder: Path):
    """(vectors memory-mapped, pins of index.parquet, meta.json as a dict) of the store in ``folder``."""
    store = open_store(folder)
    return store.vectors, store.pins, store.meta.to_dict()
