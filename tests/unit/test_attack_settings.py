"""The attack settings' schema (flags and --config), their validation, label maps, and the
saved run state that decides whether a rerun is a resume. No server: see
tests/integration/test_attack_cli.py for the same rules end to end."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from defcnn.attack import _runstate
from defcnn.attack.results import interval, rate_text
from defcnn.attack.settings import (
    DEFAULTS,
    QuerySettings,
    TransferSettings,
    build,
    from_dict,
    parse_flags,
    read_config,
    resolve_label_map,
    settings_from,
    to_dict,
)
from defcnn.cli import _ATTACK_DEFAULTS
from defcnn.client import QueryCounter
from defcnn.errors import ConfigError

QUERY = {"url": "127.0.0.1:1", "model": ("m",), "out": "o", "attack": "square"}
CLASSES = ("cat", "dog", "cow")


def _config(tmp_path: Path, data: object) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(data))
    return str(path)


def test_the_help_shows_the_defaults_the_settings_apply() -> None:
    assert _ATTACK_DEFAULTS == DEFAULTS


def test_falsy_is_not_unset() -> None:
    with pytest.raises(ConfigError, match=r"--eps must be in \(0, 255\]"):
        build("query", {**QUERY, "eps": 0.0})  # never the default 16
    assert isinstance(s := build("query", QUERY), QuerySettings) and s.eps_255 == 16.0
    with pytest.raises(ConfigError, match="--seed must be a whole number >= 0"):
        build("query", {**QUERY, "seed": -1})
    assert build("query", {**QUERY, "seed": 0}).data.seed == 0


@pytest.mark.parametrize("eps", [0.0, -8.0, 300.0, float("nan"), float("inf")])
def test_eps_outside_0_255_is_refused(eps: float) -> None:
    with pytest.raises(ConfigError, match="--eps must be"):
        build("query", {**QUERY, "eps": eps})
    with pytest.raises(ConfigError, match="--eps must be"):
        build("transfer", {**QUERY, "attack": ("pgd",), "surrogate": ("s",), "eps": (8.0, eps)})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"budget": 0}, "--budget must be a whole number >= 1, got 0"),
        ({"budget": True}, "--budget must be a whole number"),
        ({"attack": "squar"}, "did you mean 'square'"),
        ({"dataset": "digit"}, "did you mean 'digits'"),
        ({"num-images": 0}, "--num-images must be"),
        ({"timeout": 0.0}, "--timeout must be > 0"),
        ({"model": ("m", "m")}, "names a model twice"),
        ({"tls-cert": "c"}, "--tls-cert and --tls-key go together"),
        ({"output-kind": "logit"}, "did you mean 'logits'"),
        ({"num-classes": 1}, "--num-classes must be >= 2"),
        ({"std": (1.0, 0.0, 1.0)}, "--std must be > 0"),
        ({"mean": (0.5, 0.5)}, "--mean takes 1 or 3 numbers"),
    ],
)
def test_bad_query_settings_name_the_setting(values: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build("query", {**QUERY, **values})


def test_transfer_steps_and_step() -> None:
    base = {**QUERY, "attack": ("pgd", "fgsm"), "surrogate": ("s",), "eps": (4.0, 8.0)}
    s = build("transfer", {**base, "steps": 5, "step": 0.5})
    assert isinstance(s, TransferSettings)
    assert s.attack_params("pgd", 8.0) == pytest.approx(
        {"eps": 8 / 255, "step": 0.5 / 255, "steps": 5, "random_start": False}
    )
    assert "steps" not in s.attack_params("fgsm", 8.0)  # FGSM is one step
    default = build("transfer", base)
    assert isinstance(default, TransferSettings)
    assert default.attack_params("pgd", 8.0)["steps"] == 20  # the paper's preset
    with pytest.raises(ConfigError, match=r"--step must be in \(0, eps\] = \(0, 4\]"):
        build("transfer", {**base, "step": 5.0})
    with pytest.raises(ConfigError, match="--steps applies to pgd, mifgsm, difgsm"):
        build("transfer", {**base, "attack": ("fgsm",), "steps": 3})
    with pytest.raises(ConfigError, match="--attack names an attack twice"):
        build("transfer", {**base, "attack": ("pgd", "pgd")})
    with pytest.raises(ConfigError, match="--surrogate is required"):
        build("transfer", {**base, "surrogate": ()})


def test_config_keys_are_the_flag_names(tmp_path: Path) -> None:
    path = _config(tmp_path, {"num_images": 7, "num-classes": 10, "model": "m", "seed": None})
    assert read_config(path, "query") == {"num-images": 7, "num-classes": 10, "model": ("m",)}
    with pytest.raises(ConfigError, match=r"unknown key 'budjet'; did you mean 'budget'\?"):
        read_config(_config(tmp_path, {"budjet": 5}), "query")
    with pytest.raises(ConfigError, match="'budget' is a setting of `defcnn attack query`"):
        read_config(_config(tmp_path, {"budget": 5}), "transfer")
    with pytest.raises(ConfigError, match="sets 'num-images' twice"):
        read_config(_config(tmp_path, {"num-images": 5, "num_images": 6}), "query")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        read_config(_config(tmp_path, [1, 2]), "query")
    with pytest.raises(ConfigError, match="cannot read --config"):
        read_config(str(tmp_path / "missing.json"), "query")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"budget": "10"}, "'budget' must be an integer, got a string \"10\""),
        ({"budget": 2.5}, "'budget' must be an integer, got a number 2.5"),
        ({"eps": [8]}, "'eps' must be a number, got a list"),
        ({"overwrite": "yes"}, "'overwrite' must be true or false"),
        ({"input-range": [0, 1, 2]}, "'input-range' must be two numbers"),
        ({"model": ["m", 3]}, "'model' must be a string or a list of strings"),
    ],
)
def test_config_types_are_checked(tmp_path: Path, data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        read_config(_config(tmp_path, data), "query")


def test_flags_win_over_config_values(tmp_path: Path) -> None:
    path = _config(tmp_path, {**QUERY, "model": "m", "budget": 50, "eps": 8, "layout": "NHWC"})
    flags = {"budget": 4, "eps": None, "overwrite": False, "input_range": "0,255"}
    s = settings_from("query", flags, path)
    assert isinstance(s, QuerySettings)
    assert (s.budget, s.eps_255, s.spec.layout, s.spec.input_range) == (4, 8.0, "NHWC",
                                                                       (0.0, 255.0))  # fmt: skip
    assert parse_flags("query", {"mean": "0.5,0.5,0.5"}) == {"mean": (0.5, 0.5, 0.5)}
    with pytest.raises(ConfigError, match="--input-range must be two numbers"):
        parse_flags("query", {"input_range": "0;255"})


def test_settings_round_trip_through_json() -> None:
    s = build("transfer", {**QUERY, "attack": ("pgd",), "surrogate": ("a", "b"), "steps": 3,
                           "input-range": (0.0, 255.0), "mean": (0.5,)})  # fmt: skip
    assert from_dict("transfer", json.loads(json.dumps(to_dict(s)))) == s


def test_files_are_checked_before_the_run(tmp_path: Path) -> None:
    values = {**QUERY, "attack": ("pgd",), "surrogate": (str(tmp_path / "none"),)}
    with pytest.raises(ConfigError, match=r"--surrogate .*none: no such file"):
        build("transfer", values).check_files()
    with pytest.raises(ConfigError, match="cannot read --token-file"):
        build("query", {**QUERY, "token-file": str(tmp_path / "t")}).check_files()
    bad = tmp_path / "map.json"
    bad.write_text('{"cat": -1}')
    with pytest.raises(ConfigError, match="endpoint indices are whole numbers >= 0, got -1"):
        build("query", {**QUERY, "label-map": str(bad)}).check_files()


def test_label_maps(tmp_path: Path) -> None:
    path = tmp_path / "map.json"

    def resolve(data: object, num_classes: int | None = 10) -> tuple[int, ...] | None:
        path.write_text(json.dumps(data))
        return resolve_label_map(str(path), CLASSES, num_classes)

    assert resolve_label_map(None, CLASSES, 10) is None
    assert resolve([4, 5, 6]) == (4, 5, 6)
    assert resolve({"cow": 1, "0": 7, "dog": 2}) == (7, 2, 1)  # names or indices
    with pytest.raises(ConfigError, match="lists 2 classes; the data set has 3"):
        resolve([1, 2])
    with pytest.raises(ConfigError, match="does not map the data set's classes cow"):
        resolve({"cat": 1, "dog": 2})
    with pytest.raises(ConfigError, match=r"'dgo' is not a class .*did you mean 'dog'"):
        resolve({"cat": 1, "dgo": 2, "cow": 3})
    with pytest.raises(ConfigError, match="maps class 'cat' twice"):
        resolve({"cat": 1, "0": 2, "dog": 3, "cow": 4})
    with pytest.raises(ConfigError, match="maps to endpoint index 12, but the endpoint has 10"):
        resolve([0, 1, 12])
    with pytest.raises(ConfigError, match="must hold a JSON list or object"):
        resolve("cat")


def test_run_state_refuses_other_runs_and_overwrite_clears_only_its_files(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    assert _runstate.open_folder(out, "query", overwrite=False) is None
    key = {"attack": "square", "budget": 100, "eps": 16.0, "data": {"indices": list(range(50))}}
    _runstate.save(out, "query", key, _runstate.Totals())
    (out / "traces").mkdir()
    (out / "report.md").write_text("old")
    (out / "mine.txt").write_text("mine")
    saved = _runstate.open_folder(out, "query", overwrite=False)
    assert saved is not None and saved.key == key
    _runstate.check_same(out, saved, key)  # the same run: a resume
    other = {**key, "attack": "hopskipjump", "budget": 10, "data": {"indices": [1, 2]}}
    with pytest.raises(ConfigError) as exc:
        _runstate.check_same(out, saved, other)
    text = str(exc.value)
    assert "attack: square -> hopskipjump" in text and "budget: 100 -> 10" in text
    assert "data.indices: 50 values (sha256 " in text and "-> [1, 2]" in text
    _runstate.check_same(out, saved, {"attack": "square"})  # only the keys compared so far
    with pytest.raises(ConfigError, match="holds a query attack run; a transfer run never"):
        _runstate.open_folder(out, "transfer", overwrite=True)
    assert _runstate.open_folder(out, "query", overwrite=True) is None
    assert sorted(p.name for p in out.iterdir()) == ["mine.txt"]
    (out / "stages").mkdir()  # files of a run without run.json: settings unknown
    with pytest.raises(ConfigError, match=r"without run\.json"):
        _runstate.open_folder(out, "transfer", overwrite=False)
    (out / "run.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"cannot read run\.json"):
        _runstate.open_folder(out, "transfer", overwrite=False)


def test_totals_add_up_across_runs() -> None:
    first = _runstate.Totals().add(1.5, {"m": QueryCounter(10, 2)})
    both = first.add(2.0, {"m": QueryCounter(1, 1), "n": QueryCounter(3, 1)})
    assert (both.runs, both.wall_s) == (2, 3.5)
    assert both.queries == {"m": QueryCounter(11, 3), "n": QueryCounter(3, 1)}
    assert _runstate.Totals.from_dict(json.loads(json.dumps(both.to_dict()))) == both


def test_rates_show_their_wilson_interval() -> None:
    assert rate_text(0.5, interval(5, 10)) == "0.500 [0.237, 0.763]"
    assert rate_text(float("nan"), None) == "-"  # an empty subset: no rate, no interval
    assert interval(0, 0) is None
    assert rate_text(0.0, interval(0, 10)).startswith("0.000 [0.000, ")


def _spec(height: int, width: int, num_classes: int | None = 10, kind: Any = "logits") -> Any:
    from defcnn.client.spec import EndpointSpec

    return EndpointSpec(
        model="m", version="1", input_name="input", datatype="FP32", layout="NCHW", channels=3,
        height=height, width=width, input_range=(0.0, 1.0), mean=None, std=None,
        output_name="out", output_kind=kind, num_classes=num_classes, labels=(),
        max_batch_size=8,
    )  # fmt: skip


def test_images_are_fitted_to_the_endpoint_once(capsys: pytest.CaptureFixture[str]) -> None:
    from defcnn.attack.harness import _fit

    x = np.random.default_rng(0).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    assert _fit(x, _spec(32, 32), "digits") is x and capsys.readouterr().out == ""
    fitted = _fit(x, _spec(24, 40), "digits")
    assert fitted.shape == (5, 3, 24, 40) and fitted.dtype == np.uint8
    assert capsys.readouterr().out.count("resizing digits images from 32x32") == 1


def test_the_threat_model_and_the_class_count_are_checked() -> None:
    from defcnn.attack.harness import _label_map, check_threat
    from defcnn.attack.results import DatasetInfo

    labels_only = {"m": _spec(32, 32, kind="label")}
    with pytest.raises(ConfigError, match=r"square needs scores.*hopskipjump, boundary"):
        check_threat("square", labels_only)
    assert check_threat("hopskipjump", labels_only) == "decision"
    assert check_threat("square", {"m": _spec(32, 32)}) == "score"
    info = DatasetInfo("d", "d", 1, (0,), tuple("abcdefghijkl"))  # 12 classes
    with pytest.raises(ConfigError, match="12 classes but the endpoint 10: pass --label-map"):
        _label_map(build("query", QUERY).data, info, {"m": _spec(32, 32)})
