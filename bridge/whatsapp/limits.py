"""The Cloud API's documented limits, shared by the Graph client (what it may send)
and the webhook parser (what a citizen can have sent). Pure: no I/O library here."""

from __future__ import annotations

from typing import Final

MEDIA_KINDS: Final = frozenset({"image", "document", "audio", "video", "sticker"})
MAX_MEDIA_BYTES: Final = 100 * 1024 * 1024  # WhatsApp's largest attachment (documents)
# Meta's per-type limits ("Supported media types"): what a WhatsApp message can carry,
# so anything bigger is not a file a citizen sent. Stickers: 100 KB static, 500 KB
# animated; the webhook does not always say which, so the larger bound applies.
MEDIA_LIMITS: Final[dict[str, int]] = {
    "image": 5 * 1024 * 1024,
    "video": 16 * 1024 * 1024,
    "audio": 16 * 1024 * 1024,
    "document": MAX_MEDIA_BYTES,
    "sticker": 500 * 1024,
}
STATIC_STICKER_LIMIT: Final = 100 * 1024


def media_limit(kind: str, animated: bool | None = None) -> int:
    """The cap for one media kind; a sticker known to be static gets the lower one."""
    if kind == "sticker" and animated is False:
        return STATIC_STICKER_LIMIT
    return MEDIA_LIMITS.get(kind, MAX_MEDIA_BYTES)


MAX_BUTTONS: Final = 3
MAX_BUTTON_TITLE: Final = 20
# Wire contract: `biz_opaque_callback_data` is an arbitrary string (max 512 chars) that
# can be set on a `POST /{phone_number_id}/messages` request and that Meta echoes back
# in the `statuses[]` webhook entries of that message (field `biz_opaque_callback_data`
# on the status object). Graph has no idempotency key; the outbox uses this echo to
# learn the outcome of a send whose HTTP answer it never read (a crash mid-send).
MAX_CALLBACK_DATA: Final = 512
