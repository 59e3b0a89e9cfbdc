"""One error hierarchy: every exception carries its HTTP status and Matrix-style errcode.

A single middleware (bridge.web.middleware) turns these into JSON `{errcode, error}`;
anything else becomes a generic 500 without details, so no stack trace or secret leaks.
"""


class BridgeError(Exception):
    """Base class; `message` must be safe to show to the caller (no secrets, no phone numbers)."""

    status = 500
    errcode = "M_UNKNOWN"

    def __init__(self, message: str = "internal error") -> None:
        super().__init__(message)
        self.message = message


class BadRequest(BridgeError):
    status = 400
    errcode = "M_BAD_JSON"


class InvalidParam(BridgeError):
    status = 400
    errcode = "M_INVALID_PARAM"


class Unauthorized(BridgeError):
    status = 401
    errcode = "M_UNKNOWN_TOKEN"


class Forbidden(BridgeError):
    status = 403
    errcode = "M_FORBIDDEN"


class NotFound(BridgeError):
    status = 404
    errcode = "M_NOT_FOUND"


class Conflict(BridgeError):
    status = 409
    errcode = "CB_CONFLICT"


class Unavailable(BridgeError):
    status = 503
    errcode = "CB_UNAVAILABLE"


class ConfigError(Exception):
    """Configuration problems, one human-readable line each (`key.path: what; fix`)."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


class SchemaError(Exception):
    """The database is not ours, or is behind the code's schema."""
