"""Notices of availability (aviso de puesta a disposición): `POST /admin/v1/notices`.

The agency's notification platform names a recipient (the subscription code the
citizen entered in the sede electrónica, or a ghost's Matrix ID) and its own reference.
The bridge sends the fixed, approved template (issuing body as its only parameter, the
sede's generic link fixed in the template) through the durable outbox. Content can
never be passed: any field other than `recipient` and `reference` is refused, and the
reference is only logged, never sent. Every entry says it is informative only.

`POST /admin/v1/notices/withdrawals` records a withdrawal the citizen asked for in person
(GDPR art. 7(3)): with the staff member who assisted and the agency's own record of it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Any

from bridge.admin.common import MXID
from bridge.config import Config, NoticesConfig
from bridge.db import Citizen, Database, Notice
from bridge.errors import BridgeError, InvalidParam, NotFound, Unavailable
from bridge.metrics import Metrics
from bridge.privacy import looks_like_personal_id
from bridge.types import Pseudonym, UserID
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE, NoticeSubscriptions

log = logging.getLogger(__name__)

FIELDS = ("recipient", "reference")
WITHDRAWAL_FIELDS = ("recipient", "staff_id", "evidence")
MAX_USER_ID = 255
REFERENCE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/:\-]{0,127}")
LABEL = ("Registro informativo: no acredita la práctica de la notificación. "
         "Informative record only, not proof of notification.")


class NoNoticesConsent(BridgeError):
    """The recipient has not consented to notices (never, or withdrew)."""

    status = 409
    errcode = "CB_NO_NOTICES_CONSENT"


def _time(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def notice_entry(n: Notice) -> dict[str, Any]:
    """A log entry as the API, the CLI and a citizen's export show it."""
    return {
        "id": n.id, "reference": n.reference, "pseudonym": n.pseudonym, "status": n.status,
        "template": {"name": n.template_name, "language": n.template_language,
                     "version": n.template_version},
        # Whether WhatsApp's message id is on record (as a keyed hash), never the id: a
        # wamid embeds the citizen's number.
        "has_wamid": n.wamid_hash is not None, "requested_by": n.requested_by,
        "created_at": _time(n.created_at),
        "sent_at": _time(n.sent_at), "delivered_at": _time(n.delivered_at),
        "read_at": _time(n.read_at), "failed_at": _time(n.failed_at), "error": n.error,
        "proof_of_notification": False, "label": LABEL,
    }


def notice_template(n: NoticesConfig) -> dict[str, Any]:
    """The outbox payload of a notice: the approved template, the issuer its only value."""
    return {"name": n.template_name, "language": n.template_language,
            "components": [{"type": "body", "parameters": [{"type": "text", "text": n.issuer}]}]}


def _only(body: dict[str, Any], fields: tuple[str, ...], why: str) -> None:
    for key in body:
        if key not in fields:
            raise InvalidParam(f"{str(key)[:40]}: unknown field; {why}")


def _recipient_of(body: dict[str, Any]) -> str:
    recipient = body.get("recipient")
    if not isinstance(recipient, str) or not recipient.strip():
        raise InvalidParam("recipient: required, the subscription code or the citizen's "
                           "Matrix user ID")
    return recipient.strip()


def _reference(body: dict[str, Any], key: str, whose: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not REFERENCE.fullmatch(value):
        raise InvalidParam(f"{key}: required, 1-128 characters of A-Z a-z 0-9 . _ / : -")
    if looks_like_personal_id(value):
        raise InvalidParam(f"{key}: looks like a personal identifier; use {whose}")
    return value


def parse_request(body: dict[str, Any]) -> tuple[str, str]:
    """(recipient, reference) of a send request; refuses anything that could be content."""
    _only(body, FIELDS, "a notice carries no content (only recipient and reference are "
                        "accepted)")
    return _recipient_of(body), _reference(body, "reference",
                                           "the notification platform's own reference")


def parse_withdrawal(body: dict[str, Any],
                     is_ours: Callable[[str], bool]) -> tuple[str, UserID, str]:
    """(recipient, staff_id, evidence) of an assisted withdrawal; `is_ours` tells the
    bridge's own users (bot, ghosts), who cannot have assisted anyone."""
    _only(body, WITHDRAWAL_FIELDS, "only recipient, staff_id and evidence are accepted")
    recipient = _recipient_of(body)
    staff_id = body.get("staff_id")
    if not isinstance(staff_id, str) or len(staff_id) > MAX_USER_ID or \
            not MXID.fullmatch(staff_id):
        raise InvalidParam("staff_id: required, the Matrix user ID (@name:server) of the "
                           "staff member who assisted the citizen")
    if is_ours(staff_id):
        raise InvalidParam("staff_id: a user of the bridge itself (bot or ghost), not staff")
    evidence = _reference(body, "evidence", "the agency's own record of the request (e.g. "
                                            "the registry entry number)")
    return recipient, UserID(staff_id), evidence


class Notices:
    """Sends notices of availability, lists their log, and takes assisted withdrawals."""

    def __init__(self, config: Config, db: Database, outbox: Outbox, metrics: Metrics,
                 subscriptions: NoticeSubscriptions, is_ours: Callable[[str], bool]) -> None:
        self._config = config
        self._db = db
        self._outbox = outbox
        self._metrics = metrics
        self._subscriptions = subscriptions
        self._is_ours = is_ours

    async def send(self, actor: str, body: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Queue a notice; returns its entry and whether it is new (a repeat of the same
        recipient and reference returns the existing one and sends nothing)."""
        n = self._enabled()
        recipient, reference = parse_request(body)
        citizen = await self._recipient(recipient)
        pseudonym = Pseudonym(citizen.pseudonym_code)
        what = f"pseudonym {pseudonym}"
        existing = await self._db.notices.find(pseudonym, reference)
        if existing is not None:
            await self._outcome(actor, what, "repeat", reference)
            return notice_entry(existing), False
        sub = await self._db.subscriptions.get(citizen.id)
        if sub is None or sub.state != "granted":
            await self._outcome(actor, what, "no_consent", reference)
            raise NoNoticesConsent("the recipient has not consented to notices (or withdrew)")
        template = notice_template(n)
        async with self._db.transaction() as tx:  # the log entry and the send, or neither
            notice, created = await tx.notices.add(
                reference=reference, citizen_id=citizen.id, pseudonym=pseudonym,
                template_name=n.template_name, template_language=n.template_language,
                template_version=n.template_version, requested_by=actor)
            if created:
                await self._outbox.notice(tx, citizen, notice.id, template)
        if not created:  # a concurrent request for the same pair won
            await self._outcome(actor, what, "repeat", reference)
            return notice_entry(notice), False
        self._outbox.wake()
        await self._outcome(actor, what, "queued", reference)
        log.info("notice %d queued for %s", notice.id, pseudonym)
        return notice_entry(notice), True

    async def withdraw(self, actor: str, body: dict[str, Any]) -> dict[str, Any]:
        """Withdraw a citizen's notices consent as they asked a staff member in person.

        `withdrawn` is false, and nothing is recorded, when there was no granted consent
        (never given, already withdrawn, or a repeat of this request)."""
        self._enabled()
        recipient, staff_id, evidence = parse_withdrawal(body, self._is_ours)
        citizen = await self._recipient(recipient)
        withdrawn, state = await self._subscriptions.withdraw_assisted(citizen, actor,
                                                                       staff_id, evidence)
        return {"pseudonym": citizen.pseudonym_code, "state": state, "withdrawn": withdrawn}

    async def entries(self, reference: str | None, recipient: str | None,
                      limit: int) -> list[dict[str, Any]]:
        """Log entries, newest first, optionally of one reference and/or recipient."""
        pseudonym = None
        if recipient:
            pseudonym = Pseudonym((await self._recipient(recipient)).pseudonym_code)
        notices = await self._db.notices.list(reference=reference, pseudonym=pseudonym,
                                              limit=limit)
        return [notice_entry(x) for x in notices]

    def _enabled(self) -> NoticesConfig:
        if not self._config.notices.enabled:
            raise Unavailable("notices are off; set notices.enabled (see docs/notices.md)")
        return self._config.notices

    async def _recipient(self, recipient: str) -> Citizen:
        citizen = None
        if recipient.startswith("@"):
            citizen = await self._db.citizens.by_ghost(UserID(recipient))
        elif SUBSCRIPTION_CODE.fullmatch(recipient.upper()):
            sub = await self._db.subscriptions.by_code(recipient.upper())
            citizen = await self._db.citizens.get(sub.citizen_id) if sub else None
        else:
            raise InvalidParam("recipient: must be a subscription code (XXXX-XXXX-XXXX) or "
                               "a citizen's Matrix user ID")
        if citizen is None:
            self._metrics.notices.labels("unknown_recipient").inc()
            raise NotFound("no citizen has this subscription code or Matrix user ID")
        return citizen

    async def _outcome(self, actor: str, what: str, outcome: str, reference: str) -> None:
        self._metrics.notices.labels(outcome).inc()
        await self._db.audit.append(actor, "notice.send", what, outcome,
                                    f"reference {reference}")
