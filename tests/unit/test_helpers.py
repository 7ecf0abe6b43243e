"""The small torch-free core helpers every stage shares: the seeded subset sampler, the
token-file reader and the versions record."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest

from defcnn.cli import EXIT_USAGE, main
from defcnn.errors import ConfigError
from defcnn.sampling import seeded_subset
from defcnn.tokens import read_token_file
from defcnn.versions import versions

# ---------------------------------------------------------------- seeded subsets


def test_seeded_subset_is_sorted_distinct_and_repeatable() -> None:
    first = seeded_subset(100, 10, seed=3)
    assert first.dtype == np.int64 and len(first) == 10
    assert np.all(np.diff(first) > 0) and first.min() >= 0 and first.max() < 100
    np.testing.assert_array_equal(first, seeded_subset(100, 10, seed=3))
    assert not np.array_equal(first, seeded_subset(100, 10, seed=4))
    # the same images as the inline expression the CLI and the harness used before
    expected = np.sort(np.random.default_rng(3).permutation(100)[:10])
    np.testing.assert_array_equal(first, expected)
    np.testing.assert_array_equal(seeded_subset(5, 5, seed=0), np.arange(5))


@pytest.mark.parametrize(
    "k,message", [(0, ">= 1, got 0"), (-2, ">= 1"), (11, "only 10 images"), (True, "whole")]
)
def test_seeded_subset_refuses_bad_counts(k: int, message: str) -> None:
    with pytest.raises(ConfigError, match=rf"--query-images.*{message}"):
        seeded_subset(10, k, seed=0, what="--query-images")


# ---------------------------------------------------------------- token files


def test_token_file_first_line_stripped(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text("  s3cret \nsecond line ignored\n")
    assert read_token_file(path) == "s3cret"
    path.write_text("no newline")
    assert read_token_file(str(path)) == "no newline"


@pytest.mark.parametrize("content", [b"", b"\n", b"   \nlater line\n", b"\xff\xfe\x00"])
def test_token_file_empty_or_unreadable_is_a_config_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match=r"--auth-token-file .*token"):
        read_token_file(path, flag="--auth-token-file")
    with pytest.raises(ConfigError, match=r"cannot read --token-file .*missing"):
        read_token_file(tmp_path / "missing")


def test_every_token_reader_uses_the_shared_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from defcnn.attack.harness import Endpoint
    from defcnn.server.auth import TOKEN_ENV, load_token

    empty = tmp_path / "empty-token"
    empty.write_text("\n")
    good = tmp_path / "token"
    good.write_text("abc\n")

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert load_token(str(good)) == "abc" and load_token(None) is None
    with pytest.raises(ConfigError, match=r"--auth-token-file .*empty-token is empty"):
        load_token(str(empty))

    with pytest.raises(ConfigError, match=r"--token-file .*empty-token is empty"):
        Endpoint(url="127.0.0.1:1", models=("m",), token_file=str(empty)).client()

    argv = ["classify", "--url", "127.0.0.1:1", "--model", "m", "--token-file", str(empty)]
    assert main([*argv, str(tmp_path / "image.png")]) == EXIT_USAGE
    assert f"--token-file {empty} is empty" in capsys.readouterr().err


# ---------------------------------------------------------------- versions


def test_versions_come_from_distribution_metadata() -> None:
    record = versions("numpy", "art", "onnxruntime", "not-a-real-package")
    assert record["python"] == platform.python_version()
    assert record["platform"] == platform.platform()
    assert record["defcnn"] == version("defective-cnn")
    assert record["numpy"] == np.__version__
    assert record["art"] == version("adversarial-robustness-toolbox")
    assert "onnxruntime" in record  # whichever build (CPU or GPU) is installed
    assert "not-a-real-package" not in record


def test_the_shared_helpers_never_import_torch() -> None:
    code = (
        "import sys, defcnn.sampling, defcnn.tokens, defcnn.versions, defcnn.images; "
        "defcnn.versions.versions('torch'); assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
