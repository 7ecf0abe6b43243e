"""The server's onnx-free reader of external-data locations agrees with the onnx package."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

from defcnn.server._external_data import check_external_data, external_locations
from defcnn.server.errors import InvalidArgument


def _tensor(name: str, location: str | None) -> TensorProto:
    tensor = numpy_helper.from_array(np.ones((2, 2), np.float32), name)
    if location is not None:
        set_external_data(tensor, location=location, offset=0, length=16)
        tensor.ClearField("raw_data")
        tensor.data_location = TensorProto.EXTERNAL
    return tensor


def _model(locations: dict[str, str | None]) -> onnx.ModelProto:
    """A tensor stored at each place the reader walks: initializer, sparse initializer,
    Constant attribute, a subgraph's initializer and a function's Constant."""
    sparse = onnx.SparseTensorProto(
        values=_tensor("sparse_values", locations.get("sparse")),
        indices=numpy_helper.from_array(np.array([0], np.int64), "sparse_indices"),
        dims=[4],
    )
    branch = helper.make_graph(
        [helper.make_node("Identity", ["sub_w"], ["b"])], "branch", [],
        [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2, 2])],
        [_tensor("sub_w", locations.get("subgraph"))],
    )  # fmt: skip
    nodes = [
        helper.make_node("Constant", [], ["c"], value=_tensor("const", locations.get("attr"))),
        helper.make_node("If", ["cond"], ["y"], then_branch=branch, else_branch=branch),
        helper.make_node("F", ["c"], ["z"], domain="local"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2])],
        [_tensor("w", locations.get("initializer"))], sparse_initializer=[sparse],
    )  # fmt: skip
    function = helper.make_function(
        "local", "F", ["x"], ["z"],
        [helper.make_node("Constant", [], ["k"], value=_tensor("fconst", locations.get("fn"))),
         helper.make_node("Add", ["x", "k"], ["z"])],
        [helper.make_opsetid("", 17)],
    )  # fmt: skip
    return helper.make_model(
        graph, functions=[function],
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
    )  # fmt: skip


PLACES = ("initializer", "sparse", "attr", "subgraph", "fn")
NAMES = {"initializer": "w", "sparse": "sparse_values", "attr": "const", "subgraph": "sub_w",
         "fn": "fconst"}  # fmt: skip


def test_every_place_a_tensor_can_live_is_read() -> None:
    locations: dict[str, str | None] = {p: f"{p}.bin" for p in PLACES}
    found = sorted(external_locations(_model(locations).SerializeToString()))
    # the subgraph is both branches of the If
    expected = sorted([(NAMES[p], f"{p}.bin") for p in PLACES] + [("sub_w", "subgraph.bin")])
    assert found == expected
    assert list(external_locations(_model({}).SerializeToString())) == []


@pytest.mark.parametrize("place", PLACES)
@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "a/../../x"])
def test_a_location_outside_the_folder_is_refused(
    tmp_path: Path, place: str, location: str
) -> None:
    path = tmp_path / "1" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(_model({place: location}).SerializeToString())
    with pytest.raises(InvalidArgument, match="outside"):
        check_external_data(path)


def test_locations_inside_the_folder_and_no_external_data_pass(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(_model({p: f"data/{p}.bin" for p in PLACES}).SerializeToString())
    check_external_data(path)
    path.write_bytes(_model({}).SerializeToString())
    check_external_data(path)


def test_a_malformed_file_is_invalid_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    data = _model({"initializer": "w.bin"}).SerializeToString()
    for broken in (data[: len(data) // 2], b"\xff" * 64, b"\x0b\x00"):
        path.write_bytes(broken)
        with pytest.raises(InvalidArgument, match="not a valid ONNX file"):
            check_external_data(path)
