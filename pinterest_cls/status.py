"""``python -m pinterest_cls.status``: the state of every embedding store and of each of its shards.

For each store: rows done and failed, and per shard (from the progress records that shard jobs commit) the
rows done, the time spent, and for an unfinished or never-started shard the command that (re-)runs it alone.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from . import config
from .cli import verb_main
from .errors import UserError
from .extraction import backbone_configs
from .fileio import slurm_states
from .store import FINGERPRINT_DEFAULTS, META, merge_records, read_records, shard_range


def rerun_command(meta: dict, index: int, count: int) -> str:
    """The extract command line that runs shard ``index`` of ``count`` of this store alone."""
    bcfg = meta.get("backbone_config") or {}
    name = meta["backbone"]
    if (Path(config.CONF_DIR) / "backbone" / f"{name}.yaml").is_file():
        args = [f"backbone={name}"]
    elif bcfg.get("kind") == "timm":
        args = ["backbone=timm", f"backbone.model={bcfg.get('model')}"]
    else:
        args = [f"backbone={bcfg.get('kind', name)}"]
    if meta.get("data_root"):
        args.append(f"data.root={meta['data_root']}")
    # the store's own settings, whatever the defaults are now: the shard boundaries depend on the batch size
    recorded = meta.get("extract", {})
    args.append(f"extract.batch_size={recorded.get('batch_size') or meta['fingerprint']['batch_size']}")
    if recorded.get("micro_batch") is not None:
        args.append(f"extract.micro_batch={recorded['micro_batch']}")
    if recorded.get("decode", FINGERPRINT_DEFAULTS["decode"]) != "cpu":
        args.append(f"extract.decode={recorded['decode']}")
    args += [f"extract.shard.count={count}", f"extract.shard.index={index}"]
    return "python -m pinterest_cls.extract " + " ".join(shlex.quote(a) for a in args)


def store_status(folder: Path) -> dict:
    """{backbone, state, rows, rows_done, rows_failed, shards: [{index, count, lo, hi, done, state, ...}]}."""
    if not (folder / META).is_file():
        return {"backbone": folder.name, "folder": str(folder), "state": "not started", "rows": None,
                "rows_done": 0, "rows_failed": 0, "shards": []}
    meta = json.loads((folder / META).read_text())
    rows = int(meta["rows"])
    batch = int(meta.get("extract", {}).get("batch_size") or meta["fingerprint"]["batch_size"])
    records = read_records(folder)
    done, failures = merge_records(records, rows)
    by_range = {(r["lo"], r["hi"]): r for r in records}
    counts = sorted({r["shard"][1] for r in records if "shard" in r}) or ([1] if not records else [])
    shards, seen = [], set()
    for count in counts:
        for index in range(count):
            lo, hi = shard_range(rows, batch, index, count)
            rec = by_range.get((lo, hi))
            seen.add((lo, hi))
            shards.append(_shard_entry(meta, index, count, lo, hi, rec))
    for (lo, hi), rec in sorted(by_range.items()):  # records from a sharding that no longer matches
        if (lo, hi) not in seen:
            shards.append(_shard_entry(meta, None, None, lo, hi, rec))
    _add_slurm_states(shards)
    n_done = int(done.sum())
    state = "complete" if n_done == rows else ("partial" if n_done else "not started")
    return {"backbone": meta["backbone"], "folder": str(folder), "state": state, "rows": rows,
            "rows_done": n_done, "rows_failed": len(failures), "shards": shards}


def _shard_entry(meta, index, count, lo, hi, rec) -> dict:
    done = (rec["done"] - lo) if rec else 0
    state = "done" if done >= hi - lo else ("partial" if done else "not started")
    entry = {"index": index, "count": count, "lo": lo, "hi": hi, "done": done, "state": state,
             "elapsed_s": rec["elapsed_s"] if rec else 0.0, "slurm_job": (rec or {}).get("slurm_job")}
    if state != "done" and index is not None:
        entry["rerun"] = rerun_command(meta, index, count)
    return entry


def _add_slurm_states(shards: list[dict]) -> None:
    """An unfinished shard that last committed from a SLURM job gets that job's state while SLURM's queue holds
    it (``slurm_state``: RUNNING, PENDING, ...)."""
    jobs = [sh["slurm_job"] for sh in shards if sh["slurm_job"] and sh["state"] != "done"]
    states = slurm_states(jobs)
    for sh in shards:
        if sh["slurm_job"] in states and sh["state"] != "done":
            sh["slurm_state"] = states[sh["slurm_job"]]


def status(cfg: DictConfig) -> list[dict]:
    root = config.embeddings_root(cfg)
    if OmegaConf.select(cfg, "backbones", default=None):
        names = [str(b.name) for b in backbone_configs(cfg)]
    else:
        names = sorted(p.name for p in root.glob("*") if (p / META).is_file()) if root.is_dir() else []
        if not names:
            raise UserError(f"no embedding stores in {root}; run python -m pinterest_cls.extract first")
    out = [store_status(root / name) for name in names]
    print(f"embedding stores in {root}:")
    width = max(len(s["backbone"]) for s in out)
    for s in out:
        rows = f"{s['rows_done']}/{s['rows']}" if s["rows"] is not None else "-"
        print(f"  {s['backbone']:<{width}}  {s['state']:<11}  rows {rows:>13}  failed {s['rows_failed']}")
        for sh in s["shards"] if len(s["shards"]) > 1 or s["state"] != "complete" else []:
            name = f"shard {sh['index']}/{sh['count']}" if sh["index"] is not None else "old shard"
            line = (f"    {name:<13} rows [{sh['lo']}, {sh['hi']})  {sh['done']}/{sh['hi'] - sh['lo']}  "
                    f"{sh['state']:<11}  {sh['elapsed_s']:.1f} s")
            if "slurm_state" in sh:  # still queued: no need to run it again
                print(line + f"  SLURM job {sh['slurm_job']}: {sh['slurm_state']}")
            else:
                print(line + (f"\n      run it: {sh['rerun']}" if "rerun" in sh else ""))
    incomplete = [s["backbone"] for s in out if s["state"] != "complete"]
    print(f"{len(out) - len(incomplete)} of {len(out)} stores complete" +
          (f"; incomplete: {', '.join(incomplete)}" if incomplete else ""), flush=True)
    return out


@verb_main("status")
def main(cfg: DictConfig) -> None:
    out = status(cfg)
    if bool(cfg.status.require_complete) and any(s["state"] != "complete" for s in out):
        sys.exit(1)


if __name__ == "__main__":
    main()
