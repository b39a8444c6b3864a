"""Config plumbing shared by every verb: the conf/ folder, resolvers, and the locations others rely on."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from pinterest_cls.core.errors import UserError


def _conf_dir() -> str:
    """The configs: ``pinterest_cls/conf`` inside an installed wheel, else ``conf/`` at the top of the source
    tree beside the package (a checkout or an editable install)."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "conf", package.parent / "conf"):
        if (folder / "extract.yaml").is_file():
            return str(folder)
    raise ImportError(f"pinterest_cls: no conf/ folder with extract.yaml in {package} or {package.parent}; "
                      "reinstall the package")


#: Where Hydra finds the verbs' configs.
CONF_DIR = _conf_dir()

#: ``data.name`` when ``data.root`` is unset: the embedded demo export.
DEMO_NAME = "demo"


def _data_name(root) -> str:
    """Default ``data.name``: the export folder's name (a CSV/parquet file's stem), or ``demo``."""
    if root in (None, "", "null"):
        return DEMO_NAME
    path = Path(str(root)).expanduser()
    name = path.stem if path.suffix.lower() in (".csv", ".parquet", ".tsv", ".npz") else path.name
    return name or path.resolve().name


if not OmegaConf.has_resolver("pc_data_name"):
    OmegaConf.register_new_resolver("pc_data_name", _data_name)
if not OmegaConf.has_resolver("pc_join"):  # a list as a Hydra sweep: [a, b] -> "a,b"
    OmegaConf.register_new_resolver("pc_join", lambda items: ",".join(str(i) for i in items))


def select(cfg: DictConfig, key: str):
    """``cfg[key]`` for a dotted key, with an error naming the key when it is missing."""
    value = OmegaConf.select(cfg, key, throw_on_missing=False, default=KeyError)
    if value is KeyError:
        raise UserError(f"config key '{key}' is missing; add it to the config or pass {key}=...")
    return value


def work_dir(cfg: DictConfig) -> Path:
    return _path(cfg, "paths.work")


def _path(cfg: DictConfig, key: str) -> Path:
    return Path(os.path.expanduser(str(select(cfg, key)))).resolve()


def data_dir(cfg: DictConfig) -> Path:
    """``paths.data``: the dataset's manifest, categories and scan report live here."""
    return _path(cfg, "paths.data")


def embeddings_root(cfg: DictConfig) -> Path:
    """``paths.embeddings``: one store per backbone in it."""
    return _path(cfg, "paths.embeddings")


def embeddings_dir(cfg: DictConfig, backbone: str | None = None) -> Path:
    """The store of ``backbone`` (default: ``backbone.name``)."""
    return embeddings_root(cfg) / str(backbone or select(cfg, "backbone.name"))


def report_dir(cfg: DictConfig) -> Path:
    return _path(cfg, "paths.report")


def audit_dir(cfg: DictConfig, backbone: str | None = None) -> Path:
    """``paths.audit``/<backbone>: the audit's findings for one store."""
    return _path(cfg, "paths.audit") / str(backbone or select(cfg, "backbone.name"))


def job_output_dir() -> Path:
    """The Hydra job's output folder when running under Hydra, else a new temporary folder."""
    try:
        from hydra.core.hydra_config import HydraConfig

        path = Path(HydraConfig.get().runtime.output_dir)
    except Exception:  # not inside a Hydra app (library use, tests)
        path = Path(tempfile.mkdtemp(prefix="pinterest_cls_"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def compose(config_name: str, overrides: list[str]) -> DictConfig:
    """The config ``python -m pinterest_cls.<config_name> <overrides>`` would run with (inside a running Hydra
    app too)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return hydra_compose(config_name=config_name, overrides=overrides)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name=config_name, overrides=overrides)


def group_config(group: str, option: str) -> DictConfig:
    """``conf/<group>/<option>.yaml`` as Hydra composes it: the options of the same group that its defaults list
    names first, the file's own keys over them. A missing option is a one-line error listing the options."""
    path = Path(CONF_DIR) / group / f"{option}.yaml"
    if not path.is_file():
        options = sorted(p.stem for p in path.parent.glob("*.yaml") if not p.stem.startswith("_"))
        raise UserError(f"there is no conf/{group}/{option}.yaml; choose from {', '.join(options)}")
    node = OmegaConf.load(path)
    defaults = node.pop("defaults", []) if "defaults" in node else []
    base = OmegaConf.create()
    for entry in defaults:
        if entry != "_self_":
            base = OmegaConf.merge(base, group_config(group, str(entry)))
    return OmegaConf.merge(base, node)
