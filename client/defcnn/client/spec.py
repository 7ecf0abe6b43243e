"""What an endpoint takes and gives, read once from its ModelMetadata (and ModelConfig when
the server offers one): the declared spec a black-box target needs (ART and Counterfit call
it input shape, dtype, clip values, classes, scores or labels).

`build_spec` is pure: metadata, config and overrides in, an `EndpointSpec` out. Metadata
cannot say whether a float output holds logits or probabilities, so the client answers that
with one probe query (`needs_probe`, `probe_kind`) and passes the probe's scores in.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import numpy as np

from defcnn.errors import ConfigError
from defcnn.names import parse_version
from defcnn.protos import grpc_service_pb2 as pb

Layout = Literal["NCHW", "NHWC"]
Datatype = Literal["FP32", "FP16", "UINT8"]
OutputKind = Literal["logits", "probabilities", "label"]

LAYOUTS: tuple[Layout, ...] = ("NCHW", "NHWC")
INPUT_DATATYPES: tuple[Datatype, ...] = ("FP32", "FP16", "UINT8")
OUTPUT_KINDS: tuple[OutputKind, ...] = ("logits", "probabilities", "label")
SCORE_DATATYPES = ("FP32", "FP16", "FP64")  # decoded to float32
LABEL_DATATYPES = ("INT32", "INT64", "BYTES")  # one class per image; BYTES as text
PROBABILITY_ATOL = 1e-3  # a probe row within this of summing to 1 (and >= 0) is probabilities
CHANNELS = 3  # RGB only: the data sets and the attacks are RGB
# Images per request when the metadata allows any batch (a leading -1) but no ModelConfig
# says how many (KServe's ModelServer offers none): chunks of this size, unless
# --max-batch-size says otherwise. Only throughput depends on it, never a result.
UNCONFIGURED_BATCH = 64

_Meta = pb.ModelMetadataResponse.TensorMetadata


def _floats(value: Sequence[float] | None, field: str, sizes: tuple[int, ...]) -> Any:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{field} must be numbers, got {value!r}") from exc
    if len(out) not in sizes or not all(math.isfinite(v) for v in out):
        raise ConfigError(f"{field} must be {' or '.join(map(str, sizes))} finite numbers: {value}")
    return out


@dataclass(frozen=True)
class SpecOverrides:
    """What the caller knows better than the metadata (the CLI's --layout, --input-range, ...).
    Each one given wins over what `build_spec` reads; None leaves it to the endpoint."""

    layout: str | None = None
    input_range: tuple[float, float] | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    output: str | None = None
    output_kind: str | None = None
    num_classes: int | None = None
    max_batch_size: int | None = None

    def __post_init__(self) -> None:
        if self.layout is not None and self.layout not in LAYOUTS:
            raise ConfigError(f"layout must be NCHW or NHWC, got {self.layout!r}")
        if self.output_kind is not None and self.output_kind not in OUTPUT_KINDS:
            raise ConfigError(
                f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, got {self.output_kind!r}"
            )
        if self.num_classes is not None and (
            isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int)
            or self.num_classes < 2
        ):  # fmt: skip
            raise ConfigError(f"num_classes must be an integer >= 2, got {self.num_classes!r}")
        if self.max_batch_size is not None and (
            isinstance(self.max_batch_size, bool) or not isinstance(self.max_batch_size, int)
            or self.max_batch_size < 1
        ):  # fmt: skip
            raise ConfigError(
                f"max_batch_size must be an integer >= 1, got {self.max_batch_size!r}"
            )
        if self.output is not None and not self.output:
            raise ConfigError("output must name one of the model's outputs, got ''")
        span = _floats(self.input_range, "input_range", (2,))
        if span is not None and not span[0] < span[1]:
            raise ConfigError(f"input_range must be (LOW, HIGH) with LOW < HIGH, got {span}")
        std = _floats(self.std, "std", (1, CHANNELS))
        if std is not None and min(std) <= 0:
            raise ConfigError(f"std must be > 0 per channel, got {std}")
        # Lists from the CLI or JSON become tuples, so overrides hash (the client caches on them).
        object.__setattr__(self, "input_range", span)
        object.__setattr__(self, "mean", _floats(self.mean, "mean", (1, CHANNELS)))
        object.__setattr__(self, "std", std)


@dataclass(frozen=True)
class EndpointSpec:
    """How to send images to one model version and read its answers.

    Images reach the client as float32 [N, 3, H, W] in [0, 1]; the client sends pixel 0.0 as
    `input_range[0]` and 1.0 as `input_range[1]` (linearly between), then subtracts `mean`
    and divides by `std` per channel, in `layout` and `datatype` (UINT8 rounded half to even).
    `max_batch_size` is Triton's: the most images one request may hold, 0 when the server
    does not batch (one image per request; a leading -1 with no config to say more gives
    `UNCONFIGURED_BATCH`); `batch_dim` says whether a request tensor has a
    leading batch dimension at all. `outputs` lists every output the model offers, so
    `describe()` can say that one was chosen.
    """

    model: str
    version: str
    input_name: str
    datatype: Datatype
    layout: Layout
    channels: int
    height: int
    width: int
    input_range: tuple[float, float]
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    output_name: str
    output_kind: OutputKind
    num_classes: int | None
    labels: tuple[str, ...]
    max_batch_size: int
    batch_dim: bool = True
    outputs: tuple[str, ...] = ()

    @property
    def score_based(self) -> bool:
        """Whether the endpoint answers scores (logits or probabilities), not just a label."""
        return self.output_kind != "label"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        """What the client takes per image: (3, H, W), whatever the endpoint's layout."""
        return (self.channels, self.height, self.width)

    @property
    def request_batch(self) -> int:
        """The most images the client puts in one request."""
        return max(1, self.max_batch_size)

    def result_key(self) -> dict[str, Any]:
        """What of the spec can change a result, for deciding whether a rerun is a resume:
        everything but how many images go in one request."""
        key = self.to_dict()
        del key["max_batch_size"]
        return key

    def describe(self) -> str:
        """One console line: what is sent and what comes back."""
        version = f" v{self.version}" if self.version else ""
        sent = f"{self.datatype} {self.layout} {self.channels}x{self.height}x{self.width}"
        span = f"[{_num(self.input_range[0])}, {_num(self.input_range[1])}]"
        norm = ""
        if self.mean is not None or self.std is not None:
            norm = f", mean {_nums(self.mean or (0.0,))} std {_nums(self.std or (1.0,))}"
        chosen = ""
        if len(self.outputs) > 1:
            others = ", ".join(o for o in self.outputs if o != self.output_name)
            chosen = f" (chosen over {others}; --output picks another)"
        classes = "classes unknown" if self.num_classes is None else f"{self.num_classes} classes"
        if self.labels:
            classes += " with labels"
        batch = f"max batch {self.max_batch_size}" if self.max_batch_size else "no batching"
        return (
            f"{self.model}{version}: input {self.input_name!r} {sent} in {span}{norm}; "
            f"output {self.output_name!r}{chosen} {self.output_kind}, {classes}; {batch}"
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (tuples become lists), for results.json and resume keys."""
        return {
            f.name: list(v) if isinstance(v := getattr(self, f.name), tuple) else v
            for f in dataclasses.fields(self)
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> EndpointSpec:
        """The inverse of `to_dict`; unknown or missing fields are a ConfigError."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        unknown, missing = sorted(set(data) - names), sorted(required - set(data))
        if unknown or missing:
            raise ConfigError(f"endpoint spec: unknown fields {unknown}, missing fields {missing}")
        values: dict[str, Any] = {
            k: tuple(v) if isinstance(v, list) else v for k, v in data.items()
        }
        if values["datatype"] not in INPUT_DATATYPES or values["layout"] not in LAYOUTS:
            raise ConfigError(f"endpoint spec: bad datatype or layout in {dict(data)}")
        if values["output_kind"] not in OUTPUT_KINDS:
            raise ConfigError(f"endpoint spec: bad output_kind {values['output_kind']!r}")
        return cls(**values)


def _num(v: float) -> str:
    return f"{v:g}"


def _nums(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(_num(v) for v in values) + ")"


def _describe_tensor(t: _Meta) -> str:
    return f"{t.name} ({t.datatype} {list(t.shape)})"


def _axes(metadata: pb.ModelMetadataResponse, t: _Meta) -> list[int]:
    """An output's axes of size other than 1, without the batch axis: outputs lead with one
    when the (image) input does, [-1, 3, H, W]; Triton's config-style [3, H, W] has none."""
    explicit = len(metadata.inputs) == 1 and len(metadata.inputs[0].shape) == 4
    return [int(d) for d in (t.shape[1:] if explicit else t.shape) if d != 1]


def _scores_shaped(metadata: pb.ModelMetadataResponse, t: _Meta) -> bool:
    """A float output with one class axis (any other axes of size 1)."""
    return t.datatype in SCORE_DATATYPES and len(_axes(metadata, t)) == 1


def select_output(metadata: pb.ModelMetadataResponse, overrides: SpecOverrides) -> _Meta:
    """The output to read: the one named, the only one, or the only scores-shaped one."""
    outputs = list(metadata.outputs)
    offered = ", ".join(_describe_tensor(o) for o in outputs)
    if overrides.output is not None:
        for o in outputs:
            if o.name == overrides.output:
                return o
        raise ConfigError(f"model {metadata.name!r} has no output {overrides.output!r}: {offered}")
    if len(outputs) == 1:
        return outputs[0]
    if not outputs:
        raise ConfigError(f"model {metadata.name!r} declares no outputs")
    scores = [o for o in outputs if _scores_shaped(metadata, o)]
    if len(scores) == 1:
        return scores[0]
    raise ConfigError(
        f"model {metadata.name!r} has outputs {offered}; pass --output NAME to pick one"
    )


def needs_probe(metadata: pb.ModelMetadataResponse, overrides: SpecOverrides | None) -> bool:
    """Whether the output gives scores that only a query can call logits or probabilities."""
    overrides = overrides or SpecOverrides()
    chosen = select_output(metadata, overrides)
    return chosen.datatype in SCORE_DATATYPES and overrides.output_kind is None


def probe_kind(scores: np.ndarray) -> OutputKind:
    """Probabilities when every probed row is >= 0 and sums to 1 within PROBABILITY_ATOL."""
    s = np.asarray(scores, dtype=np.float64)
    s = s.reshape(1, -1) if s.ndim == 1 else s
    if s.size == 0 or not np.isfinite(s).all():
        raise ConfigError(f"the probe query came back with no or non-finite scores: {s.tolist()}")
    sums_to_one = bool(np.all(np.abs(s.sum(axis=1) - 1.0) <= PROBABILITY_ATOL))
    return "probabilities" if bool((s >= 0).all()) and sums_to_one else "logits"


def _latest(versions: Sequence[str]) -> str:
    ordered = sorted(versions, key=lambda v: -1 if (n := parse_version(v)) is None else n)
    return ordered[-1] if ordered else ""


def _input(
    metadata: pb.ModelMetadataResponse, max_batch: int, overrides: SpecOverrides
) -> tuple[_Meta, Layout, int, int, bool, int]:
    """The image input: (tensor, layout, height, width, batch_dim, max_batch_size)."""
    name = metadata.name
    if len(metadata.inputs) != 1:
        names = ", ".join(_describe_tensor(t) for t in metadata.inputs) or "none"
        raise ConfigError(f"model {name!r} must take one image input, it takes: {names}")
    t = metadata.inputs[0]
    if t.datatype not in INPUT_DATATYPES:
        raise ConfigError(
            f"input {t.name!r} of model {name!r} is {t.datatype}; "
            f"supported input datatypes: {', '.join(INPUT_DATATYPES)}"
        )
    shape = [int(d) for d in t.shape]
    if len(shape) == 4:  # a leading batch dimension: -1, or a fixed 1 (one image per request)
        if shape[0] not in (-1, 1):
            raise ConfigError(
                f"input {t.name!r} of model {name!r} has a fixed batch of {shape[0]} ({shape}); "
                "only a variable batch (-1) or a batch of 1 is supported"
            )
        batch_dim, dims = True, shape[1:]
        max_batch = 1 if shape[0] == 1 else max_batch or UNCONFIGURED_BATCH
    elif len(shape) == 3:  # Triton: with max_batch_size > 0 the batch dimension is implicit
        batch_dim, dims = max_batch > 0, shape
    else:
        raise ConfigError(
            f"input {t.name!r} of model {name!r} has shape {shape}; expected an image "
            "[-1, 3, H, W] or [-1, H, W, 3] (or without the batch dimension)"
        )
    nchw = dims[0] == CHANNELS and dims[2] != CHANNELS
    nhwc = dims[2] == CHANNELS and dims[0] != CHANNELS
    layout: Layout
    if overrides.layout is not None:
        layout = cast(Layout, overrides.layout)
    elif nchw or nhwc:
        layout = "NCHW" if nchw else "NHWC"
    else:
        raise ConfigError(
            f"cannot tell the layout of input {t.name!r} of model {name!r} from its shape "
            f"{shape}: pass --layout NCHW or --layout NHWC"
        )
    c, h, w = dims if layout == "NCHW" else (dims[2], dims[0], dims[1])
    if c not in (CHANNELS, -1):
        raise ConfigError(
            f"input {t.name!r} of model {name!r} ({layout} {shape}) has {c} channels; "
            f"only RGB images ({CHANNELS} channels) are supported"
        )
    if h < 1 or w < 1:
        raise ConfigError(
            f"input {t.name!r} of model {name!r} ({layout} {shape}) has a variable height or "
            "width; only fixed-size inputs are supported"
        )
    return t, layout, h, w, batch_dim, max_batch


def _classes(
    metadata: pb.ModelMetadataResponse, out: _Meta, overrides: SpecOverrides,
    scores: np.ndarray | None, labels: Sequence[str],
) -> tuple[OutputKind, int | None]:  # fmt: skip
    """The output's kind and class count."""
    where = f"output {out.name!r} of model {metadata.name!r}"
    axes = _axes(metadata, out)
    if out.datatype in LABEL_DATATYPES:
        if axes:
            raise ConfigError(
                f"{where} is {out.datatype} {list(out.shape)}; a label output holds one class "
                "per image, [N] or [N, 1]"
            )
        if overrides.output_kind not in (None, "label"):
            raise ConfigError(f"{where} gives labels ({out.datatype}), not {overrides.output_kind}")
        return "label", overrides.num_classes or (len(labels) or None)
    if out.datatype not in SCORE_DATATYPES:
        raise ConfigError(
            f"{where} is {out.datatype}; supported outputs: {', '.join(SCORE_DATATYPES)} scores "
            f"or {', '.join(LABEL_DATATYPES)} labels"
        )
    if len(axes) != 1:
        raise ConfigError(f"{where} has shape {list(out.shape)}; scores must be [N, C]")
    if overrides.output_kind == "label":
        raise ConfigError(
            f"{where} gives scores ({out.datatype}); output_kind label needs a label output"
        )
    declared = axes[0] if axes[0] > 0 else None
    probed = None if scores is None else int(np.asarray(scores).shape[-1])
    if declared is not None and probed is not None and probed != declared:
        raise ConfigError(f"{where} declares {declared} classes but the probe returned {probed}")
    num = declared or probed or (len(labels) or None)
    if overrides.num_classes is not None:
        if num is not None and overrides.num_classes != num:
            raise ConfigError(
                f"num_classes {overrides.num_classes} contradicts {where}, which gives {num}"
            )
        num = overrides.num_classes
    kind = overrides.output_kind
    if kind is None:
        if scores is None:
            raise ConfigError(
                f"{where} gives scores; without a probe query metadata cannot say whether they "
                "are logits or probabilities: pass output_kind"
            )
        kind = probe_kind(scores)
    return cast(OutputKind, kind), num


def build_spec(
    metadata: pb.ModelMetadataResponse, config: pb.ModelConfigResponse | None = None,
    overrides: SpecOverrides | None = None, *, version: str = "",
    scores: np.ndarray | None = None, labels: Sequence[str] = (),
) -> EndpointSpec:  # fmt: skip
    """The spec of `metadata`'s model at `version` ("" = the latest it lists).

    `scores` is the endpoint's answer to a probe image (needed when `needs_probe` says so),
    `labels` the class names the server offers (the client reads them with the same probe).
    """
    overrides = overrides or SpecOverrides()
    max_batch = int(config.config.max_batch_size) if config is not None else 0
    if max_batch < 0:
        raise ConfigError(f"model {metadata.name!r}: max_batch_size {max_batch} < 0 in its config")
    tensor, layout, height, width, batch_dim, max_batch = _input(metadata, max_batch, overrides)
    if overrides.max_batch_size is not None:
        if not batch_dim:
            raise ConfigError(
                f"model {metadata.name!r} takes one image per request (no batch dimension); "
                "--max-batch-size cannot change that"
            )
        max_batch = overrides.max_batch_size
    out = select_output(metadata, overrides)
    kind, num_classes = _classes(metadata, out, overrides, scores, labels)
    if labels and num_classes is not None and len(labels) != num_classes:
        raise ConfigError(
            f"model {metadata.name!r} offers {len(labels)} labels for {num_classes} classes"
        )
    datatype = cast(Datatype, tensor.datatype)
    default_range = (0.0, 255.0) if datatype == "UINT8" else (0.0, 1.0)
    return EndpointSpec(
        model=metadata.name, version=version or _latest(list(metadata.versions)),
        input_name=tensor.name, datatype=datatype, layout=layout, channels=CHANNELS,
        height=height, width=width, input_range=overrides.input_range or default_range,
        mean=overrides.mean, std=overrides.std, output_name=out.name, output_kind=kind,
        num_classes=num_classes, labels=tuple(labels), max_batch_size=max_batch,
        batch_dim=batch_dim, outputs=tuple(o.name for o in metadata.outputs),
    )  # fmt: skip
