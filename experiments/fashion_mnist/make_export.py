"""Write Fashion-MNIST (the IDX files) as an export of PNG files with a CSV table, so that scan/extract/train
can run on it: columns path, label (class name), split (train | test; the data's own 60k/10k split).

    python experiments/fashion_mnist/make_export.py [--idx /usr/share/datasets/fashion-mnist] [--out /tmp/fmnist]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pinterest_cls.core.config import compose
from pinterest_cls.finetuning.sources import write_idx_export


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idx", default="/usr/share/datasets/fashion-mnist")
    ap.add_argument("--out", default="/tmp/fmnist")
    args = ap.parse_args()
    dcfg = compose("finetune", ["data=fashion_mnist", f"data.root={args.idx}"]).data
    table = write_idx_export(dcfg, Path(args.out))
    print(f"wrote the PNGs and {table}")


if __name__ == "__main__":
    main()
