"""Meta's rate limits as the outbox keeps them (bridge.whatsapp.pacing), on a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from bridge.whatsapp.pacing import Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_recipient_interval_postpones_only_that_citizen() -> None:
    clock = Clock()
    pacer = Pacer(0, 6.0, clock)
    assert pacer.too_early(1) == 0
    pacer.sent(1)
    clock.now += 2
    assert pacer.too_early(1) == pytest.approx(4.0)
    assert pacer.too_early(2) == 0
    clock.now += 4
    assert pacer.too_early(1) == 0


def test_no_interval_never_postpones() -> None:
    pacer = Pacer(0, 0, Clock())
    pacer.sent(1)
    assert pacer.too_early(1) == 0


async def test_sends_per_second_take_consecutive_slots(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(round(seconds, 6))

    monkeypatch.setattr(asyncio, "sleep", fake_sleep)
    pacer = Pacer(4, 0, clock)  # one send every 0.25 s
    for _ in range(4):
        await pacer.slot()
    assert slept == [0.25, 0.5, 0.75]
    clock.now += 5  # idle: no debt carried over
    await pacer.slot()
    assert slept == [0.25, 0.5, 0.75]


async def test_unlimited_never_waits() -> None:
    pacer = Pacer(0, 0, Clock())
    for _ in range(1000):
        await pacer.slot()
