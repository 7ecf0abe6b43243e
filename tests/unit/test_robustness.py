"""Patch shuffling and Gaussian noise, and `defcnn evaluate` comparing models under them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from defcnn.cli import EXIT_USAGE, main
from defcnn.errors import ConfigError
from defcnn.robustness import (
    EvaluationResult,
    corruption_table,
    gaussian_noise,
    patch_shuffle,
)


def _images(n: int = 5, side: int = 32) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (n, 3, side, side), dtype=np.uint8)


@pytest.mark.parametrize("grid", [2, 4, 8])
def test_patch_shuffle_permutes_whole_patches(grid: int) -> None:
    x = _images()
    out = patch_shuffle(x, grid, seed=1)
    side = 32 // grid
    for img, shuffled in zip(x, out, strict=True):

        def patches(a: np.ndarray) -> list[bytes]:
            return [a[:, r:r + side, c:c + side].tobytes()
                    for r in range(0, 32, side) for c in range(0, 32, side)]  # fmt: skip

        before, after = patches(img), patches(shuffled)
        assert sorted(before) == sorted(after)  # the same patches, intact
        assert before != after  # in another order
    assert np.array_equal(out, patch_shuffle(x, grid, seed=1))  # seeded
    assert not np.array_equal(out, patch_shuffle(x, grid, seed=2))


def test_patch_shuffle_keeps_pixels_and_gives_each_image_its_own_order() -> None:
    x = np.repeat(_images(1), 6, axis=0)  # six copies of one image
    out = patch_shuffle(x, 4, seed=0)
    assert out.dtype == np.uint8 and out.shape == x.shape
    assert np.array_equal(np.sort(out.reshape(6, -1), axis=1), np.sort(x.reshape(6, -1), axis=1))
    assert len({o.tobytes() for o in out}) > 1
    assert np.array_equal(patch_shuffle(x, 1), x)


def test_bad_grids_and_sigmas_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="does not tile"):
        patch_shuffle(_images(), 3)
    with pytest.raises(ConfigError, match="does not tile"):
        patch_shuffle(_images(), 0)
    with pytest.raises(ConfigError, match=">= 0"):
        gaussian_noise(_images(), -0.1)


def test_gaussian_noise_has_the_asked_spread_and_stays_uint8() -> None:
    x = np.full((4, 3, 32, 32), 128, dtype=np.uint8)
    out = gaussian_noise(x, 0.1, seed=0)
    assert out.dtype == np.uint8
    delta = (out.astype(np.float64) - 128) / 255
    assert delta.std() == pytest.approx(0.1, rel=0.05)
    assert abs(delta.mean()) < 0.01
    assert np.array_equal(gaussian_noise(x, 0.0), x)
    assert gaussian_noise(np.full_like(x, 255), 0.5).max() == 255  # clipped, not wrapped


def test_evaluate_compares_models_under_corruptions(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    small = ["--arch", "resnet18", "--width", "0.125", "--dataset", "digits", "--quiet"]
    for name, extra in (("std", []), ("def", ["--defective"])):
        argv = ["train", *small, *extra, "--epochs", "1", "--out", str(tmp_path / name)]
        assert main(argv) == 0
    capsys.readouterr()
    report = tmp_path / "eval.json"
    argv = ["evaluate", str(tmp_path / "std" / "model.safetensors"),
            str(tmp_path / "def" / "model.safetensors"), "--patch-shuffle", "2", "4",
            "--noise", "0.2", "--num-images", "100", "--out", str(report)]  # fmt: skip
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| patch_shuffle | 4x4 |" in table and "| gaussian_noise | sigma 0.2 |" in table
    result = json.loads(report.read_text())
    assert result["images"] == 100
    assert [(r["corruption"], r["level"]) for r in result["rows"]] == [
        ("clean", 0), ("patch_shuffle", 2), ("patch_shuffle", 4), ("gaussian_noise", 0.2),
    ]  # fmt: skip
    clean = result["rows"][0]
    assert clean["std"] > 0.5 and clean["std_relative"] == 1.0
    for row in result["rows"]:
        assert row["def_relative"] == pytest.approx(row["def"] / clean["def"])
    # digits cut into a 4x4 jigsaw are hard to read: accuracy must drop
    assert result["rows"][2]["std"] < clean["std"]
    assert Path(report.with_suffix(".md")).read_text().startswith("| corruption |")
    # the file is EvaluationResult.to_dict(): it reads back into the same rows
    typed = EvaluationResult.from_dict(result)
    assert typed.to_dict() == result
    assert typed.rows[0].accuracy == {"std": clean["std"], "def": clean["def"]}
    table_md = Path(report.with_suffix(".md")).read_text()
    assert corruption_table(typed.rows, ["std", "def"]) + "\n" == table_md


def test_evaluate_rejects_a_grid_that_does_not_tile(tmp_path: Path) -> None:
    out = tmp_path / "m"
    small = ["--arch", "resnet18", "--width", "0.125", "--dataset", "digits", "--quiet"]
    assert main(["train", *small, "--max-steps", "1", "--epochs", "1", "--out", str(out)]) == 0
    argv = ["evaluate", str(out / "model.safetensors"), "--patch-shuffle", "5"]
    assert main(argv) == EXIT_USAGE
