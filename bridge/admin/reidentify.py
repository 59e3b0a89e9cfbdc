"""Re-identification and look-up by phone number: the two ways from a person to data.

* `reveal` turns a pseudonym (ghost Matrix ID or notices subscription code) into the
  person's WhatsApp number / BSUID, e.g. for a court order or a call back. Only tokens
  with the `reidentify` scope reach it; it needs a reason, is rate-limited per token
  (`admin.reveal_per_hour`) and every attempt is audited by pseudonym, never by number.
* `lookup` goes the other way for rights requests (GDPR art. 15-17, issue 15 point 7):
  a person at the desk with only their phone number learns which pseudonyms the bridge
  holds for them, so the export or erasure can be run on those (or on the number
  itself: bridge.admin.citizens). How a number finds citizens: bridge.admin.identify.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from typing import Any

from bridge.admin.citizens import CitizenData
from bridge.admin.common import MXID
from bridge.admin.identify import (
    DEFAULT_REGION,
    MAX_REASON,
    MIN_REASON,
    check_reason,
    normalise_phone,
)
from bridge.config import Config
from bridge.db import Citizen, Database
from bridge.errors import BridgeError, NotFound
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE

__all__ = ["DEFAULT_REGION", "MAX_REASON", "MIN_REASON", "Reidentification", "RevealLimiter",
           "check_reason", "normalise_phone"]
WINDOW_SECONDS = 3600.0


class RateLimited(BridgeError):
    status = 429
    errcode = "M_LIMIT_EXCEEDED"


class RevealLimiter:
    """At most `per_hour` reveals per token in any hour (sliding window, this process)."""

    def __init__(self, per_hour: int, clock: Callable[[], float] = time.monotonic) -> None:
        self._per_hour = per_hour
        self._clock = clock
        self._used: dict[str, deque[float]] = {}

    def take(self, token_name: str) -> bool:
        now = self._clock()
        used = self._used.setdefault(token_name, deque())
        while used and used[0] <= now - WINDOW_SECONDS:
            used.popleft()
        if len(used) >= self._per_hour:
            return False
        used.append(now)
        return True


class Reidentification:
    """`reveal` (pseudonym -> number) and `lookup` (number -> pseudonyms), both audited."""

    def __init__(self, config: Config, db: Database, privacy: Privacy,
                 citizens: CitizenData) -> None:
        self._db = db
        self._privacy = privacy
        self._citizens = citizens
        self.limiter = RevealLimiter(config.admin.reveal_per_hour)

    async def reveal(self, actor: str, token_name: str, user_id: str,
                     reason: object) -> dict[str, Any]:
        why = check_reason(reason)
        # A ghost ID or subscription code is a pseudonym; anything else might be what an
        # operator typed by mistake (a phone number): not recorded, not even queried.
        pseudonym = (MXID.match(user_id) is not None or SUBSCRIPTION_CODE.fullmatch(
            user_id.upper()) is not None) and len(user_id) <= 200
        obj = user_id if pseudonym else "(not a pseudonym)"
        if not self.limiter.take(token_name):
            await self._db.audit.append(actor, "citizen.reveal", obj, "rate_limited", why)
            raise RateLimited("too many re-identifications with this token in the last "
                              "hour (admin.reveal_per_hour); try later")
        try:
            if not pseudonym:
                raise NotFound("not a citizen's Matrix user id or subscription code")
            citizen = await self._citizens.find(user_id)
        except NotFound:
            await self._db.audit.append(actor, "citizen.reveal", obj, "not_found", why)
            raise
        cipher = self._privacy.cipher
        identifier = cipher.decrypt_str(citizen.identifier_ct, aad=AAD_IDENTIFIER)
        wa_id = cipher.decrypt_str(citizen.wa_id_ct, aad=AAD_WA_ID) if citizen.wa_id_ct else None
        await self._db.audit.append(actor, "citizen.reveal",
                                    f"pseudonym {citizen.pseudonym_code}", "ok", why)
        return {"pseudonym": citizen.pseudonym_code, "matrix_user_id": citizen.ghost_user_id,
                "phone": f"+{wa_id}" if wa_id else None, "wa_id": wa_id,
                "bsuid": identifier if identifier != wa_id else None}

    async def lookup(self, actor: str, phone: object, reason: object) -> dict[str, Any]:
        found = await self._citizens.by_phone(actor, phone, reason)
        return {"citizens": [await self._describe(c) for c in found]}

    async def _describe(self, citizen: Citizen) -> dict[str, Any]:
        sub = await self._db.subscriptions.get(citizen.id)
        return {"pseudonym": citizen.pseudonym_code, "matrix_user_id": citizen.ghost_user_id,
                "consent_state": citizen.consent_state,
                "subscription_code": sub.code if sub else None,
                "notices_consent_state": sub.state if sub else None}
