"""How an admin names a person in a rights request: by phone number, with a reason.

A person at the desk may bring only their phone number. Citizens are keyed by their
BSUID when WhatsApp gives one, so the keyed hash of the number finds only those keyed by
number; the others are found by decrypting the stored numbers (a linear scan, fine for a
rare, audited request). The number itself is never stored, logged, audited or echoed.
"""

from __future__ import annotations

import asyncio
import hmac

import phonenumbers

from bridge.db import Citizen, CitizenIdentifiers, Database
from bridge.errors import InvalidParam
from bridge.privacy import AAD_WA_ID, Privacy

MIN_REASON = 10
MAX_REASON = 500
DEFAULT_REGION = "ES"  # the agency's country: numbers written without +34


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


async def citizens_with_number(db: Database, privacy: Privacy, wa_id: str) -> list[Citizen]:
    """Every citizen whose WhatsApp number is `wa_id` (normalised), oldest first."""
    found: dict[int, Citizen] = {}
    keyed = await db.citizens.by_any_index(privacy.index.digests(wa_id))
    if keyed is not None:
        found[keyed.id] = keyed
    stored = await db.citizens.list_identifiers()
    for citizen_id in await asyncio.to_thread(_matching, privacy, stored, wa_id):
        if citizen_id not in found and (c := await db.citizens.get(citizen_id)):
            found[citizen_id] = c
    return sorted(found.values(), key=lambda c: c.id)


def _matching(privacy: Privacy, stored: list[CitizenIdentifiers], wa_id: str) -> list[int]:
    cipher = privacy.cipher
    return [item.id for item in stored if item.wa_id_ct and hmac.compare_digest(
        cipher.decrypt_str(item.wa_id_ct, aad=AAD_WA_ID).encode(), wa_id.encode())]
