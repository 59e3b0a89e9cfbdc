"""Decoding JSON bodies from outside (webhooks, appservice transactions) into values
every later step can store.

`json.loads` accepts what cannot be stored or re-encoded: a lone UTF-16 surrogate
(`"\\ud800"`) becomes a `str` that UTF-8 refuses, and `NaN`/`Infinity` are not JSON.
Left in, they fail the request after it was accepted, every time it is retried.
"""

from __future__ import annotations

import json
import re
from typing import Any, Final

MAX_DEPTH: Final = 64  # Meta's and Matrix's bodies are a dozen levels deep at most

_SURROGATE = re.compile("[\ud800-\udfff]")
REPLACEMENT: Final = "\ufffd"


class BodyError(ValueError):
    """The body is not JSON this bridge can accept (the caller answers 400)."""


def _refuse_constant(name: str) -> Any:
    raise BodyError(f"{name} is not JSON")


def _clean_str(text: str) -> str:
    return _SURROGATE.sub(REPLACEMENT, text) if _SURROGATE.search(text) else text


def clean(value: Any, max_depth: int = MAX_DEPTH) -> Any:
    """`value` with every lone surrogate (in keys and strings) replaced by U+FFFD.

    Iterative, so depth costs no stack; BodyError past `max_depth` levels.
    """
    if isinstance(value, str):
        return _clean_str(value)
    if not isinstance(value, (dict, list)):
        return value
    root: list[Any] = [value]
    stack: list[tuple[Any, int]] = [(root, 0)]
    while stack:
        container, depth = stack.pop()
        if depth > max_depth:
            raise BodyError("nested too deeply")
        if isinstance(container, list):
            for i, item in enumerate(container):
                if isinstance(item, str):
                    container[i] = _clean_str(item)
                elif isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
        else:
            for key in list(container):
                item = container[key]
                if isinstance(item, str):
                    item = _clean_str(item)
                elif isinstance(item, (dict, list)):
                    stack.append((item, depth + 1))
                fixed = _clean_str(key)
                if fixed != key:
                    del container[key]
                container[fixed] = item
    return root[0]


def load_body(raw: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Decode an untrusted JSON body (UTF-8, BOM allowed); BodyError for anything not acceptable."""
    try:
        value = json.loads(raw.decode("utf-8-sig"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise BodyError("body is not JSON") from exc
    return clean(value, max_depth)
