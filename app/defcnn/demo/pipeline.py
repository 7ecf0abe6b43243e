"""The demo's stages in order: train three models, export two, serve them, attack both
endpoints (transfer and query-based), and compare them side by side.

The defective target trains first; the standard target, same seed, then trains until its
clean accuracy reaches the defective one's (unless `match_accuracy` is off), so the table
compares models of comparable accuracy: under-training alone makes a model resist
transfer, and that must not be credited to the masks.

Every stage leaves its output in the run folder and is skipped when a rerun finds it
there, so an interrupted demo continues where it stopped.
"""

from __future__ import annotations

import importlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defcnn.atomic import write_json
from defcnn.demo.summary import MATCH_TOLERANCE, DemoSummary, summarize, write_summary
from defcnn.digest import sha256_file
from defcnn.errors import ConfigError
from defcnn.names import MODEL_FILE
from defcnn.server.launcher import local_server, sigterm_as_interrupt

if TYPE_CHECKING:
    from defcnn.attack.results import QueryResult, TransferResult

TARGETS = ("standard", "defective")
CHECKS_PER_EPOCH = 10  # how often the standard target's accuracy is checked against the target


@dataclass(frozen=True)
class DemoSettings:
    """What the demo trains and how hard it attacks; the defaults fit 2 CPU cores."""

    out: str = "runs/demo"
    dataset: str = "cifar10-subset"
    data_dir: str | None = None
    arch: str = "resnet18"
    width: float = 0.25
    epochs: int = 4
    keep_prob: float = 0.1
    match_accuracy: bool = True
    seed: int = 0
    surrogate_arch: str | None = None
    surrogate_width: float | None = None
    surrogate_seed: int | None = None
    device: str = "auto"
    attacks: tuple[str, ...] = ("fgsm", "pgd", "mifgsm")
    eps_255: tuple[float, ...] = (8.0, 16.0, 32.0)
    num_images: int = 500
    query_attack: str = "square"
    query_budget: int = 300
    query_images: int = 100
    query_eps_255: float = 8.0
    extra_surrogates: tuple[str, ...] = field(default_factory=tuple)

    def check(self) -> None:
        flags = {"epochs": "--epochs", "num_images": "--num-images",
                 "query_images": "--query-images", "query_budget": "--budget"}  # fmt: skip
        for name, flag in flags.items():
            if getattr(self, name) < 1:
                raise ConfigError(f"{flag} must be >= 1, got {getattr(self, name)}")
        if not self.attacks or not self.eps_255:
            raise ConfigError("at least one transfer attack and one eps are needed")


@dataclass(frozen=True)
class DemoResult:
    """The comparison, how long each stage took, and the settings that produced them."""

    summary: DemoSummary
    seconds: dict[str, float]
    settings: DemoSettings

    def to_dict(self) -> dict[str, Any]:
        """summary.json: the summary's fields with `seconds` and `settings` beside them."""
        return {**self.summary.to_dict(), "seconds": dict(self.seconds),
                "settings": asdict(self.settings)}  # fmt: skip


def _log(message: str) -> None:
    print(message, flush=True)


def _without_out(config: dict[str, Any]) -> dict[str, Any]:
    """A training config minus its folder, so a moved run folder still matches."""
    return {k: v for k, v in config.items() if k != "out"}


def check_sample_sizes(s: DemoSettings) -> int:
    """Refuse, before any training, attack samples larger than the test split (digits has
    359 test images): the harness would find out only after three models were trained.
    Returns the number of training images."""
    from defcnn.data import load_dataset

    data = load_dataset(s.dataset, s.data_dir, progress=False)
    for flag, wanted in (("--num-images", s.num_images), ("--query-images", s.query_images)):
        if wanted > len(data.test_x):
            raise ConfigError(
                f"{flag} {wanted} is more than the {len(data.test_x)} test images of {s.dataset}"
            )
    return len(data.train_x)


def _stop_at(defective_accuracy: float) -> float:
    """Where the standard target stops: just under the defective one's accuracy, since a
    check lands a little past the point where the target is crossed."""
    return max(0.01, round(defective_accuracy - MATCH_TOLERANCE / 2, 4))


def train_models(
    s: DemoSettings, models: Path, train_images: int, *, progress: bool
) -> dict[str, dict[str, Any]]:
    """The defective target, the standard one (same seed; stopped at the defective one's
    accuracy when matching) and a surrogate trained independently."""
    from defcnn.training import TrainConfig, train

    base = TrainConfig(
        arch=s.arch, width=s.width, dataset=s.dataset, data_dir=s.data_dir, epochs=s.epochs,
        seed=s.seed, device=s.device, schedule="fast" if s.epochs < 100 else "paper", out="",
    )  # fmt: skip
    configs = {
        "defective": replace(
            base, defective=True, keep_prob=s.keep_prob, out=str(models / "defective")
        ),
        "standard": replace(base, out=str(models / "standard")),
        "surrogate": replace(
            base,
            arch=s.surrogate_arch or s.arch,
            width=s.surrogate_width or s.width,
            seed=s.seed + 1 if s.surrogate_seed is None else s.surrogate_seed,
            out=str(models / "surrogate"),
        ),
    }
    metrics: dict[str, dict[str, Any]] = {}
    for name, cfg in configs.items():
        if name == "standard" and s.match_accuracy:
            # a check every tenth of an epoch: accuracy moves a few points per quarter epoch
            every = max(1, math.ceil(train_images / cfg.batch_size) // CHECKS_PER_EPOCH)
            cfg = replace(cfg, stop_at_accuracy=_stop_at(metrics["defective"]["test_accuracy"]),
                          eval_every=every)  # fmt: skip
        out = Path(cfg.out)
        saved = out / "config.json"
        if saved.exists() and _without_out(json.loads(saved.read_text())) != _without_out(
            cfg.to_dict()
        ):
            raise ConfigError(f"{out} holds a model trained with other settings; use another --out")
        if (out / "model.safetensors").exists() and (out / "metrics.json").exists():
            _log(f"  {name}: reusing {out}")
        else:
            _log(f"  {name}: {cfg.arch} width {cfg.width:g}, seed {cfg.seed}"
             + (f", defective keep {cfg.keep_prob:g}" if cfg.defective else "")
             + (f", until test accuracy {cfg.stop_at_accuracy:.3f}"
                if cfg.stop_at_accuracy is not None else ""))  # fmt: skip
            train(cfg, resume=True, progress=progress)
        # metrics.json (with the per-epoch history), whether trained now or before
        metrics[name] = json.loads((out / "metrics.json").read_text())
    return metrics


def export_targets(models: Path, repo: Path, exported: Path) -> None:
    """Both targets into one model repository (version 1), each verified against PyTorch.
    `exported` records the checkpoint each export came from, so an export is reused only for
    the checkpoint it was made from."""
    from defcnn.export.exporter import ExportSettings, export

    sources = json.loads(exported.read_text()) if exported.exists() else {}
    for name in TARGETS:
        checkpoint = models / name / "model.safetensors"
        if (repo / name / "1" / MODEL_FILE).exists():
            if sources.get(name) != sha256_file(checkpoint):
                raise ConfigError(f"{repo / name} was exported from another checkpoint than "
                                  f"{checkpoint}; use another --out")  # fmt: skip
            _log(f"  {name}: reusing {repo / name}")
            continue
        export(ExportSettings(checkpoint=str(checkpoint), repo=str(repo), name=name, version=1))
        sources[name] = sha256_file(checkpoint)
        write_json(exported, sources)
        _log(f"  {name}: {repo / name / '1' / MODEL_FILE} (verified against PyTorch)")


def _preload_attacks() -> None:
    """Import the attack stack (ART, torch attacks) before the server starts: some optional-
    dependency probes swallow a Ctrl-C that lands mid-import, so that window must not fall
    while a server is running."""
    for module in ("art.attacks.evasion", "art.estimators.classification",
                   "defcnn.attack", "defcnn.attack.harness"):  # fmt: skip
        importlib.import_module(module)


def attack_endpoints(
    s: DemoSettings, url: str, models: Path, out: Path, *, progress: bool
) -> tuple[TransferResult, QueryResult]:
    """A transfer attack from the surrogate(s) and a query attack, both over gRPC."""
    from defcnn.attack.harness import (
        DataChoice,
        Endpoint,
        QuerySettings,
        TransferSettings,
        run_query,
        run_transfer,
    )

    endpoint = Endpoint(url=url, models=TARGETS)
    surrogates = (str(models / "surrogate" / "model.safetensors"), *s.extra_surrogates)
    transfer = run_transfer(
        TransferSettings(
            endpoint=endpoint, surrogates=surrogates, attacks=s.attacks, eps_255=s.eps_255,
            data=DataChoice(s.dataset, s.data_dir, s.num_images, s.seed),
            out=str(out / "transfer"),
        ),
        progress=progress,
    )  # fmt: skip
    query = run_query(
        QuerySettings(
            endpoint=endpoint, attack=s.query_attack, budget=s.query_budget,
            eps_255=s.query_eps_255,
            data=DataChoice(s.dataset, s.data_dir, s.query_images, s.seed),
            out=str(out / "query"),
        ),
        progress=progress,
    )  # fmt: skip
    return transfer, query


def run_demo(
    s: DemoSettings, *, progress: bool = True, on_server: Callable[[str], None] | None = None
) -> DemoResult:
    """Run every stage; the server started here is stopped however this function exits."""
    s.check()
    train_images = check_sample_sizes(s)
    out = Path(s.out)
    out.mkdir(parents=True, exist_ok=True)
    models, repo = out / "models", out / "repo"
    times: dict[str, float] = {}
    start = time.monotonic()

    def stage(name: str) -> None:
        times[name] = round(time.monotonic() - start - sum(times.values()), 1)

    with sigterm_as_interrupt():
        _log(f"[1/5] training defective, standard and surrogate models on {s.dataset}")
        train_metrics = train_models(s, models, train_images, progress=progress)
        stage("train")
        _log(f"[2/5] exporting both targets to {repo}")
        export_targets(models, repo, out / "exported.json")
        stage("export")
        _preload_attacks()
        _log("[3/5] starting the server")
        with local_server(repo, out / "server.log") as server:
            write_json(out / "server.json", {"url": server.url, "pid": server.pid})
            _log(f"  serving {', '.join(TARGETS)} on {server.url} (log: {server.log})")
            if on_server:
                on_server(server.url)
            stage("serve")
            _log(f"[4/5] attacking both endpoints over gRPC (reports in {out})")
            transfer, query = attack_endpoints(s, server.url, models, out, progress=progress)
            stage("attack")
        _log("[5/5] summary")
        summary = summarize(s, train_metrics, transfer, query)
        write_summary(out, summary)
        stage("summary")
    result = DemoResult(
        summary=summary, seconds=dict(times, total=round(time.monotonic() - start, 1)), settings=s
    )
    write_json(out / "summary.json", result.to_dict())
    return result
