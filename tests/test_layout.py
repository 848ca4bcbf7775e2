"""The shape of the package: layers import downwards only, and nobody reaches into another's privates."""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "src" / "tikmix_hf"
TESTS = Path(__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in SRC.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if node.level == 0:
        return node.module or ""
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def _imports(module: str) -> list[tuple[str, str | None]]:
    """(imported module, imported name or None) for every import of ``module``, wherever it stands."""
    out = []
    for node in ast.walk(ast.parse(MODULES[module].read_text())):
        if isinstance(node, ast.Import):
            out += [(alias.name, None) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                out.append((full, None) if full in MODULES else (base, alias.name))
    return out


def _graph(top_level_only: bool = False) -> dict[str, set[str]]:
    graph = {}
    for module in MODULES:
        targets = set()
        for target, _ in _imports(module):
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target and target != module and target.startswith("tikmix_hf"):
                targets.add(target)
        graph[module] = targets
    return graph


def test_no_import_cycle_in_src():
    graph = _graph()
    # A package's __init__ re-exporting its own modules is not a cycle of layers.
    for module, targets in graph.items():
        graph[module] = {t for t in targets if not (MODULES[t].name == "__init__.py" and module.startswith(t + "."))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(module):
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycle = stack[stack.index(target):] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for module in MODULES:
        for target, name in _imports(module):
            if not target.startswith("tikmix_hf"):
                continue
            if name is not None and name.startswith("_") and not name.startswith("__"):
                offenders.append(f"{module} imports {name} from {target}")
    assert not offenders, offenders


def test_the_core_imports_neither_the_cli_nor_the_demo():
    graph = _graph()
    core = [m for m in MODULES if not m.startswith(("tikmix_hf.cli", "tikmix_hf.demo"))]
    offenders = [(m, t) for m in core for t in graph[m] if t.startswith(("tikmix_hf.cli", "tikmix_hf.demo"))]
    assert not offenders, offenders


def test_only_the_cli_and_the_demo_import_plots():
    graph = _graph()
    users = {m for m, targets in graph.items() if "tikmix_hf.plots" in targets}
    assert users and all(m.startswith(("tikmix_hf.cli", "tikmix_hf.demo")) for m in users), users


def test_the_solvers_import_no_torch():
    for module in MODULES:
        if module.startswith("tikmix_hf.solvers") or module in ("tikmix_hf.validation", "tikmix_hf.options"):
            heavy = [t for t, _ in _imports(module) if t.split(".")[0] in ("torch", "transformers")]
            assert not heavy, f"{module} imports {heavy}"


def _loaded_after(statement: str) -> set[str]:
    code = f"import sys; {statement}; print(' '.join(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    return set(proc.stdout.split())


@pytest.mark.parametrize("module", ["tikmix_hf.mixers", "tikmix_hf.config"])
def test_mixers_and_config_import_no_transformers(module):
    loaded = _loaded_after(f"import {module}")
    assert "transformers" not in loaded, f"import {module} pulls in transformers"


def test_the_solvers_load_no_torch():
    loaded = _loaded_after("import tikmix_hf.solvers")
    assert "torch" not in loaded


def test_the_command_line_loads_the_demo_only_for_tikmix_demo():
    loaded = _loaded_after("import tikmix_hf.cli")
    assert not {m for m in loaded if m.startswith("tikmix_hf.demo")}, "import tikmix_hf.cli pulls in the demo"


def test_no_module_is_named_common():
    """A module's name says what it holds; ``_common`` says only that several others use it."""
    common = [str(p.relative_to(SRC)) for p in SRC.rglob("_common*") if p.stem == "_common"]
    assert not common, common


def test_no_function_name_is_defined_at_the_top_of_two_modules():
    """A helper is written once, in the layer that owns it, and imported from there."""
    where: dict[str, list[str]] = {}
    for module, path in MODULES.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                where.setdefault(node.name, []).append(module)
    twice = {name: modules for name, modules in where.items() if len(modules) > 1}
    assert not twice, twice


def test_nothing_outside_tests_imports_from_tests():
    """The package, benchmarks, scripts and notebooks build their models and data from tikmix_hf.testing."""
    # What tests/ (or tests/distributed/) on sys.path would make importable.
    tops = {p.stem if p.suffix == ".py" else p.name for folder in (TESTS, TESTS / "distributed")
            for p in folder.iterdir() if p.suffix == ".py" or (p.is_dir() and not p.name.startswith((".", "_")))}
    names = "|".join(sorted(tops))
    imports = re.compile(rf'(?:^|")[ \t]*(?:from|import)[ \t]+({names})\b', re.M)
    path_to_tests = re.compile(r"(?:sys\.path\.\w+\(|PYTHONPATH)[^\n]*\btests\b")
    offenders = []
    for folder in ("src", "benchmarks", "scripts", "notebooks"):
        for path in sorted((ROOT / folder).rglob("*")):
            if path.suffix in (".py", ".ipynb", ".sh"):
                text = path.read_text()
                found = [m.group(1) for m in imports.finditer(text)] + path_to_tests.findall(text)
                offenders += [f"{path.relative_to(ROOT)}: {f}" for f in found]
    assert not offenders, offenders


def _marked_distributed(node: ast.FunctionDef, module_marks: set[str]) -> bool:
    marks = set(module_marks)
    for decorator in node.decorator_list:
        text = ast.unparse(decorator)
        if text.startswith("pytest.mark."):
            marks.add(text.split(".")[2].split("(")[0])
    return "distributed" in marks


def test_every_torchrun_test_is_marked_distributed():
    """``make test-fast`` (``-m "not distributed"``) must not launch torchrun."""
    unmarked = []
    for path in sorted(p for p in TESTS.glob("test_*.py") if p.name != "test_layout.py"):
        tree = ast.parse(path.read_text())
        module_marks = set()
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets):
                module_marks |= {m.split(".")[-1] for m in ast.unparse(node.value).replace("[", " ").split()
                                 if m.startswith("pytest.mark.")}
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                body = ast.unparse(node)
                launches = "torchrun(" in body or "torch.distributed.run" in body or "accelerate" in body and \
                    "launch" in body
                if launches and not _marked_distributed(node, module_marks):
                    unmarked.append(f"{path.name}::{node.name}")
    assert not unmarked, unmarked


def test_the_callback_stays_an_adapter():
    lines = (SRC / "callback.py").read_text().count("\n")
    assert lines <= 400, f"callback.py has {lines} lines; move what is not adapting the Trainer to its own module"


def _unannotated(obj: object, label: str) -> list[str]:
    """``label(names)`` for a function, or for each public method (and ``__init__``) of one of our classes, that
    leaves a parameter (``self``, ``cls`` aside) or its return unannotated; nothing for anything else."""
    if inspect.isclass(obj):
        methods: dict[str, object] = {}
        for klass in reversed(obj.__mro__):  # a subclass's own method replaces its base's
            if klass.__module__.startswith("tikmix_hf"):
                methods.update((n, m) for n, m in vars(klass).items() if n == "__init__" or not n.startswith("_"))
        out = []
        for name, member in methods.items():
            member = member.fget if isinstance(member, property) else getattr(member, "__func__", member)
            out += _unannotated(member, f"{label}.{name}") if inspect.isfunction(inspect.unwrap(member)) else []
        return out
    if not (callable(obj) and inspect.isfunction(inspect.unwrap(obj))):
        return []  # a constant, a type alias, a registry
    signature = inspect.signature(obj)
    missing = [p.name for i, p in enumerate(signature.parameters.values())
               if p.annotation is p.empty and not (i == 0 and p.name in ("self", "cls"))]
    missing += ["return"] if signature.return_annotation is signature.empty else []
    return [f"{label}({', '.join(missing)})"] if missing else []


def _layer(module: str) -> str:
    """The package of src/tikmix_hf that ``module`` belongs to: its subpackage, or ``tikmix_hf`` for the
    modules at the top."""
    parts = module.split(".")
    return parts[1] if len(parts) > 2 or MODULES[module].name == "__init__.py" and len(parts) == 2 else parts[0]


def test_the_public_names_are_annotated():
    """Every function and class method in ``tikmix_hf.__all__`` and in each subpackage's ``__all__`` says the
    types of its parameters and of its return (``py.typed`` ships: users' type checkers read them)."""
    packages = [m for m, p in MODULES.items() if p.name == "__init__.py" and "__all__" in p.read_text()]
    assert "tikmix_hf" in packages and "tikmix_hf.mixture" in packages, packages
    missing = []
    for package in sorted(packages):
        module = importlib.import_module(package)
        for name in module.__all__:
            missing += _unannotated(getattr(module, name), f"{package}.{name}")
    assert not missing, f"annotate these parameters and returns: {sorted(set(missing))}"


def test_what_one_layer_calls_in_another_is_annotated():
    """A function (or a class's public methods) that a module imports from another package of src/tikmix_hf
    is a boundary between layers, and says its types as the public API does."""
    missing = []
    for module in sorted(MODULES):
        for target, name in _imports(module):
            if name is None or not target.startswith("tikmix_hf") or _layer(target) == _layer(module):
                continue
            obj = getattr(importlib.import_module(target), name)
            home = getattr(obj, "__module__", target) or target
            if home in MODULES and _layer(home) != _layer(module):
                missing += [f"{line} <- {module}" for line in _unannotated(obj, f"{home}.{name}")]
    assert not missing, f"annotate these parameters and returns: {sorted(set(missing))}"


def test_the_default_algorithm_and_the_history_reader_are_public():
    import tikmix_hf

    for name in ("solve_trust_region", "TrustRadius", "PrecisionSmoother", "load_history", "Mixer", "register"):
        assert name in tikmix_hf.__all__ and callable(getattr(tikmix_hf, name)), name
    assert "lookahead_gain" not in tikmix_hf.__all__  # TiKMiX-M's internal, public in tikmix_hf.influence
