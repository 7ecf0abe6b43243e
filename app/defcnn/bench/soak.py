"""`defcnn bench soak`: many concurrent clients against a local server for a bounded time,
with every answer checked and the server's memory and queue watched.

Pass criteria (issue 7): no errors, no wrong answers, resident memory after warm-up grows
by less than 10%, and the queue never holds more than its bound.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm.auto import tqdm

from defcnn.atomic import write_json
from defcnn.errors import ConfigError
from defcnn.names import MODEL_FILE, parse_version
from defcnn.server.launcher import local_server, sigterm_as_interrupt
from defcnn.server.scrape import queue_gauges

if TYPE_CHECKING:
    from defcnn.client.loadtest import LoadSummary

MAX_RSS_GROWTH = 0.10


@dataclass(frozen=True)
class SoakSettings:
    model_repo: str
    model: str
    clients: int = 64
    seconds: float = 60.0
    warmup_seconds: float = 10.0
    batch: int = 1
    max_queue_size: int = 256
    images: int = 256
    seed: int = 0
    out: str = "runs/soak"


@dataclass(frozen=True)
class RssFigures:
    """The server's resident memory in MiB; `growth` is max over after-warm-up, minus 1."""

    start: float
    after_warmup: float
    max: float
    end: float
    growth: float


@dataclass(frozen=True)
class QueueFigures:
    bound: int
    max_depth: float  # the server's own high-water mark
    max_pending_sampled: float  # the most requests seen waiting at a once-a-second sample


@dataclass(frozen=True)
class SoakChecks:
    """The four pass criteria."""

    no_errors: bool
    every_answer_correct: bool
    memory_flat: bool
    queue_bound_respected: bool

    def items(self) -> list[tuple[str, bool]]:
        return list(asdict(self).items())


@dataclass(frozen=True)
class SoakResult:
    """soak.json is its `to_dict()`."""

    settings: SoakSettings
    warmup: LoadSummary
    soak: LoadSummary
    rss_mb: RssFigures
    queue: QueueFigures
    checks: SoakChecks
    timeline: list[dict[str, float]]  # once a second: "t", "ok", "errors", "wrong", samples
    finished: str

    @property
    def passed(self) -> bool:
        return all(ok for _, ok in self.checks.items())

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}

    def line(self) -> str:
        """The soak in one line, for a console."""
        soak, rss = self.soak, self.rss_mb
        return (
            f"{soak.requests} requests from {soak.clients} clients in {soak.seconds} s: "
            f"{soak.ok} correct, {soak.wrong} wrong, errors {soak.errors_text()}; "
            f"{soak.throughput_rps} answers/s, p99 {soak.latency_ms.p99:.1f} ms; "
            f"RSS {rss.after_warmup:.0f} -> max {rss.max:.0f} MiB ({rss.growth:+.1%}); "
            f"queue max {self.queue.max_depth:g} of {self.queue.bound}"
        )


def rss_mb(pid: int) -> float:
    """Resident memory of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise ConfigError(f"no VmRSS for process {pid}")


def _reference(repo: Path, model: str, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded random images and the newest version's logits for them, in-process."""
    import onnxruntime as ort

    versions = sorted((p for p in (repo / model).iterdir() if parse_version(p.name) is not None),
                      key=lambda p: parse_version(p.name) or 0)  # fmt: skip
    if not versions:
        raise ConfigError(f"{repo / model} has no version folder")
    session = ort.InferenceSession(str(versions[-1] / MODEL_FILE),
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    shape = [int(d) for d in session.get_inputs()[0].shape[1:]]
    x = np.random.default_rng(seed).random((n, *shape), dtype=np.float32)
    logits = np.concatenate([session.run(None, {session.get_inputs()[0].name: x[i : i + 64]})[0]
                             for i in range(0, n, 64)])  # fmt: skip
    return x, logits


def run_soak(s: SoakSettings, *, progress: bool = True) -> SoakResult:
    """Warm up, then soak; returns (and writes to OUT/soak.json) the figures and verdicts."""
    from defcnn.client.loadtest import run_load

    if s.clients < 1 or s.seconds <= 0 or s.batch < 1 or s.max_queue_size < 1:
        raise ConfigError("clients, seconds, batch and max queue size must be positive")
    repo, out = Path(s.model_repo), Path(s.out)
    if not (repo / s.model).is_dir():
        raise ConfigError(f"no model {s.model!r} in {repo}")
    out.mkdir(parents=True, exist_ok=True)
    x, logits = _reference(repo, s.model, s.images, s.seed)
    extra = ["--max-queue-size", str(s.max_queue_size), "--max-queue-delay-us", "2000"]
    with sigterm_as_interrupt(), local_server(repo, out / "server.log", metrics=True,
                                              extra=extra) as server:  # fmt: skip
        assert server.metrics_port is not None
        rss_start = rss_mb(server.pid)
        warm = run_load(server.url, s.model, x, logits, clients=s.clients,
                        seconds=s.warmup_seconds, batch=s.batch)  # fmt: skip
        rss_warm = rss_mb(server.pid)

        def sample() -> dict[str, Any]:
            return {"rss_mb": round(rss_mb(server.pid), 2),
                    **queue_gauges(server.metrics_port or 0, s.model)}  # fmt: skip

        bar = tqdm(total=int(s.seconds), desc=f"soak, {s.clients} clients", unit="s",
                   disable=not progress)  # fmt: skip
        load = run_load(server.url, s.model, x, logits, clients=s.clients, seconds=s.seconds,
                        batch=s.batch, sample=sample,
                        progress=lambda t: bar.update(1) if t <= s.seconds else None)  # fmt: skip
        bar.close()
        final = sample()
    rss = [row["rss_mb"] for row in load.timeline]
    growth = (max(rss) - rss_warm) / rss_warm
    main = load.summary()
    checks = SoakChecks(
        no_errors=not main.errors and not warm.errors,
        every_answer_correct=main.wrong == 0 and warm.wrong == 0,
        memory_flat=growth < MAX_RSS_GROWTH,
        queue_bound_respected=final["max_depth"] <= s.max_queue_size,
    )
    result = SoakResult(
        settings=s, warmup=warm.summary(), soak=main,
        rss_mb=RssFigures(start=round(rss_start, 2), after_warmup=round(rss_warm, 2),
                          max=max(rss), end=rss[-1], growth=round(growth, 4)),
        queue=QueueFigures(bound=s.max_queue_size, max_depth=final["max_depth"],
                           max_pending_sampled=max(r["pending"] for r in load.timeline)),
        checks=checks, timeline=load.timeline, finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )  # fmt: skip
    write_json(out / "soak.json", result.to_dict())
    _plot(out / "soak.png", result)
    return result


def _plot(path: Path, result: SoakResult) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from defcnn.atomic import atomic_write

    t = [r["t"] for r in result.timeline]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(t, [r["ok"] for r in result.timeline], color="tab:blue")
    a.set_xlabel("seconds")
    a.set_ylabel("correct answers per second")
    a.set_ylim(bottom=0)
    b.plot(t, [r["rss_mb"] for r in result.timeline], color="tab:red")
    b.axhline(result.rss_mb.after_warmup * (1 + MAX_RSS_GROWTH), ls=":", color="gray",
              label="+10% over post-warm-up")  # fmt: skip
    b.set_xlabel("seconds")
    b.set_ylabel("server RSS (MiB)")
    b.legend()
    s = result.soak
    fig.suptitle(f"soak: {s.clients} clients, {s.requests} requests, "
                 f"{s.wrong} wrong, {sum(s.errors.values())} errors")  # fmt: skip
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
