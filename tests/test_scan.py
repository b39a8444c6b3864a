import hashlib
import json
import os
import time

import pandas as pd
import pytest

from pinterest_cls.core.errors import UserError
from pinterest_cls.data import demo
from pinterest_cls.data.images import verify_image
from pinterest_cls.data.manifest import MANIFEST, load_manifest
from pinterest_cls.scan import scan

from .helpers import image_bytes, make_cfg, make_pinterest_export, run_verb, write_image


def run_scan(work, *overrides):
    return scan(make_cfg("scan", [f"paths.work={work}", *overrides]), progress=False)


def by_pin(manifest):
    return {(r.user, r.board, r.pin): r for r in manifest.itertuples()}


def test_demo_export_every_pin_judged_right(work):
    report = run_scan(work)
    m = load_manifest(work / "demo")
    rows = by_pin(m)
    expected = {
        ("alice", "ocean_waves", "corrupt_pin"): ("corrupt", "cannot identify image file"),
        ("bruno", "woodland", "truncated_pin"): ("corrupt", "truncated JPEG"),
        ("chen", "dunes", "bomb_pin"): ("corrupt", "image larger than 89478485 pixels (100000x100000 PNG)"),
        ("chen", "dunes", "no_image_pin"): ("missing", "no pin_closeup_image.jpg in pin folder"),
    }
    for key, (status, reason) in expected.items():
        assert (rows[key].status, rows[key].reason) == (status, reason), key
    png = rows[("alice", "night_lights", "png_as_jpg")]
    assert (png.status, png.format, png.width, png.height) == ("ok", "PNG", 192, 256)
    for board, reason in [("misc", "category 'Other' rejected"), ("unsorted", "no board_category.txt"),
                          ("drafts", "empty board_category.txt")]:
        sub = m[m.board == board]
        assert len(sub) == 3 and set(sub.status) == {"rejected"} and set(sub.reason) == {reason}
    # no good image flagged: every generated pin of an accepted board is ok with its real size
    regular = m[m.pin.str.startswith("pin_") & ~m.board.isin(["misc", "unsorted", "drafts"])]
    assert len(regular) == len(demo.BOARDS) * demo.PINS_PER_BOARD
    assert set(regular.status) == {"ok"} and set(regular.format) == {"JPEG"}
    assert set(zip(regular.width, regular.height)) == {demo.SIZE}
    assert report["status"] == {"ok": 147, "corrupt": 3, "missing": 1, "rejected": 9}
    assert report["skipped_users"] == ["dana"] and report["stray_files"] == 1
    cats = json.loads((work / "demo" / "categories.json").read_text())
    assert cats == {"desert": 0, "forest": 1, "night_sky": 2, "ocean": 3}
    assert all(len(m[(m.category == c) & (m.status == "ok")]) >= 30 for c in cats)
    # deterministic order
    assert list(m.itertuples(index=False)) == list(
        m.sort_values(["user", "board", "pin"]).itertuples(index=False))


def test_pool_and_serial_scans_agree(work, tmp_path):
    run_scan(work, "scan.workers=1", "scan.incremental=false")
    serial = load_manifest(work / "demo")
    run_scan(work, "scan.workers=2", "scan.incremental=false")
    pooled = load_manifest(work / "demo")
    pd.testing.assert_frame_equal(serial, pooled)


def test_imagefolder_layout(tmp_path, work):
    root = tmp_path / "flowers"
    write_image(root / "roses" / "a.jpg", seed=1)
    write_image(root / "roses" / "nested" / "b.png", image_bytes("PNG", seed=2))
    write_image(root / "tulips" / "c.jpg", image_bytes("PNG", seed=3))  # PNG named .jpg
    write_image(root / "tulips" / "d.jpg", b"not an image at all")
    write_image(root / "Other" / "e.jpg", seed=4)
    (root / "tulips" / "README.txt").write_text("not a pin")
    (root / "stray.jpg").write_bytes(image_bytes(seed=5))
    report = run_scan(work, f"data.root={root}", "data.layout=imagefolder")
    m = load_manifest(work / "flowers")  # data.name defaults to the root folder's name
    got = {(r.board, r.pin): (r.status, r.format if isinstance(r.format, str) else None, r.reason)
           for r in m.itertuples()}
    assert got == {
        ("Other", "e.jpg"): ("rejected", None, "category 'Other' rejected"),
        ("roses", "a.jpg"): ("ok", "JPEG", ""),
        ("roses", "nested/b.png"): ("ok", "PNG", ""),
        ("tulips", "c.jpg"): ("ok", "PNG", ""),
        ("tulips", "d.jpg"): ("corrupt", None, "cannot identify image file"),
    }
    assert set(m.user) == {""} and report["stray_files"] == 2


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_csv_layout(tmp_path, work, suffix):
    img = tmp_path / "imgs"
    write_image(img / "1.jpg", seed=1)
    write_image(img / "2.jpg", seed=2)
    write_image(img / "3.jpg", seed=3)
    table = pd.DataFrame({"file": ["imgs/1.jpg", "imgs/2.jpg", "imgs/3.jpg", "imgs/gone.jpg"],
                          "theme": [" cats ", "dogs", "none", "cats"],
                          "owner": ["u1", "u1", "u2", "u2"]})
    file = tmp_path / f"pins{suffix}"
    table.to_csv(file, index=False) if suffix == ".csv" else table.to_parquet(file)
    run_scan(work, f"data.root={file}", "data.layout=csv", "data.path_column=file",
             "data.label_column=theme", "data.user_column=owner")
    m = load_manifest(work / "pins")
    got = {r.pin: (r.user, r.category, r.status) for r in m.itertuples()}
    assert got == {"imgs/1.jpg": ("u1", "cats", "ok"), "imgs/2.jpg": ("u1", "dogs", "ok"),
                   "imgs/3.jpg": ("u2", "none", "rejected"), "imgs/gone.jpg": ("u2", "cats", "missing")}
    with pytest.raises(UserError, match="data.label_column='label' is not a column"):
        run_scan(work, f"data.root={file}", "data.layout=csv", "data.path_column=file")


def test_anomaly_kinds(tmp_path):
    good = write_image(tmp_path / "good.jpg", seed=7, size=(300, 200))
    data = good.read_bytes()
    trunc = write_image(tmp_path / "trunc.jpg", data[: len(data) // 2])
    assert verify_image(good).status == "ok"
    # header-only checks (and Image.verify) pass a truncated JPEG; the full decode does not
    assert verify_image(trunc, full=False).status == "ok"
    v = verify_image(trunc)
    assert (v.status, v.reason) == ("corrupt", "truncated JPEG")
    v = verify_image(trunc, allow_truncated=True)
    assert (v.status, v.reason, v.width) == ("ok", "truncated JPEG (allowed)", 300)
    bomb = write_image(tmp_path / "bomb.png", demo.bomb_png(200_000, 200_000))
    t0 = time.perf_counter()
    v = verify_image(bomb)
    assert v.status == "corrupt" and v.reason.startswith("image larger than 89478485 pixels (200000x200000")
    assert time.perf_counter() - t0 < 5  # judged from the header: a decode would need 120 GB
    assert verify_image(bomb, max_pixels=10**12).status == "corrupt"  # allowed size, but broken data
    assert verify_image(write_image(tmp_path / "empty.jpg", b"")).reason == "empty file (0 bytes)"
    assert verify_image(tmp_path / "nope.jpg").status == "missing"
    gif = write_image(tmp_path / "anim.jpg", image_bytes("GIF", seed=3, save_all=True,
                                                          append_images=[]))
    assert verify_image(gif).format == "GIF"


def test_incremental_rescan(tmp_path, work):
    root = make_pinterest_export(tmp_path / "exp", {("u", "b1"): "cats", ("u", "b2"): "dogs"})
    first = run_scan(work, f"data.root={root}")
    assert (first["decoded"], first["reused"]) == (6, 0)
    before = load_manifest(work / "exp")
    for r in before.itertuples():  # the content digest of exact copies: the file's sha256
        assert r.digest == hashlib.sha256(open(r.path, "rb").read()).hexdigest()
    again = run_scan(work, f"data.root={root}")
    assert (again["decoded"], again["reused"]) == (0, 6)
    pd.testing.assert_frame_equal(before, load_manifest(work / "exp"))  # digests kept with reused verdicts
    # a changed file is decoded again and its new verdict recorded
    changed = root / "u" / "per_board" / "b1" / "p1" / "pin_closeup_image.jpg"
    changed.write_bytes(b"garbage")
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    third = run_scan(work, f"data.root={root}")
    assert (third["decoded"], third["reused"]) == (1, 5)
    assert by_pin(load_manifest(work / "exp"))[("u", "b1", "p1")].status == "corrupt"
    assert pd.isna(by_pin(load_manifest(work / "exp"))[("u", "b1", "p1")].digest)
    # a manifest written before digests were recorded is verified again, not reused without them
    old = load_manifest(work / "exp").drop(columns=["digest"])
    old.to_parquet(work / "exp" / "manifest.parquet", index=False)
    assert run_scan(work, f"data.root={root}")["reused"] == 0
    assert load_manifest(work / "exp")["digest"].notna().sum() == 5
    # other verification settings invalidate stored verdicts
    fourth = run_scan(work, f"data.root={root}", "scan.allow_truncated=true")
    assert (fourth["decoded"], fourth["reused"]) == (6, 0)


def test_bad_inputs_exit_with_one_line(tmp_path):
    empty = tmp_path / "empty_export"
    empty.mkdir()
    cases = [
        ([f"data.root={tmp_path / 'does_not_exist'}"], "does not exist"),
        ([f"data.root={empty}"], "no pins found in data.root="),
        (["data.layout=zip"], "data.layout='zip' is not a layout; choose one of: pinterest, imagefolder, csv"),
        ([f"data.root={empty}", "data.layout=csv"], "is not a file (data.layout=csv"),
    ]
    for args, message in cases:
        proc = run_verb("scan", f"paths.work={tmp_path / 'w'}", *args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert message in proc.stderr
        assert "Traceback" not in proc.stderr
        assert not (tmp_path / "w" / "empty_export" / MANIFEST).exists()


def test_cli_default_runs_on_demo(tmp_path):
    proc = run_verb("scan", cwd=tmp_path)  # no arguments at all: demo data into ./work
    assert proc.returncode == 0, proc.stderr
    assert "ok 147, corrupt 3, missing 1, rejected 9" in proc.stdout
    assert (tmp_path / "work" / "demo" / MANIFEST).is_file()
