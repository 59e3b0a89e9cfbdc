"""civic-bridge's Synapse module (configure `civic_bridge_synapse.PolicyModule`).

The rules live in `rules` (pure, no Synapse import); `PolicyModule` is imported
lazily so `rules` can be used, and tested, where Synapse is not installed.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name == "PolicyModule":
        from civic_bridge_synapse.module import PolicyModule

        return PolicyModule
    raise AttributeError(name)
