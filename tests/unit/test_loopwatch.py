"""The loop watchdog (tests/fixtures/loopwatch.py) catches a blocked loop and only that."""

import asyncio
import time

from tests.fixtures.loopwatch import LoopWatch


def _hashes_passwords_on_the_loop() -> None:
    time.sleep(0.25)  # stands for any blocking call made from a coroutine


async def test_a_blocking_call_is_caught_with_its_stack() -> None:
    watch = LoopWatch()
    watch.start()
    await asyncio.sleep(0.05)
    _hashes_passwords_on_the_loop()
    await asyncio.sleep(0.05)
    stalls = await watch.stop()
    assert len(stalls) == 1
    assert stalls[0].seconds > 0.1
    assert "_hashes_passwords_on_the_loop" in stalls[0].stack
    assert "blocked 1 time(s)" in watch.report()


async def test_waiting_and_short_work_are_not_stalls() -> None:
    watch = LoopWatch()
    watch.start()
    await asyncio.sleep(0.3)  # idle in the selector, however long
    for _ in range(10):
        time.sleep(0.02)  # short slices, each well under the limit
        await asyncio.sleep(0)
    assert await watch.stop() == []
