"""Shared fixtures: storage (SQLite + PostgreSQL), a real Synapse, staff clients, the bridge."""

pytest_plugins = [
    "tests.fixtures.db",
    "tests.fixtures.synapse",
    "tests.fixtures.staff",
    "tests.fixtures.bridge",
]
