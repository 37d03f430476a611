"""The package's architecture, read from its own imports (no module is run): the rules of
DESIGN.md's "Layout" and docs/contracts.md "Layout". A change that breaks one fails here, with
the file, the line and the rule."""
from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mlic_dist"

# Imports point down: a module may import its own layer or a lower one.
LAYERS = [
    {"errors", "atomic", "cli", "images", "resources"},              # base
    {"config", "metrics", "rundir", "models", "losses"},             # leaves
    {"shard", "data", "tracking"},
    {"train"},
    {"evaluate", "predict", "ensemble", "report", "relog", "export", "distill"},
    {"sweep", "demo"},
]
FORBIDDEN = {("data", "shard")}       # same layer, but the loaders never need the writer
MAX_TOP_LEVEL = 12                    # modules at the package's top (packages not counted)
# Third-party packages only these parts of the package import.
OWNERS = {"mlflow": ("tracking", "export.pyfunc", "export.pyfunc_model"), "ray": ("sweep",)}
# An import inside a function is for an optional heavy dependency (its import costs seconds, or
# a process must run without it), never to dodge a cycle; these are the heavy ones.
HEAVY = {"mlflow", "ray", "nvidia", "onnx", "onnxruntime", "torch", "torchvision", "accelerate",
         "matplotlib", "sklearn", "webdataset", "wds2idx", "iterstrat", "skimage", "timm"}
# Own modules that may be imported inside a function, because they import a heavy dependency at
# their top: the loader a config picks (DALI / webdataset), the MLflow model flavour, Ray Tune.
LAZY_OWN = {"mlic_dist.data.dali", "mlic_dist.data.torch_loader", "mlic_dist.export.pyfunc",
            "mlic_dist.sweep.progress",
            "mlic_dist.models",    # torch and timm, which config (read by torch-free shard workers) must not import
            "mlic_dist.report.speed"}   # torch and the models: a report reads score files unless it times predict


def _modules() -> dict[str, Path]:
    mods = {}
    for p in ROOT.rglob("*.py"):
        rel = p.relative_to(ROOT.parent).with_suffix("")
        name = ".".join(rel.parts)
        mods[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return mods


MODULES = _modules()


def _imports(name: str, path: Path):
    """(line, imported module or package, inside a function?, third-party?) for every import."""
    tree = ast.parse(path.read_text())
    in_function = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            in_function |= {id(n) for n in ast.walk(fn) if n is not fn}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(tree):
        lazy = id(node) in in_function
        if isinstance(node, ast.Import):
            for a in node.names:
                yield node.lineno, a.name, lazy, not a.name.startswith("mlic_dist")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            if not base.startswith("mlic_dist"):
                yield node.lineno, base, lazy, True
                continue
            for a in node.names:   # `from . import rundir` imports a module, `from .x import f` a name
                target = f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                yield node.lineno, target, lazy, False


def _part(module: str) -> str:
    """mlic_dist.train.loop -> train, mlic_dist.metrics -> metrics."""
    return module.split(".")[1] if module.count(".") else ""


def _layer(part: str) -> int:
    return next(i for i, names in enumerate(LAYERS) if part in names)


EDGES = [(name, line, target, lazy, third) for name, path in sorted(MODULES.items())
         for line, target, lazy, third in _imports(name, path)]


def test_every_module_has_a_layer():
    parts = {_part(m) for m in MODULES if m != "mlic_dist"}
    assert parts <= set().union(*LAYERS), f"add these to LAYERS and docs/contracts.md: {parts - set().union(*LAYERS)}"


def test_imports_point_down():
    wrong = []
    for name, line, target, _, third in EDGES:
        if third or "mlic_dist" in (name, target):
            continue
        src, dst = _part(name), _part(target)
        if src != dst and (_layer(dst) > _layer(src) or (src, dst) in FORBIDDEN):
            wrong.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} {src} imports {dst}")
    assert not wrong, "imports must point down (tests/test_layout.py LAYERS):\n" + "\n".join(wrong)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]
    sys.setrecursionlimit(10_000)

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    return out


@pytest.mark.parametrize("level", ["module", "folder"])
def test_no_import_cycles(level):
    """Counting imports inside functions too: a lazy import does not remove a cycle."""
    graph = defaultdict(set)
    for name, _, target, _, third in EDGES:
        if third:
            continue
        a, b = (name, target) if level == "module" else (_part(name), _part(target))
        # a package's __init__ re-exporting its modules is not a cycle with them
        if a != b and not (level == "module" and (a.startswith(b + ".") or b.startswith(a + "."))):
            graph[a].add(b)
            graph.setdefault(b, set())
    assert _cycles(graph) == []


def test_the_top_level_stays_small():
    top = sorted(p.stem for p in ROOT.glob("*.py") if p.stem != "__init__")
    assert len(top) <= MAX_TOP_LEVEL, f"{len(top)} top-level modules: {top}; group them in a folder"


def test_mlflow_and_ray_are_imported_only_by_their_owners():
    wrong = []
    for name, line, target, _, third in EDGES:
        owners = OWNERS.get(target.split(".")[0]) if third else None
        if owners and not any(name == f"mlic_dist.{o}" or name.startswith(f"mlic_dist.{o}.") for o in owners):
            wrong.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_imports_inside_functions_are_for_heavy_optional_dependencies():
    wrong = []
    for name, line, target, lazy, third in EDGES:
        if lazy and not (target.split(".")[0] in HEAVY if third else target in LAZY_OWN):
            wrong.append(f"{MODULES[name].relative_to(ROOT.parent)}:{line} imports {target} inside a function")
    assert not wrong, "move these imports to the top of the module (or name the heavy dependency " \
                      "in HEAVY / LAZY_OWN):\n" + "\n".join(wrong)


def test_every_entry_point_follows_the_cli_contract():
    """Every `main` a `python -m` runs is wrapped by mlic_dist.cli.entry_point (one `error:` line,
    exit 2 for a UserError), and every user-facing error class derives from UserError."""
    import importlib

    from mlic_dist.errors import UserError

    unwrapped, plain = [], []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text())
        if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            module = importlib.import_module(name)
            if not getattr(module.main, "__wrapped__", None):
                unwrapped.append(name)
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error") and not node.name.startswith("_"):
                cls = getattr(importlib.import_module(name), node.name)
                if not issubclass(cls, (UserError, RuntimeError)) or (
                        issubclass(cls, ValueError) and not issubclass(cls, UserError)):
                    plain.append(f"{name}.{node.name}")
    assert not unwrapped, f"wrap these mains with @entry_point: {unwrapped}"
    assert not plain, f"derive these from mlic_dist.errors.UserError: {plain}"
