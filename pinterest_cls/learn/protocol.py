"""A train run's protocol: the settings that make two runs' scores comparable, as one string (what ``report``
groups runs by): the split and its parameters, the per-category cap, how the inner CV folded, how copies were
handled, which audit findings were left out, and the identity of the embedded rows."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core import config
from pinterest_cls.neighbors.duplicates import possible_descriptions


def resolve_split_name(name: str, layout: str) -> str:
    """``split=auto``: by board for the pinterest layout (boards do not straddle train and test), else
    stratified."""
    if name == "auto":
        return "group" if layout == "pinterest" else "stratified"
    return name


def split_settings(split) -> str:
    """The split and the parameters that define it, from a resolved ``split`` config (``name`` resolved, not
    ``auto``): e.g. ``split=group test_size=0.2 seed=1``."""
    name = str(split.name)
    keys = {"kfold": ("folds", "by_board", "seed"), "predefined": ("column", "test_value")}.get(
        name, ("test_size", "seed"))
    return " ".join([f"split={name}"] + [f"{k}={split.get(k)}" for k in keys])


def protocol_settings(split, max_per_category, sampling_seed, inner: str, repins: str, exclusion: str = "") -> str:
    """What makes two train runs' scores comparable, the manifest's rows aside: the split and its parameters,
    the per-category cap and its seed, how the inner CV folds were made (``by board``, ``by pin``, or
    ``by pin, leaky`` when the data has boards), how copies across the split were handled, and which pins the
    audit's findings took out (``exclusion``; nothing is added when none were)."""
    return (f"{split_settings(split)}; cap={max_per_category} seed={sampling_seed}; inner CV {inner}; "
            f"repins {repins}" + (f"; {exclusion}" if exclusion else ""))


def repins_settings(mode: str, copies: str = "exact", keep_one: bool = False) -> str:
    """How a run handled copies across the split, as its protocol records it: ``off``, or the mode and the copies
    it found (``CopyPolicy.describe``): ``drop, exact + near calibrated, verified``, ``drop, exact + near >= 0.95
    given, verified``, ``link, exact (store not calibrated)``, with ``, one per group`` under ``repins.keep_one``."""
    if mode == "off":
        return mode
    return f"{mode}, {copies}" + (", one per group" if keep_one else "")


def protocol(settings: str, rows_sha256: str) -> str:
    """A run's protocol: ``protocol_settings`` plus the identity of the embedded rows."""
    return f"{settings}; rows {rows_sha256[:10]}"


def protocol_without_rows(value: str) -> str:
    return value.rsplit("; rows ", 1)[0]


def exclusion_settings(kinds, sides: str) -> str:
    """How a run used the audit, as its protocol records it: ``""`` (no exclusion) or e.g.
    ``audit-excluded duplicates,label_issues from train``."""
    kinds = sorted(str(k) for k in (kinds or []))
    return f"audit-excluded {','.join(kinds)} from {sides}" if kinds else ""


#: The protocol of a run that recorded none.
NO_PROTOCOL = "(not recorded: a run from before protocols were logged)"


def train_protocol(cfg: DictConfig, split_name: str, inner: str, copies: str) -> str:
    """The protocol settings of the train run ``cfg``, its split resolved to ``split_name`` (not ``auto``);
    ``inner``: how its inner CV folded (``by board``, ``by pin``, ``by pin, leaky``); ``copies``: the copies it
    looked for (``CopyPolicy.describe``)."""
    split = OmegaConf.merge(cfg.split, {"name": split_name})
    repins = repins_settings(str(cfg.repins.mode), copies, bool(cfg.repins.keep_one))
    exclusion = exclusion_settings(config.select(cfg, "audit.exclude"), str(config.select(cfg, "audit.exclude_from")))
    return protocol_settings(split, cfg.sampling.max_per_category, int(cfg.sampling.seed), inner, repins, exclusion)


def default_protocol_settings(cfg: DictConfig) -> list[str]:
    """The protocol settings of a ``train`` run with default settings on this data (``report.protocol=default``):
    on a calibrated store, and on one that is not (exact copies only), in that order of preference."""
    layout = str(cfg.data.layout)
    tcfg = config.compose("train", [f"data.layout={layout}"])
    split, inner = resolve_split_name(str(tcfg.split.name), layout), "by board" if layout == "pinterest" else "by pin"
    return [train_protocol(tcfg, split, inner, copies) for copies in possible_descriptions(tcfg.repins)]
