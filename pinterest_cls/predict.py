"""``python -m pinterest_cls.predict run_id=RUN inputs=FOLDER|LIST.txt|EXPORT|IMAGE``: classify new images end to
end with a ``train`` run: decode -> the backbone (weights, preprocessing) its embeddings were made with -> the
run's preprocessing and classifier.

The same end-to-end model is logged by ``train`` as an MLflow pyfunc model (``pipeline``), so that
``mlflow models predict`` and ``mlflow models serve`` take image paths (column ``path``) or image bytes
(column ``image``: raw bytes, or base64 text in JSON requests) and return categories and scores.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pandas as pd
from omegaconf import DictConfig

from pinterest_cls.core import config
from pinterest_cls.core.cli import verb_main
from pinterest_cls.core.errors import UserError
from pinterest_cls.serving.end_to_end import EndToEnd, collect_inputs
from pinterest_cls.serving.model_io import load_run

log = logging.getLogger(__name__)


def predict(cfg: DictConfig) -> pd.DataFrame:
    """Classify ``inputs`` with the train run ``run_id``; writes and returns ``predictions.csv``."""
    if not cfg.run_id:
        raise UserError("give run_id=<MLflow run id of a train run> (see `mlflow ui` or the report's runs.csv)")
    if not cfg.inputs:
        raise UserError("give inputs=<folder | list.txt | export | image>")
    classifier, meta = load_run(str(cfg.mlflow.tracking_uri), str(cfg.run_id))
    paths = collect_inputs(str(cfg.inputs))
    if not paths:
        raise UserError(f"inputs={cfg.inputs} holds no images")
    p = cfg.predict
    model = EndToEnd(classifier, meta, top_k=int(p.top_k), batch_size=int(p.batch_size), workers=p.workers,
                     device=str(p.device))
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


@verb_main("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
