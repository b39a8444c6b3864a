"""pinterest_cls: thematic classification of Pinterest-style image collections.

Pipeline: ``scan`` (export -> manifest) -> ``extract`` (manifest -> embeddings) -> classifiers.
Every verb is a Hydra app: ``python -m pinterest_cls.<verb> key=value ...``.
"""

__version__ = "0.1.0"

import os as _os

# MLflow narrates its own work (database migrations, artifact downloads) at INFO on a handler of its own, set
# up when it is first imported, and draws a progress bar for each artifact it copies while logging a model;
# the runs of this package keep it to warnings and no bars, unless the user chose otherwise.
_os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
_os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
