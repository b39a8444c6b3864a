"""pinterest_cls: thematic classification of Pinterest-style image collections.

Pipeline: ``scan`` (export -> manifest) -> ``extract`` (manifest -> embeddings) -> classifiers.
Every verb is a Hydra app: ``python -m pinterest_cls.<verb> key=value ...``.
"""

__version__ = "0.1.0"
