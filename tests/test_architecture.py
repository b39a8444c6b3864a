"""The import rule of the package (README, "Architecture"): library modules never import a verb, a verb never
imports another verb, and a library module imports only modules of its own layer or below. Imports inside
functions count too."""

import ast
from pathlib import Path

import pinterest_cls

PACKAGE = Path(pinterest_cls.__file__).parent

#: Every module of the package, by layer; a new module must be placed here (the test fails until it is).
LAYERS = {
    0: {"__init__", "errors", "fileio", "config", "cli", "demo", "images"},  # foundation
    1: {"catalog", "backbones", "gpu_decode", "data", "store", "neighbors", "duplicates", "evaluation", "plots",
        "tracking", "pages"},
    2: {"embedding", "openvino_runtime", "extraction", "splits", "estimators", "classifiers", "index", "serving",
        "pyfunc_model", "auditing", "reporting", "finetuning", "finetuning.data", "finetuning.models",
        "finetuning.loop"},
    3: {"scan", "extract", "train", "report", "predict", "search", "cluster", "finetune", "status", "audit"},  # verbs
}
VERBS = LAYERS[3]
LAYER_OF = {m: layer for layer, mods in LAYERS.items() for m in mods}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" and len(parts) > 1 else ".".join(parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """The package's modules that ``path`` (the module ``name``) imports, anywhere in the file."""
    name = name or module_name(path)
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    if name == "__init__":
        package = []
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
            elif (node.module or "").startswith("pinterest_cls"):
                base, node_module = [], node.module.removeprefix("pinterest_cls").lstrip(".")
                target = node_module.split(".") if node_module else []
                found |= {resolve(target + [a.name]) for a in node.names}
                continue
            else:
                continue
            target = base + (node.module.split(".") if node.module else [])
            found |= {resolve(target + [a.name]) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name.split(".")[1:]) for a in node.names if a.name.startswith("pinterest_cls.")}
    return {m for m in found if m} - {name}


def resolve(parts: list[str]) -> str:
    """The longest module prefix of ``parts`` (``a.b.name`` -> ``a.b`` when ``name`` is not a module)."""
    for k in range(len(parts), 0, -1):
        candidate = ".".join(parts[:k])
        if candidate in LAYER_OF:
            return candidate
    return "__init__" if parts and parts[0] in ("__version__",) else ".".join(parts)


def all_modules() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_every_module_has_a_layer():
    unplaced = sorted(set(all_modules()) - set(LAYER_OF))
    assert not unplaced, f"place these modules in a layer of tests/test_architecture.py LAYERS: {unplaced}"


def test_no_verb_imports_another_verb():
    offending = {m: sorted(deps & VERBS) for m, deps in all_modules().items() if m in VERBS and deps & VERBS}
    assert not offending, f"verbs importing verbs (move the shared code into a library module): {offending}"


def test_library_modules_import_only_their_layer_or_below():
    offending = {}
    for m, deps in all_modules().items():
        if m not in LAYER_OF or m in VERBS:
            continue
        up = sorted(d for d in deps if LAYER_OF.get(d, -1) > LAYER_OF[m])
        if up:
            offending[m] = up
    assert not offending, f"imports from a higher layer: {offending}"


def test_the_rule_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import of a verb hidden in a function is found."""
    module = PACKAGE / "splits.py"
    assert "train" not in imports_of(module)
    fake = tmp_path / "loop.py"
    fake.write_text("import numpy\n\ndef f():\n    from ..train import train\n    from .. import extract\n"
                    "    import pinterest_cls.search\n    from .data import Source\n")
    assert imports_of(fake, "finetuning.loop") == {"train", "extract", "search", "finetuning.data"}


def test_no_function_is_longer_than_60_lines():
    """Long functions are split into named pieces (README, "Architecture")."""
    long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{module_name(path)}.{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, f"split these into named pieces: {long}"


def test_imports_inside_functions_are_only_optional_third_party_libraries():
    """The package's own modules and the standard library are imported at the top of a module; only a
    third-party library that a verb may not need (mlflow, faiss, timm, matplotlib, ...) loads where it is used."""
    import sys

    hidden = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text())
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if getattr(node, "level", 0) or any(n.split(".")[0] in sys.stdlib_module_names | {"pinterest_cls"}
                                                for n in names):
                hidden.append(f"{module_name(path)}:{node.lineno}")
    assert not hidden, f"move these imports to the top of their module: {hidden}"
