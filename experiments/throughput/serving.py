"""CPU serving throughput, torch vs OpenVINO (and OpenVINO int8): `predict` and `mlflow models serve` with a
trained classifier.

    python experiments/throughput/serving.py [--n 256] [--request 16] [--dir /tmp/serving_bench]

On N generated 736x1100 JPEGs (the same pins as bench.py), for each runtime (extract.runtime=torch|openvino,
efficientnet_lite0 with its real weights, extract.amp=auto; and OpenVINO with extract.amp=int8, its model
quantized on the store's own pins, which the served model then embeds with): embed them, train a logistic
regression (fixed C, no search: only the speed matters here), then
  - predict: the `predict` verb over the N pins (from the MLflow run: the classifier, the backbone rebuilt, the
    OpenVINO model from its cache), whole call and images/s after the model is built;
  - serve: `mlflow models serve --env-manager local` on the run's pyfunc model; one client sends the N pins as
    base64 in requests of --request pins each, one after another; images/s over the requests after a
    warm-up request.
The pins are generated noise, so the classifiers' predictions mean nothing; their agreement across runtimes is
tested on real photos and the demo (tests/test_openvino.py).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
from hydra import compose, initialize_config_dir

from pinterest_cls.core.config import CONF_DIR
from pinterest_cls.data.demo import synthetic_export
from pinterest_cls.extract import extract
from pinterest_cls.predict import predict
from pinterest_cls.train import train

SIZE = (736, 1100)


def make_cfg(verb, overrides):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(verb, overrides=overrides)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_rate(model_uri: str, tracking_uri: str, paths: list[str], request: int, log_path: Path) -> tuple[float, list]:
    port = free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri,
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    with open(log_path, "wb") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri,
                                   "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError(log_path.read_text(errors="replace")[-3000:]) from None
                time.sleep(1)
        bodies = []
        for lo in range(0, len(paths), request):
            rows = [[base64.b64encode(Path(p).read_bytes()).decode()] for p in paths[lo:lo + request]]
            bodies.append(json.dumps({"dataframe_split": {"columns": ["image"], "data": rows}}).encode())

        def invoke(body):
            req = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=600) as r:
                return json.loads(r.read())["predictions"]

        invoke(bodies[0])  # warm-up: the first request builds the model's runtime
        t0 = time.perf_counter()
        preds = [p for body in bodies for p in invoke(body)]
        return len(paths) / (time.perf_counter() - t0), [p["prediction"] for p in preds]
    finally:
        server.terminate()
        server.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--request", type=int, default=16, help="pins per request to the server")
    ap.add_argument("--dir", default="/tmp/serving_bench")
    args = ap.parse_args()
    base = Path(args.dir)
    export = synthetic_export(base / f"export{args.n}_boards16", args.n, SIZE, pins_per_board=16, categories=4)
    work = base / "work"
    os.environ.setdefault("PINTEREST_CLS_CACHE", str(base / "cache"))
    print(f"{platform.machine()}, {os.cpu_count()} cores, {args.n} JPEGs {SIZE[0]}x{SIZE[1]}, "
          f"requests of {args.request}", flush=True)
    paths = sorted(str(p) for p in export.rglob("pin_closeup_image.jpg"))
    rows = []
    for runtime, amp in (("torch", "auto"), ("openvino", "auto"), ("openvino", "int8")):
        name = runtime if amp == "auto" else f"{runtime} {amp}"
        common = [f"paths.work={work}", f"data.root={export}", f"data.name=serve_{runtime}_{amp}"]
        extract(make_cfg("extract", [*common, f"extract.runtime={runtime}", f"extract.amp={amp}",
                                     "mlflow.enabled=false", "extract.overwrite=true"]), progress=False)
        result = train(make_cfg("train", [*common, "classifier=logreg", "classifier.grid.C=[1]",
                                          "split=stratified", "train.n_jobs=1"]))
        cfg = make_cfg("predict", [*common, f"run_id={result['run_id']}", f"inputs={export}",
                                   f"predict.out={base / f'{runtime}_{amp}.csv'}"])
        t0 = time.perf_counter()
        frame = predict(cfg)
        predict_s = time.perf_counter() - t0
        tracking = f"sqlite:///{work}/mlflow.db"
        serve, served = serve_rate(f"runs:/{result['run_id']}/pipeline", tracking, paths, args.request,
                                   base / f"server_{runtime}_{amp}.log")
        assert len(served) == len(frame) == args.n
        rows.append(dict(runtime=name, predict_s=predict_s, predict_images_per_s=len(frame) / predict_s,
                         serve_images_per_s=serve))
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in rows[-1].items()}), flush=True)
    table = pd.DataFrame(rows).set_index("runtime")
    print()
    print(table.round(2).to_string())
    for a, b in (("openvino", "torch"), ("openvino int8", "openvino")):
        ratio = table.loc[a] / table.loc[b]
        print(f"{a} / {b}: predict {ratio['predict_images_per_s']:.2f}x, serve {ratio['serve_images_per_s']:.2f}x")


if __name__ == "__main__":
    main()
