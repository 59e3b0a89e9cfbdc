"""bridge.heap: what start-up built leaves the collector's sight (gc.freeze)."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from bridge.heap import freeze_startup_heap


class Built:
    """An object start-up made, in a reference cycle (tracked by the collector)."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen() -> Iterator[None]:
    yield
    gc.unfreeze()  # the test process goes on collecting as before


def test_objects_built_before_the_freeze_are_no_longer_walked(unfrozen: None) -> None:
    built = Built()
    assert any(o is built for o in gc.get_objects())
    frozen = freeze_startup_heap()
    assert frozen == gc.get_freeze_count() > 0
    assert not any(o is built for o in gc.get_objects())
    later = Built()
    assert any(o is later for o in gc.get_objects())
