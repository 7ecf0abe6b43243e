"""benchmarks/reproduce_cifar10.sh and cifar10_claims.py end to end on digits, tiny: the
three targets, a matched control, exports, the served endpoints attacked over gRPC, the
claims; a rerun keeps every finished run and repeats no attack."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = {
    "DATASET": "digits", "SEEDS": "0", "TARGET_EPOCHS": "2", "SURROGATE_EPOCHS": "1",
    "WIDTH": "0.125", "IMAGES": "40", "QUERY_ATTACKS": "boundary", "QUERY_IMAGES": "8",
    "QUERY_BUDGET": "20", "OMP_NUM_THREADS": "1",
}  # fmt: skip


def _run(runs: Path, code: int = 0) -> subprocess.CompletedProcess[str]:
    if shutil.which("defcnn") is None:
        pytest.skip("the defcnn console script is not on PATH (pip install -e .)")
    env = {**os.environ, **TINY, "RUNS": str(runs)}
    done = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "reproduce_cifar10.sh"), "all"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == code, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def test_the_pipeline_trains_matches_attacks_and_reruns_nothing(tmp_path: Path) -> None:
    runs = tmp_path / "c10"
    _run(runs)
    ctl = json.loads((runs / "ctl-s0" / "metrics.json").read_text())
    target = json.loads((runs / "def-s0" / "metrics.json").read_text())["test_accuracy"]
    checks = [abs(c["test_accuracy"] - target) <= 0.01 for c in ctl["checks"]]
    if ctl["stopped_at_step"] is None:  # no check landed in the band: trained to the end
        assert not any(checks)
    else:  # the first check within 1 point of the defective model's accuracy
        assert checks[-1] and not any(checks[:-1])
        assert abs(ctl["test_accuracy"] - target) <= 0.01
    models = sorted(runs.glob("*-s0/model.safetensors"))
    before = {p: p.read_bytes() for p in models}
    assert "skip boundary (done)" in _run(runs).stdout
    assert {p: p.read_bytes() for p in models} == before  # finished runs kept as they are
    corruptions = runs / "corruptions-s0.json"
    kept = corruptions.read_text()
    stale = json.loads(kept)
    stale["checkpoint_sha256"]["ctl-s0"] = "0" * 64  # as if made from an earlier control
    corruptions.write_text(json.dumps(stale))
    assert "computed from other checkpoints" in _run(runs, code=2).stderr
    corruptions.write_text(kept)

    data = tmp_path / "results.json"
    claims = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "cifar10_claims.py"), str(runs),
         "--img", str(tmp_path / "img"), "--json", str(data)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert claims.returncode == 0, claims.stderr[-3000:]
    res = json.loads(data.read_text())
    assert set(res["models"]) == {"standard-s0", "defective-s0", "control-s0"}
    assert len(res["transfer"]["resnet18"]["cells"]) == 9  # 3 attacks x 3 eps
    assert set(res["decision"]["boundary"]["models"]) == set(res["models"])
    assert "## Claims" in claims.stdout and (tmp_path / "img" / "cifar10-transfer.png").exists()
