"""Meta's request contract for the Cloud API, checked the way Graph checks it.

The rules live in one JSON Schema (Draft 2020-12), `schemas/messages.json`: every
documented body of `POST /{phone-number-id}/messages` (each message type, replies,
`biz_opaque_callback_data`, mark-as-read with the typing indicator) and the form fields
of a media upload. The simulator refuses what does not match, and the unit tests run
every body the bridge builds through the same rules, so a malformed send fails a test
instead of reaching a citizen.

A refusal is a `GraphContractError` carrying Graph's code for it: 131008 when a required
parameter is missing, 100 when a parameter is not one Meta defines there (or when
alternatives that exclude each other are both given), 131009 when a value is not valid.
Its details name the parameter's path and the rule, never the value sent: a refused body
can hold a message text or a phone number.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any, Final, cast

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, relevance
from referencing import Registry, Resource

SCHEMA_ID: Final = "urn:civic-bridge:whatsapp:messages"
INVALID_PARAMETER: Final = 100
MISSING_PARAMETER: Final = 131008
INVALID_VALUE: Final = 131009
TITLES: Final[dict[int, str]] = {
    INVALID_PARAMETER: "Invalid parameter",
    MISSING_PARAMETER: "Required parameter is missing",
    INVALID_VALUE: "Parameter value is not valid",
}
MAX_LIST_ROWS: Final = 10
# Keywords whose failure means "a parameter Meta does not define here".
_UNKNOWN_KEYWORDS: Final = frozenset({"additionalProperties", "unevaluatedProperties"})
_FIELD_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,39}")


@dataclass(frozen=True, slots=True)
class GraphContractError:
    """Why Graph would refuse a request body: its error `code` and safe `details`."""

    code: int
    details: str

    @property
    def message(self) -> str:
        """Graph's `error.message`: the code and its title, e.g. `(#100) Invalid parameter`."""
        return f"(#{self.code}) {TITLES[self.code]}"


@functools.cache
def schema() -> dict[str, Any]:
    """The contract as JSON (read once from the installed package: it never changes)."""
    text = resources.files("bridge.whatsapp").joinpath("schemas", "messages.json").read_text(
        encoding="utf-8")
    loaded: dict[str, Any] = json.loads(text)
    return loaded


@functools.cache
def _validator(definition: str | None) -> Draft202012Validator:
    root = schema()
    if definition is None:
        return Draft202012Validator(root)
    registry: Registry[Any] = Registry().with_resource(SCHEMA_ID, Resource.from_contents(root))
    return Draft202012Validator({"$ref": f"{SCHEMA_ID}#/$defs/{definition}"},
                                registry=registry)


def validate_message(body: Any) -> GraphContractError | None:
    """Check a `POST /{phone-number-id}/messages` body; None when Graph would accept it."""
    if not isinstance(body, dict):
        return GraphContractError(INVALID_PARAMETER, "the request body must be a JSON object")
    return _first_error(_validator(None).iter_errors(body)) or _uniqueness(body)


def validate_upload(fields: Mapping[str, str], has_file: bool) -> GraphContractError | None:
    """Check the form of a `POST /{phone-number-id}/media` upload (`fields` are its text
    parts, `has_file` whether it has a `file` part)."""
    form: dict[str, Any] = dict(fields)
    if has_file:
        form["file"] = True
    else:
        form.pop("file", None)
    return _first_error(_validator("media_upload").iter_errors(form))


# -- choosing and describing an error -------------------------------------------------------


def _key(error: ValidationError) -> tuple[Any, ...]:
    return cast(tuple[Any, ...], relevance(error))


def _first_error(errors: Iterable[ValidationError]) -> GraphContractError | None:
    best = max(errors, key=_key, default=None)
    if best is None:
        return None
    # Descend into oneOf/anyOf as jsonschema's best_match does, but stop at alternatives
    # that are all missing (one missing parameter, named by its alternatives) or that are
    # alternative forms of this same value (none of them fits: the value is not valid).
    while best.context and not _all_missing(best.context) and \
            any(len(e.path) > len(best.path) for e in best.context):
        best = max(best.context, key=_key)
    return _describe(best)


def _all_missing(errors: list[ValidationError]) -> bool:
    return all(e.validator == "required" for e in errors)


def _where(path: Iterable[Any]) -> str:
    shown = ""
    for part in path:
        shown += f"[{part}]" if isinstance(part, int) else f".{part}" if shown else str(part)
    return shown


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _field(name: Any) -> str:
    # A field name comes from the request: show it only if it looks like one.
    return name if isinstance(name, str) and _FIELD_NAME.fullmatch(name) else "(a parameter)"


def _describe(error: ValidationError) -> GraphContractError:
    where = _where(error.absolute_path)
    kind, rule, instance = cast(Any, error.validator), cast(Any, error.validator_value), \
        error.instance
    schema_path = list(error.absolute_schema_path)
    if "dependentSchemas" in schema_path:  # one type's field in an object of another type
        field = schema_path[schema_path.index("dependentSchemas") + 1]
        # The failure is on the object's `type` (its value, or its absence).
        parent = where if kind == "required" else _where(list(error.absolute_path)[:-1])
        return GraphContractError(INVALID_PARAMETER,
                                  f"{parent or 'the request'}: {_field(field)} is not a "
                                  f"parameter of this type")
    if kind == "required":
        missing = next((n for n in rule if not (isinstance(instance, dict) and n in instance)),
                       rule[0])
        return GraphContractError(MISSING_PARAMETER, f"{_join(where, missing)} is required")
    if kind in ("oneOf", "anyOf") and error.context and _all_missing(error.context):
        names = " or ".join(str(cast(list[Any], e.validator_value)[0]) for e in error.context)
        return GraphContractError(MISSING_PARAMETER,
                                  f"{where or 'the request'} needs {names}")
    if kind == "oneOf" and not error.context:  # valid under several alternatives
        return GraphContractError(INVALID_PARAMETER,
                                  f"{where or 'the request'}: give only one of the "
                                  f"alternatives ({_alternatives(rule)})")
    if kind in _UNKNOWN_KEYWORDS or kind is None:
        unexpected = sorted(_field(k) for k in _unexpected(error))
        what = ", ".join(unexpected) if unexpected else "a parameter"
        return GraphContractError(INVALID_PARAMETER,
                                  f"{where or 'the request'}: {what} is not a parameter "
                                  f"of this object")
    return GraphContractError(INVALID_VALUE, f"{where or 'the request'} {_rule(kind, rule)}")


def _alternatives(rule: Any) -> str:
    names = [str(r["required"][0]) for r in rule if isinstance(r, dict) and r.get("required")]
    return ", ".join(names) if names else "see the reference"


def _unexpected(error: ValidationError) -> list[Any]:
    instance, schema_ = error.instance, error.schema
    if not (isinstance(instance, dict) and isinstance(schema_, dict)):
        return []
    known = schema_.get("properties", {})
    return [k for k in instance if k not in known]


def _rule(kind: str, rule: Any) -> str:
    texts = {
        "maxLength": f"must be at most {rule} characters",
        "minLength": "must not be empty" if rule == 1 else f"must be at least {rule} characters",
        "maxItems": f"must have at most {rule} items",
        "minItems": f"must have at least {rule} item{'s' if rule != 1 else ''}",
        "minimum": f"must be at least {rule}",
        "maximum": f"must be at most {rule}",
        "type": f"must be of type {rule}",
        "pattern": "is not in the expected format",
        "uniqueItems": "must not repeat an item",
    }
    if kind == "const":
        return f"must be {json.dumps(rule)}"
    if kind == "enum":
        return "must be one of " + ", ".join(json.dumps(v) for v in rule)
    return texts.get(kind, "is not valid")


# -- rules JSON Schema cannot express ------------------------------------------------------


def _uniqueness(body: dict[str, Any]) -> GraphContractError | None:
    """Reply button ids, and list row ids, unique in their message; at most ten rows in
    all the sections of a list."""
    interactive = body.get("interactive")
    if body.get("type") != "interactive" or not isinstance(interactive, dict):
        return None
    action = interactive.get("action") or {}
    if interactive.get("type") == "button":
        ids = [b["reply"]["id"] for b in action["buttons"]]
        titles = [b["reply"]["title"] for b in action["buttons"]]
        if len(set(ids)) != len(ids) or len(set(titles)) != len(titles):
            return GraphContractError(INVALID_VALUE, "interactive.action.buttons: reply ids "
                                                     "and titles must be unique")
    elif interactive.get("type") == "list":
        rows = [row["id"] for section in action["sections"] for row in section["rows"]]
        if len(rows) > MAX_LIST_ROWS:
            return GraphContractError(INVALID_VALUE, f"interactive.action.sections: at most "
                                                     f"{MAX_LIST_ROWS} rows in all sections")
        if len(set(rows)) != len(rows):
            return GraphContractError(INVALID_VALUE, "interactive.action.sections: row ids "
                                                     "must be unique")
    return None
