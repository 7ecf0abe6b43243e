"""The saved state of an attack run (`run.json` in its report folder), which decides
whether a rerun is a resume.

A rerun resumes from the saved stages only when it is the same run: the state records the
run's kind and every setting that changes a result (its key), and a rerun whose key
differs is refused with the differences listed, unless `--overwrite` clears the old run's
files first. A transfer run never writes into a query run's folder, nor the reverse. The
state also carries totals (runs, wall time, queries per model) that add up across resumes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from defcnn.atomic import write_json
from defcnn.client import QueryCounter
from defcnn.errors import ConfigError

RUN_FILE = "run.json"
FORMAT = 1
#: What a run writes into its folder, by kind (nothing else is touched by --overwrite).
RUN_FILES = ("results.json", "report.md", "examples.png", "robust_accuracy.png",
             "success_vs_queries.png")  # fmt: skip
STAGE_DIRS = {"transfer": "stages", "query": "traces"}


@dataclass
class Totals:
    """What every run into this folder spent, together (interrupted runs included)."""

    runs: int = 0
    wall_s: float = 0.0
    queries: dict[str, QueryCounter] = field(default_factory=dict)

    def add(self, wall_s: float, queries: dict[str, QueryCounter]) -> Totals:
        summed = {m: QueryCounter(c.images, c.rpcs) for m, c in self.queries.items()}
        for m, c in queries.items():
            was = summed.setdefault(m, QueryCounter())
            summed[m] = QueryCounter(was.images + c.images, was.rpcs + c.rpcs)
        return Totals(self.runs + 1, round(self.wall_s + wall_s, 3), summed)

    def to_dict(self) -> dict[str, Any]:
        return {"runs": self.runs, "wall_s": self.wall_s,
                "queries": {m: asdict(c) for m, c in self.queries.items()}}  # fmt: skip

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Totals:
        return cls(
            runs=int(data.get("runs", 0)), wall_s=float(data.get("wall_s", 0.0)),
            queries={m: QueryCounter(**c) for m, c in data.get("queries", {}).items()},
        )  # fmt: skip


@dataclass
class SavedRun:
    kind: str
    key: dict[str, Any]
    totals: Totals


def _stage_dir(out: Path) -> tuple[str, Path] | None:
    for kind, name in STAGE_DIRS.items():
        if (out / name).exists():
            return kind, out / name
    return None


def open_folder(out: Path, kind: str, *, overwrite: bool) -> SavedRun | None:
    """The run saved in `out` (None: a fresh folder, or one --overwrite just cleared).

    Refused: a folder holding the other kind's run, or run files without a run.json (a
    run of an older version, whose settings cannot be compared)."""
    out.mkdir(parents=True, exist_ok=True)
    state = out / RUN_FILE
    saved: SavedRun | None = None
    if state.exists():
        try:
            data = json.loads(state.read_text())
            saved = SavedRun(str(data["kind"]), dict(data["key"]), Totals.from_dict(data["totals"]))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"--out {out}: cannot read {RUN_FILE} ({exc}); pass --overwrite "
                              "to start over, or another --out") from exc  # fmt: skip
    found = saved.kind if saved else (_stage_dir(out) or (None,))[0]
    if found is not None and found != kind:
        raise ConfigError(f"--out {out} holds a {found} attack run; a {kind} run never writes "
                          "into it: choose another --out")  # fmt: skip
    if saved is None and found is not None and not overwrite:
        raise ConfigError(f"--out {out} holds {kind} attack files without {RUN_FILE}, so "
                          "their settings are unknown: pass --overwrite to start over, or "
                          "another --out")  # fmt: skip
    if overwrite:
        clear(out, kind)
        return None
    return saved


def clear(out: Path, kind: str) -> None:
    """Remove the old run's files (its state, reports and stages), nothing else."""
    for name in (RUN_FILE, *RUN_FILES):
        (out / name).unlink(missing_ok=True)
    stages = out / STAGE_DIRS[kind]
    if stages.is_dir():
        shutil.rmtree(stages)


def _flat(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for k, v in data.items():
            out |= _flat(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    return {prefix: data}


def _shown(value: Any) -> str:
    """A setting's value in a one-line message: digests and long lists shortened."""
    if value is None:
        return "unset"
    if isinstance(value, str):
        is_digest = len(value) == 64 and all(c in "0123456789abcdef" for c in value)
        return f"sha256 {value[:12]}" if is_digest else value
    if isinstance(value, list) and len(value) <= 4 and all(isinstance(v, str) for v in value):
        return ", ".join(_shown(v) for v in value)
    text = json.dumps(value)
    if isinstance(value, list) and len(text) > 40:
        return f"{len(value)} values (sha256 {hashlib.sha256(text.encode()).hexdigest()[:8]})"
    return text


def differences(saved: dict[str, Any], key: dict[str, Any]) -> list[str]:
    """`name: old -> new` for every setting of `key` that the saved run had otherwise."""
    old = _flat(json.loads(json.dumps(saved)))
    new = _flat(json.loads(json.dumps(key)))
    names = sorted(n for n in {*old, *new} if n.split(".")[0] in key)
    return [f"{n}: {_shown(old.get(n))} -> {_shown(new.get(n))}" for n in names
            if old.get(n) != new.get(n)]  # fmt: skip


def check_same(out: Path, saved: SavedRun | None, key: dict[str, Any]) -> None:
    """Refuse a rerun whose settings (those in `key`) differ from the saved run's."""
    if saved is None:
        return
    diff = differences(saved.key, key)
    if diff:
        raise ConfigError(f"--out {out} holds a different {saved.kind} run ("
                          + "; ".join(diff) + "): pass --overwrite to replace it, "
                          "or another --out")  # fmt: skip


def save(out: Path, kind: str, key: dict[str, Any], totals: Totals) -> None:
    write_json(out / RUN_FILE, {"format": FORMAT, "kind": kind, "key": key,
                                "totals": totals.to_dict()})  # fmt: skip
