"""The garbage collector in a long-running bridge: what start-up built is frozen.

A full collection walks every tracked object, and it holds the GIL while it does: the
event loop stops, and so does the ingest thread that answers webhooks
(bridge.web.ingest_thread). Most of a started bridge's heap (modules, configuration,
schemas, SQLAlchemy's compiled mappers, nio's classes) lives as long as the process,
so walking it again and again finds nothing. `freeze_startup_heap` moves it out of the
collector's sight (`gc.freeze`); later collections walk only what came after. Called
once the bridge is ready (`civic-bridge run`, bridge.cli), not by tests, whose process
holds many bridges one after the other.
"""

from __future__ import annotations

import gc
import logging

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Collect once, then freeze what survived; returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("start-up heap frozen: %d objects out of the collector's sight", frozen)
    return frozen
