"""Attack runs against an endpoint: transfer attacks from local surrogates, and query
attacks through the client. Each stage's output is saved as it completes, so an
interrupted run resumes from what is on disk; seeds make runs repeatable."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from defcnn.atomic import atomic_write
from defcnn.attack.blackbox import DECISION_BASED, Trace, attack_one, summarize
from defcnn.attack.metrics import boundary_figure, perturbation_norms, transfer_metrics
from defcnn.attack.report import image_grid, query_report, transfer_report, write_results
from defcnn.attack.results import (
    DatasetInfo,
    ModelQueryResult,
    QueryResult,
    TransferResult,
    TransferRow,
)
from defcnn.sampling import seeded_subset
from defcnn.tokens import read_token_file
from defcnn.versions import versions

GRID_IMAGES = 6


@dataclass(frozen=True)
class Endpoint:
    """Where the models are served and how to reach them."""

    url: str
    models: tuple[str, ...]
    token_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    timeout: float = 60.0

    def client(self, budget: int | None = None) -> Any:
        from defcnn.client import InferenceClient

        token = read_token_file(self.token_file) if self.token_file else None
        return InferenceClient(
            self.url,
            token=token,
            tls=bool(self.tls_ca),
            tls_ca=self.tls_ca,
            tls_cert=self.tls_cert,
            tls_key=self.tls_key,
            timeout=self.timeout,
            budget=budget,
        )


@dataclass(frozen=True)
class DataChoice:
    dataset: str = "digits"
    data_dir: str | None = None
    num_images: int = 100
    seed: int = 0


@dataclass(frozen=True)
class TransferSettings:
    endpoint: Endpoint
    surrogates: tuple[str, ...]
    attacks: tuple[str, ...] = ("pgd",)
    eps_255: tuple[float, ...] = (16.0,)
    data: DataChoice = field(default_factory=DataChoice)
    out: str = "attack-report"
    batch_size: int = 64


@dataclass(frozen=True)
class QuerySettings:
    endpoint: Endpoint
    attack: str = "square"
    budget: int = 1000
    eps_255: float = 16.0
    data: DataChoice = field(default_factory=DataChoice)
    out: str = "attack-report"


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    atomic_write(path, write)


def _cached(path: Path, compute: Any) -> np.ndarray:
    """Load a stage's output from disk, or compute and save it (the resume mechanism)."""
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            path.unlink()
    value = compute()
    _save_npy(path, value)
    return value


def _sample(choice: DataChoice, image_size: int) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """A seeded subset of the test split, uint8 NCHW."""
    from defcnn.data import load_dataset

    data = load_dataset(choice.dataset, choice.data_dir, image_size=image_size, progress=False)
    idx = seeded_subset(len(data.test_y), choice.num_images, choice.seed, what="--num-images")
    info = DatasetInfo(
        name=data.name,
        source=data.source,
        images=len(idx),
        indices=tuple(idx.tolist()),
        classes=tuple(data.classes),
    )
    return data.test_x[idx], data.test_y[idx], info


def _local_predict(model: Any, images: np.ndarray, device: str) -> np.ndarray:
    """The surrogate's labels for uint8 images (to know which adversarial examples fool it)."""
    import torch

    with torch.no_grad():
        chunks = np.array_split(images, max(1, len(images) // 256))
        preds = [model(torch.from_numpy(c).to(device).float() / 255).argmax(1) for c in chunks]
    return torch.cat(preds).cpu().numpy()


def _label_text(pred: np.ndarray, y: np.ndarray, classes: tuple[str, ...]) -> list[str]:
    return [f"{classes[p]}{'' if p == t else ' (wrong)'}" for p, t in zip(pred, y, strict=True)]


def run_transfer(settings: TransferSettings, *, progress: bool = True) -> TransferResult:
    """Craft on the surrogates, send to every endpoint model, score, and write the report."""
    import torch

    from defcnn.attack import Ensemble, craft, make_attack
    from defcnn.checkpoint import load_model

    out = Path(settings.out)
    (out / "stages").mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    models = [load_model(p, device)[0] for p in settings.surrogates]
    surrogate = models[0] if len(models) == 1 else Ensemble(models)
    size = load_model(settings.surrogates[0])[1].spec.resolved_input_size
    x, y, info = _sample(settings.data, size)
    client = settings.endpoint.client()
    clean = x.astype(np.float32) / 255.0
    clean_pred = {
        m: _cached(out / "stages" / f"{m}-clean.npy", lambda m=m: client.predict(m, clean))
        for m in settings.endpoint.models
    }
    rows: list[TransferRow] = []
    grid_adv = {}
    total = len(settings.attacks) * len(settings.eps_255)
    bar = tqdm(total=total, desc="attacks", disable=not progress)
    for attack_name in settings.attacks:
        for eps in settings.eps_255:
            tag = f"{attack_name}-eps{eps:g}"
            attack = make_attack(attack_name, eps / 255.0)
            adv = _cached(
                out / "stages" / f"adv-{tag}.npy",
                lambda a=attack: craft(
                    a,
                    surrogate,
                    x,
                    y,
                    batch_size=settings.batch_size,
                    device=device,
                    progress=progress,
                ),
            )
            src = _local_predict(surrogate, adv, device)
            norms = perturbation_norms(x, adv)
            for m in settings.endpoint.models:
                pred = _cached(
                    out / "stages" / f"{m}-{tag}.npy",
                    lambda m=m, adv=adv: client.predict(m, adv.astype(np.float32) / 255),
                )
                metrics = transfer_metrics(y, src, clean_pred[m], pred)
                rows.append(TransferRow.of(m, attack_name, eps, metrics, norms))
                grid_adv[(m, tag)] = (adv[:GRID_IMAGES], pred[:GRID_IMAGES])
            bar.update(1)
    bar.close()
    results = TransferResult(
        settings=settings,
        dataset=info,
        rows=tuple(rows),
        queries={m: client.counter(m) for m in settings.endpoint.models},
        versions=versions("torch", "numpy", "grpcio", "art"),
    )
    write_results(out, results)
    transfer_report(out, results)
    last_tag = f"{settings.attacks[-1]}-eps{settings.eps_255[-1]:g}"
    classes = info.classes
    image_grid(
        out / "examples.png",
        x[:GRID_IMAGES],
        {f"{m} {last_tag}": grid_adv[(m, last_tag)][0] for m in settings.endpoint.models},
        {
            f"{m} {last_tag}": _label_text(grid_adv[(m, last_tag)][1], y[:GRID_IMAGES], classes)
            for m in settings.endpoint.models
        },
        [f"true {classes[t]}" for t in y[:GRID_IMAGES]],
    )
    client.close()
    return results


def budgets_for(budget: int) -> list[int]:
    """Report points: 10, 100, 1,000, ... up to and including the run's budget."""
    points = [b for b in (10, 100, 1000, 10000, 100000) if b < budget]
    return [*points, budget]


def run_query(settings: QuerySettings, *, progress: bool = True) -> QueryResult:
    """Attack each correctly classified image through the client, trace by trace (resumable)."""
    out = Path(settings.out)
    (out / "traces").mkdir(parents=True, exist_ok=True)
    client = settings.endpoint.client()
    first = settings.endpoint.models[0]
    info0 = client.info(first)
    x, y, info = _sample(settings.data, info0.input_shape[1])
    clean = x.astype(np.float32) / 255.0
    decision = settings.attack in DECISION_BASED
    models: dict[str, ModelQueryResult] = {}
    grid: dict[str, np.ndarray] = {}
    captions: dict[str, list[str]] = {}
    grid_index: dict[str, list[int]] = {}
    for m in settings.endpoint.models:
        num_classes = client.info(m).num_classes
        clean_pred = _cached(
            out / "traces" / f"{m}-clean.npy", lambda m=m: client.predict(m, clean)
        )
        trace_file = out / "traces" / f"{m}.jsonl"
        done = _read_traces(trace_file)
        todo = [i for i in range(len(y)) if clean_pred[i] == y[i] and i not in done]
        for i in tqdm(todo, desc=f"{settings.attack} on {m}", disable=not progress):
            trace = attack_one(
                settings.attack,
                lambda b, m=m: client.probabilities(m, b),
                clean[i],
                int(y[i]),
                num_classes,
                budget=settings.budget,
                eps=settings.eps_255 / 255.0,
                seed=settings.data.seed + i,
            )
            _append_trace(trace_file, i, trace)
            done[i] = trace
        order = sorted(done)
        attacked = [done[i] for i in order]
        by_budget = summarize(attacked, budgets_for(settings.budget), decision_based=decision)
        figure = None
        if settings.attack == "boundary":
            figure = boundary_figure(clean[order], [done[i].best_adv for i in order])
        models[m] = ModelQueryResult(
            clean_accuracy=float((clean_pred == y).mean()),
            attacked=len(attacked),
            skipped=int((clean_pred != y).sum()),
            by_budget=tuple(by_budget),
            traces=dict(sorted(done.items())),
            boundary_figure=figure,
        )
        shown = sorted(done)[:GRID_IMAGES]
        if shown:  # captions from what the endpoint answered during the attack: no new queries
            grid[m] = np.stack([_best_or_clean(done[i], clean[i]) for i in shown])
            labels = [done[i].best_label if done[i].best_label is not None else int(clean_pred[i])
                      for i in shown]  # fmt: skip
            captions[m] = _label_text(np.asarray(labels), y[shown], info.classes)
            grid_index[m] = shown
    results = QueryResult(
        settings=settings,
        decision_based=decision,
        dataset=info,
        models=models,
        queries={m: client.counter(m) for m in settings.endpoint.models},
        versions=versions("torch", "numpy", "grpcio", "art"),
    )
    write_results(out, results)
    query_report(out, results)
    if grid:
        first_model = next(iter(grid))
        idx = grid_index[first_model]
        same = {m: g for m, g in grid.items() if grid_index[m] == idx}
        image_grid(
            out / "examples.png", x[idx], same, {m: captions[m] for m in same},
            [f"true {info.classes[t]}" for t in y[idx]],
        )  # fmt: skip
    client.close()
    return results


def _best_or_clean(trace: Trace, clean: np.ndarray) -> np.ndarray:
    return trace.best_adv if trace.best_adv is not None else clean


def _read_traces(path: Path) -> dict[int, Trace]:
    done: dict[int, Trace] = {}
    if not path.exists():
        return done
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill: that image is attacked again
        done[int(rec["index"])] = Trace.from_dict(rec)
    return done


def _append_trace(path: Path, index: int, trace: Trace) -> None:
    rec = {
        "index": index,
        **trace.to_dict(),
        "best_adv": None if trace.best_adv is None else trace.best_adv.round(6).tolist(),
    }
    with open(path, "a") as fh:
        fh.write(json.dumps(rec) + "\n")
        fh.flush()
