"""Backbones: a registered name (``pinterest_cls.embed.registry``), any timm model, or raw pixels, built into
a feature model with the right weights, pooling and preprocessing.

``build_backbone(cfg.backbone)`` returns a ``Backbone``: a module mapping uint8 image batches (B, 3, H, W)
to features (B, D) — normalisation included, so a loader only has to deliver resized uint8 pixels — plus the
transform that produces those pixels from a PIL image, and a description for ``meta.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image
from torch import nn

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError
from pinterest_cls.embed.registry import POOLS, REGISTRY, registered_names, timm_model_of
from pinterest_cls.embed.weights import create_timm


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


#: ``extract.resize``: how the workers resize a decoded pin. ``tensor``: torchvision's antialiased resize of the
#: uint8 tensor (its own vectorised kernels; 0.36 of ``pil``'s core time at a row cosine of 1.00000 to it,
#: experiments/throughput/README.md); ``pil``: Pillow's resize of the image (the stores made before the option).
RESIZES = ("tensor", "pil")


def check_resize(name: str) -> str:
    """``extract.resize``, checked: one of ``RESIZES``."""
    if name not in RESIZES:
        raise UserError(f"extract.resize={name!r} must be one of: {', '.join(RESIZES)}")
    return name


class TensorResize:
    """RGB image (PIL, or an (H, W, 3) uint8 array: ``extract.decode=opencv``) -> uint8 tensor (3, size, size) by
    torchvision's antialiased resize of the uint8 tensor: the
    shorter side to ``resize`` and a centre crop of ``size``, or both sides to ``size`` (``squash``). The same
    geometry as the ``pil`` transform (torchvision's ``Resize(int)`` and ``CenterCrop`` rules)."""

    def __init__(self, size: int, resize: int, interpolation, squash: bool):
        self.size, self.resize, self.interpolation, self.squash = size, resize, interpolation, squash

    def __call__(self, image) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        # HWC memory seen as CHW (channels last): the layout torchvision's uint8 kernels run fastest on
        array = image if isinstance(image, np.ndarray) else np.array(image, dtype=np.uint8, copy=True)
        x = torch.from_numpy(array).permute(2, 0, 1)
        if self.squash:
            return F.resize(x, [self.size, self.size], self.interpolation, antialias=True).contiguous()
        x = F.resize(x, [self.resize], self.interpolation, antialias=True)
        return F.center_crop(x, [self.size]).contiguous()

    def __repr__(self) -> str:
        return (f"TensorResize(size={self.size}, resize={self.resize}, interpolation={self.interpolation.value}, "
                f"squash={self.squash})")


class AsPIL:
    """An (H, W, 3) uint8 array (``extract.decode=opencv``) as a PIL image; a PIL image as it is."""

    def __call__(self, image):
        return Image.fromarray(image) if isinstance(image, np.ndarray) else image

    def __repr__(self) -> str:
        return "AsPIL()"


def make_transform(input_size: int, crop_pct: float, interpolation: str, crop_mode: str = "center",
                   resize_impl: str = "tensor"):
    """Resize the shorter side to ``input_size / crop_pct``, crop ``input_size`` (centre), as uint8 tensor;
    ``resize_impl``: ``tensor`` or ``pil`` (``RESIZES``). Returns (transform, resize_size)."""
    from torchvision import transforms as T
    from torchvision.transforms import InterpolationMode

    check_resize(resize_impl)
    resize = int(input_size / crop_pct) if crop_pct else input_size
    interp = {"bicubic": InterpolationMode.BICUBIC, "bilinear": InterpolationMode.BILINEAR,
              "nearest": InterpolationMode.NEAREST, "lanczos": InterpolationMode.LANCZOS}[interpolation]
    squash = crop_mode == "squash"
    if squash:
        resize = input_size
    if resize_impl == "tensor" and interp in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR):
        return TensorResize(input_size, resize, interp, squash), resize
    if resize_impl == "tensor":  # torchvision resizes tensors antialiased in bicubic and bilinear only
        raise UserError(f"interpolation {interpolation!r} has no tensor resize; use extract.resize=pil")
    steps = ([T.Resize((input_size, input_size), interpolation=interp)] if squash
             else [T.Resize(resize, interpolation=interp), T.CenterCrop(input_size)])
    return T.Compose([AsPIL(), *steps, T.PILToTensor()]), resize


def with_defaults(bcfg) -> DictConfig:
    """``bcfg`` over ``conf/backbone/<kind>.yaml``: a backbone config written in code (a mapping, or just a name
    from conf/backbone/), or recorded by an older store, gets its missing keys from the YAML, the one place of the
    defaults."""
    if isinstance(bcfg, str):
        bcfg = {"name": bcfg}
    # resolved where it stands (a composed config's interpolations may point outside the backbone node)
    given = OmegaConf.to_container(bcfg, resolve=True) if isinstance(bcfg, DictConfig) else dict(bcfg)
    kind = str(given.get("kind") or given.get("name"))
    if not (Path(config.CONF_DIR) / "backbone" / f"{kind}.yaml").is_file():
        return OmegaConf.create(given)
    merged = OmegaConf.merge(config.group_config("backbone", kind), given)
    return OmegaConf.create(OmegaConf.to_container(merged, resolve=True))


def build_backbone(bcfg, resize: str = "tensor") -> Backbone:
    """Build the backbone described by the ``backbone`` config group (see conf/backbone/): ``backbone.kind`` is
    looked up in ``KINDS``, where every registered name builds its timm model. ``resize``: how its transform
    resizes (``RESIZES``, ``extract.resize``)."""
    bcfg = with_defaults(bcfg)
    kind = str(bcfg.get("kind") or bcfg.get("name"))
    if kind not in KINDS:
        raise UserError(f"backbone={kind!r} is not registered; choose one of: {', '.join(registered_names())} "
                        "(backbone=timm backbone.model=<name> takes any timm model)")
    pool = str(bcfg.pool)
    if pool not in POOLS:
        raise UserError(f"backbone.pool={pool!r} must be one of: {', '.join(POOLS)}")
    return KINDS[kind](bcfg, pool, resize)  # make_transform checks resize


def _pixels(bcfg, pool: str, resize_impl: str) -> Backbone:
    size = int(bcfg.image_size)
    grayscale = bool(bcfg.grayscale)
    transform, resize = make_transform(size, 1.0, "bilinear", crop_mode="squash", resize_impl=resize_impl)
    dim = size * size * (1 if grayscale else 3)
    info = {"backbone": bcfg.name, "timm_id": None, "weights": "none (raw pixels)", "weights_sha256": None,
            "input_size": size, "grayscale": grayscale, "crop_pct": 1.0, "interpolation": "bilinear",
            "pool": "flatten", "dim": dim, "resize": resize_impl}
    return Backbone(str(bcfg.name), PixelModel(grayscale).eval(), transform, resize, dim, info)


def _timm(bcfg, pool: str, resize_impl: str) -> Backbone:
    """Any timm model (``kind: timm``) or a registered one (its ``Spec`` gives the defaults)."""
    spec = REGISTRY.get(str(bcfg.get("kind") or bcfg.get("name")))
    model_id = timm_model_of(bcfg)
    model, weights_info = create_timm(model_id, bcfg, spec)
    model.eval()

    import timm.data

    data_cfg = timm.data.resolve_data_config({}, model=model)
    size = bcfg.get("image_size") or (spec.image_size if spec else None) or data_cfg["input_size"][-1]
    crop_pct = bcfg.get("crop_pct") or (spec.crop_pct if spec else None) or data_cfg.get("crop_pct") or 1.0
    interpolation = str(bcfg.get("interpolation") or data_cfg.get("interpolation") or "bicubic")
    transform, resize = make_transform(int(size), float(crop_pct), interpolation, resize_impl=resize_impl)
    feature_model = FeatureModel(model, data_cfg["mean"], data_cfg["std"], pool).eval()
    dim = int(model.num_features if pool == "keras_avg" else getattr(model, "head_hidden_size", None)
              or model.num_features)
    info = {"backbone": str(bcfg.name), "timm_id": model_id, **weights_info, "input_size": int(size),
            "crop_pct": float(crop_pct), "resize_size": resize, "interpolation": interpolation,
            "mean": list(map(float, data_cfg["mean"])), "std": list(map(float, data_cfg["std"])),
            "pool": pool, "dim": dim, "resize": resize_impl}
    return Backbone(str(bcfg.name), feature_model, transform, resize, dim, info)


#: ``backbone.kind`` -> its builder: the raw-pixel baseline, any timm model, and every registered backbone.
KINDS = {"pixels": _pixels, "timm": _timm, **{name: _timm for name in REGISTRY}}
