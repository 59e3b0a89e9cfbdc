"""Shared fixtures: storage (SQLite + PostgreSQL), a real Synapse, staff clients, the bridge."""

from hypothesis import settings

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.synapse",
    "tests.fixtures.staff",
    "tests.fixtures.bridge",
    "tests.fixtures.loopwatch",
]

# Property tests assert behaviour, not speed (speed lives in bench/): hypothesis's
# 200 ms per-example deadline only flakes on a loaded 2-core CI machine.
settings.register_profile("civic-bridge", deadline=None)
settings.load_profile("civic-bridge")
