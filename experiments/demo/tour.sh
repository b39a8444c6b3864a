#!/usr/bin/env bash
# The README's tour on the demo export, in a fresh work folder, with its output kept: what experiments/demo/README.md
# reports. Usage: experiments/demo/tour.sh [work folder] (default /tmp/demo_tour; it is emptied first).
set -euo pipefail
cd "$(dirname "$0")/../.."
work=${1:-/tmp/demo_tour}
rm -rf "$work"
py=.venv/bin/python
log=experiments/demo/results/tour.log
mkdir -p "$(dirname "$log")"
run() { echo "\$ python -m pinterest_cls.$*"; "$py" -m "pinterest_cls.$@" "paths.work=$work" 2>&1; }
{
  run scan
  run extract
  run train classifier=knn
  run extract backbone=pixels
  run train -m backbone=efficientnet_lite0,pixels classifier=svm,logreg,mlp,knn
  run report
  run audit
  run cluster
  run search pin=alice/hiking/pin_003 k=5
  run extract extract.uncategorised=true
  rid=$("$py" -c "import mlflow; mlflow.set_tracking_uri('sqlite:///$work/mlflow.db'); print(mlflow.search_runs(experiment_names=['demo'], filter_string=\"tags.verb = 'train' and tags.backbone = 'efficientnet_lite0' and tags.classifier = 'logreg'\", output_format='list')[0].info.run_id)")
  run predict "run_id=$rid" predict.boards=uncategorised
} | grep -v "^\[20" | tee "$log"
