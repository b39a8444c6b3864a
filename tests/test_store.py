"""The embedding store: one typed reader of meta.json with a format version (an older format migrated, a newer one
refused), the pins' lookup, the commands a store names, and damaged stores (a truncated array, a corrupt meta.json,
a flipped byte in a committed range) detected by every verb and repaired by extract, on real files."""

import json
import logging
import shutil

import numpy as np
import pytest

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.manifest import load_manifest
from pinterest_cls.data.metadata import FORMAT_VERSION, META, read_meta
from pinterest_cls.data.store import extract_command, legacy_rows_sha256, open_store, rerun_command
from pinterest_cls.extract import extract
from pinterest_cls.status import status

from .helpers import TINY, make_cfg, make_pinterest_export, run_verb

STORE = ("demo", "embeddings", "test_efficientnet")


@pytest.fixture
def store_copy(tiny_demo, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(tiny_demo.joinpath(*STORE), folder)
    return folder


def test_a_store_reads_back_its_rows_pins_and_meta(tiny_demo):
    store = open_store(tiny_demo.joinpath(*STORE))
    assert store.vectors.shape == (147, store.meta.dim) and store.vectors.dtype == np.float16
    assert len(store.pins) == 147 and store.embedded()["embedded"].all()
    assert store.meta.format_version == FORMAT_VERSION and store.meta.complete
    assert store.meta.backbone == "test_efficientnet" and store.meta.extract.runtime == "torch"
    pins = store.pins.iloc[[3, 7]]
    assert np.array_equal(store.vectors_of(pins), np.asarray(store.vectors[[3, 7]], dtype=np.float32))


def test_a_pin_is_found_by_user_board_pin_and_an_ambiguous_id_is_refused(tiny_demo):
    store = open_store(tiny_demo.joinpath(*STORE))
    row = store.pins.iloc[10]
    assert store.find_pin(f"{row['user']}/{row['board']}/{row['pin']}") == int(row["row"])
    with pytest.raises(UserError, match=f"pin={row['pin']} matches 12 pins; give user/board/pin"):
        store.find_pin(str(row["pin"]))
    with pytest.raises(UserError, match="is not an embedded pin"):
        store.find_pin("nobody/none/nothing")


def test_a_store_from_before_format_versions_is_migrated_on_reading(store_copy):
    """Format 0 had no format_version, and lacked the keys added since: they get the values those stores were made
    with, the same ones a resume compares."""
    raw = json.loads((store_copy / META).read_text())
    del raw["format_version"]
    for key in ("decode", "micro_batch", "runtime", "request_rows"):
        raw["fingerprint"].pop(key)
        raw["extract"].pop(key)
    raw["extract"].pop("amp")
    (store_copy / META).write_text(json.dumps(raw))
    meta = read_meta(store_copy)
    assert meta.format_version == 0  # the file's own; extract migrates the file when it opens the store
    assert (meta.extract.runtime, meta.extract.decode, meta.extract.amp) == ("torch", "cpu", None)
    assert {k: meta.fingerprint[k] for k in ("decode", "runtime", "micro_batch")} == {
        "decode": "cpu", "runtime": "torch", "micro_batch": None}


def test_a_store_of_a_newer_format_is_refused(store_copy):
    raw = json.loads((store_copy / META).read_text())
    (store_copy / META).write_text(json.dumps({**raw, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(UserError, match=f"store format {FORMAT_VERSION + 1}, newer than this pinterest_cls reads"):
        read_meta(store_copy)


def test_a_meta_json_that_is_not_json_is_a_one_line_error_naming_the_file(store_copy):
    (store_copy / META).write_text('{"backbone": "test_eff')
    with pytest.raises(UserError, match=rf"{store_copy / META} cannot be read \(JSONDecodeError") as err:
        read_meta(store_copy)
    assert "\n" not in str(err.value)


def test_the_commands_a_store_names_are_quoted_for_a_shell(tiny_demo):
    cmd = extract_command({"name": "r50", "kind": "timm", "model": "resnet50"}, "/data/my export", "paths.work=w")
    assert cmd == "python -m pinterest_cls.extract backbone=timm backbone.model=resnet50 'data.root=/data/my export' " \
                  "paths.work=w"
    meta = read_meta(tiny_demo.joinpath(*STORE))
    assert rerun_command(meta, 1, 4) == ("python -m pinterest_cls.extract backbone=test_efficientnet "
                                         f"extract.batch_size={meta.batch_size} extract.shard.count=4 "
                                         "extract.shard.index=1")


# --- damaged stores, on a real export ---------------------------------------------------------------------------

SMALL = [*TINY, "extract.batch_size=4", "extract.commit_every=1", "extract.workers=0", "extract.threads=1",
         "mlflow.enabled=false"]


@pytest.fixture
def made(tmp_path):
    """A finished store of 24 pins and its bytes as first written."""
    export = make_pinterest_export(tmp_path / "exp", {("ann", "b1"): "cats", ("ann", "b2"): "dogs",
                                                      ("bob", "b3"): "cats", ("bob", "b4"): "dogs"},
                                   pins_per_board=6, size=(96, 128))
    args = [f"paths.work={tmp_path / 'work'}", f"data.root={export}", *SMALL]
    extract(make_cfg("extract", args), progress=False)
    folder = tmp_path / "work" / "exp" / "embeddings" / "test_efficientnet"
    return {"args": args, "folder": folder, "bytes": (folder / "embeddings.npy").read_bytes(), "tmp": tmp_path}


def test_an_array_cut_short_is_refused_by_every_reader_and_repaired_by_extract(made, caplog):
    folder, args = made["folder"], made["args"]
    array = folder / "embeddings.npy"
    array.write_bytes(made["bytes"][: len(made["bytes"]) // 2])  # a full disk, an interrupted copy
    (st,) = status(make_cfg("status", args[:2]))
    assert st["state"] == "damaged" and "is cut short" in st["problem"] and "rows from 11 on are gone" in st["problem"]
    proc = run_verb("train", *args[:2], *TINY, cwd=made["tmp"])
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert f"{folder} is damaged: {array} is cut short" in proc.stderr
    assert "repair it: python -m pinterest_cls.extract backbone=test_efficientnet" in proc.stderr
    with caplog.at_level(logging.WARNING, logger="pinterest_cls.data.integrity"):
        extract(make_cfg("extract", args), progress=False)  # re-embeds the rows that are gone, keeps the rest
    assert "rows [8, 24) to embed again" in caplog.text
    assert array.read_bytes() == made["bytes"]
    assert status(make_cfg("status", args[:2]))[0]["state"] == "complete"


def test_a_meta_json_that_is_not_json_stops_every_verb_in_one_line(made):
    meta = made["folder"] / META
    meta.write_text(meta.read_text()[:40])
    (st,) = status(make_cfg("status", made["args"][:2]))
    assert st["state"] == "damaged" and st["repair"] == "re-extract the store with extract.overwrite=true"
    for verb, extra in (("train", TINY), ("extract", made["args"][2:])):
        proc = run_verb(verb, *made["args"][:2], *extra, cwd=made["tmp"])
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, (verb, proc.stderr)
        assert f"{meta} cannot be read (JSONDecodeError" in proc.stderr and "Traceback" not in proc.stderr
    extract(make_cfg("extract", [*made["args"], "extract.overwrite=true"]), progress=False)
    assert (made["folder"] / "embeddings.npy").read_bytes() == made["bytes"]


def test_a_flipped_byte_is_found_by_status_verify_and_embedded_again(made, caplog):
    folder, args = made["folder"], made["args"]
    data = bytearray(made["bytes"])
    data[-100] ^= 0xFF  # in the last committed range (rows 20-23)
    (folder / "embeddings.npy").write_bytes(bytes(data))
    assert status(make_cfg("status", args[:2]))[0]["state"] == "complete"  # the cheap checks cannot see it
    (st,) = status(make_cfg("status", [*args[:2], "status.verify=true"]))
    assert st["state"] == "damaged" and st["problem"] == "rows [20, 24) no longer match their checksums"
    assert st["repair"].endswith("extract.batch_size=4 extract.verify=true")
    with caplog.at_level(logging.WARNING, logger="pinterest_cls.data.store"):
        extract(make_cfg("extract", [*args, "extract.verify=true"]), progress=False)
    assert "rows [20, 24) no longer match their checksums" in caplog.text
    assert (folder / "embeddings.npy").read_bytes() == made["bytes"]
    assert status(make_cfg("status", [*args[:2], "status.verify=true"]))[0]["state"] == "complete"


def test_extract_migrates_a_store_of_format_1_without_embedding_again(made, caplog):
    """Format 1 identified its rows by paths, sizes and mtimes: extract recognises such a store by that identity,
    rewrites its meta.json to this format (rows identified by content) and finds it done."""
    folder = made["folder"]
    raw = json.loads((folder / META).read_text())
    ok = load_manifest(made["tmp"] / "work" / "exp").query("status == 'ok'").reset_index(drop=True)
    raw["format_version"] = 1
    raw["fingerprint"]["rows_sha256"] = legacy_rows_sha256(ok)
    (folder / META).write_text(json.dumps(raw))
    with caplog.at_level(logging.INFO, logger="pinterest_cls"):
        extract(make_cfg("extract", made["args"]), progress=False)
    assert "migrated from store format 1 to 2" in caplog.text and "already done" in caplog.text
    meta = read_meta(folder)
    assert meta.format_version == FORMAT_VERSION and meta.rows_sha256 != legacy_rows_sha256(ok)
    assert (folder / "embeddings.npy").read_bytes() == made["bytes"]


def test_the_rows_identity_is_the_same_for_a_copy_of_the_export_elsewhere(made, tmp_path):
    elsewhere = tmp_path / "copied" / "exp"
    shutil.copytree(made["tmp"] / "exp", elsewhere)
    work = tmp_path / "work2"
    extract(make_cfg("extract", [f"paths.work={work}", f"data.root={elsewhere}", *SMALL]), progress=False)
    assert read_meta(work / "exp" / "embeddings" / "test_efficientnet").rows_sha256 == \
        read_meta(made["folder"]).rows_sha256
