#!/usr/bin/env bash
# Row 2 of the Fashion-MNIST benchmark: frozen efficientnet_lite0 features + train classifiers, on the data's
# own 60k/10k split. Run from the repository root with the virtual environment's python on PATH.
#   bash experiments/fashion_mnist/frozen_features.sh [/tmp/fmnist] [/tmp/fm_work]
set -euo pipefail
out=${1:-/tmp/fmnist}
work=${2:-/tmp/fm_work}
python experiments/fashion_mnist/make_export.py --out "$out"
data=(data.root="$out/fashion_mnist.csv" data.layout=csv data.user_column=split paths.work="$work")
python -m pinterest_cls.scan "${data[@]}"
# 28x28 product photos upscaled to 112 (resize 128, centre crop 112): a quarter of the pixels of 224
python -m pinterest_cls.extract "${data[@]}" backbone=efficientnet_lite0 backbone.image_size=112
common=("${data[@]}" backbone=efficientnet_lite0 split=predefined split.column=user split.test_value=test
        sampling.max_per_category=null train.cv_folds=3)
python -m pinterest_cls.train "${common[@]}" classifier=knn 'classifier.grid.k=[10,20]' 'classifier.grid.weights=[softmax]'
python -m pinterest_cls.train "${common[@]}" classifier=logreg 'classifier.grid.C=[1]'
python -m pinterest_cls.train "${common[@]}" classifier=mlp 'classifier.grid.batch_size=[128]'
python -m pinterest_cls.report "${data[@]}"
