"""The package's shape, as the folder tree states it (README, "Layout"): the verbs at the top, the library in
subpackages in layer order. A module imports only modules of its own layer or below, no verb imports another verb,
and the rules of size, names and imports hold everywhere. Imports inside functions count too."""

import ast
import sys
from pathlib import Path

import pinterest_cls

PACKAGE = Path(pinterest_cls.__file__).parent

#: The layer of each subpackage, lowest first; a module's layer is its folder's.
FOLDERS = {"core": 0, "data": 1, "neighbors": 2, "embed": 3, "learn": 4, "track": 5, "analysis": 6, "serving": 7,
           "finetuning": 7}
VERBS = {"scan", "extract", "train", "report", "status", "audit", "cluster", "search", "predict", "finetune"}
VERB_LAYER = 8
API_LAYER = 9  # pinterest_cls/__init__.py: the Python API, above everything it exports
#: Functions may take at most this many parameters (self aside); more go into the object that holds them.
MAX_PARAMETERS = 8
#: scikit-learn's convention: an estimator's hyper-parameters are the parameters of its __init__.
ESTIMATOR_INITS = {"learn.estimators.TorchMLP.__init__", "learn.estimators.FaissKNN.__init__",
                   "learn.estimators.FaissKMeans.__init__"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1]) if parts[-1] == "__init__" else ".".join(parts)


def layer_of(module: str) -> int | None:
    """The layer of a module (``data.store`` -> 1, ``train`` -> 8, ``""`` the package itself -> the API's)."""
    if module == "":
        return API_LAYER
    head = module.split(".")[0]
    if head in FOLDERS:
        return FOLDERS[head]
    return VERB_LAYER if module in VERBS else None


def all_paths() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


MODULES = {module_name(p) for p in all_paths()}


def resolve(parts: list[str]) -> str:
    """The longest module prefix of ``parts`` (``data.store.Store`` -> ``data.store``)."""
    for k in range(len(parts), 0, -1):
        if ".".join(parts[:k]) in MODULES:
            return ".".join(parts[:k])
    return ".".join(parts)


def imports_of(path: Path, name: str | None = None) -> set[str]:
    """The package's modules that ``path`` (the module ``name``) imports, anywhere in the file."""
    name = module_name(path) if name is None else name
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
            elif (node.module or "").split(".")[0] == "pinterest_cls":
                target = node.module.split(".")[1:]
            else:
                continue
            found |= {resolve(target + [a.name]) for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {resolve(a.name.split(".")[1:]) for a in node.names if a.name.split(".")[0] == "pinterest_cls"}
    return found - {name}


def test_the_tree_is_the_layers():
    """Every module sits in a layer's folder, or is a verb at the top; every subpackage is a layer."""
    stray = [m for m in MODULES if layer_of(m) is None]
    assert not stray, f"put these modules in a subpackage of tests/test_architecture.py FOLDERS, or make them verbs: " \
                      f"{sorted(stray)}"
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert folders == set(FOLDERS), f"subpackages without a layer, or layers without a folder: {folders ^ set(FOLDERS)}"
    top = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    assert top == VERBS, f"the top level holds the verbs and nothing else: {top ^ VERBS}"


def test_no_verb_imports_another_verb():
    offending = {m: sorted(imports_of(p) & VERBS) for p in all_paths() if (m := module_name(p)) in VERBS
                 and imports_of(p) & VERBS}
    assert not offending, f"verbs importing verbs (move the shared code into a library module): {offending}"


def test_modules_import_only_their_layer_or_below():
    offending = {}
    for path in all_paths():
        m = module_name(path)
        up = sorted(d for d in imports_of(path) if (layer_of(d) or 0) > layer_of(m) or (d in VERBS and m not in VERBS))
        if up:
            offending[m] = up
    assert not offending, f"imports from a higher layer: {offending}"


def test_the_rule_sees_imports_inside_functions(tmp_path):
    """The checker itself: imports of a verb and of a higher layer hidden in a function are found."""
    fake = tmp_path / "loop.py"
    fake.write_text("import numpy\n\ndef f():\n    from ...train import train\n    from ... import extract\n"
                    "    import pinterest_cls.search\n    from ..serving.model_io import load_run\n"
                    "    from pinterest_cls.data import store\n")
    assert imports_of(fake, "finetuning.loop") == {"train", "extract", "search", "serving.model_io", "data.store"}


def test_no_two_modules_differ_by_a_suffix():
    """``extract`` and ``extraction``, ``report`` and ``reporting``: names that do not tell rooms apart. No module's
    name begins with another module's name (nor repeats it in another folder)."""
    stems = sorted({p.stem for p in all_paths() if p.stem != "__init__"})
    clashes = [(a, b) for a in stems for b in stems if a != b and b.startswith(a)]
    repeated = sorted({p.stem for p in all_paths() if p.stem != "__init__"
                       and sum(q.stem == p.stem for q in all_paths()) > 1})
    assert not clashes and not repeated, f"rename: {clashes} {repeated}"


def _functions():
    """(qualified name, node) of every function of the package, methods and nested functions included."""
    for path in all_paths():
        def walk(node, prefix):
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    name = f"{prefix}.{child.name}"
                    if not isinstance(child, ast.ClassDef):
                        yield name, child
                    yield from walk(child, name)
                else:
                    yield from walk(child, prefix)

        yield from walk(ast.parse(path.read_text()), module_name(path))


def test_no_function_is_longer_than_60_lines():
    """Long functions are split into named pieces."""
    long = sorted({f"{name} ({n.end_lineno - n.lineno + 1} lines)" for name, n in _functions()
                   if n.end_lineno - n.lineno >= 60})
    assert not long, f"split these into named pieces: {long}"


def test_no_function_takes_more_than_8_parameters():
    """A function that needs many values takes the object that holds them (a dataclass, the config node)."""
    many = sorted({name for name, n in _functions() if name not in ESTIMATOR_INITS and len(
        [a for a in n.args.posonlyargs + n.args.args + n.args.kwonlyargs if a.arg not in ("self", "cls")])
        > MAX_PARAMETERS})
    assert not many, f"pass the object that holds these parameters: {many}"


def test_imports_inside_functions_are_only_optional_third_party_libraries():
    """The package's own modules and the standard library are imported at the top of a module; only a
    third-party library that a verb may not need (mlflow, faiss, timm, matplotlib, ...) loads where it is used."""
    hidden = []
    for path in all_paths():
        tree = ast.parse(path.read_text())
        # the top of a module, an `if TYPE_CHECKING:` block at the top included
        top = {id(n) for node in tree.body for n in [node, *(node.body if isinstance(node, ast.If) else [])]}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in top:
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if getattr(node, "level", 0) or any(n.split(".")[0] in sys.stdlib_module_names | {"pinterest_cls"}
                                                for n in names):
                hidden.append(f"{module_name(path)}:{node.lineno}")
    assert not hidden, f"move these imports to the top of their module: {hidden}"


def test_importing_the_package_loads_no_heavy_library_and_sets_no_environment():
    """``import pinterest_cls`` (and a verb's command line module) stays cheap: torch, mlflow, faiss and timm load
    where they are used, and no environment variable is set on the user's behalf."""
    import subprocess

    code = ("import os, sys; before = dict(os.environ); import pinterest_cls, pinterest_cls.scan, "
            "pinterest_cls.status; print(sorted(m for m in ('torch', 'mlflow', 'faiss', 'timm') if m in sys.modules), "
            "sorted(set(os.environ) - set(before)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("] [")
    assert out[0] == "[" and out[1].strip() == "]", out
