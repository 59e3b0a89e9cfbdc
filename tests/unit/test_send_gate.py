"""The send gate (bridge.matrix.send_gate): the bridge's room sends that find others in
flight wait until those are answered, then leave together (group commit)."""

from __future__ import annotations

import asyncio
from collections import Counter

from bridge.matrix.send_gate import SendGate


async def _sender(gate: SendGate, name: str, sent: list[str],
                  answer: asyncio.Event) -> None:
    async with gate.turn():
        sent.append(name)
        await answer.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def _started(gate: SendGate, name: str, sent: list[str],
                   answer: asyncio.Event) -> asyncio.Task[None]:
    """A send under way: in flight, or waiting for its turn."""
    task = asyncio.create_task(_sender(gate, name, sent, answer))
    await _settle()
    return task


def _counted(grace: float, longest_wait: float) -> tuple[SendGate, Counter[int]]:
    """A gate and how often N sends left together, as the metric is told."""
    batches: Counter[int] = Counter()
    return SendGate(grace=grace, longest_wait=longest_wait,
                    on_batch=lambda sends: batches.update([sends])), batches


async def test_a_send_with_nothing_in_flight_leaves_at_once() -> None:
    gate, batches = _counted(grace=10.0, longest_wait=10.0)  # a wait would hang the test
    async with asyncio.timeout(1):
        async with gate.turn():
            pass
        async with gate.turn():  # the first one was answered: nothing in flight
            pass
    assert batches == {1: 2}


async def test_sends_that_find_one_in_flight_leave_together_once_it_is_answered() -> None:
    gate, batches = _counted(grace=0.01, longest_wait=10.0)
    sent: list[str] = []
    first, later = asyncio.Event(), asyncio.Event()
    a = await _started(gate, "a", sent, first)
    b = await _started(gate, "b", sent, later)
    c = await _started(gate, "c", sent, later)
    await asyncio.sleep(0.05)
    assert sent == ["a"]  # b and c wait while a is in flight
    first.set()
    await a
    await _settle()
    assert sent == ["a"]  # the grace: a's lane may come back to join them
    await asyncio.sleep(0.03)
    assert sent == ["a", "b", "c"]  # in their order of arrival
    later.set()
    await asyncio.gather(b, c)
    assert batches == {1: 1, 2: 1}


async def test_a_send_that_comes_back_within_the_grace_joins_the_batch() -> None:
    gate, batches = _counted(grace=0.05, longest_wait=10.0)
    sent: list[str] = []
    first, later = asyncio.Event(), asyncio.Event()
    a = await _started(gate, "a1", sent, first)
    b = await _started(gate, "b", sent, later)
    first.set()
    await a
    a2 = await _started(gate, "a2", sent, later)  # a's lane, next item
    assert sent == ["a1"]
    await asyncio.sleep(0.1)
    assert sent == ["a1", "b", "a2"]
    later.set()
    await asyncio.gather(b, a2)
    assert batches == {1: 1, 2: 1}


async def test_a_send_that_is_never_answered_holds_the_others_only_so_long() -> None:
    gate = SendGate(grace=0.001, longest_wait=0.05)
    sent: list[str] = []
    stuck, later = asyncio.Event(), asyncio.Event()
    slow = await _started(gate, "slow", sent, stuck)
    b = await _started(gate, "b", sent, later)
    await asyncio.sleep(0.01)
    assert sent == ["slow"]
    await asyncio.sleep(0.1)
    assert sent == ["slow", "b"]  # released by the longest wait
    later.set()
    await b
    # The stuck send no longer counts: the next one leaves at once.
    async with asyncio.timeout(0.04):
        async with gate.turn():
            sent.append("c")
    assert sent == ["slow", "b", "c"]
    stuck.set()
    await slow


async def test_a_cancelled_waiter_does_not_hold_the_others() -> None:
    gate = SendGate(grace=0.001, longest_wait=10.0)
    sent: list[str] = []
    first, later = asyncio.Event(), asyncio.Event()
    a = await _started(gate, "a", sent, first)
    b = await _started(gate, "b", sent, later)
    c = await _started(gate, "c", sent, later)
    b.cancel()
    first.set()
    await a
    await asyncio.sleep(0.02)
    assert sent == ["a", "c"]
    later.set()
    await c
    # Nothing is left counted in flight: a new send leaves at once.
    async with asyncio.timeout(1):
        async with gate.turn():
            pass


async def test_a_send_that_fails_is_answered_too() -> None:
    gate = SendGate(grace=0.001, longest_wait=10.0)
    sent: list[str] = []
    later = asyncio.Event()

    async def failing() -> None:
        async with gate.turn():
            await asyncio.sleep(0.01)
            raise ConnectionError("homeserver unreachable")

    a = asyncio.create_task(failing())
    await _settle()
    b = await _started(gate, "b", sent, later)
    results = await asyncio.gather(a, return_exceptions=True)
    assert isinstance(results[0], ConnectionError)
    await asyncio.sleep(0.02)
    assert sent == ["b"]
    later.set()
    await b
