"""Re-identification and look-up by phone number: the two ways from a person to data.

* `reveal` turns a pseudonym (ghost Matrix ID or notices subscription code) into the
  person's WhatsApp number / BSUID, e.g. for a court order or a call back. Only tokens
  with the `reidentify` scope reach it; it needs a reason, is rate-limited per token
  (`admin.reveal_per_hour`) and every attempt is audited by pseudonym, never by number.
* `lookup` goes the other way for rights requests (GDPR art. 15-17, issue 15 point 7):
  a person at the desk with only their phone number learns which pseudonyms the bridge
  holds for them, so the export or erasure can be run on those.

Citizens are keyed by their BSUID when WhatsApp gives one, so the keyed hash of the
number finds only those keyed by number; the others are found by decrypting the stored
numbers (a linear scan, fine for a rare, audited request).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import phonenumbers

from bridge.admin.citizens import CitizenData
from bridge.admin.common import MXID
from bridge.config import Config
from bridge.db import Citizen, CitizenIdentifiers, Database
from bridge.errors import BridgeError, InvalidParam, NotFound
from bridge.privacy import AAD_IDENTIFIER, AAD_WA_ID, Privacy
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE

MIN_REASON = 10
MAX_REASON = 500
DEFAULT_REGION = "ES"  # the agency's country: numbers written without +34
WINDOW_SECONDS = 3600.0


class RateLimited(BridgeError):
    status = 429
    errcode = "M_LIMIT_EXCEEDED"


def check_reason(value: object) -> str:
    """A reason that says something (it is what the DPO reads in the audit log)."""
    text = value.strip() if isinstance(value, str) else ""
    if len(text) < MIN_REASON:
        raise InvalidParam(f"reason: required, at least {MIN_REASON} characters (it goes to "
                           "the audit log), e.g. 'oficio juzgado 123/2026'")
    if len(text) > MAX_REASON:
        raise InvalidParam(f"reason: at most {MAX_REASON} characters")
    return text


def normalise_phone(value: object) -> str:
    """The number as WhatsApp's wa_id writes it (E.164 digits, no +); Spanish by default.

    The error never repeats the input: it is a phone number.
    """
    if not isinstance(value, str) or not value.strip():
        raise InvalidParam("phone: required, e.g. +34 600 11 22 33")
    try:
        number = phonenumbers.parse(value, DEFAULT_REGION)
    except phonenumbers.NumberParseException:
        raise InvalidParam("phone: not a phone number") from None
    if not phonenumbers.is_possible_number(number):
        raise InvalidParam("phone: not a possible phone number (check the digits)")
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)[1:]


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
        why = check_reason(reason)
        wa_id = normalise_phone(phone)
        found = await self._find(wa_id)
        if not found:
            await self._db.audit.append(actor, "citizen.lookup", "-", "not_found", why)
            raise NotFound("no citizen has this phone number")
        people = [await self._describe(c) for c in found]
        await self._db.audit.append(
            actor, "citizen.lookup",
            ("pseudonym " + ",".join(p["pseudonym"] for p in people))[:255], "ok", why)
        return {"citizens": people}

    async def _find(self, wa_id: str) -> list[Citizen]:
        found: dict[int, Citizen] = {}
        keyed = await self._db.citizens.by_any_index(self._privacy.index.digests(wa_id))
        if keyed is not None:
            found[keyed.id] = keyed
        stored = await self._db.citizens.list_identifiers()
        for citizen_id in await asyncio.to_thread(self._matching, stored, wa_id):
            if citizen_id not in found and (c := await self._db.citizens.get(citizen_id)):
                found[citizen_id] = c
        return list(found.values())

    def _matching(self, stored: list[CitizenIdentifiers], wa_id: str) -> list[int]:
        cipher = self._privacy.cipher
        return [item.id for item in stored if item.wa_id_ct and hmac.compare_digest(
            cipher.decrypt_str(item.wa_id_ct, aad=AAD_WA_ID).encode(), wa_id.encode())]

    async def _describe(self, citizen: Citizen) -> dict[str, Any]:
        sub = await self._db.subscriptions.get(citizen.id)
        return {"pseudonym": citizen.pseudonym_code, "matrix_user_id": citizen.ghost_user_id,
                "consent_state": citizen.consent_state,
                "subscription_code": sub.code if sub else None,
                "notices_consent_state": sub.state if sub else None}
