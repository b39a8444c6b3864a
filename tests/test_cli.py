"""The command line as a user meets it: each verb's --help, configuration mistakes stopped with one line, exit
status 2 and the closest valid names, and nothing left behind by a command that failed."""

import pytest

from pinterest_cls.core.cli import check_overrides, verb_help
from pinterest_cls.core.errors import UserError

from .helpers import run_verb


@pytest.mark.parametrize("verb, args, message", [
    ("train", ["classifer=svm"], "classifer: train has no such key; did you mean 'classifier'?"),
    ("train", ["+classifer=svm"], "+classifer: train has no key 'classifer'; did you mean 'classifier'?"),
    ("extract", ["backbone=convnext_bse"], "backbone=convnext_bse: no such backbone; did you mean 'convnext_base'"),
    ("train", ["classifier=svm,knnn"], "classifier=knnn: no such classifier; did you mean 'knn'?"),
    ("train", ["train.cv_foldz=3"], "train.cv_foldz: train has no such key; did you mean 'train.cv_folds'"),
    ("cluster", ["cluster.restart=3"], "did you mean 'cluster.restarts'?"),
    ("train", ["split=kfold", "split.foldz=3"], "did you mean 'split.folds'?"),
    ("train", ["backbone=nope"], "no such backbone (options: convnext_base, "),
])
def test_configuration_mistakes_name_the_key_and_the_closest_names(verb, args, message):
    with pytest.raises(UserError) as err:
        check_overrides(verb, args)
    assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("verb, args", [
    ("train", ["classifier=svm,knn", "split=kfold", "split.folds=3", "train.cv_folds=2", "hydra/launcher=local",
               "hydra.launcher.n_jobs=2"]),
    ("extract", ["+experiment=paper_grid_tiny", "backbones=null", "extract.batch_size=8"]),
    ("report", ["+experiment=paper_grid_tiny", "grid.name=mine"]),  # a key that only the experiment has
    ("extract", ["+backbone.kwargs.drop_rate=0.1"]),
    ("finetune", ["model=timm", "model.backbone=efficientnet_lite0", "split.mode=kfold"]),
])
def test_valid_command_lines_pass(verb, args):
    check_overrides(verb, args)


def test_a_mistake_on_the_command_line_is_one_line_exit_2_and_leaves_nothing(tmp_path):
    work = tmp_path / "work"
    proc = run_verb("train", "classifer=svm", f"paths.work={work}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: classifer: train has no such key; did you mean 'classifier'? "
        "(python -m pinterest_cls.train --help lists its keys)"]
    assert not work.exists()
    # an error of the verb itself (inside the Hydra job): one line, and its empty job folder is removed again
    proc = run_verb("search", "pin=alice/hiking/pin_003", "k=0", f"paths.work={work}", cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == ["error: k=0 must be >= 1"]
    assert not (work / "hydra").exists() or not list((work / "hydra").iterdir()), sorted(work.rglob("*"))


def test_help_describes_the_verb_and_only_the_groups_it_takes(tmp_path):
    import pinterest_cls.finetune
    import pinterest_cls.train

    text = verb_help("finetune", pinterest_cls.finetune.__doc__)
    assert text.startswith("``python -m pinterest_cls.finetune")
    assert "  model: simple_cnn, timm  (default: simple_cnn)" in text
    assert "  data: export, fashion_mnist, npz  (default: export)" in text
    assert "\n  split:" not in text.split("Keys of finetune")[0]  # finetune's split is a key, not the group
    assert "classifier:" not in text and "backbone:" not in text
    assert "  epochs: 15\n" in text and "  mode: auto\n" in text and "# auto: boards on data with boards" in text
    train = verb_help("train", pinterest_cls.train.__doc__)
    assert "  classifier: knn, logreg, mlp, random_forest, svm  (default: svm)" in train
    assert "  split: auto, group, kfold, predefined, random, stratified  (default: auto)" in train
    assert "  hydra/launcher: local, slurm_cpu, slurm_gpu" in train and "max_per_category: 3000" in train
    proc = run_verb("predict", "--help", cwd=tmp_path)  # the real entry point: nothing but the help
    assert proc.returncode == 0 and proc.stderr == "" and "run_id: null  # an MLflow run of `train`" in proc.stdout
    assert "model:" not in proc.stdout.split("Keys of predict")[0]
