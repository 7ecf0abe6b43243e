"""GPU evidence: train, export and serve on one device, with every step's outcome recorded.

One command writes gpu_evidence.json, gpu_evidence.md and small plots to --out: the machine;
training throughput of standard vs defective ResNet-18 (bf16 autocast and channels_last on
CUDA; eager, and torch.compile when asked); a short real training run of both; their export
(with the CPU parity check every export makes) and, on CUDA, ONNX Runtime CUDA against
PyTorch CUDA; ONNX Runtime throughput by batch, standard vs defective; `defcnn serve` under
closed-loop one-image clients beside in-process ONNX Runtime, every answer checked. A step
that cannot run is recorded as skipped with its reason, never as a pass; a step that fails
is recorded with its error, the others still run, and the command exits 1.

    python benchmarks/gpu_evidence.py --device cuda --data-dir DATA --out runs/gpu-evidence
    python benchmarks/gpu_evidence.py --device cpu --out runs/gpu-evidence-cpu

On CUDA the real run trains on CIFAR-10: --data-dir is the JPEG archive (or its folder),
read as `--dataset imagefolder`, the default there; `--dataset cifar10` reads the python
batches. On the CPU it trains on the embedded digits at small sizes by default: a rehearsal
of the same code, not a GPU figure. Seeds are fixed (0); the report states versions and the command.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, cast

import numpy as np
import onnxruntime as ort
import torch
from _evidence_report import Step, goals, markdown, plots
from _machine import cpu_model
from onnx_throughput import seconds_per_batch
from serve_throughput import closed_loop, server_split, where_time_goes
from train_throughput import time_steps

from defcnn.atomic import write_json, write_text
from defcnn.checkpoint import load_model
from defcnn.data.registry import EMBEDDED
from defcnn.export.exporter import ExportSettings, export
from defcnn.export.verify import CUDA_PROVIDER, cuda_parity, parity_cases
from defcnn.models import create_model
from defcnn.names import DATASETS, MODEL_FILE
from defcnn.server.backends.onnxruntime import OnnxRuntimeBackend
from defcnn.server.launcher import local_server
from defcnn.stats import wilson
from defcnn.training import TrainConfig, train
from defcnn.versions import versions

CIFAR10_TRAIN_IMAGES = 50_000
MODELS = ("standard", "defective")
KEEP_PROB = 0.1  # the paper's keep probability for the defective layers
SEED = 0
# What a serving figure is checked against: the in-process answer of the same provider.
# A GPU's convolution algorithms differ with the batch a request lands in, so the bound
# there is relative 1e-2 (argmax must agree everywhere); on the CPU it is 1e-3.
ANSWER_RTOL = {"cuda": 1e-2, "cpu": 1e-3}


@dataclass(frozen=True)
class Plan:
    """Sizes of one run: full width and batch 512 on CUDA, small ones on the CPU."""

    device: str
    width: float
    batch_size: int
    speed_steps: int
    repeats: int
    compile: bool
    dataset: str
    data_dir: str | None
    epochs: int
    train_batch_size: int
    ort_batches: tuple[int, ...]
    ort_min_seconds: float
    serve_seconds: float
    concurrency: tuple[int, ...] = (1, 16, 64)

    @classmethod
    def for_device(cls, args: argparse.Namespace) -> Plan:
        cuda = args.device == "cuda"
        return cls(
            device=args.device,
            width=args.width if args.width is not None else (1.0 if cuda else 0.125),
            batch_size=512 if cuda else 64,
            speed_steps=20 if cuda else 2,
            repeats=args.repeats if args.repeats is not None else (5 if cuda else 3),
            compile=args.compile == "on" or (args.compile == "auto" and cuda),
            dataset=args.dataset or ("imagefolder" if cuda else "digits"),
            data_dir=args.data_dir,
            epochs=args.epochs if args.epochs is not None else (10 if cuda else 2),
            train_batch_size=512 if cuda else 64,
            ort_batches=(1, 16, 64, 256),
            ort_min_seconds=0.5 if cuda else 0.1,
            serve_seconds=args.serve_seconds or (5.0 if cuda else 1.5),
        )


class Skip(Exception):
    """This step cannot run here; the message says why."""


class Failed(Exception):
    """This step ran and its figures are kept, but they show it failed (wrong answers)."""

    def __init__(self, why: str, result: dict[str, Any]) -> None:
        super().__init__(why)
        self.result = result


def run_step(name: str, title: str, work: Callable[[], dict[str, Any]]) -> Step:
    """Run one step, turning Skip into 'skipped' and any other exception into 'failed'."""
    print(f"== {title}", flush=True)
    step = Step(name, title)
    start = time.perf_counter()
    try:
        step.result = work()
        step.status = "ran"
    except Skip as why:
        step.reason = str(why)
    except Failed as failure:
        step.status, step.reason, step.result = "failed", str(failure), failure.result
    except Exception as exc:  # recorded, and the run goes on: one report holds every step
        traceback.print_exc()
        step.status, step.reason = "failed", f"{type(exc).__name__}: {exc}"
    step.seconds = round(time.perf_counter() - start, 2)
    shown = step.status if step.reason is None else f"{step.status}: {step.reason}"
    print(f"   {shown} ({step.seconds:.1f} s)", flush=True)
    return step


def needs(step: Step, what: str) -> None:
    """Skip the calling step unless `step` ran."""
    if step.status != "ran":
        raise Skip(f"needs {what}, which {step.status}")


def cuda_device(plan: Plan) -> None:
    if plan.device != "cuda":
        raise Skip("no CUDA device (--device cpu)")
    if not torch.cuda.is_available():
        raise Skip("no CUDA device (torch sees none)")


def onnxruntime_provider(plan: Plan) -> str:
    """The provider the ONNX Runtime steps use; CUDA only where it is installed."""
    if plan.device == "cpu":
        return "CPUExecutionProvider"
    cuda_device(plan)
    if CUDA_PROVIDER not in ort.get_available_providers():
        raise Skip(f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (onnxruntime-gpu)")
    return CUDA_PROVIDER


# --- the steps --------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "versions": versions(
            "torch",
            "onnxruntime",
            "onnxruntime-gpu",
            "onnx",
            "grpcio",
            "protobuf",
            "numpy",
            "tensorrt",
        ),
        # The modules this process imported (a distribution's metadata can name another
        # copy: CPU onnxruntime beside a carried onnxruntime-gpu, say).
        "imported": {
            "torch": f"{torch.__version__} ({Path(torch.__file__).parent})",
            "onnxruntime": f"{ort.__version__} ({Path(ort.__file__).parent})",
        },
        "onnxruntime_providers": ort.get_available_providers(),
        "torch_cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "count": torch.cuda.device_count(),
        }
        info["cudnn"] = torch.backends.cudnn.version()
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(
            query, capture_output=True, text=True, timeout=20, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as exc:
        info["nvidia_smi"] = f"not available ({type(exc).__name__})"
    return info


def train_speed(plan: Plan) -> dict[str, Any]:
    """Images/s of SGD steps on a batch already on the device, interleaved repeats."""
    if plan.device == "cuda":
        cuda_device(plan)
    device = torch.device(plan.device)
    torch.manual_seed(SEED)
    x = torch.rand(plan.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (plan.batch_size,), device=device)
    amp = device.type == "cuda"
    if amp:
        x = x.contiguous(memory_format=torch.channels_last)
    variants: dict[str, torch.nn.Module] = {}
    compile_seconds: dict[str, float] = {}
    compile_errors: dict[str, str] = {}

    def build(kind: str) -> torch.nn.Module:
        model = create_model(
            "resnet18", width=plan.width, defective=kind == "defective", keep_prob=KEEP_PROB
        ).to(device)
        if amp:
            model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        return model.train()

    for kind in MODELS:
        variants[f"{kind} eager"] = build(kind)
        if not plan.compile:
            continue
        compiled = cast(torch.nn.Module, torch.compile(build(kind)))  # an OptimizedModule
        start = time.perf_counter()
        try:
            time_steps(compiled, x, y, 1, amp)  # compiles the forward and the backward
        except Exception as exc:  # compiling is optional: the eager figures stand alone
            compile_errors[kind] = f"{type(exc).__name__}: {str(exc)[:300]}"
            continue
        compile_seconds[kind] = round(time.perf_counter() - start, 1)
        variants[f"{kind} compiled"] = compiled
    for model in variants.values():
        time_steps(model, x, y, 2, amp)  # warm-up: cuDNN autotuning, allocator
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(plan.repeats):
        print(f"   repeat {r + 1}/{plan.repeats}", flush=True)
        for name, model in variants.items():
            seconds = time_steps(model, x, y, plan.speed_steps, amp)
            rates[name].append(plan.speed_steps * plan.batch_size / seconds)
    rows: dict[str, dict[str, Any]] = {
        name: {
            "images_per_second": statistics.median(r),
            "images_per_second_range": [min(r), max(r)],  # over the repeats
            "seconds_per_cifar10_epoch": CIFAR10_TRAIN_IMAGES / statistics.median(r),
        }
        for name, r in rates.items()
    }
    ratios = {}
    for mode in ("eager", "compiled"):
        s, d = rates.get(f"standard {mode}"), rates.get(f"defective {mode}")
        if s and d:  # time ratio = inverse rate ratio, per repeat, then the median
            ratios[mode] = statistics.median(a / b for a, b in zip(s, d, strict=True))
    standard = [n for n in rows if n.startswith("standard")]
    best = min(standard, key=lambda n: rows[n]["seconds_per_cifar10_epoch"])
    return {
        "arch": "resnet18",
        "width": plan.width,
        "batch_size": plan.batch_size,
        "keep_prob": KEEP_PROB,
        "bf16_autocast": amp,
        "channels_last": amp,
        "steps_per_repeat": plan.speed_steps,
        "repeats": plan.repeats,
        "rows": rows,
        "time_ratio_defective_over_standard": ratios,
        "compile_seconds": compile_seconds,
        "compile_errors": compile_errors,
        "compile": plan.compile,
        "fastest_standard": best,
    }


def _interval(correct: int, count: int) -> list[float]:
    """The 95% Wilson interval of a test accuracy."""
    rate = wilson(correct, count)
    return [rate.low, rate.high]


def train_run(plan: Plan, out: Path) -> dict[str, Any]:
    """Both models on the fast schedule; test accuracy after every epoch."""
    if plan.device == "cuda":
        cuda_device(plan)
    if plan.dataset not in EMBEDDED and plan.data_dir is None:  # parse_args refuses it too
        raise Skip(f"--data-dir not given: no {plan.dataset} data to train on")
    runs: dict[str, Any] = {}
    for kind in MODELS:
        cfg = TrainConfig(
            arch="resnet18",
            width=plan.width,
            defective=kind == "defective",
            keep_prob=KEEP_PROB,
            dataset=plan.dataset,
            data_dir=plan.data_dir,
            epochs=plan.epochs,
            batch_size=plan.train_batch_size,
            schedule="fast",
            seed=SEED,
            device=plan.device,
            out=str(out / kind),
        )
        start = time.perf_counter()
        metrics = train(cfg, progress=True)
        history = json.loads((out / kind / "metrics.json").read_text())["history"]
        runs[kind] = {
            "seconds": round(time.perf_counter() - start, 1),
            "test_accuracy": metrics["test_accuracy"],
            "epochs": [
                {
                    "epoch": h["epoch"],
                    "test_accuracy": h["test_accuracy"],
                    "test_accuracy_95": _interval(h["test_correct"], h["test_count"]),
                    "train_images_per_second": h["images_per_second"],
                }
                for h in history
            ],
            "checkpoint": str(out / kind / "model.safetensors"),
            "config": {k: v for k, v in cfg.to_dict().items() if k != "out"},
        }
    return runs


def export_both(plan: Plan, trained: Step, repo: Path) -> dict[str, Any]:
    needs(trained, "the training run")
    reports = {}
    for kind in MODELS:
        report = export(
            ExportSettings(
                checkpoint=trained.result[kind]["checkpoint"],
                repo=str(repo),
                name=kind,
                max_batch_size=max(plan.ort_batches),
                dataset=plan.dataset,
                data_dir=plan.data_dir,
            )
        )
        reports[kind] = {
            "masks": report.masks.count,
            "cpu_parity": [asdict(r) for r in report.parity],
            "model": str(repo / kind / str(report.version) / MODEL_FILE),
        }
    return reports


def gpu_parity(plan: Plan, trained: Step, exported: Step) -> dict[str, Any]:
    onnxruntime_provider(plan)
    cuda_device(plan)
    needs(exported, "the export")
    results = {}
    rng = np.random.default_rng(SEED)
    real = rng.integers(0, 256, (64, 3, 32, 32), dtype=np.uint8)
    for kind in MODELS:
        model, _ = load_model(Path(trained.result[kind]["checkpoint"]))
        onnx_bytes = Path(exported.result[kind]["model"]).read_bytes()
        checks = cuda_parity(onnx_bytes, model, parity_cases(real, 32, 64))
        results[kind] = [asdict(r) for r in checks]
    return {"cases": results, "note": "random uint8 images stand in for real ones"}


def ort_throughput(plan: Plan, exported: Step) -> dict[str, Any]:
    """In-process ONNX Runtime with the server's own backend class and settings."""
    provider = onnxruntime_provider(plan)
    needs(exported, "the export")
    backends = {
        k: OnnxRuntimeBackend(Path(exported.result[k]["model"]), plan.device) for k in MODELS
    }
    rng = np.random.default_rng(SEED)
    inputs = {b: rng.random((b, 3, 32, 32), dtype=np.float32) for b in plan.ort_batches}
    cells = [(k, b) for b in plan.ort_batches for k in MODELS]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    for r in range(plan.repeats):
        print(f"   repeat {r + 1}/{plan.repeats}", flush=True)
        for kind, b in cells:
            x = inputs[b]
            run = lambda kind=kind, x=x: backends[kind].run(x)  # noqa: E731
            times[(kind, b)].append(seconds_per_batch(run, plan.ort_min_seconds))
    rows = [
        {
            "model": k,
            "batch": b,
            "images_per_second": statistics.median(b / t for t in times[(k, b)]),
            "latency_ms": 1e3 * statistics.median(times[(k, b)]),
            "images_per_second_range": [b / max(times[(k, b)]), b / min(times[(k, b)])],
        }
        for k, b in cells
    ]
    mask_cost = {
        b: statistics.median(
            d / s for s, d in zip(times[("standard", b)], times[("defective", b)], strict=True)
        )
        for b in plan.ort_batches
    }
    return {
        "provider": provider,
        "rows": rows,
        "latency_ratio_defective_over_standard": mask_cost,
        "repeats": plan.repeats,
        "min_seconds_per_cell": plan.ort_min_seconds,
    }


def serve(plan: Plan, exported: Step, in_process: Step, repo: Path, log: Path) -> dict[str, Any]:
    """`defcnn serve --device D` on the exported repository; defective model, one image per
    request; the answers are checked against the same provider in process."""
    onnxruntime_provider(plan)
    needs(exported, "the export")
    needs(in_process, "the in-process ONNX Runtime figures")
    model = Path(exported.result["defective"]["model"])
    x = np.random.default_rng(SEED + 1).random((1, 3, 32, 32), dtype=np.float32)
    expected = OnnxRuntimeBackend(model, plan.device).run(x)
    points = {}
    with local_server(repo, log, extra=["--device", plan.device]) as server:
        for c in plan.concurrency:
            before = server_split(server.url, "defective")
            point = asyncio.run(
                closed_loop(
                    server.url,
                    "defective",
                    c,
                    plan.serve_seconds,
                    x,
                    expected,
                    rtol=ANSWER_RTOL[plan.device],
                )
            )
            point["split"] = where_time_goes(
                before, server_split(server.url, "defective"), point["p50_ms"]
            )
            points[c] = point
            print(
                f"   concurrency {c}: {point['images_per_second']:.0f} img/s, "
                f"p50 {point['p50_ms']:.2f} ms, wrong {point['mismatches']}",
                flush=True,
            )
    rows = [r for r in in_process.result["rows"] if r["model"] == "defective"]
    best = max(rows, key=lambda r: r["images_per_second"])
    batch1 = next(r for r in rows if r["batch"] == 1)
    wrong = sum(p["mismatches"] for p in points.values())
    result = {
        "model": "defective",
        "seconds_per_point": plan.serve_seconds,
        "points": points,
        "in_process_best": best,
        "in_process_batch1": batch1,
        "wrong_answers": wrong,
        "answers_checked": sum(p["requests"] + 3 for p in points.values()),
        "answer_rtol": ANSWER_RTOL[plan.device],
    }
    if wrong:
        firsts = [p["first_mismatch"] for p in points.values() if p["mismatches"]]
        raise Failed(f"{wrong} wrong answers; first: {firsts[0]}", result)
    return result


def tensorrt_engines(plan: Plan, trained: Step, tmp_repo: Path) -> dict[str, Any]:
    if importlib.util.find_spec("tensorrt") is None:
        raise Skip("the tensorrt package is not installed")
    cuda_device(plan)
    needs(trained, "the training run")
    report = export(
        ExportSettings(
            checkpoint=trained.result["defective"]["checkpoint"],
            repo=str(tmp_repo),
            name="defective_trt",
            tensorrt=True,
            fp16=True,
            dataset=plan.dataset,
            data_dir=plan.data_dir,
        )
    )
    return {"engines": [asdict(e) for e in report.tensorrt or ()]}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--out", type=Path, required=True, help="the report's folder: new or empty")
    p.add_argument(
        "--work",
        type=Path,
        help="where the training runs and the exported repository go: new or empty "
        "(default: --out); keep it off a folder that is copied back",
    )
    p.add_argument(
        "--dataset",
        choices=DATASETS,
        help="for the real run (default: imagefolder on CUDA, digits on the CPU)",
    )
    p.add_argument("--data-dir", help="the data set's archive or folder (CIFAR-10 JPEG archive)")
    p.add_argument("--epochs", type=int, help="of the real run (default 10 on CUDA, 2 on CPU)")
    p.add_argument("--width", type=float, help="ResNet-18 width (default 1.0 CUDA, 0.125 CPU)")
    p.add_argument("--repeats", type=int, help="interleaved repeats of each timing")
    p.add_argument("--serve-seconds", type=float, help="per concurrency, at least 0.5")
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off"],
        default="auto",
        help="time torch.compile too (auto: on CUDA)",
    )
    args = p.parse_args(argv)
    for name in ("epochs", "repeats"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    if args.width is not None and not 0 < args.width <= 16:
        p.error("--width must be a number in (0, 16]")
    if args.serve_seconds is not None and not 0.5 <= args.serve_seconds <= 600:
        p.error("--serve-seconds must be a number of seconds in [0.5, 600]")
    dataset = args.dataset or ("imagefolder" if args.device == "cuda" else "digits")
    if dataset in EMBEDDED and args.data_dir is not None:
        p.error(f"--dataset {dataset} is embedded: it takes no --data-dir")
    if dataset not in EMBEDDED and args.data_dir is None:
        p.error(f"--dataset {dataset} needs --data-dir")
    if args.data_dir is not None and not Path(args.data_dir).exists():
        p.error(f"--data-dir {args.data_dir} does not exist")
    for flag, folder in (("--out", args.out), ("--work", args.work)):
        if folder is None:
            continue
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            p.error(f"{flag} {folder} is not an empty folder: give a new one (nothing is reused)")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            p.error(f"{flag} {folder}: cannot make it ({exc.strerror or exc})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = Plan.for_device(args)
    out: Path = args.out
    work: Path = args.work or out
    started, clock = datetime.now(timezone.utc), time.perf_counter()
    torch.manual_seed(SEED)
    steps: dict[str, Step] = {}
    report: dict[str, Any] = {
        "command": shlex.join([sys.executable, *sys.argv]) if argv is None else shlex.join(argv),
        "started": started.isoformat(timespec="seconds"),
        "settings": asdict(plan),
        "seed": SEED,
        "plots": [],
        "finished": False,
    }

    def publish() -> None:
        """The report as it stands: rewritten after every step, so a run cut short (a
        machine's time limit) still leaves every finished step on record."""
        machine = steps["machine"].result
        gpu = machine.get("gpu", {}).get("name", "none")
        report.update(
            seconds=round(time.perf_counter() - clock, 1),
            machine=machine,
            steps={name: asdict(s) for name, s in steps.items()},
            goals=[asdict(g) for g in goals(plan.device, plan.width, gpu, steps)],
        )
        write_json(out / "gpu_evidence.json", report)
        write_text(out / "gpu_evidence.md", markdown(report, steps))

    def add(name: str, title: str, run: Callable[[], dict[str, Any]]) -> Step:
        steps[name] = run_step(name, title, run)
        publish()
        return steps[name]

    add("machine", "the machine", machine_info)
    add("train_speed", "training throughput, standard vs defective", lambda: train_speed(plan))
    trained = add(
        "train_run", "a short real training run of both", lambda: train_run(plan, work / "train")
    )
    exported = add(
        "export",
        "export of both (with the CPU parity check)",
        lambda: export_both(plan, trained, work / "repo"),
    )
    add(
        "gpu_parity",
        "parity, ONNX Runtime CUDA vs PyTorch CUDA",
        lambda: gpu_parity(plan, trained, exported),
    )
    in_process = add(
        "ort_throughput",
        "in-process ONNX Runtime throughput by batch",
        lambda: ort_throughput(plan, exported),
    )
    add(
        "serve",
        "defcnn serve under closed-loop clients",
        lambda: serve(plan, exported, in_process, work / "repo", out / "serve.log"),
    )
    add("tensorrt", "TensorRT engines", lambda: tensorrt_engines(plan, trained, work / "trt"))
    report["plots"] = plots(steps, out, plan.device)
    report["finished"] = True
    publish()

    failed = [s.name for s in steps.values() if s.status == "failed"]
    skipped = [s.name for s in steps.values() if s.status == "skipped"]
    print(
        f"wrote {out / 'gpu_evidence.md'}; ran {len(steps) - len(failed) - len(skipped)}, "
        f"skipped {skipped or 'none'}, failed {failed or 'none'}"
    )
    # Asked for CUDA, a run whose GPU steps were skipped measured nothing it was asked for:
    # it says so and fails (TensorRT alone is optional).
    missing = [n for n in skipped if n != "tensorrt"] if plan.device == "cuda" else []
    if missing:
        print(f"--device cuda, but no GPU figures for: {', '.join(missing)}", file=sys.stderr)
    return 1 if failed or missing else 0


if __name__ == "__main__":
    sys.exit(main())
