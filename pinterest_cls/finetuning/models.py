"""finetune's models: the sibling studies' small CNN, or any timm model with a new head."""

from __future__ import annotations

import copy

import numpy as np
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pinterest_cls.core.errors import UserError
from pinterest_cls.embed.registry import REGISTRY
from pinterest_cls.embed.weights import create_timm


class SimpleCNN(nn.Module):
    """The sibling studies' small CNN: conv 32 -> pool -> conv 64 -> pool -> conv 64 -> dense 64 -> output,
    channels configurable, with batch norm and dropout (``batchnorm``/``dropout`` 0 give the plain Keras net)."""

    def __init__(self, in_chans: int, num_outputs: int, image_size: int, channels=(32, 64, 64), dense: int = 64,
                 batchnorm: bool = True, dropout: float = 0.3):
        super().__init__()
        layers, c_in = [], in_chans
        for i, c in enumerate(channels):
            layers += [nn.Conv2d(c_in, c, 3, padding=1, bias=not batchnorm)]
            if batchnorm:
                layers.append(nn.BatchNorm2d(c))
            layers.append(nn.ReLU(inplace=True))
            if i < len(channels) - 1:
                layers.append(nn.MaxPool2d(2))
            c_in = c
        self.features = nn.Sequential(*layers)
        side = image_size // 2 ** (len(channels) - 1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in * side * side, dense),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(dense, num_outputs))
        self.pretrained_cfg = {"mean": (0.5,) * in_chans, "std": (0.5,) * in_chans}

    def forward(self, x):
        return self.head(self.features(x))

    def get_classifier(self):
        return self.head[-1]


def build_model(cfg: DictConfig, in_chans: int, num_outputs: int, image_size: int) -> tuple[nn.Module, dict]:
    """The model ``model.kind`` names (one registry lookup), with its weights' description and normalisation."""
    kind = str(cfg.model.kind)
    if kind not in MODELS:
        raise UserError(f"model.kind={kind!r} must be one of: {', '.join(MODELS)}")
    return MODELS[kind](cfg.model, in_chans, num_outputs, image_size)


def _simple_cnn(m: DictConfig, in_chans: int, num_outputs: int, image_size: int) -> tuple[nn.Module, dict]:
    model = SimpleCNN(in_chans, num_outputs, image_size, tuple(m.channels), int(m.dense), bool(m.batchnorm),
                      float(m.dropout))
    return model, {"weights": "random (from scratch)", "mean": (0.5,) * in_chans, "std": (0.5,) * in_chans}


def _timm_model(m: DictConfig, in_chans: int, num_outputs: int, image_size: int) -> tuple[nn.Module, dict]:
    spec = REGISTRY.get(str(m.get("backbone") or ""))
    model_id = str(m.name or (spec.model if spec else ""))
    if not model_id:
        raise UserError("model=timm needs model.name=<timm model> (or model.backbone=<registered backbone>)")
    bcfg = OmegaConf.create({"pretrained": bool(m.pretrained), "weights": m.get("weights"), "in_chans": None})
    model, info = create_timm(model_id, bcfg, spec)  # 3-channel features, with the weight rules of backbones
    if in_chans != 3:
        _adapt_first_conv(model, in_chans)
    model.reset_classifier(num_outputs)
    cfg_pre = model.pretrained_cfg or {}
    mean = tuple(cfg_pre.get("mean", (0.5, 0.5, 0.5)))
    std = tuple(cfg_pre.get("std", (0.5, 0.5, 0.5)))
    if in_chans != 3:  # grey or multi-band input: one mean/std for every band
        mean, std = (float(np.mean(mean)),) * in_chans, (float(np.mean(std)),) * in_chans
    return model, {"weights": info["weights"], "weights_sha256": info.get("weights_sha256"), "mean": mean, "std": std,
                   "timm_id": model_id}


def _adapt_first_conv(model: nn.Module, in_chans: int) -> None:
    """Replace the first conv for ``in_chans`` inputs, adapting its (pretrained) weights as timm does."""
    from timm.models import adapt_input_conv

    name = (model.pretrained_cfg or {}).get("first_conv")
    if not name:
        raise UserError(f"cannot find the first conv of {type(model).__name__} to adapt it to in_chans={in_chans}")
    module = model.get_submodule(name)
    new = copy.deepcopy(module)
    new.in_channels = in_chans
    new.weight = nn.Parameter(adapt_input_conv(in_chans, module.weight.detach()))
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def model_name(cfg: DictConfig) -> str:
    """simple_cnn, the timm model name, or the registered backbone it came from."""
    return str(cfg.model.get("name") or cfg.model.get("backbone") or cfg.model.kind)


#: ``model.kind`` -> the function that builds it.
MODELS = {"simple_cnn": _simple_cnn, "timm": _timm_model}
