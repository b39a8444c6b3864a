"""The served model against a hostile client: a real `mlflow models serve` process, started as the guide says (an
activated environment), sent garbage, bombs, oversized payloads, path traversal and symlink escapes, mixed good
and bad rows, and empty bodies. Every row answers with its status, no answer carries a stack trace or a server
path, the limits are refused with a 4xx and one line, and the server stays up with bounded memory."""

import base64
import http.client
import json
import os
import sys
import urllib.request
from pathlib import Path

import pytest

from pinterest_cls.data.demo import bomb_png
from pinterest_cls.train import train

from .helpers import TINY, free_port, image_bytes, make_cfg, serving_in_shell, tree_rss_bytes

MAX_ROWS = 8


def strict_json(raw: bytes):
    """JSON as a strict parser (JavaScript's JSON.parse) reads it: NaN and Infinity are refused."""
    def refuse(token):
        raise AssertionError(f"not strict JSON: {token}")

    return json.loads(raw, parse_constant=refuse)


@pytest.fixture(scope="module")
def server(demo_work, tmp_path_factory):
    """A train run's pipeline served on 127.0.0.1 with a folder it may read files from (holding a symlink that
    leads out of it), at most 8 rows per request."""
    result = train(make_cfg("train", [f"paths.work={demo_work}", *TINY, "classifier=logreg", "classifier.grid.C=[1]",
                                      "train.n_jobs=1", "split=stratified"]))
    base = tmp_path_factory.mktemp("serving")
    root, outside = base / "served", base / "private"
    (root / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "sub" / "a.jpg").write_bytes(image_bytes(seed=1))
    (outside / "secret.jpg").write_bytes(image_bytes(seed=2))
    (root / "escape.jpg").symlink_to(outside / "secret.jpg")
    port = free_port()
    venv = Path(sys.executable).parent
    script = (f". {venv}/activate && exec mlflow models serve -m runs:/{result['run_id']}/pipeline "
              f"--env-manager local -h 127.0.0.1 -p {port}")
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{demo_work}/mlflow.db", "PINTEREST_CLS_SERVE_ROOT": str(root),
           "PINTEREST_CLS_SERVE_MAX_ROWS": str(MAX_ROWS),
           "PATH": os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if Path(p) != venv)}
    with serving_in_shell(script, port, "/ping", cwd=base, env=env) as proc:
        yield {"port": port, "root": root, "outside": outside, "proc": proc, "base": base,
               "export": demo_work / "demo" / "export"}


def post(server, body: bytes, content_type: str | None = "application/json") -> tuple[int, bytes]:
    """(status, body) of a POST to /invocations, sent as given: no Content-Type header at all when None."""
    conn = http.client.HTTPConnection("127.0.0.1", server["port"], timeout=120)
    try:
        conn.request("POST", "/invocations", body=body,
                     headers={"Content-Type": content_type} if content_type else {"Content-Length": str(len(body))})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def rows(server, columns: list[str], data: list[list]) -> list[dict]:
    status, raw = post(server, json.dumps({"dataframe_split": {"columns": columns, "data": data}}).encode())
    assert status == 200, raw[:500]
    answer = strict_json(raw)
    assert "stack_trace" not in raw.decode()
    return answer["predictions"]


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pin(server) -> bytes:
    return next(server["export"].glob("alice/per_board/hiking/*/pin_closeup_image.jpg")).read_bytes()


def test_image_bytes_are_classified_and_each_row_says_ok(server):
    out = rows(server, ["image"], [[b64(pin(server))], [b64(image_bytes(seed=3))]])
    assert [r["status"] for r in out] == ["ok", "ok"] and all(r["reason"] == "" for r in out)
    assert all(r["prediction"] and 0 < r["score"] <= 1 for r in out)


def test_a_bad_row_fails_alone_and_says_why(server):
    good = b64(pin(server))
    out = rows(server, ["image"], [[good], ["this is not base64!"], [b64(b"hello, not an image")], [""],
                                   [b64(bomb_png())], [good]])
    assert [r["status"] for r in out] == ["ok", "failed", "failed", "failed", "failed", "ok"]
    assert [r["reason"] for r in out[1:5]] == ["image is not base64 text", "cannot identify image file",
                                               "image is empty", out[4]["reason"]]
    assert out[4]["reason"].startswith("image larger than")
    assert out[0]["prediction"] == out[5]["prediction"]
    assert all(r["prediction"] is None and r["score"] is None for r in out[1:5])  # null, never NaN


def test_path_input_is_read_only_inside_the_served_folder(server):
    root = server["root"]
    asked = ["sub/a.jpg", str(root / "sub" / "a.jpg"), "../private/secret.jpg", str(server["outside"] / "secret.jpg"),
             "escape.jpg", "/etc/passwd", "sub/none.jpg", "/nonexistent/file.jpg"]
    out = rows(server, ["path"], [[p] for p in asked])
    assert [r["status"] for r in out] == ["ok", "ok"] + ["failed"] * 6
    assert [r["reason"] for r in out[2:]] == [
        "path leads outside the served folder ('..')", "path leads outside the served folder",
        "path leads outside the served folder", "path leads outside the served folder", "file not found",
        "path leads outside the served folder"]
    assert not any(str(server["base"]) in json.dumps(r) for r in out)  # no server path in any answer


def test_too_many_rows_are_refused_with_413_and_one_line(server):
    data = [[b64(pin(server))]] * (MAX_ROWS + 1)
    status, raw = post(server, json.dumps({"dataframe_split": {"columns": ["image"], "data": data}}).encode())
    answer = strict_json(raw)
    assert status == 413 and set(answer) == {"error_code", "message"} and "\n" not in answer["message"]
    assert answer["message"] == f"{MAX_ROWS + 1} rows, more than the {MAX_ROWS} a request may hold " \
                                "(PINTEREST_CLS_SERVE_MAX_ROWS)"


def test_a_50_mb_payload_is_refused_with_413(server):
    body = json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64(os.urandom(37 << 20))]]}}).encode()
    assert len(body) > 50e6
    status, raw = post(server, body)
    answer = strict_json(raw)
    assert status == 413 and answer["error_code"] == "REQUEST_TOO_LARGE" and "bytes, more than the" in answer["message"]


@pytest.mark.parametrize("body,content_type,status", [
    (b"", "application/json", 400), (b"", None, 415), (b"{not json", "application/json", 400),
    (b'{"rows": [1, 2]}', "application/json", 400), (b'{"dataframe_split": {"columns": ["colour"], "data": [["red"]]}}',
                                                      "application/json", 400),
    (b"image\n", "text/csv", 400)])
def test_empty_and_malformed_bodies_get_a_4xx_and_one_line(server, body, content_type, status):
    got, raw = post(server, body, content_type)
    answer = strict_json(raw)
    assert got == status and set(answer) == {"error_code", "message"}, raw[:300]
    assert "\n" not in answer["message"] and "Traceback" not in answer["message"]


def test_the_server_stays_up_and_its_memory_stays_bounded(server):
    bomb, junk = b64(bomb_png()), json.dumps({"dataframe_split": {"columns": ["image"],
                                                                  "data": [[b64(os.urandom(36 << 20))]]}}).encode()
    rows(server, ["image"], [[bomb]] * MAX_ROWS)
    post(server, junk)
    before = tree_rss_bytes(server["proc"].pid)
    for _ in range(5):  # pixel bombs and oversized payloads, again and again
        out = rows(server, ["image"], [[bomb]] * MAX_ROWS)
        assert all(r["status"] == "failed" for r in out)
        assert post(server, junk)[0] == 413
    after = tree_rss_bytes(server["proc"].pid)
    assert after - before < 200 << 20, (before, after)
    assert urllib.request.urlopen(f"http://127.0.0.1:{server['port']}/ping", timeout=10).status == 200
    assert rows(server, ["image"], [[b64(pin(server))]])[0]["status"] == "ok"
