"""Staff send approved templates: `!plantilla` in a portal, or the admin API.

A template is the only message WhatsApp accepts once 24 hours have passed since the
citizen last wrote; it may be sent within the window too. Parameters are checked
(bridge.whatsapp.templates) before anything is queued; the send goes through the
durable outbox like any staff message (its consent check included), and the room gets
a notice with the text the citizen will read. The window reopens when the citizen
answers, as always. Notices of availability (bridge.admin.notices) are separate: they
have their own template, purpose and consent.
"""

from __future__ import annotations

import logging
from typing import Any

from bridge.config import WhatsAppConfig
from bridge.db import Database
from bridge.errors import BridgeError, Conflict, NotFound
from bridge.matrix.relay import StaffEvent, StaffHandler
from bridge.metrics import Metrics
from bridge.texts.matrix import default as mx_text
from bridge.types import EventID, RoomID
from bridge.whatsapp import templates as tpl
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.portal import Portals

log = logging.getLogger(__name__)



class NoConsent(Conflict):
    errcode = "CB_NO_CONSENT"


class StaffTemplates:
    """A relay handler in front of the staff → WhatsApp one: it answers `!plantilla`
    commands in portals and passes every other event on to `then`."""

    def __init__(self, config: WhatsAppConfig, db: Database, portals: Portals,
                 outbox: Outbox, metrics: Metrics, then: StaffHandler | None = None) -> None:
        self._templates = config.templates
        self._db = db
        self._portals = portals
        self._outbox = outbox
        self._metrics = metrics
        self._then = then

    async def __call__(self, event: StaffEvent) -> None:
        command = None
        if event.type == "m.room.message" and isinstance(event.content.get("body"), str) \
                and event.content.get("msgtype") == "m.text":
            command = tpl.parse_command(event.content["body"])
        room = event.room
        if command is not None and room is not None and room.kind == "portal":
            await self._command(event, command)
            return
        if self._then is not None:
            await self._then(event)

    async def _command(self, event: StaffEvent, command: tpl.TemplateCommand) -> None:
        if command.name is None:
            self._metrics.staff_templates.labels("listed").inc()
            await self._portals.notice(event.room_id, tpl.listing(self._templates))
            return
        try:
            try:
                template = tpl.find(self._templates, command.name)
                values = tpl.parse_args(template, command.args)
            except tpl.UnknownTemplate:
                await self._refused(event.sender, event.room_id, "unknown", None)
                raise
            except tpl.TemplateProblem:
                await self._refused(event.sender, event.room_id, "refused_parameters",
                                    template.name)
                raise
            await self.send(event.sender, event.room_id, template.name, values,
                            key=event.event_id)
        except BridgeError as exc:  # refused before anything was queued: say why
            await self._portals.notice(event.room_id, exc.message)

    async def send_api(self, actor: str, room_id: str, name: str, parameters: Any
                       ) -> dict[str, Any]:
        """The admin API's send: `parameters` by name (object) or in order (list)."""
        try:
            template = tpl.find(self._templates, name)
            values = tpl.from_api(template, parameters)
        except tpl.UnknownTemplate:
            await self._refused(actor, room_id, "unknown", None)
            raise
        except tpl.TemplateProblem:
            await self._refused(actor, room_id, "refused_parameters", template.name)
            raise
        return await self.send(actor, room_id, template.name, values)

    async def send(self, actor: str, room_id: str, name: str, values: dict[str, str], *,
                   key: EventID | None = None) -> dict[str, Any]:
        """Check and queue template `name` to the citizen of portal `room_id`.

        `key` makes the send idempotent (the staff command's event id); without one (the
        admin API) the room's notice is posted first and its event id is the key, so a
        citizen's reply to the template quotes that notice. Raises NotFound, NoConsent
        or TemplateProblem (nothing queued); every outcome is counted and audited."""
        room = await self._db.rooms.get(RoomID(room_id))
        citizen = None
        if room is not None and room.kind == "portal" and room.closed_at is None \
                and room.citizen_id is not None:
            citizen = await self._db.citizens.get(room.citizen_id)
        if citizen is None:
            self._metrics.staff_templates.labels("not_portal").inc()
            raise NotFound("not an open WhatsApp portal room")
        try:
            template = tpl.find(self._templates, name)
            checked = tpl.check(template, values)
        except tpl.UnknownTemplate:
            await self._refused(actor, room_id, "unknown", None)
            raise
        except tpl.TemplateProblem:
            await self._refused(actor, room_id, "refused_parameters", name)
            raise
        if citizen.consent_state != "granted":
            await self._refused(actor, room_id, "no_consent", name)
            raise NoConsent(mx_text.TEMPLATE_NO_CONSENT)
        text = tpl.render(template, checked)
        by = "" if key is not None else mx_text.TEMPLATE_SENT_BY_ADMIN
        notice = mx_text.TEMPLATE_SENT.format(name=template.name, by=by, text=text)
        if key is None:
            key = await self._portals.notice(RoomID(room_id), notice)
        queued = await self._outbox.staff(citizen, RoomID(room_id), key,
                                          tpl.payload(template, checked))
        if queued and by == "":
            await self._portals.notice(RoomID(room_id), notice)
        outcome = "queued" if queued else "repeat"
        self._metrics.staff_templates.labels(outcome).inc()
        await self._db.audit.append(actor, "template.send", f"room {room_id}", outcome,
                                    f"template {template.name}")
        log.info("template %s %s for portal %s", template.name, outcome, room_id)
        return {"queued": queued, "template": template.name, "text": text, "event_id": key}

    async def _refused(self, actor: str, room_id: str, outcome: str, name: str | None
                       ) -> None:
        """Count and audit a refusal; `name` only when it is a configured template's
        (a mistyped one is whatever staff typed, which might be personal data)."""
        self._metrics.staff_templates.labels(outcome).inc()
        await self._db.audit.append(actor, "template.send", f"room {room_id}", outcome,
                                    f"template {name}" if name else "unknown template")
