"""The command line of every verb: ``python -m pinterest_cls.<verb> key=value ...`` as a Hydra app, with

- ``--help`` describing the verb (its docstring), the config groups it takes and their options, and its own
  keys with their comments, instead of Hydra's generic page;
- configuration mistakes (an unknown key or group, a group option that does not exist, a value of the wrong
  type) stopped before Hydra starts, with one line naming the key and the closest valid names, exit status 2,
  as the project's own errors;
- a ``pinterest_cls.core.errors.UserError`` raised by the verb printed as one line, exit status 2, and the
  Hydra job folder removed again when the job wrote nothing into it.
"""

from __future__ import annotations

import difflib
import functools
import shlex
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from pinterest_cls.core import config
from pinterest_cls.core.errors import EXIT_USER_ERROR, UserError

#: Hydra's own flags: handed to Hydra untouched (``--cfg job`` prints the resolved config, and so on).
HYDRA_FLAGS = ("--hydra-help", "--info", "-i", "--cfg", "-c", "--package", "-p", "--resolve", "--config-path",
               "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--shell-completion", "-sc",
               "--experimental-rerun", "--version")


#: Groups every verb takes as additions (``+experiment=paper_grid``), beside those of its defaults list.
ADDED_GROUPS = ("experiment",)


def verb_main(config_name: str) -> Callable:
    """Decorate a verb's task function ``fn(cfg)``: the result is its command line entry point (``main()``)."""

    def decorate(task: Callable) -> Callable:
        import hydra

        @functools.wraps(task)
        def job(cfg):
            try:
                return task(cfg)
            except UserError as exc:
                _remove_empty_job_folder()
                _fail(str(exc))

        hydra_app = hydra.main(config_path=config.CONF_DIR, config_name=config_name, version_base="1.3")(job)

        @functools.wraps(task)
        def main() -> None:
            args = sys.argv[1:]
            if any(a in ("--help", "-h") for a in args):
                print(verb_help(config_name, sys.modules[task.__module__].__doc__ or ""))
                return
            if not any(a.split("=", 1)[0] in HYDRA_FLAGS for a in args):
                try:
                    check_overrides(config_name, [a for a in args if a not in ("-m", "--multirun")])
                except UserError as exc:
                    _fail(str(exc))
            hydra_app()

        main.task = task  # the undecorated function, for tests
        return main

    return decorate


def command(verb: str, args: list[str]) -> str:
    """The command line that runs ``verb`` with ``args`` (each quoted for a POSIX shell where it needs it)."""
    return " ".join([f"python -m pinterest_cls.{verb}", *(shlex.quote(str(a)) for a in args)])


def _fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def _primary(config_name: str) -> tuple[list, str]:
    """The defaults list of ``conf/<config_name>.yaml`` and the file's text after it (the verb's own keys)."""
    text = (Path(config.CONF_DIR) / f"{config_name}.yaml").read_text()
    defaults = (yaml.safe_load(text) or {}).get("defaults", [])
    lines, own, in_defaults = text.splitlines(), [], False
    for line in lines:
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults and (line.startswith(" ") or line.startswith("-") or not line.strip()):
            continue
        in_defaults = False
        own.append(line)
    while own and (not own[0].strip() or own[0].startswith("#")):  # the header comment is the usage line
        own.pop(0)
    return defaults, "\n".join(own).strip()


def group_options(group: str) -> list[str]:
    """The options of config group ``group`` (``backbone``, ``hydra/launcher``) in the project's conf/ (a file whose
    name starts with ``_`` holds shared keys that options extend: not an option)."""
    folder = Path(config.CONF_DIR) / group
    return sorted(p.stem for p in folder.glob("*.yaml") if not p.stem.startswith("_")) if folder.is_dir() else []


def verb_groups(config_name: str) -> dict[str, str | None]:
    """The groups a verb takes: those of its defaults list (with their default option), ``hydra/launcher``
    where the verb uses the project's Hydra settings, and the groups every verb may add."""
    defaults, _ = _primary(config_name)
    groups: dict[str, str | None] = {}
    for entry in defaults:
        if isinstance(entry, dict):
            (group, option), = entry.items()
            if group == "hydra":
                groups["hydra/launcher"] = None
            elif group_options(group):
                groups[group] = str(option)
    for group in ADDED_GROUPS:
        groups.setdefault("+" + group, None)
    return groups


def verb_help(config_name: str, doc: str) -> str:
    """The verb's ``--help``: ``doc`` (its module's docstring), its groups and options, its own keys."""
    doc = doc.strip()
    _, own = _primary(config_name)
    lines = [doc, "", f"Usage: python -m pinterest_cls.{config_name} [key=value ...]   "
             f"(-m key=a,b,... runs a sweep, one job per value)", "", "Config groups (group=option):"]
    for group, default in verb_groups(config_name).items():
        options = group_options(group.lstrip("+"))
        lines.append(f"  {group}: {', '.join(options)}" + (f"  (default: {default})" if len(options) > 1 and default
                                                           else ""))
    lines += ["", f"Keys of {config_name} (conf/{config_name}.yaml; shared keys: docs/configuration.md):", "",
              "  " + own.replace("\n", "\n  "), "",
              "--cfg job prints the resolved configuration; --hydra-help shows Hydra's own options."]
    return "\n".join(lines)


def _did_you_mean(name: str, candidates, prefix: str = "") -> str:
    """``; did you mean 'a' or 'b'?`` for the candidates closest to ``name`` (each shown with ``prefix``)."""
    close = difflib.get_close_matches(name, [str(c) for c in candidates], n=3, cutoff=0.6)
    return f"; did you mean {' or '.join(repr(prefix + c) for c in close)}?" if close else ""


def check_overrides(config_name: str, args: list[str]) -> None:
    """Raise a one-line ``UserError`` for an override the verb would not run with: an unknown group
    option, a key the config does not have (also when added with ``+``), or a value Hydra cannot compose."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        overrides = OverridesParser.create().parse_overrides(args)
    except HydraException as exc:
        raise UserError(f"cannot parse the command line: {str(exc).splitlines()[0]}") from None
    groups = verb_groups(config_name)
    first: list[str] = []  # each sweep at its first value: the composition that is checked
    keys: list[tuple[str, str]] = []
    for o in overrides:
        key = o.key_or_group
        values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        options = group_options(key)
        if options and not key.startswith("hydra"):
            for value in values:
                if value not in options and value != "null":
                    hint = _did_you_mean(value, options) or f" (options: {', '.join(options)})"
                    raise UserError(f"{key}={value}: no such {key}{hint}")
        elif key.startswith("hydra/") or key.startswith("hydra."):
            pass  # Hydra's own settings: Hydra checks them
        elif o.is_add() and key.split(".")[0] in ADDED_GROUPS:
            pass
        elif not o.is_force_add():
            keys.append((key, "+" if o.is_add() else ""))
        first.append(f"{o.get_key_element()}={values[0]}" if o.is_sweep_override() else o.input_line)
    # the keys as the chosen groups (+experiment=... too) make them
    base = config.compose(config_name, [f for f, o in zip(first, overrides) if group_options(o.key_or_group)])
    top = set(base.keys()) | {g.lstrip("+") for g in groups}
    for key, mark in keys:
        head = key.split(".")[0]
        if mark == "+":  # a new key: only under a node the verb has
            if head not in top:
                raise UserError(f"+{key}: {config_name} has no key {head!r}{_did_you_mean(head, top)} "
                                f"(python -m pinterest_cls.{config_name} --help lists its keys)")
        elif not _has_key(base, key):
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
            siblings = list(node.keys()) if hasattr(node, "keys") else []
            hint = _did_you_mean(leaf, siblings, f"{parent}." if parent else "")
            raise UserError(f"{key}: {config_name} has no such key{hint} "
                            f"(python -m pinterest_cls.{config_name} --help lists its keys)")
    try:
        config.compose(config_name, first)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise UserError(f"{' '.join(args)}: {_first_line(exc)}") from None


def _has_key(cfg, key: str) -> bool:
    """Whether ``cfg`` has the dotted ``key`` (a mandatory value still missing, ``???``, counts)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue

    try:
        return OmegaConf.select(cfg, key, default=KeyError, throw_on_missing=True) is not KeyError
    except MissingMandatoryValue:
        return True


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _remove_empty_job_folder() -> None:
    """Remove this Hydra job's output folder if the job wrote nothing but Hydra's own files into it (and the
    sweep folder above it when it is left with nothing but ``multirun.yaml``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        hc = HydraConfig.get()
        folder = Path(hc.runtime.output_dir)
    except Exception:
        return
    own = {".hydra", f"{hc.job.name}.log"}
    if not folder.is_dir() or any(p.name not in own for p in folder.iterdir()):
        return
    shutil.rmtree(folder, ignore_errors=True)
    parent = folder.parent
    if hc.sweep.dir and parent.resolve() == Path(hc.sweep.dir).resolve():
        if all(p.name in ("multirun.yaml", ".mlflow_parent_run") for p in parent.iterdir()):
            shutil.rmtree(parent, ignore_errors=True)
            parent = parent.parent
    for _ in range(2):  # hydra/<verb> (or <verb>-multirun) and hydra/, each if left empty
        try:
            parent.rmdir()
        except OSError:
            break
        parent = parent.parent
