"""Repins on real photos with planted copies of every kind: what `train` and `audit` find before (exact copies
only; near copies at a fixed cosine, unverified) and after (the store's calibrated threshold, verified on pixels).

    python experiments/repins/bench.py [--idx /usr/share/datasets/fashion-mnist] [--n 10000] [--offset 10000]
        [--per-kind 150] [--backbone efficientnet_lite0] [--seeds 5] [--dir /tmp/repins_bench] [--reuse]

Fashion-MNIST product photos (Debian's dataset-fashion-mnist; --n training photos from --offset on, apart from
the 600 the pixel check was developed on, upscaled to 112 px JPEGs at quality 90) are laid out as a Pinterest
export: each class a category, boards of 30 pins. For each kind, --per-kind originals (distinct ones for every
kind) get one copy on another board of their category: exact (the same bytes), the four kinds calibration makes
(``pinterest_cls.data.copies``: re-encoded at quality 50-90, downscaled to 0.3-0.7, cropped to 80-95 % then
resized, stretched in width by 0.85-1.15) and the issue's own trial (resized to 100 px, JPEG quality 55). Then,
as a user runs them:

1. ``scan`` and ``extract`` with default settings (which calibrates the store: ``repins.json``).
2. Copies found by ``neighbors.duplicates.find_copies`` over the whole store (what ``audit`` runs; ``train`` runs
   it on its sample) under each policy: recall of each kind (the copy is in its original's group), false groups
   (a group joining two distinct photos) per 10,000 distinct pins, candidates and seconds (no pixel score known
   beforehand: the export's score cache is emptied first, and then filled for train).
3. ``train`` with default settings but for the policy (``classifier=knn``): planted copies straddling the split,
   per kind; and for each verified policy, every planted near copy it missed, by why (below the threshold,
   refused by the pixels, or not among the neighbours searched), with its cosine and exact pixel score.
4. The calibration again with seeds 1 .. --seeds - 1: the band of thresholds (``tests/test_repins.py`` checks a
   calibration on real photos falls inside it).

Prints the tables of ``experiments/repins/README.md`` and writes ``results/bench.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from pinterest_cls.core.config import compose
from pinterest_cls.data.copies import KINDS, synthetic_copy
from pinterest_cls.data.manifest import pin_digests
from pinterest_cls.data.metadata import CALIBRATION, read_calibration
from pinterest_cls.data.pixel_match import PIXEL_SCORES, ScoreCache, verify_pairs
from pinterest_cls.data.store import open_store
from pinterest_cls.embed.calibration import calibrate
from pinterest_cls.embed.embedder import backbone_from_meta
from pinterest_cls.extract import extract
from pinterest_cls.finetuning.sources import read_idx
from pinterest_cls.neighbors.duplicates import copy_policy, find_copies
from pinterest_cls.scan import scan
from pinterest_cls.train import train

CLASSES = ["tshirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot"]
PLANTED = ("exact", *KINDS, "issue_100px_q55")
POLICIES = {  # name -> repins overrides
    "before: exact only (the old train default)": ["repins.threshold=off"],
    "before: near >= 0.95, unverified (the old audit default)": ["repins.threshold=0.95", "repins.verify=false"],
    "after: calibrated, verified (the default)": [],
}


def jpeg(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def planted_copy(data: bytes, kind: str, rng: np.random.Generator) -> bytes:
    if kind == "exact":
        return data
    image = Image.open(io.BytesIO(data)).convert("RGB")
    if kind == "issue_100px_q55":
        return jpeg(image.resize((100, 100), Image.BICUBIC), 55)
    return synthetic_copy(image, kind, rng)


def build(idx: Path, root: Path, n: int, per_kind: int, seed: int = 0, offset: int = 0) -> pd.DataFrame:
    """The export of photos ``offset`` to ``offset + n``; returns the planted copies: original pin, copy pin,
    kind."""
    rng = np.random.default_rng(seed)
    images = read_idx(idx / "train-images-idx3-ubyte.gz")[offset:offset + n]
    labels = read_idx(idx / "train-labels-idx1-ubyte.gz")[offset:offset + n]
    shutil.rmtree(root, ignore_errors=True)
    pins, counter = [], {}
    for i, (im, y) in enumerate(zip(images, labels)):
        cat = CLASSES[int(y)]
        k = counter.get(cat, 0)
        counter[cat] = k + 1
        board = f"{cat}{k // 30:03d}"
        folder = root / f"u_{cat}" / "per_board" / board / f"p{i:05d}"
        folder.mkdir(parents=True)
        data = jpeg(Image.fromarray(im, "L").resize((112, 112), Image.BICUBIC), 90)
        (folder / "pin_closeup_image.jpg").write_bytes(data)
        (folder.parent / "board_category.txt").write_text(cat)
        pins.append((f"p{i:05d}", cat, board, data))
    frame = pd.DataFrame(pins, columns=["pin", "cat", "board", "data"])
    boards = frame.groupby("cat")["board"].unique()
    chosen = rng.choice(len(frame), per_kind * len(PLANTED), replace=False)
    planted = []
    for j, i in enumerate(chosen):
        pin, cat, board, data = frame.iloc[i]
        kind = PLANTED[j // per_kind]
        target = rng.choice([b for b in boards[cat] if b != board])
        folder = root / f"u_{cat}" / "per_board" / target / f"c{j:05d}"
        folder.mkdir()
        (folder / "pin_closeup_image.jpg").write_bytes(planted_copy(data, kind, rng))
        planted.append((pin, folder.name, kind))
    return pd.DataFrame(planted, columns=["original", "copy", "kind"])


def measure(found: pd.DataFrame, pins: pd.DataFrame, planted: pd.DataFrame, originals: dict) -> dict:
    """Recall per kind, and false groups: groups that join two distinct photos (a copy belongs to its original's
    photo), each with its photos and the mean absolute difference (grey levels of 255) of their 28-px originals
    (``originals``: pin -> array)."""
    group = dict(zip(pins["pin"], found["group"].to_numpy()))
    photo = dict(zip(pins["pin"], pins["pin"]))
    photo.update(dict(zip(planted["copy"], planted["original"])))
    hit = np.array([group[o] >= 0 and group[o] == group[c] for o, c in zip(planted["original"], planted["copy"])])
    recall = {k: float(hit[(planted["kind"] == k).to_numpy()].mean()) for k in PLANTED}
    g = pd.DataFrame({"group": found["group"].to_numpy(), "photo": pins["pin"].map(photo).to_numpy()})
    g = g[g["group"] >= 0]
    photos_per_group = g.groupby("group")["photo"].nunique()
    distinct = len(pins) - len(planted)
    false = int((photos_per_group > 1).sum())
    joined = []
    for _, photos in g[g["group"].isin(photos_per_group.index[photos_per_group > 1])].groupby("group")["photo"]:
        first, second = sorted(set(photos))[:2]
        diff = np.abs(originals[first].astype(np.float32) - originals[second]).mean()
        joined.append({"photos": sorted(set(photos)), "mean_grey_difference_28px": round(float(diff), 2)})
    return {"recall": recall, "false_groups": false, "false_groups_per_10k": false / distinct * 10_000,
            "groups": int(len(photos_per_group)), "false_group_photos": joined}


def missed(found: pd.DataFrame, pins: pd.DataFrame, planted: pd.DataFrame, store, threshold: float | None,
           floor: float) -> list[dict]:
    """Each planted near copy not in its original's group: its kind, its cosine to the original, its pixel score
    (decided exactly, without a floor) and why it was missed: ``cosine`` (below the threshold), ``pixels`` (the
    score below ``floor``) or ``neighbours`` (neither: not among the ``repins.k`` searched)."""
    group = dict(zip(pins["pin"], found["group"].to_numpy()))
    row = dict(zip(pins["pin"], pins["row"]))
    path = dict(zip(pins["pin"], pins["path"]))
    lost = planted[[not (group[o] >= 0 and group[o] == group[c]) for o, c in zip(planted["original"],
                                                                                 planted["copy"])]]
    lost = lost[lost["kind"] != "exact"]
    if not len(lost) or threshold is None:
        return []
    a = store.vectors[[row[o] for o in lost["original"]]].astype(np.float64)
    b = store.vectors[[row[c] for c in lost["copy"]]].astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    score = verify_pairs([path[o] for o in lost["original"]], [path[c] for c in lost["copy"]])
    return [{"copy": c, "kind": k, "cosine": round(float(x), 4), "pixel_score": round(float(y), 4),
             "why": "cosine" if x < threshold else "pixels" if y < floor else "neighbours"}
            for c, k, x, y in zip(lost["copy"], lost["kind"], cos, score)]


def straddling(split_csv: Path, planted: pd.DataFrame, pins: bool = False) -> dict | list:
    """Planted copies whose original and copy sit on the two sides of train's split, per kind (``pins``: the
    copies' pins instead)."""
    table = pd.read_csv(split_csv, dtype={"pin": str})
    side = dict(zip(table["pin"], table["side"]))
    across = [{side.get(o), side.get(c)} == {"train", "test"} for o, c in zip(planted["original"], planted["copy"])]
    if pins:
        return [c for c, a in zip(planted["copy"], across) if a]
    return {k: int(sum(a for a, kind in zip(across, planted["kind"]) if kind == k)) for k in PLANTED}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--n", type=int, default=10000)
    ap.add_argument("--offset", type=int, default=10000, help="the first photo used (the pixel check was "
                    "developed on the first 600)")
    ap.add_argument("--per-kind", type=int, default=150)
    ap.add_argument("--backbone", default="efficientnet_lite0", help="a conf/backbone name with real weights")
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/repins_bench")
    ap.add_argument("--reuse", action="store_true", help="keep the export and store of an earlier run (calibrate "
                    "again)")
    args = ap.parse_args()
    base = Path(args.dir)
    root, work = base / "export", base / "work"
    over = [f"paths.work={work}", f"data.root={root}", f"backbone={args.backbone}", "mlflow.enabled=false"]
    cfg = compose("extract", over)
    folder = work / "export" / "embeddings" / args.backbone
    if args.reuse and (base / "planted.csv").is_file() and (folder / "embeddings.npy").is_file():
        planted = pd.read_csv(base / "planted.csv", dtype=str)
        (folder / CALIBRATION).unlink(missing_ok=True)  # calibrated again, by extract on the complete store
    else:
        planted = build(Path(args.idx), root, args.n, args.per_kind, offset=args.offset)
        shutil.rmtree(work, ignore_errors=True)
        base.mkdir(parents=True, exist_ok=True)
        planted.to_csv(base / "planted.csv", index=False)
        scan(cfg, progress=False)
    t0 = time.perf_counter()
    extract(cfg, progress=False)
    extract_s = time.perf_counter() - t0
    store = open_store(folder)
    calibration = read_calibration(store.folder, store.meta)
    pins = store.embedded()
    digests = pin_digests(cfg, pins)
    print(f"{len(pins)} pins: {args.n} Fashion-MNIST photos in {pins['board'].nunique()} boards of 10 categories "
          f"and {len(planted)} planted copies ({args.per_kind} of each of {', '.join(PLANTED)}); extract with "
          f"calibration {extract_s:.0f} s, of it calibration {calibration['seconds']} s; calibrated threshold "
          f"{calibration['threshold']}")
    images = read_idx(Path(args.idx) / "train-images-idx3-ubyte.gz")[args.offset:args.offset + args.n]
    originals = {f"p{i:05d}": im for i, im in enumerate(images)}
    cache = work / "export" / PIXEL_SCORES  # train's: the scores computed here are not computed again
    shutil.rmtree(cache, ignore_errors=True)
    out = {"n_pins": len(pins), "planted": len(planted), "per_kind": args.per_kind, "extract_s": extract_s,
           "extract": {k: store.meta.to_dict()["extract"].get(k) for k in ("amp", "resize", "runtime", "decode")},
           "calibration": calibration, "policies": {}}
    for name, extra in POLICIES.items():
        tcfg = compose("train", [*over, *extra])
        policy = copy_policy(tcfg.repins, store.folder, store.meta)
        t0 = time.perf_counter()
        found = find_copies(digests, pins["path"].to_numpy(), policy, vectors=store.vectors,
                            rows=pins["row"].to_numpy(), cache=ScoreCache(cache))
        seconds = time.perf_counter() - t0
        result = measure(found, pins, planted, originals)
        run = train(compose("train", [*over, *extra, "classifier=knn", "classifier.grid.k=[5]", "train.bootstrap=0",
                                      "train.log_pipeline=false", "sampling.max_per_category=null"]), progress=False)
        result.update(policy=policy.describe(), threshold=policy.threshold, seconds=seconds,
                      candidates=found.attrs["candidates"], rejected=found.attrs["rejected"],
                      straddling=straddling(run["output_dir"] / "split.csv", planted),
                      straddling_pins=straddling(run["output_dir"] / "split.csv", planted, pins=True),
                      missed=missed(found, pins, planted, store, policy.threshold, policy.min_score)
                      if policy.verify else [], protocol=run["params"]["protocol"])
        out["policies"][name] = result
    print("\nrecall per kind (the copy in its original's group)\n\n| policy | " + " | ".join(PLANTED)
          + " | false groups / 10k pins | near candidates (refused) | find_copies s |")
    print("|---|" + "---|" * (len(PLANTED) + 3))
    for name, r in out["policies"].items():
        print(f"| {name} | " + " | ".join(f"{r['recall'][k]:.3f}" for k in PLANTED)
              + f" | {r['false_groups_per_10k']:.2f} ({r['false_groups']}) | {r['candidates']} ({r['rejected']}) | "
              f"{r['seconds']:.1f} |")
    for name, r in out["policies"].items():
        if r["false_group_photos"]:
            print(f"\n{name}: false groups' 28-px originals differ by a mean of "
                  + ", ".join(f"{j['mean_grey_difference_28px']:.1f}" for j in r["false_group_photos"])
                  + " grey levels (of 255)")
    print(f"\nplanted copies straddling train's split (of {args.per_kind} per kind)\n\n| policy | "
          + " | ".join(PLANTED) + " | all |")
    print("|---|" + "---|" * (len(PLANTED) + 1))
    for name, r in out["policies"].items():
        print(f"| {name} | " + " | ".join(str(r["straddling"][k]) for k in PLANTED)
              + f" | {sum(r['straddling'].values())} of {len(planted)} |")
    for name, r in out["policies"].items():
        if r["missed"]:
            across = set(r["straddling_pins"])
            print(f"\n{name}: near copies missed, by why (straddling the split among them)\n\n| kind | "
                  "below the threshold | refused by the pixels | not among the neighbours searched |")
            print("|---|---|---|---|")
            for k in PLANTED[1:]:
                cells = []
                for why in ("cosine", "pixels", "neighbours"):
                    m = [x for x in r["missed"] if x["kind"] == k and x["why"] == why]
                    cells.append(f"{len(m)} ({sum(x['copy'] in across for x in m)})")
                print(f"| {k} | " + " | ".join(cells) + " |")
    backbone = backbone_from_meta(store.meta)
    band = []
    for seed in [*range(1, args.seeds), 0]:  # seed 0, the default, last: the store keeps its own calibration
        rec = calibrate(store.folder, backbone, int(cfg.extract.calibrate.pins), seed,
                        float(cfg.repins.min_pixel_score))
        band.append({"seed": seed, "threshold": rec["threshold"], "recall_verified": rec["recall_verified"],
                     "false_pair_rate": rec["false_pair_rate"], "seconds": rec["seconds"]})
    t = [b["threshold"] for b in band]
    out["band"] = {"thresholds": band, "min": min(t), "max": max(t)}
    print(f"\ncalibration over seeds 0-{args.seeds - 1}: thresholds {min(t):.4f} - {max(t):.4f} "
          f"({', '.join(f'{x:.4f}' for x in t)})")
    results = Path(__file__).parent / "results"
    results.mkdir(exist_ok=True)
    (results / "bench.json").write_text(json.dumps(out, indent=2, default=str))


if __name__ == "__main__":
    main()
