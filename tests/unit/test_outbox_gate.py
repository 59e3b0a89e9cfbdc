"""The outbox sender's gate (bridge.whatsapp.outbox_sender._Gate): at most N sends at
once across the batches in progress, a free turn going to the oldest batch first."""

from __future__ import annotations

import asyncio

from bridge.whatsapp.outbox_sender import _Gate


async def _hold(gate: _Gate, batch: int, name: str, order: list[str],
                release: asyncio.Event) -> None:
    async with gate.turn(batch):
        order.append(name)
        await release.wait()


async def test_a_free_turn_goes_to_the_oldest_batch_not_the_first_to_ask() -> None:
    gate = _Gate(1)
    order: list[str] = []
    release = asyncio.Event()
    first = asyncio.create_task(_hold(gate, 0, "a0", order, release))
    await asyncio.sleep(0)
    # Batch 2 asks before batch 1; batch 1 is older and goes first.
    waiters = [asyncio.create_task(_hold(gate, 2, "c0", order, release)),
               asyncio.create_task(_hold(gate, 1, "b0", order, release)),
               asyncio.create_task(_hold(gate, 1, "b1", order, release))]
    await asyncio.sleep(0)
    assert order == ["a0"]
    release.set()
    await asyncio.gather(first, *waiters)
    assert order == ["a0", "b0", "b1", "c0"]


async def test_never_more_than_its_size_at_once() -> None:
    gate = _Gate(3)
    inside = peak = 0

    async def send(batch: int) -> None:
        nonlocal inside, peak
        async with gate.turn(batch):
            inside += 1
            peak = max(peak, inside)
            await asyncio.sleep(0.001)
            inside -= 1

    await asyncio.gather(*(send(n % 4) for n in range(40)))
    assert peak == 3 and inside == 0


async def test_a_cancelled_waiter_does_not_keep_a_turn() -> None:
    gate = _Gate(1)
    order: list[str] = []
    release = asyncio.Event()
    holder = asyncio.create_task(_hold(gate, 0, "a0", order, release))
    await asyncio.sleep(0)
    cancelled = asyncio.create_task(_hold(gate, 0, "a1", order, release))
    later = asyncio.create_task(_hold(gate, 1, "b0", order, release))
    await asyncio.sleep(0)
    cancelled.cancel()
    release.set()
    await asyncio.gather(holder, later)
    assert cancelled.cancelled()
    assert order == ["a0", "b0"]
    async with asyncio.timeout(1):  # the turn came back: the gate is free again
        async with gate.turn(5):
            pass


async def test_a_turn_given_as_the_waiter_is_cancelled_is_passed_on() -> None:
    gate = _Gate(1)
    order: list[str] = []
    release = asyncio.Event()

    async def holder() -> None:
        async with gate.turn(0):
            order.append("a0")
            await release.wait()
        unlucky.cancel()  # given the turn just now, before it could run

    holding = asyncio.create_task(holder())
    await asyncio.sleep(0)
    unlucky = asyncio.create_task(_hold(gate, 0, "a1", order, release))
    later = asyncio.create_task(_hold(gate, 1, "b0", order, release))
    await asyncio.sleep(0)
    release.set()
    async with asyncio.timeout(1):
        await asyncio.gather(holding, later)
    assert unlucky.cancelled()
    assert order == ["a0", "b0"]
