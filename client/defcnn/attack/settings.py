"""An attack run's settings: one validated object per run kind, built by one schema from
the command line and from `--config FILE.json`.

The schema is the flags: a config key is a flag's name without its dashes (`num-images`;
`num_images` is read the same), its value the flag's value as JSON. Flags win over config
values; what neither sets takes the default. Every value is checked here, before the run
loads a model or sends a query, and a bad one is a `ConfigError` naming the setting and what
was expected. Falsy is not unset: `--eps 0` is an eps of 0 (refused), never the default.
"""

from __future__ import annotations

import difflib
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

from defcnn.attack.blackbox import QUERY_ATTACKS
from defcnn.errors import ConfigError
from defcnn.names import DATASETS
from defcnn.tokens import read_token_file

TRANSFER_ATTACKS = ("fgsm", "pgd", "mifgsm", "difgsm", "cwl2")
ITERATIVE = ("pgd", "mifgsm", "difgsm")  # the attacks that take --steps and --step
L2_ONLY = ("cwl2",)  # no eps: the budget is the L2 distance
LAYOUTS = ("NCHW", "NHWC")
OUTPUT_KINDS = ("logits", "probabilities", "label")
MAX_EPS = 255.0

#: What a setting is when neither a flag nor --config sets it (the CLI's help shows these).
DEFAULTS: dict[str, Any] = {
    "dataset": "digits", "num-images": 100, "seed": 0, "timeout": 60.0, "batch-size": 64,
    "budget": 1000, "eps-transfer": (16.0,), "eps-query": 16.0,
}  # fmt: skip


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise ConfigError(f"--{name} must be a finite number, got {value}")
    return float(value)


def _positive_int(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"--{name} must be a whole number >= 1, got {value!r}")
    return value


def check_eps(name: str, value: float) -> float:
    """An L-inf budget in 1/255 units: in (0, 255]."""
    value = _finite(name, value)
    if not 0 < value <= MAX_EPS:
        raise ConfigError(f"--{name} must be in (0, 255] (1/255 units), got {value:g}")
    return value


def _one_of(name: str, value: str, known: tuple[str, ...] | list[str]) -> str:
    if value not in known:
        near = difflib.get_close_matches(str(value), list(known), n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ConfigError(
            f"--{name} {value!r} is unknown{hint}; expected one of {', '.join(known)}"
        )
    return value


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

    def __post_init__(self) -> None:
        if not self.url:
            raise ConfigError("--url is required (HOST:PORT, grpc://, grpcs://, http(s)://)")
        if not self.models or any(not m for m in self.models):
            raise ConfigError("--model is required (an endpoint model; repeat for several)")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"--model names a model twice: {', '.join(self.models)}")
        if not _finite("timeout", self.timeout) > 0:
            raise ConfigError(f"--timeout must be > 0 seconds, got {self.timeout:g}")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("--tls-cert and --tls-key go together (mutual TLS)")

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
class SpecChoice:
    """What the user says about the endpoint where its metadata does not (or says wrong):
    the contract's `SpecOverrides`, as given. None: read it from the endpoint."""

    layout: str | None = None
    input_range: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    output: str | None = None
    output_kind: str | None = None
    num_classes: int | None = None
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.max_batch_size is not None:
            _positive_int("max-batch-size", self.max_batch_size)
        if self.layout is not None:
            _one_of("layout", self.layout, LAYOUTS)
        if self.output_kind is not None:
            _one_of("output-kind", self.output_kind, OUTPUT_KINDS)
        if self.input_range is not None:
            lo, hi = (_finite("input-range", v) for v in self.input_range)
            if not lo < hi:
                raise ConfigError(f"--input-range LO,HI needs LO < HI, got {lo:g},{hi:g}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) not in (1, 3):
                raise ConfigError(f"--{name} takes 1 or 3 numbers (one per channel), "
                                  f"got {len(values)}")  # fmt: skip
            for v in values:
                _finite(name, v)
                if name == "std" and not v > 0:
                    raise ConfigError(f"--std must be > 0 for every channel, got {v:g}")
        if self.output is not None and not self.output:
            raise ConfigError("--output must name an output tensor")
        if self.num_classes is not None and _positive_int("num-classes", self.num_classes) < 2:
            raise ConfigError(f"--num-classes must be >= 2, got {self.num_classes}")

    def given(self) -> bool:
        return any(v is not None for v in asdict(self).values())

    def overrides(self) -> Any:
        """The client's `SpecOverrides` (None when nothing is overridden)."""
        if not self.given():
            return None
        from defcnn.client.spec import SpecOverrides

        return SpecOverrides(**asdict(self))


@dataclass(frozen=True)
class DataChoice:
    dataset: str = "digits"
    data_dir: str | None = None
    num_images: int = 100
    seed: int = 0
    label_map: str | None = None  # JSON file: data set class (index or name) -> endpoint index

    def __post_init__(self) -> None:
        _one_of("dataset", self.dataset, DATASETS)
        _positive_int("num-images", self.num_images)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ConfigError(f"--seed must be a whole number >= 0, got {self.seed!r}")


@dataclass(frozen=True)
class TransferSettings:
    endpoint: Endpoint
    surrogates: tuple[str, ...]
    attacks: tuple[str, ...] = ("pgd",)
    eps_255: tuple[float, ...] = (16.0,)
    data: DataChoice = field(default_factory=DataChoice)
    out: str = "attack-report"
    batch_size: int = 64
    steps: int | None = None  # PGD/MI-FGSM/DI-FGSM iterations (None: the paper's preset)
    step_255: float | None = None  # their step size in 1/255 units (None: the preset)
    spec: SpecChoice = field(default_factory=SpecChoice)
    overwrite: bool = False

    kind: ClassVar[str] = "transfer"

    def __post_init__(self) -> None:
        if not self.surrogates:
            raise ConfigError("--surrogate is required (a checkpoint; repeat for an ensemble)")
        if not self.attacks:
            raise ConfigError("--attack is required (one or more of "
                              f"{', '.join(TRANSFER_ATTACKS)})")  # fmt: skip
        for a in self.attacks:
            _one_of("attack", a, TRANSFER_ATTACKS)
        if len(set(self.attacks)) != len(self.attacks):
            raise ConfigError(f"--attack names an attack twice: {' '.join(self.attacks)}")
        if not self.eps_255:
            raise ConfigError("--eps needs at least one value")
        for e in self.eps_255:
            check_eps("eps", e)
        if len(set(self.eps_255)) != len(self.eps_255):
            raise ConfigError(f"--eps names a value twice: {' '.join(map(str, self.eps_255))}")
        _positive_int("batch-size", self.batch_size)
        if not self.out:
            raise ConfigError("--out is required (the report folder)")
        iterative = [a for a in self.attacks if a in ITERATIVE]
        for name, value in (("steps", self.steps), ("step", self.step_255)):
            if value is not None and not iterative:
                raise ConfigError(f"--{name} applies to {', '.join(ITERATIVE)}; "
                                  f"--attack has none of them")  # fmt: skip
        if self.steps is not None:
            _positive_int("steps", self.steps)
        if self.step_255 is not None:
            step = _finite("step", self.step_255)
            smallest = min(self.eps_255)
            if not 0 < step <= smallest:
                raise ConfigError(f"--step must be in (0, eps] = (0, {smallest:g}] "
                                  f"(1/255 units), got {step:g}")  # fmt: skip

    def attack_params(self, attack: str, eps_255: float | None) -> dict[str, Any]:
        """What `make_attack` gets for one (attack, eps): the paper's preset with this run's
        eps, steps and step; the resolved values are what results.json records."""
        from defcnn.attack.transfer import PRESETS

        params = dict(PRESETS[attack])
        if eps_255 is not None:
            params["eps"] = eps_255 / 255.0
        if attack in ITERATIVE:
            if self.steps is not None:
                params["steps"] = self.steps
            if self.step_255 is not None:
                params["step"] = self.step_255 / 255.0
        return params

    def check_files(self) -> None:
        """The files the run reads exist (before any query is sent)."""
        for path in self.surrogates:
            if not Path(path).is_file():
                raise ConfigError(f"--surrogate {path}: no such file (a checkpoint from "
                                  "defcnn train)")  # fmt: skip
        _check_common_files(self.endpoint, self.data)


@dataclass(frozen=True)
class QuerySettings:
    endpoint: Endpoint
    attack: str = "square"
    budget: int = 1000
    eps_255: float = 16.0
    data: DataChoice = field(default_factory=DataChoice)
    out: str = "attack-report"
    spec: SpecChoice = field(default_factory=SpecChoice)
    overwrite: bool = False

    kind: ClassVar[str] = "query"

    def __post_init__(self) -> None:
        _one_of("attack", self.attack, list(QUERY_ATTACKS))
        _positive_int("budget", self.budget)
        check_eps("eps", self.eps_255)
        if not self.out:
            raise ConfigError("--out is required (the report folder)")

    def check_files(self) -> None:
        _check_common_files(self.endpoint, self.data)


def _check_common_files(endpoint: Endpoint, data: DataChoice) -> None:
    if endpoint.token_file:
        read_token_file(endpoint.token_file)
    for flag, path in (("tls-ca", endpoint.tls_ca), ("tls-cert", endpoint.tls_cert),
                       ("tls-key", endpoint.tls_key)):  # fmt: skip
        if path and not Path(path).is_file():
            raise ConfigError(f"--{flag} {path}: no such file")
    if data.label_map:
        read_label_map(data.label_map)


# ---------------------------------------------------------------- label maps


def read_label_map(path: str) -> list[int] | dict[str, int]:
    """A --label-map file: a JSON list (data set class i -> endpoint index) or an object
    (data set class index or name -> endpoint index)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read --label-map {path}: {exc}") from exc
    values = data if isinstance(data, list) else data.values() if isinstance(data, dict) else None
    if values is None:
        raise ConfigError(f"--label-map {path} must hold a JSON list or object, "
                          f"got {type(data).__name__}")  # fmt: skip
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"--label-map {path}: endpoint indices are whole numbers >= 0, "
                              f"got {v!r}")  # fmt: skip
    return data


def resolve_label_map(
    path: str | None, classes: tuple[str, ...], num_classes: int | None
) -> tuple[int, ...] | None:
    """The endpoint index of each data set class (None: the identity, no --label-map)."""
    if path is None:
        return None
    data = read_label_map(path)
    if isinstance(data, list):
        if len(data) != len(classes):
            raise ConfigError(f"--label-map {path} lists {len(data)} classes; the data set "
                              f"has {len(classes)}")  # fmt: skip
        mapping = tuple(data)
    else:
        by_index: dict[int, int] = {}
        for key, value in data.items():
            if key in classes:
                i = classes.index(key)
            elif key.isascii() and key.isdigit() and int(key) < len(classes):
                i = int(key)
            else:
                near = difflib.get_close_matches(key, list(classes), n=1)
                hint = f" (did you mean {near[0]!r}?)" if near else ""
                raise ConfigError(f"--label-map {path}: {key!r} is not a class of the data "
                                  f"set{hint}")  # fmt: skip
            if i in by_index:
                raise ConfigError(f"--label-map {path} maps class {classes[i]!r} twice")
            by_index[i] = value
        missing = [classes[i] for i in range(len(classes)) if i not in by_index]
        if missing:
            raise ConfigError(f"--label-map {path} does not map the data set's classes "
                              f"{', '.join(missing)}")  # fmt: skip
        mapping = tuple(by_index[i] for i in range(len(classes)))
    if num_classes is not None and max(mapping) >= num_classes:
        raise ConfigError(f"--label-map {path} maps to endpoint index {max(mapping)}, but "
                          f"the endpoint has {num_classes} classes")  # fmt: skip
    return mapping


# ---------------------------------------------------------------- the schema


class _WrongType(Exception):
    pass


def _string(v: Any) -> str:
    if not isinstance(v, str):
        raise _WrongType
    return v


def _integer(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise _WrongType
    return v


def _number(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise _WrongType
    return float(v)


def _boolean(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _WrongType
    return v


def _strings(v: Any) -> tuple[str, ...]:
    return tuple(_string(x) for x in v) if isinstance(v, list | tuple) else (_string(v),)


def _numbers(v: Any) -> tuple[float, ...]:
    return tuple(_number(x) for x in v) if isinstance(v, list | tuple) else (_number(v),)


def _number_list(v: Any) -> tuple[float, ...]:
    """ "a,b,c" (as typed on the command line) or a JSON list of numbers."""
    if isinstance(v, str):
        try:
            return tuple(float(x) for x in v.split(","))
        except ValueError:
            raise _WrongType from None
    if not isinstance(v, list | tuple) or not v:
        raise _WrongType
    return tuple(_number(x) for x in v)


def _pair(v: Any) -> tuple[float, float]:
    values = _number_list(v)
    if len(values) != 2:
        raise _WrongType
    return values[0], values[1]


@dataclass(frozen=True)
class Option:
    """One setting: its flag name (and --config key), and what its value must be."""

    name: str
    expected: str  # in words, for the error message
    parse: Callable[[Any], Any]


def _options(*rows: tuple[str, str, Callable[[Any], Any]]) -> dict[str, Option]:
    return {name: Option(name, expected, parse) for name, expected, parse in rows}


_TEXT, _TEXTS = "a string", "a string or a list of strings"
_NUMBER_LIST = 'a list of numbers or "a,b,c"'
COMMON = _options(
    ("url", _TEXT, _string), ("model", _TEXTS, _strings), ("dataset", _TEXT, _string),
    ("data-dir", _TEXT, _string), ("num-images", "an integer", _integer),
    ("seed", "an integer", _integer), ("out", _TEXT, _string), ("token-file", _TEXT, _string),
    ("tls-ca", _TEXT, _string), ("tls-cert", _TEXT, _string), ("tls-key", _TEXT, _string),
    ("timeout", "a number", _number), ("layout", _TEXT, _string),
    ("input-range", 'two numbers: [LO, HI] or "LO,HI"', _pair),
    ("mean", _NUMBER_LIST, _number_list), ("std", _NUMBER_LIST, _number_list),
    ("output", _TEXT, _string), ("output-kind", _TEXT, _string),
    ("num-classes", "an integer", _integer), ("max-batch-size", "an integer", _integer),
    ("label-map", _TEXT, _string),
    ("overwrite", "true or false", _boolean),
)  # fmt: skip
SCHEMA: dict[str, dict[str, Option]] = {
    "transfer": COMMON | _options(
        ("surrogate", _TEXTS, _strings), ("attack", _TEXTS, _strings),
        ("eps", "a number or a list of numbers", _numbers),
        ("batch-size", "an integer", _integer), ("steps", "an integer", _integer),
        ("step", "a number", _number),
    ),
    "query": COMMON | _options(
        ("attack", _TEXT, _string), ("budget", "an integer", _integer),
        ("eps", "a number", _number),
    ),
}  # fmt: skip


_TYPE_NAMES = {bool: "true/false", int: "an integer", float: "a number", str: "a string",
               list: "a list", dict: "an object", type(None): "null"}  # fmt: skip


def _type_name(v: Any) -> str:
    return _TYPE_NAMES.get(type(v), type(v).__name__)


def read_config(path: str, kind: str) -> dict[str, Any]:
    """A --config file's settings, parsed by the schema (keys with dashes or underscores)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read --config {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a JSON object of settings, "
                          f"got {_type_name(data)}")  # fmt: skip
    schema = SCHEMA[kind]
    out: dict[str, Any] = {}
    for raw, value in data.items():
        key = str(raw).replace("_", "-")
        if key not in schema:
            other = next((k for k in SCHEMA if k != kind and key in SCHEMA[k]), None)
            if other:
                raise ConfigError(f"--config {path}: {raw!r} is a setting of `defcnn attack "
                                  f"{other}`, not {kind}")  # fmt: skip
            near = difflib.get_close_matches(key, list(schema), n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
            raise ConfigError(f"--config {path}: unknown key {raw!r}{hint}")
        if key in out:
            raise ConfigError(f"--config {path} sets {key!r} twice")
        if value is None:
            continue  # null: not set
        try:
            out[key] = schema[key].parse(value)
        except _WrongType:
            raise ConfigError(f"--config {path}: {raw!r} must be {schema[key].expected}, "
                              f"got {_type_name(value)} {json.dumps(value)}") from None  # fmt: skip
    return out


def parse_flags(kind: str, flags: Mapping[str, Any]) -> dict[str, Any]:
    """The flags given on the command line (argparse's values; None/False: not given)."""
    schema = SCHEMA[kind]
    out: dict[str, Any] = {}
    for key, option in schema.items():
        value = flags.get(key.replace("-", "_"))
        if value is None or value is False:
            continue
        try:
            out[key] = option.parse(value)
        except _WrongType:
            raise ConfigError(f"--{key} must be {option.expected}, got {value!r}") from None
    return out


def build(kind: str, values: Mapping[str, Any]) -> TransferSettings | QuerySettings:
    """The run's settings from merged values (flag names as keys); defaults for the rest."""

    def get(key: str, default: Any = None) -> Any:
        return values.get(key, default)

    for key in ("url", "model", "out", "attack"):
        if key not in values:
            raise ConfigError(f"--{key} is required (on the command line or in --config)")
    endpoint = Endpoint(
        url=get("url"), models=tuple(get("model")), token_file=get("token-file"),
        tls_ca=get("tls-ca"), tls_cert=get("tls-cert"), tls_key=get("tls-key"),
        timeout=get("timeout", DEFAULTS["timeout"]),
    )  # fmt: skip
    data = DataChoice(
        dataset=get("dataset", DEFAULTS["dataset"]), data_dir=get("data-dir"),
        num_images=get("num-images", DEFAULTS["num-images"]), seed=get("seed", DEFAULTS["seed"]),
        label_map=get("label-map"),
    )  # fmt: skip
    spec = SpecChoice(
        layout=get("layout"), input_range=get("input-range"), mean=get("mean"), std=get("std"),
        output=get("output"), output_kind=get("output-kind"), num_classes=get("num-classes"),
        max_batch_size=get("max-batch-size"),
    )  # fmt: skip
    common: dict[str, Any] = dict(endpoint=endpoint, data=data, out=get("out"), spec=spec,
                                  overwrite=bool(get("overwrite", False)))  # fmt: skip
    if kind == "transfer":
        if "surrogate" not in values:
            raise ConfigError("--surrogate is required (a checkpoint; repeat for an ensemble)")
        return TransferSettings(
            surrogates=get("surrogate"), attacks=get("attack"),
            eps_255=get("eps", DEFAULTS["eps-transfer"]),
            batch_size=get("batch-size", DEFAULTS["batch-size"]), steps=get("steps"),
            step_255=get("step"), **common,
        )  # fmt: skip
    return QuerySettings(
        attack=get("attack"), budget=get("budget", DEFAULTS["budget"]),
        eps_255=get("eps", DEFAULTS["eps-query"]), **common,
    )  # fmt: skip


def settings_from(
    kind: str, flags: Mapping[str, Any], config_file: str | None = None
) -> TransferSettings | QuerySettings:
    """Flags over --config over the defaults, validated (the files it names too)."""
    values = read_config(config_file, kind) if config_file else {}
    values |= parse_flags(kind, flags)
    settings = build(kind, values)
    settings.check_files()
    return settings


def to_dict(settings: TransferSettings | QuerySettings) -> dict[str, Any]:
    """The settings as JSON-ready values (tuples as lists)."""
    return json.loads(json.dumps(asdict(settings)))


def from_dict(kind: str, data: Mapping[str, Any]) -> TransferSettings | QuerySettings:
    """Settings back from `to_dict` (lists back to tuples); unknown keys are ignored."""

    def typed(cls: type, raw: Mapping[str, Any]) -> dict[str, Any]:
        names = {f.name for f in fields(cls)}
        return {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items() if k in names}

    out = typed(TransferSettings if kind == "transfer" else QuerySettings, data)
    out["endpoint"] = Endpoint(**typed(Endpoint, data["endpoint"]))
    out["data"] = DataChoice(**typed(DataChoice, data.get("data", {})))
    out["spec"] = SpecChoice(**typed(SpecChoice, data.get("spec") or {}))
    cls = TransferSettings if kind == "transfer" else QuerySettings
    return cls(**out)
