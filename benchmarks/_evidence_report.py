"""The GPU evidence report: the step record, the goals judged, plots and the markdown."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from defcnn.atomic import atomic_write


@dataclass
class Step:
    """One step's outcome: ran, skipped (with why) or failed (with the error)."""

    name: str
    title: str
    status: str = "skipped"
    reason: str | None = None
    seconds: float = 0.0
    result: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Goal:
    """One of issue 15's goals with what was measured against it."""

    goal: str
    measured: str
    verdict: str  # met / not met / not measured (why)


PENDING = Step("pending", "not run yet", reason="the run has not reached it")


def goals(device: str, width: float, gpu: str, steps: dict[str, Step]) -> list[Goal]:
    """Issue 15's goals, judged only where they were set: on a CUDA run (the epoch goal at
    full width on an H200); elsewhere each says why it was not judged."""
    out: list[Goal] = []

    def judge(ok: bool, *, h200: bool = False) -> str:
        if device != "cuda":
            return "not measured on a GPU (--device cpu)"
        if h200 and "H200" not in gpu:
            return f"not judged: the goal is for an H200, this GPU is {gpu}"
        return "met" if ok else "not met"

    speed = steps.get("train_speed", PENDING)
    if speed.status == "ran":
        rows = speed.result["rows"]
        best = speed.result["fastest_standard"]
        epoch = rows[best]["seconds_per_cifar10_epoch"]
        verdict = judge(epoch <= 5, h200=True)
        if width != 1.0 and device == "cuda":
            verdict = f"not judged: width {width}, the goal is at full width (1.0)"
        out.append(
            Goal(
                "ResNet-18 CIFAR-10 epoch at full width (SGD steps on a batch already on "
                "the device) <= 5 s on an H200",
                f"{epoch:.2f} s ({best}, width {width})",
                verdict,
            )
        )
        mode = best.split()[-1]
        ratio = speed.result["time_ratio_defective_over_standard"].get(mode)
        if ratio is not None:
            out.append(
                Goal(
                    "defective/standard training time <= 1.05",
                    f"{ratio:.3f} ({mode})",
                    judge(ratio <= 1.05),
                )
            )
    else:
        out.append(Goal("training time goals", "-", f"not measured: {speed.reason}"))
    served = steps.get("serve", PENDING)
    if served.status == "ran":
        r = served.result
        c64, c1 = r["points"].get(64), r["points"].get(1)
        best = r["in_process_best"]
        if c64:
            share = c64["images_per_second"] / best["images_per_second"]
            out.append(
                Goal(
                    "served at concurrency 64 >= 0.8x in-process at its best batch",
                    f"{share:.2f}x ({c64['images_per_second']:.0f} vs "
                    f"{best['images_per_second']:.0f} img/s at batch {best['batch']})",
                    judge(share >= 0.8),
                )
            )
        if c1:
            bound = r["in_process_batch1"]["latency_ms"] + 1
            out.append(
                Goal(
                    "concurrency 1: p50 <= in-process batch-1 latency + 1 ms",
                    f"p50 {c1['p50_ms']:.2f} ms, bound {bound:.2f} ms",
                    judge(c1["p50_ms"] <= bound),
                )
            )
    else:
        out.append(Goal("serving goals", "-", f"not measured: {served.reason}"))
    ort_step = steps.get("ort_throughput", PENDING)
    if ort_step.status == "ran":
        costs = ort_step.result["latency_ratio_defective_over_standard"]
        worst = max(costs.values())
        shown = ", ".join(f"b{b} {v:.3f}" for b, v in costs.items())
        out.append(
            Goal(
                "mask cost on the GPU (defective/standard latency, ONNX Runtime) <= 1.03",
                shown,
                judge(worst <= 1.03),
            )
        )
    else:
        out.append(Goal("mask cost goal", "-", f"not measured: {ort_step.reason}"))
    return out


def save_figure(fig: Any, path: Path) -> None:
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)


def plots(steps: dict[str, Step], out: Path, device: str) -> list[str]:
    """Small figures for the steps that ran; returns their file names."""
    made = []
    if steps.get("train_speed", PENDING).status == "ran":
        rows = steps.get("train_speed", PENDING).result["rows"]
        fig, ax = plt.subplots(figsize=(5.5, 3))
        ax.barh(list(rows), [r["seconds_per_cifar10_epoch"] for r in rows.values()])
        ax.set_xlabel("seconds per CIFAR-10 epoch (50,000 images)")
        ax.set_title(f"training throughput on {device} (median of repeats)")
        fig.tight_layout()
        save_figure(fig, out / "train_speed.png")
        made.append("train_speed.png")
    if steps.get("train_run", PENDING).status == "ran":
        fig, ax = plt.subplots(figsize=(5.5, 3))
        for kind, run in steps.get("train_run", PENDING).result.items():
            epochs = run["epochs"]
            ax.plot(
                [e["epoch"] for e in epochs], [e["test_accuracy"] for e in epochs], "o-", label=kind
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("test accuracy")
        ax.legend()
        ax.set_title(f"test accuracy per epoch, trained on {device}")
        fig.tight_layout()
        save_figure(fig, out / "train_accuracy.png")
        made.append("train_accuracy.png")
    if steps.get("ort_throughput", PENDING).status == "ran":
        result = steps.get("ort_throughput", PENDING).result
        fig, ax = plt.subplots(figsize=(5.5, 3))
        for kind in ("standard", "defective"):
            rows = [r for r in result["rows"] if r["model"] == kind]
            ax.plot(
                [r["batch"] for r in rows], [r["images_per_second"] for r in rows], "o-", label=kind
            )
        if steps.get("serve", PENDING).status == "ran":
            points = steps.get("serve", PENDING).result["points"]
            ax.plot(
                list(points),
                [p["images_per_second"] for p in points.values()],
                "s--",
                label="served, defective (x: concurrency)",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (in process) / concurrency (served)")
        ax.set_ylabel("images/s")
        ax.set_title(f"ONNX Runtime on {device}, {result['provider']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        save_figure(fig, out / "onnxruntime_and_serving.png")
        made.append("onnxruntime_and_serving.png")
    return made


def _range(row: dict[str, Any]) -> str:
    low, high = row["images_per_second_range"]
    return f"[{low:.0f}, {high:.0f}]"


def markdown(report: dict[str, Any], steps: dict[str, Step]) -> str:
    m = report["machine"]
    gpu = m.get("gpu", {}).get("name", "none")
    device = report["settings"]["device"]
    lines = [
        f"# GPU evidence (device: {device})",
        "",
        *(
            ["**A CPU rehearsal of the same code: no figure here is a GPU figure.**", ""]
            if device != "cuda"
            else []
        ),
        *(
            []
            if report.get("finished")
            else ["**Cut short or still running: only the steps listed below finished.**", ""]
        ),
        f"Command: `{report['command']}`  ",
        f"Started {report['started']}, {report['seconds']:.0f} s in all; seed {report['seed']}.  ",
        f"Machine: {m['cpu']}; GPU: {gpu}; nvidia-smi: {m['nvidia_smi']}; "
        f"torch CUDA {m['torch_cuda']}; cuDNN {m.get('cudnn')}.  ",
        "Imported: " + ", ".join(f"{k} {v}" for k, v in m["imported"].items()) + ".  ",
        "Installed: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".  ",
        "ONNX Runtime providers: " + ", ".join(m["onnxruntime_providers"]) + ".",
        "",
        "| step | outcome | seconds |",
        "| --- | --- | ---: |",
    ]
    for s in steps.values():
        outcome = s.status if s.reason is None else f"{s.status}: {s.reason}"
        lines.append(f"| {s.title} | {outcome} | {s.seconds:.1f} |")
    lines += ["", "## Goals", "", "| goal | measured | verdict |", "| --- | --- | --- |"]
    lines += [f"| {g['goal']} | {g['measured']} | {g['verdict']} |" for g in report["goals"]]
    speed = steps.get("train_speed", PENDING)
    if speed.status == "ran":
        r = speed.result
        lines += [
            "",
            f"## Training throughput (width {r['width']}, batch {r['batch_size']}, "
            f"bf16 {r['bf16_autocast']}, channels_last {r['channels_last']}, medians of "
            f"{r['repeats']} repeats of {r['steps_per_repeat']} steps)",
            "",
            "| variant | images/s [range over repeats] | s per CIFAR-10 epoch |",
            "| --- | ---: | ---: |",
        ]
        lines += [
            f"| {n} | {v['images_per_second']:.0f} {_range(v)} | "
            f"{v['seconds_per_cifar10_epoch']:.2f} |"
            for n, v in r["rows"].items()
        ]
        lines.append("")
        lines += [
            f"Defective/standard time, {mode}: {v:.3f}."
            for mode, v in r["time_ratio_defective_over_standard"].items()
        ]
        if r["compile_seconds"] or r["compile_errors"]:
            took = ", ".join(f"{k} {v:.1f} s" for k, v in r["compile_seconds"].items())
            failed = "; ".join(f"{k}: {v}" for k, v in r["compile_errors"].items())
            lines.append(
                f"torch.compile, first step (compiling): {took or 'none compiled'}; "
                f"compile errors: {failed or 'none'}."
            )
    run = steps.get("train_run", PENDING)
    if run.status == "ran":
        first = next(iter(run.result.values()))["config"]
        lines += [
            "",
            f"## Training run ({first['dataset']}, epochs: {first['epochs']}, fast "
            f"schedule, batch {first['batch_size']}, lr {first['lr']:g}, width "
            f"{first['width']})",
            "",
            "| model | epoch | test accuracy [95% Wilson] | train img/s |",
            "| --- | ---: | ---: | ---: |",
        ]
        for kind, r in run.result.items():
            lines += [
                f"| {kind} | {e['epoch']} | {e['test_accuracy']:.4f} "
                f"[{e['test_accuracy_95'][0]:.4f}, {e['test_accuracy_95'][1]:.4f}] | "
                f"{e['train_images_per_second']:.0f} |"
                for e in r["epochs"]
            ]
        lines.append("")
        lines += [
            f"{k}: {r['seconds']:.0f} s in all (data loading and evaluation included)."
            for k, r in run.result.items()
        ]
    parity = steps.get("gpu_parity", PENDING)
    if parity.status == "ran":
        lines += [
            "",
            "## Parity, ONNX Runtime CUDA vs PyTorch CUDA (FP32, TF32 off)",
            "",
            "| model | case | max abs diff | argmax |",
            "| --- | --- | ---: | --- |",
        ]
        for kind, cases in parity.result["cases"].items():
            lines += [
                f"| {kind} | {c['case']} | {c['max_abs_diff']:.2e} | "
                f"{'identical' if c['argmax_identical'] else 'differs'} |"
                for c in cases
            ]
    ort_step = steps.get("ort_throughput", PENDING)
    if ort_step.status == "ran":
        r = ort_step.result
        lines += [
            "",
            f"## In-process ONNX Runtime ({r['provider']}, medians of {r['repeats']} repeats)",
            "",
            "| model | batch | images/s [range over repeats] | latency ms |",
            "| --- | ---: | ---: | ---: |",
        ]
        lines += [
            f"| {x['model']} | {x['batch']} | {x['images_per_second']:.0f} {_range(x)} | "
            f"{x['latency_ms']:.3f} |"
            for x in r["rows"]
        ]
    served = steps.get("serve", PENDING)
    if served.status == "ran":
        r = served.result
        lines += [
            "",
            f"## Served (`defcnn serve --device {report['settings']['device']}`, "
            f"defective, one image per request, one run of {r['seconds_per_point']:g} s per "
            "point: no spread over repeats)",
            "",
            "| concurrency | images/s | p50 ms | p99 ms | in server ms | queued ms |",
            "| ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for c, p in r["points"].items():
            sp = p["split"]
            lines.append(
                f"| {c} | {p['images_per_second']:.0f} | {p['p50_ms']:.2f} | "
                f"{p['p99_ms']:.2f} | {sp['server_ms']:.2f} | {sp['queued_ms']:.2f} |"
            )
        lines += [
            "",
            f"Answers checked: {r['answers_checked']}, wrong: {r['wrong_answers']} "
            f"(relative bound {r['answer_rtol']:g}, argmax equal).",
        ]
    lines += ["", *[f"![{p}]({p})" for p in report["plots"]], ""]
    return "\n".join(lines)
