"""Attack runs against an endpoint: transfer attacks from local surrogates, and query
attacks through the client.

A run reads the endpoint's spec first (what it takes, whether it answers scores or only
labels), fits the data set's images to it once, and checks that the attack fits the
endpoint's threat model. Each stage's output is saved as it completes, so an interrupted
run resumes from what is on disk; `run.json` (see `_runstate`) makes sure only the same run
resumes. Seeds make runs repeatable.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from defcnn.atomic import atomic_write
from defcnn.attack import _runstate
from defcnn.attack.blackbox import (
    Threat,
    Trace,
    attack_images,
    attack_info,
    attacks_for,
    summarize,
)
from defcnn.attack.metrics import boundary_figure, perturbation_norms, transfer_metrics
from defcnn.attack.report import image_grid, query_report, transfer_report, write_results
from defcnn.attack.results import (
    DatasetInfo,
    ModelQueryResult,
    QueryResult,
    TransferResult,
    TransferRow,
)
from defcnn.attack.settings import (
    L2_ONLY,
    DataChoice,
    Endpoint,
    QuerySettings,
    SpecChoice,
    TransferSettings,
    resolve_label_map,
)
from defcnn.client.spec import EndpointSpec
from defcnn.digest import sha256_file
from defcnn.errors import ConfigError, DataError
from defcnn.sampling import seeded_subset
from defcnn.versions import versions

__all__ = [
    "DataChoice",
    "Endpoint",
    "QuerySettings",
    "SpecChoice",
    "TransferSettings",
    "budgets_for",
    "run_query",
    "run_transfer",
]

GRID_IMAGES = 6


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array, allow_pickle=False)

    atomic_write(path, write)


def _cached(path: Path, compute: Callable[..., np.ndarray]) -> np.ndarray:
    """Load a stage's output from disk, or compute and save it (the resume mechanism)."""
    if path.exists():
        try:
            return np.load(path, allow_pickle=False)
        except (OSError, ValueError):
            path.unlink()
    value = compute()
    _save_npy(path, value)
    return value


def _sample(choice: DataChoice) -> tuple[np.ndarray, np.ndarray, DatasetInfo]:
    """A seeded subset of the test split, uint8 NCHW at the data set's size."""
    from defcnn.data import load_dataset

    data = load_dataset(choice.dataset, choice.data_dir, progress=False)
    idx = seeded_subset(len(data.test_y), choice.num_images, choice.seed, what="--num-images")
    info = DatasetInfo(
        name=data.name,
        source=data.source,
        images=len(idx),
        indices=tuple(idx.tolist()),
        classes=tuple(data.classes),
    )
    return data.test_x[idx], data.test_y[idx], info


def _data_key(choice: DataChoice, info: DatasetInfo) -> dict[str, Any]:
    return {"dataset": info.name, "source": info.source, "images": info.images,
            "seed": choice.seed, "indices": list(info.indices)}  # fmt: skip


def _endpoint_key(endpoint: Endpoint) -> dict[str, Any]:
    """The models by name; not the URL: a deployment that moved (or a local server on a new
    port) is the same endpoint when it answers the same (`_fingerprint`)."""
    return {"models": list(endpoint.models)}


def _fingerprint(client: Any, spec: EndpointSpec) -> str:
    """What the endpoint answers for one fixed probe image (seeded noise on uint8 levels),
    hashed: a model swapped behind the same name and spec answers otherwise, so a rerun
    against it is not taken for a resume. One counted query per model and run."""
    levels = np.random.default_rng(0).integers(0, 256, (1, 3, spec.height, spec.width))
    probe = (levels / 255).astype(np.float32)
    answer = client.scores(spec, probe) if spec.score_based else client.labels(spec, probe)
    return hashlib.sha256(np.ascontiguousarray(answer).tobytes()).hexdigest()[:16]


def _specs(client: Any, endpoint: Endpoint, choice: SpecChoice) -> dict[str, EndpointSpec]:
    """Every endpoint model's spec, each said once on the console."""
    overrides = choice.overrides()
    specs = {m: client.spec(m, overrides=overrides) for m in endpoint.models}
    for spec in specs.values():
        print(f"endpoint {spec.describe()}", flush=True)
    sizes = {(s.height, s.width) for s in specs.values()}
    if len(sizes) > 1:
        shown = ", ".join(f"{m} {s.height}x{s.width}" for m, s in specs.items())
        raise ConfigError(f"the endpoint models take different image sizes ({shown}); "
                          "attack them in separate runs")  # fmt: skip
    return specs


def _fit(x: np.ndarray, spec: EndpointSpec, source: str) -> np.ndarray:
    """The data set's images at the endpoint's height and width (resized once, said once)."""
    size = (spec.height, spec.width)
    if x.shape[2:] == size:
        return x
    from defcnn.data._resize import resize_uint8

    print(f"resizing {source} images from {x.shape[2]}x{x.shape[3]} to the endpoint's "
          f"{spec.height}x{spec.width}", flush=True)  # fmt: skip
    return resize_uint8(x, size)


def _num_classes(spec: EndpointSpec) -> int:
    if spec.num_classes is None:
        raise ConfigError(f"model {spec.model!r} does not say how many classes it has: "
                          "pass --num-classes N")  # fmt: skip
    return spec.num_classes


def _label_map(choice: DataChoice, info: DatasetInfo, specs: dict[str, EndpointSpec]) -> Any:
    """(endpoint label of each data set class, or None for the identity) for every model."""
    counts = {s.num_classes for s in specs.values()}
    smallest = min((c for c in counts if c is not None), default=None)
    mapping = resolve_label_map(choice.label_map, info.classes, smallest)
    if mapping is None and smallest is not None and len(info.classes) > smallest:
        raise ConfigError(f"the data set has {len(info.classes)} classes but the endpoint "
                          f"{smallest}: pass --label-map FILE")  # fmt: skip
    if mapping is None:
        mapping = _map_by_name(info.classes, specs)
    return mapping


def _map_by_name(classes: tuple[str, ...], specs: dict[str, EndpointSpec]) -> Any:
    """Where the endpoint names its classes and no --label-map is given: identity when the
    names are the data set's in its order, the permutation when they are the same names in
    another order (said on the console), else an error, since an identity map over
    different names would score every image against the wrong class without a word."""
    found: set[tuple[int, ...] | None] = set()
    for model, spec in specs.items():
        labels = tuple(spec.labels)
        if not labels or labels == tuple(classes):
            found.add(None)
        elif sorted(labels) == sorted(classes) and len(set(labels)) == len(labels):
            found.add(tuple(labels.index(c) for c in classes))
        else:
            raise ConfigError(
                f"model {model!r} names its classes {list(labels)[:12]}, not the data set's "
                f"{list(classes)[:12]}: pass --label-map FILE (data set class -> endpoint index)"
            )
    if len(found) > 1:
        raise ConfigError("the endpoint models order their classes differently: attack them "
                          "in separate runs, or pass --label-map FILE")  # fmt: skip
    mapping = found.pop() if found else None
    if mapping is not None:
        print(f"label map by class name: data set class i -> endpoint index {list(mapping)}",
              flush=True)  # fmt: skip
    return mapping


def _names(spec: EndpointSpec, info: DatasetInfo, mapped: bool) -> Callable[[int], str]:
    """The name of an endpoint label, for captions."""

    def name(i: int) -> str:
        if i < len(spec.labels):
            return spec.labels[i]
        if not mapped and i < len(info.classes):
            return info.classes[i]
        return f"class {i}"

    return name


def _captions(pred: np.ndarray, y: np.ndarray, name: Callable[[int], str]) -> list[str]:
    return [f"{name(int(p))}{'' if p == t else ' (wrong)'}" for p, t in zip(pred, y, strict=True)]


class _Run:
    """The run's folder and state: refuses a different run, totals across resumes."""

    def __init__(self, out: Path, kind: str, overwrite: bool) -> None:
        self.out, self.kind, self.start = out, kind, time.monotonic()
        self.saved = _runstate.open_folder(out, kind, overwrite=overwrite)
        self.before = self.saved.totals if self.saved else _runstate.Totals()
        self.key: dict[str, Any] = {}
        self.started = False

    def check(self, **key: Any) -> None:
        self.key |= key
        _runstate.check_same(self.out, self.saved, self.key)

    def begin(self) -> None:
        """Save the key before the first stage file, so an interrupted run resumes."""
        _runstate.save(self.out, self.kind, self.key, self.before)
        self.started = True

    def totals(self, client: Any, models: tuple[str, ...]) -> _runstate.Totals:
        this_run = {m: client.counter(m) for m in models}
        return self.before.add(time.monotonic() - self.start, this_run)

    def finish(self, totals: _runstate.Totals) -> None:
        _runstate.save(self.out, self.kind, self.key, totals)


@contextlib.contextmanager
def _connected(run: _Run, endpoint: Endpoint) -> Iterator[Any]:
    """The endpoint's client for the run; an interrupted or failed run that had begun still
    saves what it spent, so a resume's totals include it."""
    client = endpoint.client()
    try:
        yield client
    except BaseException:
        if run.started:
            run.finish(run.totals(client, endpoint.models))
        raise
    finally:
        client.close()


def _prepare(
    run: _Run,
    client: Any,
    settings: TransferSettings | QuerySettings,
    info: DatasetInfo,
    x: np.ndarray,
    vet: Callable[[dict[str, EndpointSpec]], Any] = lambda specs: None,
) -> tuple[dict[str, EndpointSpec], Any, tuple[int, ...] | None, np.ndarray]:
    """Before the first stage: the endpoint's specs (`vet` may refuse them, and what it
    returns is passed on), the label map, the endpoint's part of the run's key, and the
    images at the endpoint's size; then the run begins."""
    specs = _specs(client, settings.endpoint, settings.spec)
    vetted = vet(specs)
    mapping = _label_map(settings.data, info, specs)
    run.check(spec={m: s.result_key() for m, s in specs.items()},
              answers={m: _fingerprint(client, s) for m, s in specs.items()},
              label_map=None if mapping is None else list(mapping))  # fmt: skip
    x = _fit(x, next(iter(specs.values())), info.source)
    run.begin()
    return specs, vetted, mapping, x


def run_transfer(settings: TransferSettings, *, progress: bool = True) -> TransferResult:
    """Craft on the surrogates, send to every endpoint model, score, and write the report."""
    settings.check_files()
    out = Path(settings.out)
    run = _Run(out, "transfer", settings.overwrite)
    x, y, info = _sample(settings.data)
    run.check(
        attack=list(settings.attacks), eps=list(settings.eps_255),
        params={a: {k: v for k, v in settings.attack_params(a, None).items() if k != "eps"}
                for a in settings.attacks},
        batch_size=settings.batch_size,
        surrogates=[sha256_file(p) for p in settings.surrogates],
        data=_data_key(settings.data, info), endpoint=_endpoint_key(settings.endpoint),
    )  # fmt: skip
    with _connected(run, settings.endpoint) as client:
        specs, _, mapping, x = _prepare(run, client, settings, info, x)
        return _transfer(settings, run, client, specs, x, y, info, mapping, progress)


def _transfer(
    settings: TransferSettings, run: _Run, client: Any, specs: dict[str, EndpointSpec],
    x: np.ndarray, y: np.ndarray, info: DatasetInfo, mapping: tuple[int, ...] | None,
    progress: bool,
) -> TransferResult:  # fmt: skip
    import torch

    from defcnn.attack import Ensemble, craft, make_attack
    from defcnn.checkpoint import load_model

    out = run.out
    (out / "stages").mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loaded = [load_model(p, device) for p in settings.surrogates]
    models = [m for m, _ in loaded]
    surrogate = models[0] if len(models) == 1 else Ensemble(models)
    trained = loaded[0][1].spec.resolved_input_size
    if (trained, trained) != x.shape[2:]:
        print(f"the surrogate was trained at {trained}x{trained}; crafting at the endpoint's "
              f"{x.shape[2]}x{x.shape[3]}", flush=True)  # fmt: skip
    y_end = y if mapping is None else np.asarray(mapping, dtype=np.int64)[y]
    clean = x.astype(np.float32) / 255.0
    clean_pred = {
        m: _cached(out / "stages" / f"{m}-clean.npy", lambda s=s: client.labels(s, clean))
        for m, s in specs.items()
    }
    rows: list[TransferRow] = []
    params: dict[str, dict[str, Any]] = {}
    grid_adv: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
    sweep = [(a, e) for a in settings.attacks
             for e in ((None,) if a in L2_ONLY else settings.eps_255)]  # fmt: skip
    bar = tqdm(total=len(sweep), desc="attacks", disable=not progress)
    tag = ""
    for attack_name, eps in sweep:
        tag = attack_name if eps is None else f"{attack_name}-eps{eps:g}"
        attack = make_attack(attack_name, **settings.attack_params(attack_name, eps))
        params[attack_name] = {k: getattr(attack, k) for k in ("steps", "step", "decay")
                               if hasattr(attack, k)}  # fmt: skip
        adv = _cached(
            out / "stages" / f"adv-{tag}.npy",
            lambda a=attack: craft(
                a, surrogate, x, y, batch_size=settings.batch_size, device=device,
                progress=progress,
            ),
        )  # fmt: skip
        src = _local_predict(surrogate, adv, device)
        src_end = np.where(src == y, y_end, -1)  # fooled in the data set's labels
        norms = perturbation_norms(x, adv)
        for m in specs:
            pred = _cached(
                out / "stages" / f"{m}-{tag}.npy",
                lambda s=specs[m], adv=adv: client.labels(s, adv.astype(np.float32) / 255),
            )
            metrics = transfer_metrics(y_end, src_end, clean_pred[m], pred)
            rows.append(TransferRow.of(m, attack_name, eps, metrics, norms))
            grid_adv[(m, tag)] = (adv[:GRID_IMAGES], pred[:GRID_IMAGES])
        bar.update(1)
    bar.close()
    totals = run.totals(client, tuple(specs))
    results = TransferResult(
        settings=settings,
        dataset=info,
        rows=tuple(rows),
        queries={m: client.counter(m) for m in specs},
        versions=versions("torch", "numpy", "grpcio", "art"),
        specs=specs,
        attack_params=params,
        totals=totals,
    )
    write_results(out, results)
    transfer_report(out, results)
    image_grid(
        out / "examples.png",
        x[:GRID_IMAGES],
        {f"{m} {tag}": grid_adv[(m, tag)][0] for m in specs},
        {
            f"{m} {tag}": _captions(
                grid_adv[(m, tag)][1],
                y_end[:GRID_IMAGES],
                _names(specs[m], info, mapping is not None),
            )
            for m in specs
        },
        [f"true {info.classes[t]}" for t in y[:GRID_IMAGES]],
    )
    run.finish(totals)
    return results


def _local_predict(model: Any, images: np.ndarray, device: str) -> np.ndarray:
    """The surrogate's labels for uint8 images (to know which adversarial examples fool it)."""
    import torch

    with torch.no_grad():
        chunks = np.array_split(images, max(1, len(images) // 256))
        preds = [model(torch.from_numpy(c).to(device).float() / 255).argmax(1) for c in chunks]
    return torch.cat(preds).cpu().numpy()


def budgets_for(budget: int) -> list[int]:
    """Report points: 10, 100, 1,000, ... up to and including the run's budget."""
    points = [b for b in (10, 100, 1000, 10000, 100000) if b < budget]
    return [*points, budget]


def check_threat(attack: str, specs: dict[str, EndpointSpec]) -> Threat:
    """The attack's threat ("score" or "decision"), if every endpoint model can answer it."""
    threat = attack_info(attack).threat
    labels_only = [m for m, s in specs.items() if not s.score_based]
    if threat == "score" and labels_only:
        fit = ", ".join(attacks_for("decision"))
        raise ConfigError(f"{attack} needs scores, but {', '.join(labels_only)} answers only "
                          f"labels: use a decision-based attack ({fit})")  # fmt: skip
    return threat


def _predict(client: Any, spec: EndpointSpec, threat: Threat, num_classes: int) -> Any:
    """What the attack queries: scores, or for a decision-based attack one-hot labels (all
    it may see, whatever the endpoint gives)."""
    if threat == "score":
        return lambda b: client.scores(spec, b)
    eye = np.eye(num_classes, dtype=np.float32)

    def one_hot(b: np.ndarray) -> np.ndarray:
        labels = client.labels(spec, b)
        if labels.size and not (labels.min() >= 0 and labels.max() < num_classes):
            raise DataError(f"model {spec.model!r} answered label {int(labels.max())} (or "
                            f"{int(labels.min())}), outside its {num_classes} classes: "
                            "check --num-classes")  # fmt: skip
        return eye[labels]

    return one_hot


def run_query(settings: QuerySettings, *, progress: bool = True) -> QueryResult:
    """Attack each correctly classified image through the client (resumable per image)."""
    settings.check_files()
    out = Path(settings.out)
    run = _Run(out, "query", settings.overwrite)
    x, y, info = _sample(settings.data)
    run.check(attack=settings.attack, budget=settings.budget, eps=settings.eps_255,
              data=_data_key(settings.data, info),
              endpoint=_endpoint_key(settings.endpoint))  # fmt: skip
    with _connected(run, settings.endpoint) as client:
        specs, threat, mapping, x = _prepare(
            run, client, settings, info, x, vet=lambda s: check_threat(settings.attack, s)
        )
        return _query(settings, run, client, specs, threat, x, y, info, mapping, progress)


def _query(
    settings: QuerySettings, run: _Run, client: Any, specs: dict[str, EndpointSpec],
    threat: Threat, x: np.ndarray, y: np.ndarray, info: DatasetInfo,
    mapping: tuple[int, ...] | None, progress: bool,
) -> QueryResult:  # fmt: skip
    out = run.out
    (out / "traces").mkdir(parents=True, exist_ok=True)
    y_end = y if mapping is None else np.asarray(mapping, dtype=np.int64)[y]
    clean = x.astype(np.float32) / 255.0
    decision = threat == "decision"
    models: dict[str, ModelQueryResult] = {}
    grid: dict[str, np.ndarray] = {}
    captions: dict[str, list[str]] = {}
    grid_index: dict[str, list[int]] = {}
    for m, spec in specs.items():
        num_classes = _num_classes(spec)
        predict = _predict(client, spec, threat, num_classes)
        clean_pred = _cached(
            out / "traces" / f"{m}-clean.npy", lambda s=spec: client.labels(s, clean)
        )
        trace_file = out / "traces" / f"{m}.jsonl"
        done = _read_traces(trace_file)
        right = [i for i in range(len(y)) if clean_pred[i] == y_end[i]]
        todo = [i for i in right if i not in done]
        bar = tqdm(total=len(right), initial=len(right) - len(todo),
                   desc=f"{settings.attack} on {m}", disable=not progress)  # fmt: skip

        def finished(
            position: int,
            trace: Trace,
            todo: list[int] = todo,
            file: Path = trace_file,
            done: dict[int, Trace] = done,
            bar: Any = bar,
        ) -> None:
            """Each image's trace is saved as it finishes: a resume attacks only the rest."""
            _append_trace(file, todo[position], trace)
            done[todo[position]] = trace
            bar.update(1)

        attack_images(
            settings.attack, predict, clean[todo], y_end[todo], num_classes,
            budget=settings.budget, eps=settings.eps_255 / 255.0,
            seed=[settings.data.seed + i for i in todo], threat=threat,
            quantize=spec.datatype == "UINT8", progress=finished,
            max_batch=spec.request_batch,
        )  # fmt: skip
        bar.close()
        order = sorted(done)
        attacked = [done[i] for i in order]
        by_budget = summarize(attacked, budgets_for(settings.budget), decision_based=decision)
        figure = None
        if decision:  # the paper's figure measures any minimal-perturbation attack
            figure = boundary_figure(clean[order], [done[i].best_adv for i in order])
        models[m] = ModelQueryResult(
            clean_accuracy=float((clean_pred == y_end).mean()),
            attacked=len(attacked),
            skipped=int((clean_pred != y_end).sum()),
            by_budget=tuple(by_budget),
            traces=dict(sorted(done.items())),
            boundary_figure=figure,
        )
        shown = order[:GRID_IMAGES]
        if shown:  # captions from what the endpoint answered during the attack: no new queries
            grid[m] = np.stack([_best_or_clean(done[i], clean[i]) for i in shown])
            labels = [done[i].best_label if done[i].best_label is not None else int(clean_pred[i])
                      for i in shown]  # fmt: skip
            captions[m] = _captions(np.asarray(labels), y_end[shown],
                                    _names(spec, info, mapping is not None))  # fmt: skip
            grid_index[m] = shown
    totals = run.totals(client, tuple(specs))
    results = QueryResult(
        settings=settings,
        decision_based=decision,
        dataset=info,
        models=models,
        queries={m: client.counter(m) for m in specs},
        versions=versions("torch", "numpy", "grpcio", "art"),
        specs=specs,
        totals=totals,
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
    run.finish(totals)
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
