"""Patch shuffling and Gaussian noise, and `defcnn evaluate` comparing models under them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from defcnn.cli import EXIT_USAGE, main
from defcnn.errors import ConfigError
from defcnn.robustness import (
    CorruptionRow,
    EvaluationResult,
    corruption_table,
    evaluate_corruptions,
    gaussian_noise,
    patch_shuffle,
)
from defcnn.stats import wilson
from defcnn.training import evaluate


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
        for name in ("std", "def"):  # the 95% Wilson interval of the count out of 100
            rate = wilson(round(row[name] * 100), 100)
            assert row[f"{name}_ci"] == [rate.low, rate.high]
            assert f"{row[name]:.3f} [{rate.low:.3f}, {rate.high:.3f}] (" in table
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


class _MeanBright(torch.nn.Module):
    """Class 1 when the image's mean pixel is above 0.5, else 0: a model with no weights."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = x.mean(dim=(1, 2, 3))
        return torch.stack([0.5 - m, m - 0.5], dim=1)


def test_rows_carry_the_exact_count_s_wilson_interval() -> None:
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (37, 3, 8, 8), dtype=np.uint8)
    x[:20] //= 2  # darker: the model says 0
    y = np.array([0] * 15 + [1] * 22)  # right on some, wrong on others
    model = _MeanBright()
    rows = evaluate_corruptions(
        {"m": model}, x, y, grids=(2,), sigmas=(0.1,), batch_size=8, progress=False
    )
    clean = rows[0]
    expected = evaluate(model, x, y, batch_size=8)["accuracy"]  # the training loop's number
    assert clean.accuracy["m"] == expected
    correct = int(((x.reshape(37, -1).mean(1) / 255 > 0.5) == y).sum())
    assert clean.accuracy["m"] == correct / 37
    rate = wilson(correct, 37)
    assert clean.accuracy_ci["m"] == (rate.low, rate.high)
    for row in rows:
        low, high = row.accuracy_ci["m"]
        assert low <= row.accuracy["m"] <= high
    table = corruption_table(rows, ["m"])
    assert f"| clean | - | {rate.value:.3f} [{rate.low:.3f}, {rate.high:.3f}] (1.00) |" in table
    result = EvaluationResult("test", 37, 0, {"m": "m.safetensors"}, tuple(rows))
    assert EvaluationResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def test_rows_from_files_without_intervals_still_read_and_show() -> None:
    old = {"corruption": "clean", "level": 0, "std": 0.8, "std_relative": 1.0}
    row = CorruptionRow.from_dict(old)
    assert row.accuracy == {"std": 0.8} and row.accuracy_ci == {}
    assert row.to_dict() == old
    assert corruption_table([row], ["std"]).endswith("| clean | - | 0.800 (1.00) |")
    new = CorruptionRow.from_dict(old | {"std_ci": [0.7, 0.9]})
    assert new.accuracy_ci == {"std": (0.7, 0.9)} and new.accuracy == {"std": 0.8}
    assert corruption_table([new], ["std"]).endswith("| clean | - | 0.800 [0.700, 0.900] (1.00) |")
