"""The `defcnn` command: one entry point, a subcommand per pipeline stage.

Subcommands import their stage lazily, so `defcnn --help` is fast and a stage's heavy
dependencies (torch above all) load only when it runs. Errors raised on purpose
(`DefcnnError`) become a one-line message and an exit code: 2 for bad settings, 1 for bad
data or checkpoints, and 1 for the file system refusing a read or write (an unwritable
report or checkpoint folder, a full disk).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from defcnn.errors import ConfigError, DefcnnError
from defcnn.names import ARCH_NAMES, DATASETS, SCHEDULES

if TYPE_CHECKING:
    from defcnn.demo.pipeline import DemoSettings

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


def _shown(value: object) -> str:
    """A default as a user would type it: lists space-separated, not as Python reprs."""
    if isinstance(value, list | tuple):
        return " ".join(str(v) for v in value)
    return str(value)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's default in its help, except where there is none to show: a default of
    None (the help says what happens then), a bare flag's False, an empty list."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        help_text = action.help or ""
        default = action.default
        if (default is None or default is False or default == [] or "%(default)" in help_text
                or default is argparse.SUPPRESS or not action.option_strings):  # fmt: skip
            return action.help
        return f"{help_text} (default: {_shown(default).replace('%', '%%')})"


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose help shows defaults; its subparsers are _Parsers too."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def _version() -> str:
    from defcnn.versions import versions

    return versions().get("defcnn", "unknown (not installed)")


def _keep_prob(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"keep probability must be in (0, 1], got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535 (0: any free one), got {text}")
    return value


def _port_or_off(text: str) -> int:
    return -1 if text.strip() == "-1" else _port(text)


def _add_data_args(p: argparse.ArgumentParser, default: str = "digits") -> None:
    p.add_argument("--dataset", choices=DATASETS, default=default,
                   help=f"data set (default {default}; digits and cifar10-subset are "
                   "embedded)")  # fmt: skip
    p.add_argument(
        "--data-dir", help="cifar10: folder of the python batches; imagefolder: tree or .tar(.gz)"
    )
    p.add_argument("--image-size", type=int, help="resize images to this side (default: native)")
    p.add_argument(
        "--download", action="store_true", help="cifar10: fetch from the official source"
    )


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a standard or defective CNN")
    p.add_argument("--arch", choices=ARCH_NAMES, default="resnet18", help="architecture")
    p.add_argument("--width", type=_positive_float, default=1.0, help="channel multiplier")
    p.add_argument("--defective", action="store_true", help="insert defective masks")
    p.add_argument("--keep-prob", type=_keep_prob, default=0.1,
                   help="defective masks: fraction of neurons kept (the paper's)")  # fmt: skip
    p.add_argument("--stages", nargs="+", help="defective stages (default: the paper's)")
    p.add_argument("--shared-mask", action="store_true", help="one spatial mask per layer")
    p.add_argument("--mask-seed", type=int, help="seed of the masks (default: --seed)")
    _add_data_args(p)
    p.add_argument("--epochs", type=int, default=350, help="passes over the training split")
    p.add_argument("--batch-size", type=int, help="default: 128 (paper); digits: 32")
    p.add_argument("--lr", type=_positive_float, help="default: 0.1 x batch / 128")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="L2 weight decay")
    p.add_argument(
        "--schedule", choices=SCHEDULES, help="default: paper for >= 100 epochs, else fast"
    )
    p.add_argument("--crop-pad", type=int, help="random-crop padding (default 4; digits: 2)")
    p.add_argument("--no-flip", action="store_true", help="no flips (digits never flip)")
    p.add_argument("--seed", type=int, default=0, help="fixes masks, init and data order")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--checkpoint-seconds", type=_positive_float, default=300.0,
                   help="save checkpoint-last this often")  # fmt: skip
    p.add_argument("--max-steps", type=int, help="stop after this many steps (smoke tests)")
    p.add_argument("--stop-at-accuracy", type=_positive_float, metavar="ACC",
                   help="stop once test accuracy reaches ACC (0-1): an accuracy-matched "
                   "control")  # fmt: skip
    p.add_argument(
        "--eval-every",
        type=int,
        metavar="STEPS",
        help="with --stop-at-accuracy: check every STEPS steps (default 1/4 epoch)",
    )
    p.add_argument("--stop-within", type=_positive_float, metavar="TOL",
                   help="with --stop-at-accuracy: stop at the first check within TOL of ACC, "
                   "on either side, checking 8x as often once within 0.05 of ACC (default: "
                   "the first check at or past ACC)")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_train)


def _cmd_train(args: argparse.Namespace) -> int:
    from defcnn.training import TrainConfig, train
    from defcnn.training.config import FROM_PRESET

    schedule = args.schedule or ("paper" if args.epochs >= 100 else "fast")
    cfg = TrainConfig(
        arch=args.arch, width=args.width, defective=args.defective, keep_prob=args.keep_prob,
        stages=tuple(args.stages) if args.stages else None, shared_mask=args.shared_mask,
        mask_seed=args.mask_seed, dataset=args.dataset, data_dir=args.data_dir,
        image_size=args.image_size, download=args.download, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, momentum=args.momentum,
        weight_decay=args.weight_decay, schedule=schedule, crop_pad=args.crop_pad,
        flip=False if args.no_flip else FROM_PRESET, seed=args.seed, device=args.device,
        amp=not args.no_amp, out=args.out, checkpoint_seconds=args.checkpoint_seconds,
        max_steps=args.max_steps, stop_at_accuracy=args.stop_at_accuracy,
        eval_every=args.eval_every, stop_within=args.stop_within,
    )  # fmt: skip
    metrics = train(cfg, resume=args.resume, progress=not args.quiet)
    print(json.dumps(metrics, indent=2))
    return EXIT_OK


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="accuracy of checkpoints on a test split, clean or corrupted"
    )
    p.add_argument("checkpoint", nargs="+", help="one or more checkpoints (compared side by side)")
    _add_data_args(p)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    p.add_argument("--batch-size", type=int, default=512, help="images per forward pass")
    p.add_argument(
        "--patch-shuffle", type=int, nargs="*", metavar="K",
        help="also shuffle KxK grids of patches (shape-vs-texture probe; bare flag: 2 4 8)",
    )  # fmt: skip
    p.add_argument(
        "--noise", type=float, nargs="*", metavar="SIGMA",
        help="also add Gaussian noise of these sigmas, in [0,1] pixels (bare flag: 0.05 0.1)",
    )  # fmt: skip
    p.add_argument("--num-images", type=int, help="evaluate on a seeded subset of the test split")
    p.add_argument("--seed", type=int, default=0, help="seed of the subset and corruptions")
    p.add_argument("--out", help="write the results here as JSON (and a .md table beside it)")
    p.set_defaults(func=_cmd_evaluate)


def _run_name(path: str, taken: set[str]) -> str:
    """A checkpoint's short name: its run folder for .../model.safetensors, else its stem."""
    p = Path(path)
    name = p.parent.name if p.stem in ("model", "checkpoint-last") and p.parent.name else p.stem
    base, i = name, 2
    while name in taken:
        name, i = f"{base}-{i}", i + 1
    taken.add(name)
    return name


def _cmd_evaluate(args: argparse.Namespace) -> int:
    from defcnn.atomic import write_json
    from defcnn.checkpoint import load_model
    from defcnn.data import load_dataset
    from defcnn.digest import sha256_file
    from defcnn.robustness import EvaluationResult, evaluate_corruptions
    from defcnn.sampling import seeded_subset
    from defcnn.training.distributed import pick_device

    if args.out:  # fail before the work, not after it
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    device = pick_device(args.device)
    taken: set[str] = set()
    loaded = {_run_name(p, taken): load_model(p, device) for p in args.checkpoint}
    sizes = {ckpt.spec.resolved_input_size for _, ckpt in loaded.values()}
    if len(sizes) > 1 and not args.image_size:
        raise ConfigError(f"the checkpoints take different input sizes {sorted(sizes)}")
    data = load_dataset(
        args.dataset, args.data_dir, image_size=args.image_size or sizes.pop(),
        download=args.download,
    )  # fmt: skip
    for name, (_, ckpt) in loaded.items():
        if ckpt.classes and list(data.classes) != ckpt.classes:
            raise ConfigError(
                f"{name}: the checkpoint's classes {ckpt.classes} differ from the data set's "
                f"{list(data.classes)}"
            )
    x, y = data.test_x, data.test_y
    if args.num_images is not None:
        idx = seeded_subset(len(y), args.num_images, args.seed, what="--num-images")
        x, y = x[idx], y[idx]
    grids = [] if args.patch_shuffle is None else (args.patch_shuffle or [2, 4, 8])
    sigmas = [] if args.noise is None else (args.noise or [0.05, 0.1])
    rows = evaluate_corruptions(
        {name: model for name, (model, _) in loaded.items()}, x, y, grids=grids,
        sigmas=sigmas, seed=args.seed, device=device, batch_size=args.batch_size,
    )  # fmt: skip
    result = EvaluationResult(
        dataset=data.source, images=len(y), seed=args.seed,
        checkpoints=dict(zip(loaded, args.checkpoint, strict=True)), rows=tuple(rows),
        checkpoint_sha256={name: sha256_file(path)
                           for name, path in zip(loaded, args.checkpoint, strict=True)},
    )  # fmt: skip
    table = result.table()
    if args.out:
        write_json(Path(args.out), result.to_dict())
        Path(args.out).with_suffix(".md").write_text(table + "\n")
    print(table)
    return EXIT_OK


def _export_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="checkpoint -> verified ONNX in a Triton model repository")
    p.add_argument("checkpoint", help="model.safetensors written by defcnn train")
    p.add_argument("--repo", required=True, help="model repository folder")
    p.add_argument("--name", required=True, help="model name (a folder in the repository)")
    p.add_argument("--version", type=int, help="default: one past the newest")
    p.add_argument("--max-batch-size", type=int, default=64, help="largest batch served")
    p.add_argument(
        "--max-queue-delay-us", type=int, default=0, help="dynamic batching wait (microseconds)"
    )
    p.add_argument("--tensorrt", action="store_true", help="also build TensorRT engines (GPU)")
    p.add_argument("--fp16", action="store_true", help="with --tensorrt: also an FP16 engine")
    p.add_argument("--dataset", choices=DATASETS, help="real inputs for parity (default: ckpt's)")
    p.add_argument("--data-dir", help="folder of --dataset, if it needs one")
    p.set_defaults(func=_cmd_export)


def _cmd_export(args: argparse.Namespace) -> int:
    from defcnn.export.exporter import ExportSettings, export, summary

    settings = ExportSettings(
        checkpoint=args.checkpoint, repo=args.repo, name=args.name, version=args.version,
        max_batch_size=args.max_batch_size, max_queue_delay_us=args.max_queue_delay_us,
        tensorrt=args.tensorrt, fp16=args.fp16,
        dataset=args.dataset, data_dir=args.data_dir,
    )  # fmt: skip
    print(summary(export(settings)))
    return EXIT_OK


def _serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve a model repository over KServe v2 gRPC")
    p.add_argument("--model-repo", required=True, help="repository written by defcnn export")
    p.add_argument("--host", default="127.0.0.1", help="bind address (loopback: local only)")
    p.add_argument("--port", type=_port, default=8001, help="gRPC port (0: any free port)")
    p.add_argument("--metrics-port", type=_port_or_off, default=8002,
                   help="Prometheus port (0: any free port, -1: off)")  # fmt: skip
    p.add_argument(
        "--metrics-host", default="127.0.0.1",
        help="bind address of the metrics endpoint (loopback unless asked: it needs the "
        "token too when --auth-token-file is set)",
    )  # fmt: skip
    p.add_argument("--backend", choices=("onnxruntime", "tensorrt"), default="onnxruntime",
                   help="inference runtime")  # fmt: skip
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="where models run (auto: CUDA when available)")  # fmt: skip
    p.add_argument("--max-batch-size", type=int, help="default: each model's config.pbtxt")
    p.add_argument("--max-queue-delay-us", type=int, help="default: each model's config.pbtxt")
    p.add_argument("--max-queue-size", type=int, default=1024, help="requests per model version")
    p.add_argument("--max-message-mb", type=int, default=64, help="gRPC message size limit")
    p.add_argument(
        "--max-inflight-mb", type=int, default=256,
        help="request bytes held at once, over every caller: a call reserves "
        "--max-message-mb before its body is read (never less than 4 messages' worth)",
    )  # fmt: skip
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="ONNX Runtime intra-op threads (0: its own default, one per core)",
    )
    p.add_argument(
        "--ort-spinning", choices=("on", "off"), default="on",
        help="ONNX Runtime's idle intra-op threads spin (faster alone) or sleep (leave the "
        "cores to gRPC); docs/benchmarks.md has both measured",
    )  # fmt: skip
    p.add_argument("--auth-token-file", help="require this bearer token (or $DEFCNN_AUTH_TOKEN)")
    p.add_argument("--tls-cert", help="server certificate (PEM); serves TLS with --tls-key")
    p.add_argument("--tls-key", help="private key of --tls-cert (PEM)")
    p.add_argument("--tls-ca", help="require client certificates signed by this CA (mTLS)")
    p.add_argument("--grace-seconds", type=float, default=10.0, help="drain time on SIGTERM")
    p.add_argument(
        "--drain-quiet-seconds", type=float, default=0.25,
        help="while draining, keep refusing with UNAVAILABLE until no call has arrived for "
        "this long, then close the port",
    )  # fmt: skip
    p.add_argument(
        "--ready-file", metavar="PATH",
        help="once serving, write JSON here (host, port, metrics_port, pid, models with "
        "readiness); its folder must exist; removed on shutdown",
    )  # fmt: skip
    p.add_argument("--log-level", type=str.lower, choices=LOG_LEVELS, default="info",
                   help="least severe log level written (any case)")  # fmt: skip
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args: argparse.Namespace) -> int:
    import asyncio

    from defcnn.server.app import ServerSettings, configure_logging, serve
    from defcnn.server.repository import ServingOptions

    for name in ("max_batch_size", "max_queue_size", "max_message_mb", "max_inflight_mb"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    for name, most in (("threads", 1024), ("max_queue_delay_us", 60_000_000),
                       ("max_message_mb", 2047)):  # fmt: skip
        value = getattr(args, name)
        if value is not None and not 0 <= value <= most:
            raise ConfigError(f"--{name.replace('_', '-')} must be 0 to {most}, got {value}")
    for name in ("grace_seconds", "drain_quiet_seconds"):
        value = getattr(args, name)
        if not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number >= 0")
    for name in ("host", "metrics_host"):
        if not getattr(args, name).strip():
            raise ConfigError(f"--{name.replace('_', '-')} is empty (0.0.0.0: every interface)")
    configure_logging(args.log_level)
    settings = ServerSettings(
        model_repo=args.model_repo, host=args.host, port=args.port,
        metrics_port=None if args.metrics_port < 0 else args.metrics_port,
        metrics_host=args.metrics_host, max_inflight_mb=args.max_inflight_mb,
        serving=ServingOptions(
            backend=args.backend, device=args.device, max_batch_size=args.max_batch_size,
            max_queue_delay_us=args.max_queue_delay_us, max_queue_size=args.max_queue_size,
            threads=args.threads, spinning=args.ort_spinning == "on",
        ),
        auth_token_file=args.auth_token_file, tls_cert=args.tls_cert, tls_key=args.tls_key,
        tls_ca=args.tls_ca, max_message_mb=args.max_message_mb, grace_s=args.grace_seconds,
        drain_quiet_s=args.drain_quiet_seconds, ready_file=args.ready_file,
    )  # fmt: skip
    return asyncio.run(serve(settings))


# The attack settings' defaults, for the help text (defcnn.attack.settings.DEFAULTS applies
# them; a unit test keeps the two equal). Argparse defaults stay None, so that a value from
# --config can tell itself apart from one on the command line.
_ATTACK_DEFAULTS: dict[str, object] = {
    "dataset": "digits", "num-images": 100, "seed": 0, "timeout": 60.0, "batch-size": 64,
    "budget": 1000, "eps-transfer": (16.0,), "eps-query": 16.0,
}  # fmt: skip
_TRANSFER_ATTACKS = ("fgsm", "pgd", "mifgsm", "difgsm", "cwl2")
_QUERY_ATTACKS_HELP = ("square, simba (need scores); hopskipjump, boundary, geoda, signopt "
                       "(decision-based: labels suffice)")  # fmt: skip


def _attack_default(name: str) -> str:
    """The "(default: ...)" of an attack option."""
    return f"(default: {_shown(_ATTACK_DEFAULTS[name])})"


def _attack_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--url", help="HOST:PORT, grpc(s)://HOST:PORT or http(s)://HOST:PORT")
    p.add_argument("--model", action="append", help="endpoint model (repeat for several)")
    p.add_argument("--dataset", help=f"{', '.join(DATASETS)} {_attack_default('dataset')}")
    p.add_argument("--data-dir", help="folder of --dataset, if it needs one")
    p.add_argument(
        "--num-images",
        type=int,
        help=f"images of a seeded test subset {_attack_default('num-images')}",
    )
    p.add_argument("--seed", type=int, help=f"seed of subset and attacks {_attack_default('seed')}")
    p.add_argument(
        "--label-map",
        metavar="FILE",
        help="JSON list or object: data set class (index or name) -> endpoint index",
    )
    p.add_argument("--out", help="report folder (a rerun with the same settings resumes)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a different earlier run in --out (its files only)",
    )
    p.add_argument(
        "--config",
        metavar="FILE.json",
        help='the same settings as JSON, keys named as the flags ("num-images"); flags win',
    )
    p.add_argument("--token-file", help="bearer token file (first line)")
    p.add_argument("--tls-ca", help="CA certificate to verify the server (implies TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", help="private key of --tls-cert")
    p.add_argument("--timeout", type=float, help=f"seconds per RPC {_attack_default('timeout')}")
    spec = p.add_argument_group("endpoint spec", "what the endpoint's metadata does not say "
                                "(default: read from it)")  # fmt: skip
    spec.add_argument("--layout", help="input layout: NCHW or NHWC")
    spec.add_argument(
        "--input-range",
        metavar="LO,HI",
        help="the values sent for pixel 0 and pixel 1 (e.g. 0,255)",
    )
    spec.add_argument("--mean", metavar="A,B,C", help="per-channel mean subtracted after scaling")
    spec.add_argument("--std", metavar="A,B,C", help="per-channel std divided by after scaling")
    spec.add_argument("--output", metavar="NAME", help="output tensor to read")
    spec.add_argument("--output-kind", help="logits, probabilities or label")
    spec.add_argument("--num-classes", type=int, help="classes of a label-only endpoint")
    spec.add_argument("--max-batch-size", type=int,
                      help="images per request (default: the endpoint's config, else 64 when "
                      "its metadata allows any batch); changes speed, never results")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _attack_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attack", help="attack an endpoint: transfer or query-based")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    t = kinds.add_parser("transfer", help="craft on local surrogates, send to the endpoint")
    _attack_common(t)
    t.add_argument("--surrogate", action="append", help="surrogate checkpoint (repeat: ensemble)")
    t.add_argument(
        "--attack",
        nargs="+",
        metavar="ATTACK",
        help=f"white-box attacks run on the surrogates: {', '.join(_TRANSFER_ATTACKS)}",
    )
    t.add_argument(
        "--eps",
        type=float,
        nargs="+",
        help=f"L-inf budgets in (0, 255], 1/255 units {_attack_default('eps-transfer')}",
    )
    t.add_argument(
        "--steps", type=int, help="iterations of pgd, mifgsm, difgsm (default: the paper's, 20)"
    )
    t.add_argument(
        "--step",
        type=float,
        help="their step size in 1/255 units, at most eps (default: the paper's, 1)",
    )
    t.add_argument(
        "--batch-size", type=int, help=f"images crafted at once {_attack_default('batch-size')}"
    )
    t.set_defaults(func=_cmd_attack)
    q = kinds.add_parser("query", help="query-based black-box attack through the endpoint")
    _attack_common(q)
    q.add_argument("--attack", help=f"black-box attack: {_QUERY_ATTACKS_HELP}")
    q.add_argument("--budget", type=int, help=f"queries per image {_attack_default('budget')}")
    q.add_argument("--eps", type=float,
                   help=f"L-inf budget in (0, 255], 1/255 units, for the L-inf attacks "
                   f"{_attack_default('eps-query')}")  # fmt: skip
    q.set_defaults(func=_cmd_attack)


def _cmd_attack(args: argparse.Namespace) -> int:
    from defcnn.attack.harness import run_query, run_transfer
    from defcnn.attack.settings import TransferSettings, settings_from

    settings = settings_from(args.kind, vars(args), args.config)
    if isinstance(settings, TransferSettings):
        for row in run_transfer(settings, progress=not args.quiet).rows:
            print(row.line())
    else:
        results = run_query(settings, progress=not args.quiet)
        for model in results.models:
            print(results.line(model))
    print(f"report: {Path(settings.out) / 'report.md'}")
    return EXIT_OK


def _classify_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="classify image files with a running defcnn server")
    p.add_argument(
        "paths",
        nargs="+",
        metavar="PATH",
        help="image files (png, jpg, jpeg, bmp, gif, webp) or folders",
    )
    p.add_argument("--url", required=True, help="HOST:PORT, grpc://HOST:PORT or grpcs://...")
    p.add_argument("--model", required=True, help="model name in the server's repository")
    p.add_argument("--top-k", type=int, default=1, help="classes to print per image")
    p.add_argument("--token-file", help="bearer token file (first line)")
    p.add_argument("--tls-ca", help="CA certificate to verify the server (implies TLS)")
    p.add_argument("--tls-cert", help="client certificate for mutual TLS (with --tls-key)")
    p.add_argument("--tls-key", help="private key of --tls-cert")
    p.add_argument("--timeout", type=_positive_float, default=30.0, help="seconds per RPC")
    p.set_defaults(func=_cmd_classify)


def _cmd_classify(args: argparse.Namespace) -> int:
    import numpy as np

    from defcnn.client import InferenceClient
    from defcnn.images import find_images, load_images
    from defcnn.tokens import read_token_file

    if args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    token = read_token_file(args.token_file) if args.token_file else None
    paths = find_images(args.paths)
    with InferenceClient(
        args.url, token=token, tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key,
        timeout=args.timeout,
    ) as client:  # fmt: skip
        info = client.info(args.model)
        _, height, width = info.input_shape
        probabilities = client.probabilities(args.model, load_images(paths, height, width))
    k = min(args.top_k, info.num_classes)
    for path, row in zip(paths, probabilities, strict=True):
        top = np.argsort(-row, kind="stable")[:k]
        names = [info.labels[i] if i < len(info.labels) else str(i) for i in top]
        shown = ", ".join(f"{name} (p={row[i]:.2f})" for name, i in zip(names, top, strict=True))
        print(f"{path}\t{shown}")
    return EXIT_OK


def _demo_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the whole pipeline: train, export, serve, attack, compare")
    p.add_argument("--out", default="runs/demo", help="run folder (a rerun resumes from it)")
    _add_data_args(p, default="cifar10-subset")
    p.add_argument("--arch", choices=ARCH_NAMES, default="resnet18", help="both targets' arch")
    p.add_argument("--width", type=_positive_float, default=0.25, help="channel multiplier")
    p.add_argument("--epochs", type=int, default=4, help="training epochs of every model")
    p.add_argument("--keep-prob", type=_keep_prob, default=0.1, help="defective target")
    p.add_argument("--no-match-accuracy", action="store_true",
                   help="train the standard target for every epoch instead of stopping it at "
                   "the defective one's clean accuracy")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="targets, data sample and attacks")
    p.add_argument("--surrogate-arch", choices=ARCH_NAMES, help="default: same as --arch")
    p.add_argument("--surrogate-width", type=_positive_float, help="default: --width")
    p.add_argument("--surrogate-seed", type=int, help="default: --seed + 1")
    p.add_argument("--extra-surrogate", action="append", default=[],
                   help="another surrogate checkpoint for the ensemble (repeatable)")  # fmt: skip
    p.add_argument("--device", default="auto", help="training and crafting: auto, cpu, cuda")
    p.add_argument("--attack", nargs="+", default=["fgsm", "pgd", "mifgsm"],
                   choices=("fgsm", "pgd", "mifgsm", "difgsm", "cwl2"),
                   help="transfer attacks")  # fmt: skip
    p.add_argument("--eps", type=_positive_float, nargs="+", default=[8.0, 16.0, 32.0],
                   help="transfer L-inf budgets in 1/255 units")  # fmt: skip
    p.add_argument("--num-images", type=int, default=500, help="transfer-attack images")
    p.add_argument("--query-attack", default="square",
                   choices=("square", "hopskipjump", "boundary", "simba"),
                   help="black-box attack through the endpoints")  # fmt: skip
    p.add_argument("--budget", type=int, default=300, help="queries per image")
    p.add_argument("--query-images", type=int, default=100, help="query-attack images")
    p.add_argument("--query-eps", type=_positive_float, default=8.0, help="square/simba L-inf")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)


def demo_settings(args: argparse.Namespace) -> DemoSettings:
    """The demo's settings from its flags (tests check the flags' defaults are the class's)."""
    from defcnn.demo.pipeline import DemoSettings

    if args.image_size or args.download:
        raise ConfigError("the demo takes a data set as it is: no --image-size or --download")
    return DemoSettings(
        out=args.out, dataset=args.dataset, data_dir=args.data_dir, arch=args.arch,
        width=args.width, epochs=args.epochs, keep_prob=args.keep_prob,
        match_accuracy=not args.no_match_accuracy, seed=args.seed,
        surrogate_arch=args.surrogate_arch, surrogate_width=args.surrogate_width,
        surrogate_seed=args.surrogate_seed, device=args.device, attacks=tuple(args.attack),
        eps_255=tuple(args.eps), num_images=args.num_images, query_attack=args.query_attack,
        query_budget=args.budget, query_images=args.query_images, query_eps_255=args.query_eps,
        extra_surrogates=tuple(args.extra_surrogate),
    )  # fmt: skip


def _cmd_demo(args: argparse.Namespace) -> int:
    from defcnn.demo.pipeline import run_demo

    run_demo(demo_settings(args), progress=not args.quiet)
    return EXIT_OK


def _bench_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="load and reliability benchmarks against a local server")
    kinds = p.add_subparsers(dest="kind", required=True, metavar="KIND")
    s = kinds.add_parser("soak", help="many clients for a bounded time; every answer checked")
    s.add_argument("--model-repo", required=True, help="repository written by defcnn export")
    s.add_argument("--model", required=True, help="model to load")
    s.add_argument("--clients", type=int, default=64, help="concurrent clients")
    s.add_argument("--seconds", type=_positive_float, default=60.0, help="soak time")
    s.add_argument("--warmup", type=float, default=10.0, help="seconds before watching memory")
    s.add_argument("--batch", type=int, default=1, help="images per request")
    s.add_argument("--max-queue-size", type=int, default=256, help="the server's queue bound")
    s.add_argument("--seed", type=int, default=0, help="seed of the images sent")
    s.add_argument("--out", default="runs/soak", help="folder for soak.json and soak.png")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from defcnn.bench.soak import SoakSettings, run_soak

    settings = SoakSettings(
        model_repo=args.model_repo, model=args.model, clients=args.clients,
        seconds=args.seconds, warmup_seconds=args.warmup, batch=args.batch,
        max_queue_size=args.max_queue_size, seed=args.seed, out=args.out,
    )  # fmt: skip
    result = run_soak(settings, progress=not args.quiet)
    print(result.line())
    for name, ok in result.checks.items():
        print(f"  {'PASS' if ok else 'FAIL'} {name}")
    print(f"report: {Path(args.out) / 'soak.json'}")
    return EXIT_OK if result.passed else EXIT_ERROR


_PARSERS: tuple[Callable[[argparse._SubParsersAction], None], ...] = (
    _train_parser,
    _evaluate_parser,
    _export_parser,
    _serve_parser,
    _attack_parser,
    _classify_parser,
    _demo_parser,
    _bench_parser,
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="defcnn", description="Train, export, serve and attack defective CNNs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _PARSERS:
        add(sub)
    return parser


# A base install serves and classifies; the other subcommands need an extra. Modules that
# only the extras bring, and the extra each subcommand needs (pyproject.toml).
_EXTRA_MODULES = frozenset({"torch", "safetensors", "sklearn", "tqdm", "matplotlib", "onnx", "art"})
_EXTRA_OF = {"train": "train", "evaluate": "train", "export": "train", "attack": "attack",
             "demo": "all", "bench": "train"}  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (also used by the console script)."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ModuleNotFoundError as exc:
        top = (exc.name or "").split(".")[0]
        if top not in _EXTRA_MODULES:
            raise
        extra = _EXTRA_OF.get(args.command, "all")
        print(
            f"defcnn {args.command}: error: needs the [{extra}] extra ({top} is not installed): "
            f"pip install 'defective-cnn[{extra}]'",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except ConfigError as exc:
        print(f"defcnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DefcnnError as exc:
        print(f"defcnn {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a folder that cannot be written, a full disk, a vanished file
        where = f": {exc.filename}" if exc.filename else ""
        print(f"defcnn {args.command}: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"defcnn {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
