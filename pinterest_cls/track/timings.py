"""What one backbone's extraction of a shard did: its per-batch timings as CSV and plot beside the store, a
summary in the log, and the job's MLflow run (``verb=extract``)."""

from __future__ import annotations

import json
import logging

from pinterest_cls.track.plots import batch_timings_plot
from pinterest_cls.track.tracking import JobRun

log = logging.getLogger(__name__)


def report_shard(done, batch_size: int, run: JobRun | None) -> None:
    """Write, log and (into ``run``) record ``done``: an ``pinterest_cls.embed.streaming.ShardDone``."""
    backbone, stats, meta = done.backbone, done.stats, done.meta
    timing_csv = done.folder / "timings" / f"{done.tag}.csv"
    timing_csv.parent.mkdir(exist_ok=True)
    with open(timing_csv, "w") as f:
        f.write("batch,images,wait_s,compute_s\n")
        f.writelines(f"{b},{n},{w:.6f},{c:.6f}\n" for b, n, w, c in done.timings)
    png = batch_timings_plot(done.timings, timing_csv.with_suffix(".png"),
                             title=f"{backbone.name} on {stats['device']}, {done.shard_name}")
    log.info(f"{backbone.name}: {done.shard_name}: {stats['rows']} images in {stats['elapsed_s']:.1f} s: "
             f"{stats['images_per_s']:.1f} images/s over the whole run, "
             f"{stats['images_per_s_after_first_batch']:.1f} after the first batch (worker start-up left out); "
             f"waiting for data {stats['wait_s']:.1f} s, computing {stats['compute_s']:.1f} s; "
             f"{stats['failed']} failed")
    state = "complete" if meta["complete"] else f"{meta['rows_done']}/{meta['rows']} rows done"
    log.info(f"store {done.folder}: {state}, {meta['rows_failed']} failed rows")
    if run is None:
        return
    info = backbone.info
    params = {"backbone": backbone.name, "timm_id": info.get("timm_id"), "weights_sha256": info.get("weights_sha256"),
              "weights": info.get("weights"), "image_size": info.get("input_size"), "pool": info.get("pool"),
              "batch_size": batch_size, "workers": stats["workers"], "amp": stats["amp"],
              "runtime": stats["runtime"], "device": stats["device"], "shard": done.shard_name, "dtype": meta["dtype"]}
    run.add_embeddings(done.folder, meta["fingerprint"], "output")
    run.log(params=params, metrics={k: stats[k] for k in ("images_per_s", "failed", "elapsed_s", "wait_s",
                                                           "compute_s")},
            artifacts={png: "plots", timing_csv: "timings"}, texts={"meta.json": json.dumps(meta, indent=2)})
