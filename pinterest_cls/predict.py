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

from . import config
from .cli import verb_main
from .errors import UserError
from .serving import EndToEnd, PinterestPyfuncModel, collect_inputs, load_run  # noqa: F401 (models logged before the serving module refer to pinterest_cls.predict.PinterestPyfuncModel)

log = logging.getLogger(__name__)

# --- MLflow ----------------------------------------------------------------------------------------------


# --- the verb --------------------------------------------------------------------------------------------


def predict(cfg: DictConfig) -> pd.DataFrame:
    if not cfg.run_id:
        raise UserError("give run_id=<MLflow run id of a train run> (see `mlflow ui` or the report's runs.csv)")
    if not cfg.inputs:
        raise UserError("give inputs=<folder | list.txt | export | image>")
    classifier, meta = load_run(cfg, str(cfg.run_id))
    paths = collect_inputs(str(cfg.inputs))
    if not paths:
        raise UserError(f"inputs={cfg.inputs} holds no images")
    model = EndToEnd(classifier, meta, top_k=int(cfg.predict.top_k), batch_size=int(cfg.predict.batch_size),
                     workers=cfg.predict.workers, device=str(cfg.predict.device))
    frame = model.predict_paths(paths, progress=True)
    out = Path(cfg.predict.out) if cfg.predict.out else config.job_output_dir() / "predictions.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out, index=False)
    counts = frame["prediction"].value_counts()
    log.info(f"predicted {int((frame.status == 'ok').sum())} of {len(frame)} images with run {cfg.run_id} "
          f"({meta['backbone']} + {type(classifier[-1]).__name__}); {int((frame.status != 'ok').sum())} failed")
    for cat, n in counts.items():
        print(f"  {n:6d}  {cat}")
    log.info(f"wrote {out}")
    return frame


@verb_main("predict")
def main(cfg: DictConfig) -> None:
    predict(cfg)


if __name__ == "__main__":
    main()
