"""``python -m pinterest_cls.predict run_id=RUN inputs=FOLDER|LIST.txt|EXPORT|IMAGE``: classify new images end to
end with a ``train`` run: decode -> the backbone (weights, preprocessing) its embeddings were made with -> the
run's preprocessing and classifier.

Boards: ``predict.boards=uncategorised`` labels the export's uncategorised boards (their store, made by ``extract
extract.uncategorised=true``), ``predict.boards=folder inputs=FOLDER`` takes the folder's images as one board;
both write ``board_predictions.csv`` (top categories, the pins that weigh most, ``abstain``) and a page.

The same end-to-end model is logged by ``train`` as an MLflow pyfunc model (``pipeline``), so that
``mlflow models predict`` and ``mlflow models serve`` take image paths (column ``path``) or image bytes
(column ``image``: raw bytes, or base64 text in JSON requests) and return categories and scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.analysis.pages import write_board_page
from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.data.store import uncategorised_store
from pinterest_cls.learn.board_rules import BOARD_PREDICTIONS, label_boards
from pinterest_cls.serving.end_to_end import EndToEnd, collect_inputs, folder_board_scores, store_board_scores
from pinterest_cls.serving.model_io import load_boards, load_run

log = logging.getLogger(__name__)


BOARD_MODES = ("uncategorised", "folder")


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Classify ``inputs`` with the train run ``run_id``; writes and returns ``predictions.csv`` (with
    ``predict.boards``: ``board_predictions.csv``)."""
    if not cfg.run_id:
        raise UserError("give run_id=<MLflow run id of a train run> (see `mlflow ui` or the report's runs.csv)")
    boards = config.select(cfg, "predict.boards")
    if boards is not None:
        if str(boards) not in BOARD_MODES:
            raise UserError(f"predict.boards={boards} must be one of {', '.join(BOARD_MODES)} (or null: pins)")
        return predict_boards(cfg, str(boards))
    if not cfg.inputs:
        raise UserError("give inputs=<folder | list.txt | export | image>")
    classifier, meta, int8_dir = load_run(str(cfg.mlflow.tracking_uri), str(cfg.run_id))
    paths = collect_inputs(str(cfg.inputs))
    if not paths:
        raise UserError(f"inputs={cfg.inputs} holds no images")
    p = cfg.predict
    model = EndToEnd(classifier, meta, top_k=int(p.top_k), batch_size=int(p.batch_size), workers=p.workers,
                     device=str(p.device), int8_dir=int8_dir)
    frame = model.predict_paths(paths, progress=True)
    out = Path(p.out) if p.out else config.job_output_dir() / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    failed = int((frame.status != "ok").sum())
    log.info(f"predicted {len(frame) - failed} of {len(frame)} images with run {cfg.run_id} "
             f"({meta.backbone} + {type(classifier[-1]).__name__}); {failed} failed")
    for cat, n in frame["prediction"].value_counts().items():
        print(f"  {n:6d}  {cat}")
    log.info(f"wrote {out}")
    return frame


def predict_boards(cfg: DictConfig, mode: str) -> pd.DataFrame:
    """Label boards with the train run: the export's uncategorised boards from their store, or the folder
    ``inputs`` as one board; writes ``board_predictions.csv`` and ``board_predictions.html``."""
    uri, run_id = str(cfg.mlflow.tracking_uri), str(cfg.run_id)
    classifier, meta, int8_dir = load_run(uri, run_id)
    if mode == "uncategorised":
        pins, probs = store_board_scores(classifier, uncategorised_store(cfg, meta))
    else:
        folder = Path(str(cfg.inputs or ""))
        if not cfg.inputs or not folder.is_dir():
            raise UserError(f"predict.boards=folder needs inputs=<a folder of one board's images>, not {cfg.inputs}")
        p = cfg.predict
        model = EndToEnd(classifier, meta, batch_size=int(p.batch_size), workers=p.workers, device=str(p.device),
                         int8_dir=int8_dir)
        pins, probs = folder_board_scores(model, folder)
    record = load_boards(uri, run_id)
    abstention = (record or {}).get("abstention")
    if abstention is None:
        log.warning(f"warning: run {run_id} has no calibrated abstention threshold (boards.json): column abstain "
                    "left empty; train on data with boards (train.boards.abstain_target) for one")
    below = None if abstention is None else float(abstention["abstain_below"])
    table = label_boards(pins, probs, classifier.classes_, below, top=int(cfg.predict.top_k),
                         temperature=float((record or {}).get("temperature", 1.0)))
    out = Path(cfg.predict.out).parent if cfg.predict.out else config.job_output_dir()
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / BOARD_PREDICTIONS, index=False)
    page = write_board_page(out, table, pins, f"boards labelled by run {run_id} ({meta.backbone})")
    abstained = int(table["abstain"].fillna(False).astype(bool).sum()) if "abstain" in table else 0
    log.info(f"labelled {len(table)} boards ({len(pins)} pins) with run {run_id}; {abstained} abstained"
             + (f" (top mean score below {below:.4f})" if below is not None else ""))
    for r in table.itertuples(index=False):
        top = getattr(r, "top1_category", None)
        verdict = "abstains" if getattr(r, "abstain", None) is True else (top if isinstance(top, str) else "-")
        log.info(f"  {r.user}/{r.board}: {verdict}" + (f" ({r.top1_score:.3f})" if isinstance(top, str) else ""))
    log.info(f"wrote {out / BOARD_PREDICTIONS} and {page}")
    return table


@verb_main("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
