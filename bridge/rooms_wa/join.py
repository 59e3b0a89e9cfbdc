"""Joining from an invite link by WhatsApp (self-service).

The invite page of a room that allows WhatsApp members links to
`GET /invite/{token}/whatsapp`, which draws a one-time code (kv, 24 h) and shows a
`wa.me` link to the agency's number with «UNIRME <code>» prefilled. When that message
arrives, the code is spent and the citizen gets the same invitation with buttons as
from staff; accepting is the consent, as always. The code names no one: it stands for
the room and the link.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.errors import BridgeError
from bridge.rooms_wa.members import Members
from bridge.text import fold_words
from bridge.texts.whatsapp import default as wa_text
from bridge.types import RoomID, WamidHash
from bridge.whatsapp.outbox import Outbox

log = logging.getLogger(__name__)

CODE_KEY = "wr-join:"  # + code -> {"room": room id, "link": link id, "until": iso time}
CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ23456789"  # no vowels: no words, no 0/O, 1/I
CODE_TTL = timedelta(hours=24)
_JOIN = re.compile(r"unirme\s+([a-z0-9]{4})-?([a-z0-9]{4})")


def new_code() -> str:
    raw = "".join(secrets.choice(CODE_ALPHABET) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"


def code_in(text: str | None) -> str | None:
    """The code of an «UNIRME XXXX-XXXX» message (any case, dash optional)."""
    match = _JOIN.fullmatch(fold_words(text or "").strip(" .!"))
    return f"{match.group(1)}-{match.group(2)}".upper() if match else None


class SelfServiceJoin:
    def __init__(self, config: Config, db: Database, members: Members, outbox: Outbox
                 ) -> None:
        self._config = config
        self._db = db
        self._members = members
        self._outbox = outbox

    @property
    def number(self) -> str:
        return self._config.whatsapp.display_phone_number

    async def offered(self, room_id: str) -> bool:
        room = await self._db.rooms.get(RoomID(room_id))
        return bool(self._config.whatsapp.enabled and self.number and room is not None and
                    room.kind in ("citizen", "announcement") and
                    await self._members.allowed(room))

    async def issue(self, room_id: str, link_id: int) -> str:
        code = new_code()
        until = (datetime.now(UTC) + CODE_TTL).isoformat()
        await self._db.kv.set(CODE_KEY + code, json.dumps(
            {"room": room_id, "link": link_id, "until": until}))
        return code

    def wa_me(self, code: str) -> str:
        digits = re.sub(r"\D", "", self.number)
        return f"https://wa.me/{digits}?text={quote(f'{wa_text.ROOM_JOIN_WORD} {code}')}"

    async def redeem(self, citizen: Citizen, text: str | None, wamid_hash: WamidHash
                     ) -> bool:
        """True if the message was a join code (used, or refused with a reply)."""
        code = code_in(text)
        if code is None:
            return False
        raw = await self._db.kv.get(CODE_KEY + code)
        await self._db.kv.delete(CODE_KEY + code)  # one use, whatever comes of it
        target = json.loads(raw) if raw else None
        room = await self._db.rooms.get(RoomID(target["room"])) if target else None
        if target is None or room is None or room.closed_at is not None or \
                datetime.fromisoformat(target["until"]) < datetime.now(UTC) or \
                not await self._members.allowed(room) or \
                not await self._db.invites.claim(int(target["link"]), datetime.now(UTC)):
            # (claim: the code spends one use of its invite link, like an account would)
            await self._outbox.system_text(citizen, f"wr-badcode:{wamid_hash}",
                                           wa_text.ROOM_JOIN_CODE_BAD)
            return True
        try:
            await self._members.invite_citizen(f"invite-link:{target['link']}", room, citizen,
                                               None)
        except BridgeError as exc:  # already a member
            log.info("join code not used: %s", exc.errcode)
        return True
