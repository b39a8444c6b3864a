"""``python -m pinterest_cls.status``: the state of every embedding store and of each of its shards.

For each store: rows done and failed, and per shard (from the progress records that shard jobs commit) the
rows done, the time spent, and for an unfinished or never-started shard the command that (re-)runs it alone. A
damaged store (files that do not hold what its metadata says; with ``status.verify=true``, committed rows that no
longer match their checksums) is listed as such, with what is wrong and the command that repairs it.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.metadata import META
from pinterest_cls.data.store import store_status
from pinterest_cls.embed.registry import backbone_configs


def status(cfg: DictConfig) -> list[dict]:
    """Print and return the state of the stores (every store under ``paths.embeddings``, or those of
    ``backbones``)."""
    root = config.embeddings_root(cfg)
    if OmegaConf.select(cfg, "backbones", default=None):
        names = [str(b.name) for b in backbone_configs(cfg)]
    else:
        names = sorted(p.name for p in root.glob("*") if (p / META).is_file()) if root.is_dir() else []
        if not names:
            raise UserError(f"no embedding stores in {root}; run python -m pinterest_cls.extract first")
    verify = bool(config.select(cfg, "status.verify"))
    out = [store_status(root / name, verify) for name in names]
    print(f"embedding stores in {root}:")
    width = max(len(s["backbone"]) for s in out)
    for s in out:
        rows = f"{s['rows_done']}/{s['rows']}" if s["rows"] is not None else "-"
        print(f"  {s['backbone']:<{width}}  {s['state']:<11}  rows {rows:>13}  failed {s['rows_failed']}")
        if s["state"] == "damaged":
            print(f"    {s['problem']}\n      repair it: {s['repair']}")
        elif s.get("unverified_rows"):
            print(f"    {s['unverified_rows']} rows committed before checksums were recorded: not verified")
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
