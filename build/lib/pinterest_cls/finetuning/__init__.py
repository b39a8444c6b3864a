"""End-to-end training of CNNs: data sources and transforms (``data``), models (``models``) and the training
loop (``loop``). The ``finetune`` verb composes them."""
