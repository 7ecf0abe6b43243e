"""The base install serves and classifies: `defcnn serve` and `defcnn classify` run in an
environment that holds only pyproject's base dependencies, and the server never loads torch.

The environment is built offline in a second or two: a venv without system site-packages
whose site-packages links exactly the files of the distributions in the base requirements'
closure (resolved from this environment's metadata, markers honoured, no extras), plus a
`.pth` listing the source roots as the editable install does. tests/unit/test_repo.py checks
the same promise statically, on the imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib.metadata import Distribution, PackageNotFoundError, distribution, distributions
from pathlib import Path, PurePath

import numpy as np
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOT_IN_BASE = ("torch", "onnx", "safetensors", "tqdm", "sklearn", "matplotlib", "art")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/PID/maps"),
]


def base_closure() -> dict[str, Distribution]:
    """The installed distributions the base requirements need, recursively: each one's
    Requires-Dist with its markers evaluated here (extras only where a requirement asks)."""
    found: dict[str, Distribution] = {}
    done: set[tuple[str, str]] = set()
    todo = [(Requirement(r), "") for r in PYPROJECT["project"]["dependencies"]]
    while todo:
        req, extra = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": extra}):
            continue
        name = canonicalize_name(req.name)
        try:
            dist = found.get(name) or distribution(req.name)
        except PackageNotFoundError:
            pytest.fail(f"{req} (needed by the base install) is not installed here")
        assert req.specifier.contains(dist.version, prereleases=True), (
            f"{name} {dist.version} installed, the base install needs {req}"
        )
        found[name] = dist
        for wanted in ("", *sorted(req.extras)):
            if (name, wanted) not in done:
                done.add((name, wanted))
                todo += [(Requirement(r), wanted) for r in dist.requires or []]
    return found


def link_base_environment(venv: Path, closure: dict[str, Distribution]) -> Path:
    """Link every file of `closure` into the venv's site-packages: whole top-level folders
    where only these distributions own them, file by file where others share them
    (`google/`, `__pycache__/`), so nothing else comes along."""
    where = "import sysconfig; print(sysconfig.get_path('purelib'))"
    out = subprocess.run([venv / "bin" / "python", "-c", where], check=True, capture_output=True)
    site = Path(out.stdout.decode().strip())
    owners: dict[Path, set[str]] = {}
    for dist in distributions():
        owner = canonicalize_name(dist.metadata["Name"])
        for part in {file.parts[0] for file in dist.files or ()} - {".."}:
            owners.setdefault(Path(str(dist.locate_file(part))).absolute(), set()).add(owner)
    for name, dist in closure.items():
        assert dist.files is not None, f"{name} has no RECORD: cannot tell its files"
        for file in dist.files:
            if file.parts[0] == "..":  # console scripts, outside site-packages
                continue
            top = Path(str(dist.locate_file(file.parts[0]))).absolute()
            whole = owners[top] <= set(closure)
            linked = PurePath(file.parts[0] if whole else file)
            source, target = Path(str(dist.locate_file(linked))), site / linked
            if target.exists() or target.is_symlink() or not source.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source)
    roots = PYPROJECT["tool"]["hatch"]["build"]["dev-mode-dirs"]
    (site / "_defective_cnn.pth").write_text("".join(f"{ROOT / r}\n" for r in roots))
    return site


@pytest.fixture(scope="module")
def base_python(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    venv = tmp_path_factory.mktemp("base-venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    link_base_environment(venv, base_closure())
    # nothing from this environment leaks in: no PYTHONPATH, no user site
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONNOUSERSITE"] = "1"
    return venv / "bin" / "python", env


def test_the_base_environment_lacks_the_training_stack(base_python) -> None:
    python, env = base_python
    code = (
        "import importlib.util, sys, defcnn.cli, defcnn.server.app, defcnn.client\n"
        f"missing = [m for m in {NOT_IN_BASE!r} if importlib.util.find_spec(m) is None]\n"
        "print(' '.join(missing)); assert 'torch' not in sys.modules"
    )
    out = subprocess.run([python, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == list(NOT_IN_BASE)
    failed = subprocess.run([python, "-c", "import torch"], env=env, capture_output=True, text=True)
    assert failed.returncode != 0 and "ModuleNotFoundError" in failed.stderr
    helped = subprocess.run([python, "-m", "defcnn", "--help"], env=env, capture_output=True)
    assert helped.returncode == 0, helped.stderr
    # A subcommand that needs an extra says which, in one line, instead of a traceback.
    for argv, extra in ((["train", "--out", "x"], "train"), (["attack", "query"], "attack")):
        done = subprocess.run([python, "-m", "defcnn", *argv], env=env, capture_output=True,
                              text=True)  # fmt: skip
        assert done.returncode == 1, done.stderr
        assert f"pip install 'defective-cnn[{extra}]'" in done.stderr
        assert "Traceback" not in done.stderr


# Runs in the base environment: the one launcher starts `defcnn serve` (port 0, metrics off,
# ready file) and stops it on every way out; on Linux the kernel also stops it if this
# driver is killed (a timeout below).
DRIVER = """\
import json, subprocess, sys
from pathlib import Path
from defcnn.server.launcher import local_server

repo, log, model, image = sys.argv[1:]
with local_server(Path(repo), Path(log)) as server:
    print(json.dumps({"pid": server.pid}), flush=True)
    classify = subprocess.run(
        [sys.executable, "-m", "defcnn", "classify", "--url", server.url, "--model", model,
         "--top-k", "2", image], capture_output=True, text=True, timeout=120)
    maps = Path(f"/proc/{server.pid}/maps").read_text()
    alive = server.process.poll() is None
    code = server.stop()
print(json.dumps({
    "classify_rc": classify.returncode, "stdout": classify.stdout, "stderr": classify.stderr,
    "torch_mapped": sorted({line.split()[-1] for line in maps.splitlines() if "torch" in line}),
    "alive_after_classify": alive, "stop_code": code,
}))
"""


def test_serve_and_classify_run_on_the_base_install(base_python, repo, tmp_path: Path) -> None:
    from PIL import Image

    python, env = base_python
    image = tmp_path / "digit.png"
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(image)
    log = tmp_path / "server.log"
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    run = subprocess.run(
        [python, str(driver), str(repo.root), str(log), "digits", str(image)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    server_log = log.read_text(errors="replace")[-3000:] if log.exists() else ""
    assert run.returncode == 0, f"{run.stderr}\nserver log:\n{server_log}"
    first, last = (json.loads(line) for line in run.stdout.strip().splitlines())
    assert last["classify_rc"] == 0, f"{last['stderr']}\nserver log:\n{server_log}"
    labels = (repo.root / "digits" / "labels.txt").read_text().split()
    path, shown = last["stdout"].strip().split("\t")
    assert path == str(image)
    named = [part.split(" (p=")[0] for part in shown.split(", ")]
    assert len(named) == 2 and set(named) <= set(labels), shown
    assert last["torch_mapped"] == [], "the server loaded torch"
    assert last["alive_after_classify"] and last["stop_code"] == 0
    deadline = time.monotonic() + 10  # stopped, not left behind
    while Path(f"/proc/{first['pid']}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not Path(f"/proc/{first['pid']}").exists()
