"""Repository invariants: CI runs the README's test command; the namespace layout holds."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line for line in block.splitlines() if line.strip()]


def test_readme_opens_with_two_setup_commands_and_ci_runs_the_second() -> None:
    commands = _readme_commands()
    assert len(commands) == 2
    assert commands[0] == "pip install -e . && defcnn demo"  # the main job, on digits
    ci = (ROOT / ".ci" / "run").read_text()
    test_command = commands[1].replace("pip install", "python3 -m pip install")
    assert test_command in ci
    assert "ruff check" in test_command and "pytest" in test_command


def test_defcnn_is_a_namespace_package_rooted_in_the_source_folders() -> None:
    import defcnn

    assert getattr(defcnn, "__file__", None) is None  # PEP 420: no __init__.py
    roots = {Path(p).resolve().parent.name for p in defcnn.__path__}
    source_roots = {p.parent.name for p in ROOT.glob("*/defcnn") if p.is_dir()}
    assert source_roots >= {"core", "export"}
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


def test_dependencies_point_one_way() -> None:
    """The core imports no stage (except the CLI, which dispatches to each lazily); export
    and client never import each other; nothing below the demo imports it; the server never
    imports torch (also checked on a live server)."""
    forbidden = {
        "core": ("defcnn.export", "defcnn.server", "defcnn.client", "defcnn.demo"),
        "export": ("defcnn.client", "defcnn.server", "defcnn.demo"),
        "client": ("defcnn.export", "defcnn.server", "defcnn.demo"),
        "server": ("defcnn.client", "defcnn.export", "defcnn.demo", "import torch"),
        "protos": ("defcnn.client", "defcnn.export", "defcnn.server", "defcnn.demo"),
    }
    offenders = [
        f"{path.relative_to(ROOT)}: {name}"
        for root, names in forbidden.items()
        for path in (ROOT / root).rglob("*.py")
        for name in names
        if name in path.read_text()
    ]
    assert offenders == []
