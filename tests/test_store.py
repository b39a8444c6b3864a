"""The embedding store read back: one typed reader of meta.json with a format version (an older format migrated, a
newer one refused, a damaged file a one-line error), the pins' lookup, and the commands a store names."""

import json
import shutil

import numpy as np
import pytest

from pinterest_cls.core.errors import UserError
from pinterest_cls.data.store import FORMAT_VERSION, META, extract_command, open_store, read_meta, rerun_command

STORE = ("demo", "embeddings", "test_efficientnet")


@pytest.fixture
def store_copy(tiny_demo, tmp_path):
    folder = tmp_path / "store"
    shutil.copytree(tiny_demo.joinpath(*STORE), folder)
    return folder


def test_a_store_reads_back_its_rows_pins_and_meta(tiny_demo):
    store = open_store(tiny_demo.joinpath(*STORE))
    assert store.vectors.shape == (145, store.meta.dim) and store.vectors.dtype == np.float16
    assert len(store.pins) == 145 and store.embedded()["embedded"].all()
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
    assert meta.format_version == FORMAT_VERSION
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
