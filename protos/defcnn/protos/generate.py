"""Regenerate the Python modules from the .proto files, or check that they are current.

    python -m defcnn.protos.generate           # rewrite the *_pb2*.py(i) files in place
    python -m defcnn.protos.generate --check   # exit 1 listing stale files, change nothing

Runs ``grpc_tools.protoc`` in-process with ``protos/`` as the include root, so the proto
files are named ``defcnn/protos/*.proto`` and the generated modules import each other as
``defcnn.protos.*_pb2``. The output depends only on the .proto files and the grpcio-tools
version (pinned in the ``test`` extra of pyproject.toml), so it is reproducible byte for byte.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.resources
import sys
import tempfile
from pathlib import Path

# protos/defcnn/protos/generate.py -> protos/
PROTO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIR = Path("defcnn", "protos")
PROTO_FILES = ("model_config.proto", "grpc_service.proto")
# Everything protoc writes for PROTO_FILES, relative to PACKAGE_DIR.
GENERATED = (
    "grpc_service_pb2.py",
    "grpc_service_pb2.pyi",
    "grpc_service_pb2_grpc.py",
    "model_config_pb2.py",
    "model_config_pb2.pyi",
)
# --grpc_python_out writes a stub module for every proto; model_config.proto has no service.
UNWANTED = ("model_config_pb2_grpc.py",)


def _grpc_tools_version() -> str:
    try:
        return importlib.metadata.version("grpcio-tools")
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def generate(out_root: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Compile the protos under ``proto_root`` into ``out_root``; return the files written.

    Files land in ``out_root/defcnn/protos/``, mirroring the proto paths. Raises
    RuntimeError if protoc fails or does not write exactly the expected files.
    """
    try:
        from grpc_tools import protoc
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "grpcio-tools is needed to generate the protocol modules; "
            "install the test extra: pip install -e '.[test]'"
        ) from exc
    well_known = importlib.resources.files("grpc_tools") / "_proto"
    out_root.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{proto_root}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(PACKAGE_DIR.joinpath(name).as_posix() for name in PROTO_FILES),
    ]
    status = protoc.main(args)
    if status != 0:
        raise RuntimeError(f"protoc failed with status {status} (see its messages above)")
    for name in UNWANTED:
        (out_root / PACKAGE_DIR / name).unlink(missing_ok=True)
    written = [out_root / PACKAGE_DIR / name for name in GENERATED]
    missing = [str(path) for path in written if not path.is_file()]
    if missing:
        raise RuntimeError(f"protoc did not write: {', '.join(missing)}")
    return written


def stale_files(proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files under ``proto_root`` that differ from a fresh generation (or are missing).

    Returns their paths relative to ``proto_root`` (e.g. ``defcnn/protos/grpc_service_pb2.py``);
    an empty list means everything is current.
    """
    stale = []
    with tempfile.TemporaryDirectory(prefix="defcnn-protos-") as tmp:
        fresh_root = Path(tmp)
        generate(fresh_root, proto_root)
        for name in GENERATED:
            rel = PACKAGE_DIR / name
            committed = proto_root / rel
            fresh = (fresh_root / rel).read_bytes()
            if not committed.is_file() or committed.read_bytes() != fresh:
                stale.append(rel.as_posix())
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m defcnn.protos.generate", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and exit 1 if any committed file differs",
    )
    parser.add_argument(
        "--proto-root",
        type=Path,
        default=PROTO_ROOT,
        help="include root holding defcnn/protos/*.proto (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.proto_root)
        if stale:
            print(
                f"stale generated files (grpcio-tools {_grpc_tools_version()}); "
                "run: python -m defcnn.protos.generate",
                file=sys.stderr,
            )
            for rel in stale:
                print(f"  {rel}", file=sys.stderr)
            return 1
        print("generated protocol modules are up to date")
        return 0
    for path in generate(args.proto_root, args.proto_root):
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
