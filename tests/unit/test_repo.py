"""Repository invariants: CI runs the README's test command; the namespace layout holds; the
dependency rules hold on the imports as Python reads them (`ast`), and every third-party
import a stage can reach is provided by the install that stage is meant for."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SOURCE_ROOTS: tuple[str, ...] = tuple(PYPROJECT["tool"]["hatch"]["build"]["dev-mode-dirs"])


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0] == "pip install -e '.[all]' && defcnn demo"  # the main job, on digits
    test_command = commands[1]
    steps = test_command.split(" && ")
    assert steps[0] == "pip install -e '.[all,test]'"
    assert {"ruff check .", "ruff format --check .", "mypy", "python3 -m pytest"} <= set(steps)
    ci = (ROOT / ".ci" / "run").read_text()
    lines = [line.strip() for line in ci.splitlines() if line.strip()]
    assert "set -euo pipefail" in lines
    commands_run = [line for line in lines if not line.startswith("#")]
    assert commands_run[-1] == f"python3 -m {test_command}"  # exactly the README's, last


def test_defcnn_is_a_namespace_package_rooted_in_the_source_folders() -> None:
    import defcnn

    assert getattr(defcnn, "__file__", None) is None  # PEP 420: no __init__.py
    roots = {Path(p).resolve().parent.name for p in defcnn.__path__}
    source_roots = {p.parent.name for p in ROOT.glob("*/defcnn") if p.is_dir()}
    assert source_roots == set(SOURCE_ROOTS)  # every root is a dev-mode dir, and back
    assert roots >= source_roots  # the namespace spans every source root
    assert not list(ROOT.glob("*/defcnn/__init__.py"))
    for name in ("layers", "models", "data", "training", "checkpoint", "cli", "export.exporter"):
        importlib.import_module(f"defcnn.{name}")


def test_cli_parser_builds_without_torch_and_names_match_the_registries() -> None:
    code = (
        "import sys; from defcnn.cli import build_parser; build_parser(); "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    from defcnn.data.registry import DATASETS as loader_names
    from defcnn.models.registry import ARCHS
    from defcnn.names import ARCH_NAMES, DATASETS

    assert set(ARCHS) == set(ARCH_NAMES)
    assert loader_names == DATASETS


# --- imports as Python reads them ---------------------------------------------------------


@dataclass(frozen=True)
class Import:
    """One name an import statement may load: `from a.b import c` gives `a.b` and `a.b.c`
    (a submodule, or just an attribute: the rules treat both as importing it)."""

    name: str
    line: int
    statement: str
    module_level: bool


def read_imports(source: str, module: str, *, is_package: bool) -> list[Import]:
    """Every Import/ImportFrom in `source` (also inside functions and classes, not under
    `if TYPE_CHECKING:`), relative imports resolved against `module`, plus
    `importlib.import_module("literal")` calls."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[Import] = []

    def visit(node: ast.AST, module_level: bool) -> None:
        if isinstance(node, ast.If) and ast.unparse(node.test) in (
            "TYPE_CHECKING",
            "typing.TYPE_CHECKING",
        ):
            for branch in node.orelse:  # the body only runs under a type checker
                visit(branch, module_level)
            return
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            module_level = False  # runs when called, not when imported
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.append(Import(alias.name, node.lineno, ast.unparse(node), module_level))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                if node.level - 1 >= len(parts):
                    raise ValueError(f"{module}:{node.lineno}: relative import beyond the top")
                base = ".".join(parts[: len(parts) - (node.level - 1)])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            statement = ast.unparse(node)
            found.append(Import(target, node.lineno, statement, module_level))
            for alias in node.names:
                if alias.name != "*":
                    found.append(
                        Import(f"{target}.{alias.name}", node.lineno, statement, module_level)
                    )
        elif (
            isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("importlib.import_module", "import_module")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append(Import(node.args[0].value, node.lineno, ast.unparse(node), module_level))
        for child in ast.iter_child_nodes(node):
            visit(child, module_level)

    visit(tree, True)
    return found


@dataclass(frozen=True)
class Module:
    name: str
    path: Path
    root: str
    imports: tuple[Import, ...]

    @property
    def where(self) -> str:
        return str(self.path.relative_to(ROOT))


@cache
def modules() -> dict[str, Module]:
    """Every module of every source root, by dotted name."""
    found: dict[str, Module] = {}
    for root in SOURCE_ROOTS:
        for path in sorted((ROOT / root / "defcnn").rglob("*.py")):
            parts = path.relative_to(ROOT / root).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if is_package else parts)
            assert name not in found, f"{name} is defined in {found[name].where} and {path}"
            imports = read_imports(path.read_text(), name, is_package=is_package)
            found[name] = Module(name, path, root, tuple(imports))
    return found


def _under(name: str, prefixes: Iterable[str]) -> str | None:
    return next((p for p in prefixes if name == p or name.startswith(p + ".")), None)


def _top(name: str) -> str:
    return name.split(".", 1)[0]


def _is_third_party(name: str) -> bool:
    top = _top(name)
    return bool(top) and top not in sys.stdlib_module_names and top not in ("defcnn", "__future__")


# --- the rules ------------------------------------------------------------------------------

STAGES = ("defcnn.export", "defcnn.server", "defcnn.client", "defcnn.attack")
ON_TOP = ("defcnn.cli", "defcnn.demo", "defcnn.bench", "defcnn.__main__")
SERVER_NEVER = ("torch", "safetensors", "onnx", "tqdm", "matplotlib", "art", "defcnn.attack",
                "defcnn.export", "defcnn.client")  # fmt: skip
RULES: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    # (who, by source root or module prefix, what it never imports)
    ("the core", ("root:core",), STAGES + ON_TOP),
    ("the protocol", ("root:protos",), STAGES + ON_TOP),
    ("the export", ("defcnn.export",), ("defcnn.client", "defcnn.attack", "defcnn.server")),
    (
        "the client",
        ("defcnn.client",),
        ("defcnn.export", "defcnn.server", "defcnn.attack", "torch"),
    ),
    ("the attack harness", ("defcnn.attack",), ("defcnn.export", "defcnn.server")),
    ("the server", ("defcnn.server",), SERVER_NEVER),
    ("everything below app/", tuple(f"root:{r}" for r in SOURCE_ROOTS if r != "app"), ON_TOP),
)


def _belongs(module: Module, selectors: tuple[str, ...]) -> bool:
    roots = {s.removeprefix("root:") for s in selectors if s.startswith("root:")}
    prefixes = [s for s in selectors if not s.startswith("root:")]
    return module.root in roots or _under(module.name, prefixes) is not None


def rule_violations(mods: Iterable[Module]) -> list[str]:
    offenders = []
    for who, selectors, never in RULES:
        for module in mods:
            if not _belongs(module, selectors):
                continue
            for imp in module.imports:
                hit = _under(imp.name, never)
                if hit and not _under(imp.name, (module.name,)):
                    offenders.append(
                        f"{module.where}:{imp.line}: `{imp.statement}`: {who} "
                        f"({module.name}) must not import {hit}"
                    )
    return sorted(set(offenders))


def test_dependencies_point_one_way() -> None:
    """The core imports no stage; export never imports the client, the attack harness or the
    server, and they never import it or the server; the server and client never import
    torch (the server nothing of training, export or attacks); nothing below app/ imports
    the CLI, the demo or the bench."""
    mods = modules()
    assert {"defcnn.cli", "defcnn.server.app", "defcnn.client.client"} <= set(mods)
    assert rule_violations(mods.values()) == []


# --- what each install provides ------------------------------------------------------------


def _dist_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip())
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group(0)).lower()


def provided_by(extras: Iterable[str]) -> set[str]:
    """Distributions (normalised names) the base install plus these extras declare; our own
    `defective-cnn[...]` self-references are expanded."""
    project = PYPROJECT["project"]
    optional = project["optional-dependencies"]
    names: set[str] = set()
    todo, seen = list(extras), set()
    requirements = list(project["dependencies"])
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        assert extra in optional, f"pyproject.toml has no extra {extra!r}"
        requirements += optional[extra]
    for requirement in requirements:
        name = _dist_name(requirement)
        if name == _dist_name(project["name"]):
            todo = re.findall(r"[\w-]+", requirement.split("[", 1)[1].split("]")[0])
            names |= provided_by(todo)
        else:
            names.add(name)
    return names


# Import names of packages not installed here (GPU-only), and the distribution that has them.
NOT_INSTALLED_HERE = {
    "tensorrt": "tensorrt",
    "cuda": "cuda-python",
    "onnxconverter_common": "onnxconverter-common",
}
# Modules whose imports may also use an extra (lazily, behind a clear error without it).
MODULE_EXTRAS = {
    "defcnn.server.backends.tensorrt": ("tensorrt",),
    "defcnn.export.tensorrt_engine": ("tensorrt",),
    "defcnn.protos.generate": ("test",),  # the maintainers' regeneration tool
}


@cache
def _installed() -> Mapping[str, list[str]]:
    return packages_distributions()


def _distributions(import_name: str) -> set[str] | None:
    top = _top(import_name)
    found = _installed().get(top)
    if found:
        return {_dist_name(d) for d in found}
    return {NOT_INSTALLED_HERE[top]} if top in NOT_INSTALLED_HERE else None


def _parents(name: str) -> Iterator[str]:
    parts = name.split(".")
    for i in range(2, len(parts)):  # `defcnn` itself is a namespace: no code
        yield ".".join(parts[:i])


def reach(
    starts: Iterable[str], *, module_level_only: frozenset[str] = frozenset()
) -> dict[str, str | None]:
    """The defcnn modules that importing `starts` can load (every import, also inside
    functions, except in `module_level_only`), each with the module that first reached it."""
    mods = modules()
    via: dict[str, str | None] = {}
    todo: list[tuple[str, str | None]] = [(s, None) for s in starts]
    while todo:
        name, parent = todo.pop()
        if name in via or name not in mods:
            continue
        via[name] = parent
        todo += [(p, name) for p in _parents(name)]
        for imp in mods[name].imports:
            if imp.module_level or name not in module_level_only:
                if imp.name in mods:
                    todo.append((imp.name, name))
                todo += [(p, name) for p in _parents(imp.name) if p in mods]
    return via


def unprovided_imports(
    starts: Iterable[str],
    extras: tuple[str, ...],
    *,
    module_level_only: frozenset[str] = frozenset(),
) -> list[str]:
    mods = modules()
    via = reach(starts, module_level_only=module_level_only)
    offenders = []
    for name in sorted(via):
        module = mods[name]
        allowed = provided_by(extras + MODULE_EXTRAS.get(name, ()))
        chain, step = [], via[name]
        while step is not None:
            chain.append(step)
            step = via[step]
        reached = f" (reached via {' <- '.join(chain)})" if chain else ""
        for imp in module.imports:
            if not _is_third_party(imp.name) or (
                name in module_level_only and not imp.module_level
            ):
                continue
            dists = _distributions(imp.name)
            if dists is None:
                offenders.append(
                    f"{module.where}:{imp.line}: `{imp.statement}`: {_top(imp.name)} is not "
                    f"installed here, so no distribution is known to provide it{reached}"
                )
            elif not dists & allowed:
                label = "+".join(("base", *extras)) if extras else "base"
                offenders.append(
                    f"{module.where}:{imp.line}: `{imp.statement}`: {_top(imp.name)} comes "
                    f"from {'/'.join(sorted(dists))}, which the {label} install does not "
                    f"declare{reached}"
                )
    return sorted(set(offenders))


def _all(*prefixes: str) -> list[str]:
    return [m for m in modules() if _under(m, prefixes)]


def test_the_base_install_serves_and_classifies() -> None:
    """Every third-party module the server, the client and the CLI's module level can reach
    is declared in pyproject's base dependencies (tests/integration/test_base_install.py runs
    them in such an environment)."""
    starts = [*_all("defcnn.server", "defcnn.client"), "defcnn.cli", "defcnn.__main__"]
    assert len(starts) > 10
    offenders = unprovided_imports(
        starts, (), module_level_only=frozenset({"defcnn.cli", "defcnn.__main__"})
    )
    assert offenders == []


@pytest.mark.parametrize(
    ("extras", "prefixes"),
    [
        (("train",), ("root:core", "defcnn.export")),
        (("attack",), ("defcnn.attack",)),
        (("all",), tuple(f"root:{r}" for r in SOURCE_ROOTS)),
    ],
    ids=["train", "attack", "all"],
)
def test_each_extra_provides_what_its_stage_imports(
    extras: tuple[str, ...], prefixes: Iterable[str]
) -> None:
    selectors = tuple(prefixes)
    starts = [m.name for m in modules().values() if _belongs(m, selectors)]
    assert starts
    assert unprovided_imports(starts, extras) == []


# --- the guard guards -----------------------------------------------------------------------

SAMPLE = """\
import os
from defcnn.errors import ConfigError


def later():
    import torch
    from . import codec
    from ..client import images
    importlib.import_module("tqdm.auto")
"""


def test_the_import_reader_sees_function_level_and_relative_imports() -> None:
    imports = read_imports(SAMPLE, "defcnn.server.sample", is_package=False)
    seen = {(i.name, i.line, i.module_level) for i in imports}
    assert {("os", 1, True), ("defcnn.errors", 2, True), ("torch", 6, False),
            ("defcnn.server", 7, False), ("defcnn.server.codec", 7, False),
            ("defcnn.client", 8, False), ("defcnn.client.images", 8, False),
            ("tqdm.auto", 9, False)} <= seen  # fmt: skip
    in_package = read_imports("from .x import y\n", "defcnn.server", is_package=True)
    assert {i.name for i in in_package} == {"defcnn.server.x", "defcnn.server.x.y"}
    fake = Module("defcnn.server.sample", ROOT / "server/defcnn/server/sample.py", "server",
                  tuple(imports))  # fmt: skip
    offenders = rule_violations([fake])
    assert any(o.startswith("server/defcnn/server/sample.py:6: `import torch`") for o in offenders)
    assert any(":8: `from ..client import images`" in o for o in offenders)
    assert any(":9: `importlib.import_module('tqdm.auto')`" in o for o in offenders)


def test_the_closure_follows_lazy_imports_into_the_real_tree() -> None:
    """The server's lazily imported TensorRT backend is reached, and its `import tensorrt`
    inside a function is seen (and allowed only through the tensorrt extra)."""
    via = reach(_all("defcnn.server"))
    assert "defcnn.server.backends.tensorrt" in via and "defcnn.protos" in via
    lazy = [i for i in modules()["defcnn.server.backends.tensorrt"].imports if i.name == "tensorrt"]
    assert lazy and not lazy[0].module_level
    assert "cuda-python" in provided_by(("tensorrt",)) and "torch" in provided_by(("all",))
    assert "torch" not in provided_by(())


def test_imports_under_type_checking_do_not_count() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    import torch\nelse:\n    import numpy\n"
    )
    names = {i.name for i in read_imports(source, "defcnn.cli", is_package=False)}
    assert "torch" not in names and "numpy" in names
