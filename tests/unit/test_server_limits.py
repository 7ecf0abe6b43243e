"""Server limits: the byte budget (bounded, first come first served, given back on every way
out), what names a version, and the field counts of a request before it is parsed."""

from __future__ import annotations

import asyncio

import pytest

from defcnn.names import parse_version
from defcnn.protos import grpc_service_pb2 as pb
from defcnn.server.errors import InvalidArgument, ResourceExhausted
from defcnn.server.inflight import ByteBudget
from defcnn.server.wire import MAX_PARAMETERS, MAX_TENSORS, check_infer_request


def test_reservations_never_exceed_the_limit_and_are_served_in_order() -> None:
    async def run() -> list[int]:
        budget = ByteBudget(100)
        order: list[int] = []
        await budget.acquire(60, 1)

        async def waiter(i: int, size: int) -> None:
            await budget.acquire(size, 5)
            order.append(i)
            assert budget.used <= budget.limit

        tasks = [asyncio.ensure_future(waiter(i, s)) for i, s in enumerate((50, 10, 40))]
        await asyncio.sleep(0.01)
        assert order == []  # 10 would fit, but it came after 50: no overtaking
        budget.release(60)
        await asyncio.gather(*tasks)
        assert budget.used == 100 and budget.peak == 100
        return order

    assert asyncio.run(run()) == [0, 1, 2]


def test_a_wait_that_times_out_is_refused_and_leaves_nothing_reserved() -> None:
    async def run() -> None:
        budget = ByteBudget(10)
        await budget.acquire(10, 1)
        with pytest.raises(ResourceExhausted):
            await budget.acquire(5, 0.05)
        budget.release(10)
        assert budget.used == 0
        await budget.acquire(10, 0.05)  # the timed-out waiter is gone from the queue

    asyncio.run(run())


def test_a_cancelled_waiter_gives_way_to_the_next() -> None:
    async def run() -> None:
        budget = ByteBudget(10)
        await budget.acquire(8, 1)
        big = asyncio.ensure_future(budget.acquire(10, 5))
        small = asyncio.ensure_future(budget.acquire(2, 5))
        await asyncio.sleep(0.01)
        big.cancel()
        await asyncio.wait_for(small, 1)  # no longer behind the cancelled one
        assert budget.used == 10

    asyncio.run(run())


def test_a_reservation_larger_than_the_limit_takes_the_whole_budget() -> None:
    async def run() -> None:
        budget = ByteBudget(10)
        await budget.acquire(1000, 1)
        assert budget.used == 10
        assert budget.shrink(1000, 3) == 3 and budget.used == 3
        budget.release(3)
        assert budget.used == 0

    asyncio.run(run())


@pytest.mark.parametrize(
    ("name", "version"),
    [("1", 1), ("0", 0), ("42", 42), ("9" * 18, int("9" * 18)), ("01", None), ("²", None),
     ("٣", None), ("１", None), ("-1", None), ("+1", None), (" 1", None), ("1.0", None),
     ("9" * 19, None), ("", None), ("0x1", None)],
)  # fmt: skip
def test_only_plain_ascii_numbers_are_versions(name: str, version: int | None) -> None:
    assert parse_version(name) == version


def _request(**counts: int) -> bytes:
    request = pb.ModelInferRequest(model_name="m")
    for i in range(counts.get("parameters", 0)):
        request.parameters[f"p{i}"].int64_param = 1
    for _ in range(counts.get("inputs", 0)):
        request.inputs.add(name="input", datatype="FP32", shape=[1])
    for _ in range(counts.get("outputs", 0)):
        request.outputs.add(name="logits")
    for _ in range(counts.get("raw", 0)):
        request.raw_input_contents.append(b"\0" * 4)
    if "output_parameters" in counts:
        out = request.outputs.add(name="logits")
        for i in range(counts["output_parameters"]):
            out.parameters[f"q{i}"].int64_param = 1
    return request.SerializeToString()


@pytest.mark.parametrize(
    "counts",
    [{"parameters": MAX_PARAMETERS}, {"inputs": MAX_TENSORS, "outputs": MAX_TENSORS,
     "raw": MAX_TENSORS}, {"output_parameters": MAX_PARAMETERS}],
)  # fmt: skip
def test_requests_at_the_limits_pass_the_count(counts: dict[str, int]) -> None:
    check_infer_request(_request(**counts))


@pytest.mark.parametrize(
    ("counts", "words"),
    [({"parameters": MAX_PARAMETERS + 1}, "parameters"), ({"inputs": MAX_TENSORS + 1}, "inputs"),
     ({"outputs": MAX_TENSORS + 1}, "outputs"), ({"raw": MAX_TENSORS + 1}, "raw_input_contents"),
     ({"output_parameters": MAX_PARAMETERS + 1}, "parameters")],
)  # fmt: skip
def test_requests_over_the_limits_are_refused_before_parsing(counts, words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        check_infer_request(_request(**counts))


def test_bytes_that_are_no_message_are_left_to_the_parser() -> None:
    check_infer_request(b"\xff\xff\xff\xff")  # the parser describes it: no error here
