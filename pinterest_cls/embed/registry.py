"""The backbone registry, as timm's: every registered name with the timm model (pretrained tag), input size and
weights source the study used. Plain data, so that listing the backbones (for errors, ``--help`` or filling a
weights cache) loads no model library."""

from __future__ import annotations

from dataclasses import dataclass

from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.core.errors import UserError


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

#: Kinds that are not registry entries: the raw-pixel baseline, and any timm model by name.
SPECIAL = ("pixels", "timm")

#: ``backbone.pool``: timm's pooled pre-logits features, or Keras' global average of the feature map.
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
    """Every name ``backbone=`` takes a registered backbone by, and the special kinds."""
    return sorted(REGISTRY) + list(SPECIAL)


def backbone_configs(cfg: DictConfig) -> list[DictConfig]:
    """The backbones this run extracts: ``backbone``, or every entry of ``backbones`` when that is set.

    An entry of ``backbones`` is a name from ``conf/backbone/`` (``convnext_tiny``), or a mapping merged over
    the ``conf/backbone/<kind>.yaml`` it names (``{kind: timm, model: resnet50.a1_in1k}``); each is resolved
    exactly as ``backbone=<entry>`` would be, so its store is the one a run of its own writes.
    """
    entries = OmegaConf.select(cfg, "backbones", default=None)
    if entries is None or (not isinstance(entries, str) and len(entries) == 0):
        return [cfg.backbone]
    if isinstance(entries, str) or not OmegaConf.is_list(entries):
        raise UserError(f"backbones={entries} must be a list, e.g. backbones=[convnext_tiny,efficientnet_v2_b0]")
    out, names = [], []
    for entry in entries:
        if isinstance(entry, str):
            kind, extra = entry, {}
        elif OmegaConf.is_dict(entry):
            extra = OmegaConf.to_container(entry, resolve=True)
            kind = str(extra.get("kind", "timm"))
        else:
            raise UserError(f"backbones entry {entry!r} must be a backbone name or a mapping with kind: ...")
        try:  # the entry resolved as it would be at the backbone key
            base = config.group_config("backbone", kind)
            bcfg = OmegaConf.create(OmegaConf.to_container(OmegaConf.merge(base, extra), resolve=True,
                                                           throw_on_missing=True))
        except UserError as exc:
            raise UserError(f"backbones entry {entry!r}: {exc}") from None
        except Exception as exc:
            raise UserError(f"backbones entry {entry!r}: {exc}".splitlines()[0]) from None
        if bcfg.name in names:
            raise UserError(f"backbones lists {bcfg.name} twice")
        names.append(bcfg.name)
        out.append(bcfg)
    return out
