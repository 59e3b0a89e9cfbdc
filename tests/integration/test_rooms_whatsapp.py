"""Rooms over WhatsApp end to end (issue 17): real Synapse, the Cloud API simulator,
E2EE on. A `citizen` room with a staff member (nio), a Matrix citizen from an invite
link and two WhatsApp citizens, each under a pseudonym of that room only."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import html
import json
import os
import re
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import pytest_asyncio
from nio import EncryptionError, MegolmEvent, RoomMessageNotice
from nio.crypto.attachments import encrypt_attachment
from sqlalchemy import event as event_api
from sqlalchemy import select, update

from bridge.db.models import CitizenRow, ConsentRecordRow
from bridge.devtools.simulator import SimulatedUser
from bridge.rooms_wa import policy
from bridge.rooms_wa.fanout import event_key
from bridge.texts.matrix import default as mx_text
from bridge.texts.whatsapp import default as wa_text
from bridge.types import RoomID
from tests.fixtures.bridge import BridgeHarness
from tests.fixtures.citizens import USER_ID, invite_link, submit_form
from tests.fixtures.dbdump import dump, find_clear, phone_forms
from tests.fixtures.staff import StaffClient, staff_login
from tests.integration.test_moderation import _crowd, dm_with_bot
from tests.integration.test_whatsapp import (
    USED_IDENTIFIERS,
    new_citizen,
    opt_in,
    to_citizen,
    wait_until,
)

pytestmark = pytest.mark.integration

SEEN_BY_STAFF: list[str] = []  # every decrypted room event, for the privacy sweep
SENT_TO_CITIZENS: list[str] = []  # every body the other WhatsApp members received
WAMIDS: list[str] = []  # every wamid of this module's messages, both ways (privacy sweep)


@dataclass
class Member:
    """A WhatsApp citizen with a portal (its ghost is how staff name them)."""

    user: SimulatedUser
    portal_ghost: str
    citizen_id: int
    pseudonyms: dict[str, str] = field(default_factory=dict)  # room -> display name
    portal: str = ""  # their portal room
    desk: StaffClient | None = None  # the service desk, joined to the portal


@dataclass
class World:
    h: BridgeHarness
    staff: StaffClient
    room_id: str
    ana: Member
    bea: Member
    neighbour: StaffClient  # a Matrix citizen who came by an invite link
    closers: list[Any]

    async def write(self, member: Member, value: dict[str, Any]) -> str:
        assert await self.h.wa.deliver(self.h.webhook_url, value) == 200
        WAMIDS.append(str(value["messages"][0]["id"]))
        return WAMIDS[-1]

    async def sent_to(self, member: Member, predicate: Callable[[dict[str, Any]], bool],
                      timeout: float = 30) -> tuple[dict[str, Any], str]:
        """The first send to `member` matching `predicate`, and its wamid."""
        body = await self.h.wa.wait_for_sent(
            lambda s: to_citizen(s, member.user) and predicate(s), timeout=timeout)
        # What the citizen reads (the envelope's `to` is their own number).
        SENT_TO_CITIZENS.append(json.dumps({k: v for k, v in body.items()
                                            if k not in ("to", "recipient")},
                                           ensure_ascii=False))
        index = next(i for i, b in enumerate(self.h.wa.sent) if b is body)
        return body, str(self.h.wa.sent_ids[index])

    def sent_count(self, member: Member, predicate: Callable[[dict[str, Any]], bool]) -> int:
        return sum(1 for s in self.h.wa.sent if to_citizen(s, member.user) and predicate(s))

    async def staff_sees(self, room_id: str, predicate: Callable[[Any], bool],
                         timeout: float = 30) -> Any:
        """The first event in `room_id` matching `predicate`, decrypted by staff."""
        return await self.staff_sees_as(self.staff, room_id, predicate, timeout)

    async def staff_sees_as(self, who: StaffClient, room_id: str,
                            predicate: Callable[[Any], bool], timeout: float = 30) -> Any:
        async def find() -> Any:
            await who.sync_once(timeout_ms=200)
            events = who._timeline.get(room_id, [])
            for index, ev in enumerate(events):
                if isinstance(ev, MegolmEvent):
                    try:  # the room key may have come in a later sync
                        ev = events[index] = who.client.decrypt_event(ev)
                    except EncryptionError:
                        continue
                SEEN_BY_STAFF.append(str(ev.source))
                if predicate(ev):
                    return ev
            return None
        return await wait_until(find, timeout, "event in room")


def not_relayed(w: World, reason: str) -> float:
    """civic_bridge_room_not_relayed_total{reason} of the running bridge."""
    value = w.h.running.bridge.metrics.registry.get_sample_value(
        "civic_bridge_room_not_relayed_total", {"reason": reason})
    return value or 0.0


def text_body(s: dict[str, Any]) -> str:
    if s.get("type") == "text":
        return str(s["text"]["body"])
    if s.get("type") == "interactive":
        return str(s["interactive"]["body"]["text"])
    return ""


def says(fragment: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: fragment in text_body(s)


async def join_room(w: World, member: Member, room_id: str, expect_first: bool = False
                    ) -> str:
    """Admin API invitation → WhatsApp buttons → accept → the member's room pseudonym."""
    status, answer = await w.h.running.call(
        "POST", f"/admin/v1/rooms/{room_id}/whatsapp-members",
        {"citizen": member.portal_ghost})
    assert status == 201, answer
    assert answer["delivery"] == "sent"  # their window is open
    pseudonym = answer["pseudonym"]
    invitation, _ = await w.sent_to(member, lambda s: s.get("type") == "interactive" and
                                    pseudonym in text_body(s))
    buttons = invitation["interactive"]["action"]["buttons"]
    ids = [b["reply"]["id"] for b in buttons]
    shown = hashlib.sha256(text_body(invitation).encode()).hexdigest()[:16]
    assert ids == [f"{policy.ACCEPT_BUTTON}{answer['member_id']}:{shown}",
                   f"{policy.DECLINE_BUTTON}{answer['member_id']}:{shown}"]
    body = text_body(invitation)
    assert "SALIR" in body and "cifrado de extremo a extremo" in body
    accepted = await w.write(member, w.h.wa.button_reply(member.user, ids[0],
                                                         wa_text.ROOM_ACCEPT_BUTTON))
    db = w.h.running.bridge.db

    async def joined() -> bool:
        row = await db.wa_rooms.find(RoomID(room_id), member.citizen_id)
        return row is not None and row.state == "joined"
    await wait_until(joined, 30, "joined")
    await w.sent_to(member, says(f"como «{pseudonym}»"))
    member.pseudonyms[room_id] = pseudonym
    # The consent's evidence is the accepting message, by the keyed hash of its id.
    records = [r for r in await db.consent.for_citizen(member.citizen_id)
               if r.purpose == f"room:{room_id}" and r.state == "granted"]
    privacy = w.h.running.bridge.privacy
    assert records[-1].evidence == f"wamid-hmac:{privacy.index.wamid(accepted)}"
    return pseudonym


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def world(bridge: BridgeHarness) -> AsyncIterator[World]:
    h = bridge
    staff = await staff_login(h.synapse.synapse, h.admin.localpart, h.admin.password)
    status, created = await h.running.call("POST", "/admin/v1/rooms",
                                           {"name": "Vecinos de Ejemplo", "kind": "citizen"})
    assert status == 201, created
    room_id = created["room_id"]
    await staff.join(room_id)
    password = secrets.token_urlsafe(16)
    status_code, page = await submit_form(await invite_link(h, room_id), password)
    assert status_code == 200, page
    found = USER_ID.search(page)
    assert found, page
    neighbour = await staff_login(h.synapse.synapse,
                                  html.unescape(found.group(1))[1:].split(":", 1)[0], password)
    await neighbour.join(room_id)
    members = []
    closers: list[Any] = [staff, neighbour]
    for name in ("Ana Martínez", "Beatriz Gómez"):
        journey = await opt_in(h, new_citizen(name), "Hola, quería preguntar una cosa")
        closers.append(journey.desk)
        row = await h.running.bridge.db.rooms.get(RoomID(journey.room_id))
        assert row is not None and row.citizen_id is not None
        citizen = await h.running.bridge.db.citizens.get(row.citizen_id)
        assert citizen is not None and citizen.ghost_user_id
        members.append(Member(journey.citizen, citizen.ghost_user_id, citizen.id,
                              portal=journey.room_id, desk=journey.desk))
        USED_IDENTIFIERS.append(name)
    w = World(h, staff, room_id, members[0], members[1], neighbour, closers)
    yield w
    for closer in closers:
        await closer.close()


async def test_room_admin_routes_are_on_the_admin_listener_only(world: World) -> None:
    w = world
    token = {"Authorization": f"Bearer {w.h.running.config.admin.token}"}
    async with aiohttp.ClientSession() as http:
        for method, path in (("POST", "whatsapp-members"), ("GET", "whatsapp-members"),
                             ("POST", "whatsapp-settings")):
            async with http.request(method, f"{w.h.running.url}/admin/v1/rooms/"
                                    f"{quote(w.room_id, safe='')}/{path}", headers=token,
                                    json={"citizen": w.ana.portal_ghost}) as resp:
                assert resp.status == 404, (method, path)
    status, members = await w.h.running.call(
        "GET", f"/admin/v1/rooms/{quote(w.room_id, safe='')}/whatsapp-members")
    assert status == 200 and isinstance(members, list)
    # The admin listener wants its token, like every admin route.
    status, _ = await w.h.running.call(
        "GET", f"/admin/v1/rooms/{quote(w.room_id, safe='')}/whatsapp-members", token=None)
    assert status == 401


async def test_team_rooms_refuse_whatsapp_members_by_default(world: World) -> None:
    status, created = await world.h.running.call("POST", "/admin/v1/rooms",
                                                 {"name": "Equipo", "kind": "team"})
    assert status == 201
    status, answer = await world.h.running.call(
        "POST", f"/admin/v1/rooms/{created['room_id']}/whatsapp-members",
        {"citizen": world.ana.portal_ghost})
    assert status == 409, answer


async def test_joining_and_the_room_is_told(world: World) -> None:
    w = world
    pseudonym = await join_room(w, w.ana, w.room_id, expect_first=True)
    # Everyone in the room is told, once, and the topic says it.
    await w.staff_sees(w.room_id, lambda ev: isinstance(ev, RoomMessageNotice) and
                       ev.body == mx_text.WA_ROOM_NOTICE)
    b = w.h.running.bridge
    topic = await b.api.get_state_event(b.ghosts.bot, RoomID(w.room_id), "m.room.topic")
    assert mx_text.WA_ROOM_TOPIC_LINE in topic["topic"]
    # Consent for that room: purpose room:<id>, version, hash and language.
    records = [r for r in await b.db.consent.for_citizen(w.ana.citizen_id)
               if r.purpose == f"room:{w.room_id}"]
    assert [r.state for r in records] == ["granted"]
    assert records[0].notice_version == policy.INVITATION_VERSION
    assert records[0].language == "es" and len(records[0].notice_hash) == 64
    # A pseudonym of this room only: not the portal ghost, not its name.
    member = await b.db.wa_rooms.find(RoomID(w.room_id), w.ana.citizen_id)
    assert member is not None and member.ghost_user_id is not None
    assert member.ghost_user_id != w.ana.portal_ghost
    portal = await b.db.ghosts.get(w.ana.portal_ghost)  # type: ignore[arg-type]
    assert portal is not None and portal.display_name != pseudonym
    await join_room(w, w.bea, w.room_id)


async def test_staff_post_reaches_every_whatsapp_member_with_the_label(world: World) -> None:
    w = world
    await w.staff.send_text(w.room_id, "Mañana se corta el agua de 9 a 12")
    for member in (w.ana, w.bea):
        body, _ = await w.sent_to(member, says("se corta el agua"))
        assert text_body(body).startswith("*Ayuntamiento · ")
        assert w.h.admin.user_id not in text_body(body)
    # A Matrix citizen (no staff label, no Matrix ID) reaches them too.
    await w.neighbour.send_text(w.room_id, "Yo tengo garrafas, por si alguien necesita")
    for member in (w.ana, w.bea):
        body, _ = await w.sent_to(member, says("tengo garrafas"))
        assert not text_body(body).startswith("*Ayuntamiento")
        assert w.neighbour.user_id not in text_body(body)


async def _staff_image(w: World, data: bytes, caption: str) -> None:
    ciphertext, keys = encrypt_attachment(data)
    async with aiohttp.ClientSession() as http, http.post(
            f"{w.h.synapse.synapse.url}/_matrix/media/v3/upload", data=ciphertext,
            params={"filename": "plano.png"},
            headers={"Authorization": f"Bearer {w.staff.client.access_token}",
                     "Content-Type": "application/octet-stream"}) as up:
        assert up.status == 200, await up.text()
        mxc = (await up.json())["content_uri"]
    await w.staff.client.room_send(w.room_id, "m.room.message", {
        "msgtype": "m.image", "body": caption, "filename": "plano.png",
        "info": {"mimetype": "image/png", "size": len(data)},
        "file": {**keys, "url": mxc}}, ignore_unverified_devices=True)


async def test_staff_media_is_relayed_unless_switched_off(world: World) -> None:
    w = world
    data = b"\x89PNG\r\n\x1a\n" + os.urandom(2048)
    await _staff_image(w, data, "Plano de la zona afectada")
    for member in (w.ana, w.bea):
        image, _ = await w.sent_to(member, lambda s: s.get("type") == "image")
        assert image["image"]["caption"].startswith("*Ayuntamiento · ")
        assert image["image"]["caption"].endswith("Plano de la zona afectada")
        assert w.h.wa.media[image["image"]["id"]].data == data
    status, answer = await w.h.running.call(
        "POST", f"/admin/v1/rooms/{w.room_id}/whatsapp-settings", {"relay_media": False})
    assert (status, answer) == (200, {"whatsapp_allowed": True, "relay_media": False})
    before = not_relayed(w, "media_off")
    await _staff_image(w, data, "Otro plano")
    await w.sent_to(w.bea, says("ha enviado un archivo, que no se reenvía"))
    assert not_relayed(w, "media_off") == before + 2  # one per WhatsApp member
    assert w.sent_count(w.bea, lambda s: s.get("type") == "image") == 1
    status, _ = await w.h.running.call(
        "POST", f"/admin/v1/rooms/{w.room_id}/whatsapp-settings", {"relay_media": True})
    assert status == 200


async def test_a_whatsapp_reply_is_posted_under_the_pseudonym_and_relayed(world: World
                                                                          ) -> None:
    w = world
    # Ana has two conversations (the room and her portal) and has chosen none: a list.
    await w.write(w.ana, w.h.wa.text_message(w.ana.user, "¿A qué hora vuelve?"))
    picker, _ = await w.sent_to(w.ana, lambda s: s.get("type") == "interactive" and
                                s["interactive"]["type"] == "list")
    rows = picker["interactive"]["action"]["sections"][0]["rows"]
    assert [r["title"] for r in rows] == ["Vecinos de Ejemplo", wa_text.ROOM_PORTAL_TITLE]
    await w.write(w.ana, w.h.wa.button_reply(w.ana.user, rows[0]["id"], rows[0]["title"],
                                             kind="list_reply"))
    event = await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) ==
                               "¿A qué hora vuelve?")
    b = w.h.running.bridge
    ghost = await b.db.ghosts.get(event.sender)
    assert ghost is not None and ghost.display_name == w.ana.pseudonyms[w.room_id]
    # The Matrix citizen reads it, decrypted, from the same pseudonym.
    seen = await w.neighbour.wait_for_message(w.room_id,
                                              lambda ev: ev.body == "¿A qué hora vuelve?")
    assert seen.sender == event.sender
    # The other WhatsApp member gets it with Ana's room pseudonym; Ana no echo.
    body, _ = await w.sent_to(w.bea, says("¿A qué hora vuelve?"))
    assert text_body(body) == f"*{w.ana.pseudonyms[w.room_id]}*: ¿A qué hora vuelve?"
    assert w.sent_count(w.ana, says("¿A qué hora vuelve?")) == 0
    # From now on Ana's messages go to the room she chose.
    await w.write(w.ana, w.h.wa.text_message(w.ana.user, "Gracias"))
    await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) == "Gracias")


async def test_a_quote_routes_to_its_conversation(world: World) -> None:
    w = world
    # Bea has one room and her portal; she quotes the room's message: it goes there.
    _, wamid = await w.sent_to(w.bea, says("se corta el agua"))
    b = w.h.running.bridge
    unrecorded_looks: list[str] = []

    def look(_conn: object, _cursor: object, statement: str, *_rest: object) -> None:
        if "sending_at >=" in statement:  # OutboxRepo.sending_to
            unrecorded_looks.append(statement)
    event_api.listen(b.db.engine.sync_engine, "before_cursor_execute", look)
    try:
        await w.write(w.bea, w.h.wa.text_message(w.bea.user, "Vale, gracias",
                                                 context_id=wamid))
        event = await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) ==
                                   "Vale, gracias")
    finally:
        event_api.remove(b.db.engine.sync_engine, "before_cursor_execute", look)
    # The quoted post was known: no look for sends not recorded yet (a query per quote).
    assert unrecorded_looks == []
    ghost = await b.db.ghosts.get(event.sender)
    assert ghost is not None and ghost.display_name == w.bea.pseudonyms[w.room_id]


async def test_per_room_pseudonyms_differ(world: World) -> None:
    w = world
    status, created = await w.h.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Fiestas 2027", "kind": "citizen"})
    assert status == 201
    other = created["room_id"]
    await w.staff.join(other)
    second = await join_room(w, w.ana, other)
    assert second != w.ana.pseudonyms[w.room_id]
    b = w.h.running.bridge
    one = await b.db.wa_rooms.find(RoomID(w.room_id), w.ana.citizen_id)
    two = await b.db.wa_rooms.find(RoomID(other), w.ana.citizen_id)
    assert one and two and one.ghost_user_id != two.ghost_user_id
    # In two rooms now: messages carry the room's short name.
    await w.staff.send_text(other, "Reunión de la comisión el jueves")
    body, _ = await w.sent_to(w.ana, says("Reunión de la comisión"))
    assert text_body(body).startswith("[Fiestas 2027] *Ayuntamiento · ")


async def test_a_quote_of_a_send_not_yet_recorded_waits_for_it(world: World) -> None:
    """WhatsApp may deliver a post, and the citizen answer it, before Graph's answer
    (the post's wamid) is recorded. Routed then, the answer would go to the room she
    chose last instead of the one she quoted: it waits until the send is recorded."""
    w = world
    b = w.h.running.bridge
    fiestas = next(r for r in w.ana.pseudonyms if r != w.room_id)
    is_post = lambda s: to_citizen(s, w.ana.user) and "Montaje del escenario" in text_body(s)  # noqa: E731

    def retries() -> float:
        return b.metrics.registry.get_sample_value(
            "civic_bridge_inbound_retries_total", {"source": "whatsapp"}) or 0.0
    before = retries()
    release = w.h.wa.hold_next_send(is_post)
    try:
        await w.staff.send_text(fiestas, "Montaje del escenario el sábado")
        _, wamid = await w.sent_to(w.ana, is_post)
        await w.write(w.ana, w.h.wa.text_message(w.ana.user, "Yo llevo las sillas",
                                                 context_id=wamid))
        await wait_until(lambda: retries() > before, 15, "the quote waiting for its send")
    finally:
        release.set()
    said = lambda ev: getattr(ev, "body", None) == "Yo llevo las sillas"  # noqa: E731
    event = await w.staff_sees(fiestas, said)
    assert event.sender == (await b.db.wa_rooms.find(RoomID(fiestas), w.ana.citizen_id)
                            ).ghost_user_id
    await w.staff.sync_once(timeout_ms=200)
    assert not any(said(ev) for ev in w.staff._timeline.get(w.room_id, [])
                   if not isinstance(ev, MegolmEvent))
    # The quote chose Fiestas; quoting the first room's post chooses it again, as the
    # later tests expect.
    _, first = await w.sent_to(w.ana, says("se corta el agua"))
    await w.write(w.ana, w.h.wa.text_message(w.ana.user, "Entendido", context_id=first))
    await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) == "Entendido")


async def test_edits_follow_and_moderated_redactions_are_announced(world: World) -> None:
    w = world
    original = await w.staff.send_text(w.room_id, "La reunión es el lunes")
    await w.sent_to(w.bea, says("La reunión es el lunes"))
    edit = {"msgtype": "m.text", "body": "* La reunión es el martes",
            "m.new_content": {"msgtype": "m.text", "body": "La reunión es el martes"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original}}
    await w.staff.client.room_send(w.room_id, "m.room.message", edit,
                                   ignore_unverified_devices=True)
    body, _ = await w.sent_to(w.bea, says("(editado) La reunión es el martes"))
    assert text_body(body).startswith("*Ayuntamiento · ")
    # A moderator removing someone else's message: "the moderators withdrew a message".
    rude = await w.neighbour.send_text(w.room_id, "Mensaje fuera de tono")
    await w.sent_to(w.ana, says("Mensaje fuera de tono"))
    await w.sent_to(w.bea, says("Mensaje fuera de tono"))
    await w.staff.client.room_redact(w.room_id, rude, "fuera de tono")
    await w.sent_to(w.bea, says("Los moderadores han retirado un mensaje"))
    await w.sent_to(w.ana, says("Los moderadores han retirado un mensaje"))
    # Someone taking back their own message is no moderation: the WhatsApp members are
    # told its author withdrew it (staff with their label).
    await w.staff.client.room_redact(w.room_id, original, "error")
    body, _ = await w.sent_to(w.bea, says("(ha retirado su mensaje)"))
    assert text_body(body).startswith("*Ayuntamiento · ")
    own = await w.neighbour.send_text(w.room_id, "Me he equivocado de sala")
    await w.sent_to(w.bea, says("Me he equivocado de sala"))
    await w.neighbour.client.room_redact(w.room_id, own, "error")
    await w.sent_to(w.bea, lambda s: "(ha retirado su mensaje)" in text_body(s) and
                    not text_body(s).startswith("*Ayuntamiento"))
    assert w.sent_count(w.bea, says("Los moderadores han retirado un mensaje")) == 1


def content_of(ev: Any) -> dict[str, Any]:
    content = ev.source.get("content")
    return content if isinstance(content, dict) else {}


async def test_whatsapp_edits_revokes_and_reactions_follow_their_message(world: World
                                                                         ) -> None:
    w = world
    b = w.h.running.bridge
    sent = await w.write(w.bea, w.h.wa.text_message(w.bea.user, "Llego a las cinco"))
    original = await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) ==
                                  "Llego a las cinco")
    await w.sent_to(w.ana, says("Llego a las cinco"))
    # An edit on WhatsApp is an edit (m.replace) of that event, by the same pseudonym,
    # and a short "edited" follow-up for the other WhatsApp members.
    await w.write(w.bea, w.h.wa.edit_message(w.bea.user, sent, "Llego a las seis"))
    edit = await w.staff_sees(w.room_id, lambda ev: content_of(ev).get(
        "m.new_content", {}).get("body") == "Llego a las seis")
    assert content_of(edit)["m.relates_to"] == {"rel_type": "m.replace",
                                                "event_id": original.event_id}
    assert edit.sender == original.sender
    await w.sent_to(w.ana, says("(editado) Llego a las seis"))
    assert w.sent_count(w.bea, says("Llego a las seis")) == 0
    # A reaction to a message of her other room (not the one she chose) is a reaction
    # there, on that message, by her pseudonym of that room; taking it back redacts it.
    fiestas = next(r for r in await b.db.rooms.list() if r.name == "Fiestas 2027")
    _, wamid = await w.sent_to(w.ana, says("Reunión de la comisión"))
    meeting = await w.staff_sees(fiestas.room_id, lambda ev: getattr(ev, "body", None) ==
                                 "Reunión de la comisión el jueves")
    member = await b.db.wa_rooms.find(fiestas.room_id, w.ana.citizen_id)
    assert member is not None and member.ghost_user_id
    await w.write(w.ana, w.h.wa.reaction_message(w.ana.user, wamid, "👍"))
    reaction = await w.staff_sees(fiestas.room_id, lambda ev: content_of(ev).get(
        "m.relates_to", {}).get("rel_type") == "m.annotation")
    assert reaction.sender == member.ghost_user_id
    assert content_of(reaction)["m.relates_to"] == {
        "rel_type": "m.annotation", "event_id": meeting.event_id, "key": "👍"}
    await w.write(w.ana, w.h.wa.reaction_message(w.ana.user, wamid, ""))
    await w.staff_sees(fiestas.room_id, lambda ev: getattr(ev, "redacts", None) ==
                       reaction.event_id and ev.sender == member.ghost_user_id)
    # A revoke on WhatsApp redacts the event, by her pseudonym; the other WhatsApp
    # members, who got it, are told that its author withdrew it.
    await w.write(w.bea, w.h.wa.revoke_message(w.bea.user, sent))
    await w.staff_sees(w.room_id, lambda ev: getattr(ev, "redacts", None) ==
                       original.event_id and ev.sender == original.sender)
    retracted = f"*{w.bea.pseudonyms[w.room_id]}*: (ha retirado su mensaje)"
    await w.sent_to(w.ana, says(retracted))
    # Nothing of it went elsewhere: no new message in either room, none in a portal.
    await w.h.running.idle("whatsapp")
    for room in (w.room_id, fiestas.room_id):
        assert not any("reaccionado" in str(getattr(ev, "body", ""))
                       for ev in w.staff._timeline.get(room, []))
    assert w.sent_count(w.bea, says(retracted)) == 0


async def test_group_receipts_and_typing_are_not_relayed(world: World) -> None:
    """Read ticks and "escribiendo…" are a portal's (one desk, one citizen): in a room,
    whoever reads or types is one of many, and relaying it would tell each WhatsApp
    member what every other member reads."""
    w = world
    await w.write(w.bea, w.h.wa.text_message(w.bea.user, "¿Alguien más sin agua?"))
    event = await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) ==
                               "¿Alguien más sin agua?")
    before = len(w.h.wa.sent)
    await w.staff.client.room_read_markers(w.room_id, event.event_id, event.event_id)
    await w.staff.client.room_typing(w.room_id, True, timeout=30000)
    await w.neighbour.client.room_read_markers(w.room_id, event.event_id, event.event_id)
    await asyncio.sleep(3)  # ephemeral events come in a later transaction
    await w.h.running.idle("whatsapp")
    assert not [s for s in w.h.wa.sent[before:] if s.get("status") == "read"]
    # A Matrix reply to it reaches each WhatsApp member as a quote of the message they
    # have: Bea's own, and the copy Ana got.
    asked = await w.write(w.bea, w.h.wa.text_message(w.bea.user, "¿Y luz?"))
    question = await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) ==
                                  "¿Y luz?")
    _, ana_copy = await w.sent_to(w.ana, says("¿Y luz?"))
    await w.staff.client.room_send(w.room_id, "m.room.message", {
        "msgtype": "m.text", "body": "Luz sí hay",
        "m.relates_to": {"m.in_reply_to": {"event_id": question.event_id}}},
        ignore_unverified_devices=True)
    for member, quoted in ((w.bea, asked), (w.ana, ana_copy)):
        reply, _ = await w.sent_to(member, says("Luz sí hay"))
        assert reply.get("context") == {"message_id": quoted}


async def test_a_failed_delivery_is_told_in_the_room(world: World) -> None:
    """WhatsApp accepted a room message for a member, then reported it failed: the room
    is told who did not get it (by pseudonym) and why; the metric counts it."""
    w = world
    await w.staff.send_text(w.room_id, "Este aviso no llegará")
    _, wamid = await w.sent_to(w.bea, says("Este aviso no llegará"))
    before = not_relayed(w, "undelivered")
    status = w.h.wa.status_update(wamid, "failed", w.bea.user,
                                  errors=[(131026, "Message undeliverable")])
    assert await w.h.wa.deliver(w.h.webhook_url, status) == 200
    notice = await w.staff_sees(w.room_id, lambda ev: isinstance(ev, RoomMessageNotice) and
                                f"«{w.bea.pseudonyms[w.room_id]}»" in ev.body)
    assert "Message undeliverable" in notice.body
    assert not_relayed(w, "undelivered") == before + 1


async def test_fanout_keeps_each_citizens_order_through_a_429(world: World) -> None:
    w = world
    b = w.h.running.bridge
    b.outbox.concurrency = 8  # whatsapp.outbox_concurrency: citizens' lanes at once
    w.h.wa.fail_next(130429, 429)  # Meta's throughput limit, once: that send backs off
    for n in (1, 2, 3):
        event_id = await w.staff.send_text(w.room_id, f"Orden {n}")
        # Each post queued before the next is written: the order the room has (a post
        # whose key comes late is decrypted later, and would be relayed later).
        await wait_until(lambda e=event_id: b.db.outbox.by_key(
            event_key(e, w.bea.citizen_id)), 30, "queued")
    for member in (w.ana, w.bea):
        await w.sent_to(member, says("Orden 3"), timeout=60)
        got = [text_body(s).rsplit(" ", 1)[-1] for s in w.h.wa.sent
               if to_citizen(s, member.user) and "Orden " in text_body(s)]
        assert got == ["1", "2", "3"]
    assert await b.db.outbox.by_key(event_key(event_id, w.ana.citizen_id)) is not None
    b.outbox.concurrency = 1


async def test_invitar_in_the_portal(world: World) -> None:
    w = world
    status, created = await w.h.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Huertos urbanos", "kind": "citizen"})
    assert status == 201
    assert w.bea.desk is not None
    await w.bea.desk.send_text(w.bea.portal, "!invitar huertos URBANOS")
    invitation, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "interactive" and
                                    "«Huertos urbanos»" in text_body(s))
    # Named by their display name in the portal (with the staff label), never their ID.
    assert "Ayuntamiento · " in text_body(invitation)
    assert w.bea.desk.user_id not in text_body(invitation)
    notice = await w.staff_sees_as(w.bea.desk, w.bea.portal, lambda ev: isinstance(
        ev, RoomMessageNotice) and "Invitación enviada" in ev.body)
    assert "Huertos urbanos" in notice.body
    # The command itself never reached the citizen as a message.
    assert w.sent_count(w.bea, says("!invitar")) == 0
    await w.bea.desk.send_text(w.bea.portal, "!invitar Sala que no existe")
    await w.staff_sees_as(w.bea.desk, w.bea.portal, lambda ev: isinstance(
        ev, RoomMessageNotice) and ev.body.startswith("Uso: !invitar"))
    member = await w.h.running.bridge.db.wa_rooms.find(RoomID(created["room_id"]),
                                                       w.bea.citizen_id)
    assert member is not None and member.state == "invited"


async def test_window_closed_digest_once_then_backlog_in_order(world: World) -> None:
    w = world
    b = w.h.running.bridge
    # Bea last wrote 25 hours ago.
    engine_time = datetime.now(UTC) - timedelta(hours=25)
    async with b.db.session() as session:
        await session.execute(update(CitizenRow).where(CitizenRow.id == w.bea.citizen_id)
                              .values(last_inbound_at=engine_time))
    for n in (1, 2):
        await w.staff.send_text(w.room_id, f"Aviso número {n}")
    # Redacted while it waits: never sent.
    withdrawn = await w.staff.send_text(w.room_id, "Aviso que se retira")
    await wait_until(lambda: _backlog(b, w.bea.citizen_id, 3), 30, "kept")
    await w.staff.client.room_redact(w.room_id, withdrawn, "error")
    await w.staff.send_text(w.room_id, "Aviso número 3")
    digest, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "template")
    assert digest["template"]["name"] == "mensajes_nuevos_sala"
    params = [p["text"] for p in digest["template"]["components"][0]["parameters"]]
    assert params[1] == "Vecinos de Ejemplo"
    assert "Aviso" not in json.dumps(digest, ensure_ascii=False)
    await w.h.running.idle("matrix")
    await wait_until(lambda: _backlog(b, w.bea.citizen_id, 3), 30, "three kept")
    assert len(await b.db.wa_rooms.backlog(w.bea.citizen_id)) == 3
    assert w.sent_count(w.bea, lambda s: s.get("type") == "template") == 1
    assert w.sent_count(w.bea, says("Aviso número")) == 0
    # Bea answers: the newest two (rooms.backlog_max) arrive in order after one line.
    left_out = not_relayed(w, "left_out")
    await w.write(w.bea, w.h.wa.text_message(w.bea.user, "Aquí estoy"))
    await w.sent_to(w.bea, says("1 mensajes anteriores"))
    assert not_relayed(w, "left_out") == left_out + 1
    await w.sent_to(w.bea, says("Aviso número 3"))
    got = [text_body(s) for s in w.h.wa.sent if to_citizen(s, w.bea.user) and
           ("Aviso número" in text_body(s) or "anteriores" in text_body(s))]
    assert [g.split(": ", 1)[-1] for g in got] == [got[0].split(": ", 1)[-1],
                                                  "Aviso número 2", "Aviso número 3"]
    assert "anteriores" in got[0]
    assert w.sent_count(w.bea, says("Aviso que se retira")) == 0


async def test_invitation_while_the_window_is_closed_waits_for_the_reply(world: World
                                                                        ) -> None:
    """From the management room (the admin verb's third surface): the window is closed,
    so a content-free template asks the citizen to answer; the inviter is told the
    invitation waits; it arrives, with its buttons, when the citizen writes."""
    w = world
    b = w.h.running.bridge
    async with b.db.session() as session:
        await session.execute(update(CitizenRow).where(CitizenRow.id == w.bea.citizen_id)
                              .values(last_inbound_at=datetime.now(UTC) - timedelta(hours=30)))
    status, created = await w.h.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Mercadillo solidario",
                                              "kind": "citizen"})
    assert status == 201
    room = created["room_id"]
    talk = await dm_with_bot(w.h, w.h.admin.localpart, w.h.admin.password)
    try:
        code = (await b.db.subscriptions.get(w.bea.citizen_id))
        reference = code.code if code is not None else w.bea.portal_ghost
        answer = await talk.say(f"whatsapp {room} {reference}")
    finally:
        await talk.staff.close()
    member = await b.db.wa_rooms.find(RoomID(room), w.bea.citizen_id)
    assert member is not None and member.state == "invited"
    assert f"«{member.display_name}»" in answer and "waiting for their reply" in answer
    template, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "template" and
                                  s["template"]["name"] == "invitacion_pendiente")
    assert "Mercadillo" not in json.dumps(template, ensure_ascii=False)
    assert not template["template"].get("components")
    await w.h.running.idle("whatsapp")
    assert w.sent_count(w.bea, says("«Mercadillo solidario»")) == 0
    entry = await last_audit_entry(b)
    assert entry.action == "room.whatsapp_invite" and entry.actor == w.h.admin.user_id
    # She answers: the invitation with its buttons arrives.
    await w.write(w.bea, w.h.wa.text_message(w.bea.user, "Hola, ¿qué invitación?"))
    invitation, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "interactive" and
                                    "«Mercadillo solidario»" in text_body(s))
    ids = [x["reply"]["id"] for x in invitation["interactive"]["action"]["buttons"]]
    assert [i.rsplit(":", 1)[0] for i in ids] == [f"{policy.ACCEPT_BUTTON}{member.id}",
                                                  f"{policy.DECLINE_BUTTON}{member.id}"]
    assert await b.db.wa_rooms.backlog(w.bea.citizen_id) == []
    assert w.sent_count(w.bea, lambda s: s.get("type") == "template" and
                        s["template"]["name"] == "invitacion_pendiente") == 1


async def test_big_rooms_ask_to_confirm_and_declining_creates_nothing(world: World
                                                                       ) -> None:
    w = world
    b = w.h.running.bridge
    status, created = await w.h.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Asamblea vecinal", "kind": "citizen"})
    assert status == 201
    room = created["room_id"]
    above = w.h.running.config.rooms.confirm_above
    await _crowd(w.h, room, above)
    path = f"/admin/v1/rooms/{room}/whatsapp-members"
    status, answer = await w.h.running.call("POST", path, {"citizen": w.bea.portal_ghost})
    assert status == 409 and answer["errcode"] == "CB_CONFIRM_REQUIRED", answer
    assert await b.db.wa_rooms.find(RoomID(room), w.bea.citizen_id) is None
    status, answer = await w.h.running.call("POST", path, {"citizen": w.bea.portal_ghost,
                                                           "confirm": True})
    assert status == 201, answer
    invitation, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "interactive" and
                                    "«Asamblea vecinal»" in text_body(s))
    assert wa_text.ROOM_MEDIA_ON.strip() in text_body(invitation)
    decline = invitation["interactive"]["action"]["buttons"][1]["reply"]["id"]
    await w.write(w.bea, w.h.wa.button_reply(w.bea.user, decline, wa_text.ROOM_DECLINE_BUTTON))
    await w.sent_to(w.bea, says("no se le ha añadido a «Asamblea vecinal»"))
    member = await b.db.wa_rooms.find(RoomID(room), w.bea.citizen_id)
    assert member is not None and member.state == "declined" and member.ghost_user_id is None
    assert not [r for r in await b.db.consent.for_citizen(w.bea.citizen_id)
                if r.purpose == f"room:{room}"]
    # Per room: WhatsApp members switched off (refused), then media off (the invitation
    # says so).
    settings = f"/admin/v1/rooms/{room}/whatsapp-settings"
    status, _ = await w.h.running.call("POST", settings, {"whatsapp_allowed": False})
    assert status == 200
    status, answer = await w.h.running.call("POST", path, {"citizen": w.bea.portal_ghost,
                                                           "confirm": True})
    assert status == 409, answer
    status, _ = await w.h.running.call("POST", settings, {"whatsapp_allowed": True,
                                                          "relay_media": False})
    assert status == 200
    status, answer = await w.h.running.call("POST", path, {"citizen": w.bea.portal_ghost,
                                                           "confirm": True})
    assert status == 201, answer
    stale, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "interactive" and
                               "«Asamblea vecinal»" in text_body(s) and
                               wa_text.ROOM_MEDIA_OFF.strip() in text_body(s))
    # Media on again and a new invitation: its text differs, and the consent must be
    # for the text she accepts. The superseded invitation's button is refused.
    status, _ = await w.h.running.call("POST", settings, {"relay_media": True})
    assert status == 200
    status, answer = await w.h.running.call("POST", path, {"citizen": w.bea.portal_ghost,
                                                           "confirm": True})
    assert status == 201, answer
    current, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "interactive" and
                                 "«Asamblea vecinal»" in text_body(s) and
                                 wa_text.ROOM_MEDIA_ON.strip() in text_body(s)
                                 and s is not invitation)
    old_accept = stale["interactive"]["action"]["buttons"][0]["reply"]["id"]
    await w.write(w.bea, w.h.wa.button_reply(w.bea.user, old_accept, wa_text.ROOM_ACCEPT_BUTTON))
    await w.sent_to(w.bea, says(wa_text.ROOM_INVITATION_SUPERSEDED))
    member = await b.db.wa_rooms.find(RoomID(room), w.bea.citizen_id)
    assert member is not None and member.state == "invited"
    accept = current["interactive"]["action"]["buttons"][0]["reply"]["id"]
    await w.write(w.bea, w.h.wa.button_reply(w.bea.user, accept, wa_text.ROOM_ACCEPT_BUTTON))
    await w.sent_to(w.bea, says("Ya participa en «Asamblea vecinal»"))
    records = [r for r in await b.db.consent.for_citizen(w.bea.citizen_id)
               if r.purpose == f"room:{room}"]
    assert [r.state for r in records] == ["granted"]
    assert records[0].notice_hash == hashlib.sha256(text_body(current).encode()).hexdigest()


async def last_audit_entry(b: Any) -> Any:
    return (await b.db.audit.list(limit=1))[0]


async def _backlog(b: Any, citizen_id: int, count: int) -> bool:
    return len(await b.db.wa_rooms.backlog(citizen_id)) >= count


async def test_mute_then_kick_stop_the_relay(world: World) -> None:
    w = world
    b = w.h.running.bridge
    member = await b.db.wa_rooms.find(RoomID(w.room_id), w.ana.citizen_id)
    assert member is not None and member.ghost_user_id
    status, answer = await w.h.running.call(
        "POST", f"/admin/v1/rooms/{w.room_id}/mute",
        {"user_id": member.ghost_user_id, "reason": "prueba"})
    assert status == 200, answer
    muted = not_relayed(w, "muted")
    await w.write(w.ana, w.h.wa.text_message(w.ana.user, "¿Me oyen?"))
    await w.sent_to(w.ana, says("silenciado"))
    await w.write(w.ana, w.h.wa.text_message(w.ana.user, "¿Y ahora?"))
    await w.h.running.idle("whatsapp")
    assert not_relayed(w, "muted") == muted + 2  # told once, each message counted
    status, answer = await w.h.running.call(
        "POST", f"/admin/v1/rooms/{w.room_id}/kick",
        {"user_id": member.ghost_user_id, "reason": "prueba"})
    assert status == 200, answer
    await w.sent_to(w.ana, says("le han retirado de la sala «Vecinos de Ejemplo»"))
    assert w.sent_count(w.ana, says("silenciado")) == 1
    await w.staff.send_text(w.room_id, "Tras la expulsión")
    await w.sent_to(w.bea, says("Tras la expulsión"))
    assert w.sent_count(w.ana, says("Tras la expulsión")) == 0
    await w.h.running.idle("matrix")
    assert not any(getattr(ev, "body", None) in ("¿Me oyen?", "¿Y ahora?")
                   for ev in w.staff._timeline.get(w.room_id, []))


async def test_salir_leaves_the_room(world: World) -> None:
    w = world
    b = w.h.running.bridge
    await w.write(w.bea, w.h.wa.text_message(w.bea.user, "SALIR"))
    await w.sent_to(w.bea, says("Ha dejado la sala «Vecinos de Ejemplo»"))
    member = await b.db.wa_rooms.find(RoomID(w.room_id), w.bea.citizen_id)
    assert member is not None and member.state == "left"
    states = [r.state for r in await b.db.consent.for_citizen(w.bea.citizen_id)
              if r.purpose == f"room:{w.room_id}"]
    assert states == ["granted", "withdrawn"]
    await w.staff.send_text(w.room_id, "Después de SALIR")
    await w.h.running.idle("matrix")
    assert w.sent_count(w.bea, says("Después de SALIR")) == 0
    # A room message already queued when she left is not sent, and is counted.
    citizen = await b.db.citizens.get(w.bea.citizen_id)
    assert citizen is not None
    gone = not_relayed(w, "not_member")
    assert await b.outbox.room(citizen, "wr:$queued-before-salir:1", {
        "type": "text", "body": "En cola al salir", "wa_room": w.room_id})

    async def settled() -> bool:
        item = await b.db.outbox.by_key("wr:$queued-before-salir:1")
        return item is not None and item.status == "failed"
    await wait_until(settled, 30, "not sent")
    assert not_relayed(w, "not_member") == gone + 1
    assert w.sent_count(w.bea, says("En cola al salir")) == 0


async def test_announcement_rooms_refuse_whatsapp_posts(world: World) -> None:
    w = world
    status, created = await w.h.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Avisos", "kind": "announcement"})
    assert status == 201
    room = created["room_id"]
    await w.staff.join(room)
    await join_room(w, w.bea, room)
    await w.staff.send_text(room, "Bando: fiestas el día 15")
    _, wamid = await w.sent_to(w.bea, says("Bando: fiestas"))
    refused = not_relayed(w, "announcement")
    await w.write(w.bea, w.h.wa.text_message(w.bea.user, "¡Genial!", context_id=wamid))
    await w.sent_to(w.bea, says("es una sala de avisos"))
    assert not_relayed(w, "announcement") == refused + 1


async def test_a_ban_stops_the_relay(world: World) -> None:
    w = world
    b = w.h.running.bridge
    # The announcement room of the test above (the session's other tests may have made
    # rooms of that name too).
    found = [(r, m) for r in await b.db.rooms.list() if r.name == "Avisos"
             if (m := await b.db.wa_rooms.find(r.room_id, w.bea.citizen_id)) is not None]
    assert len(found) == 1
    avisos, member = found[0]
    assert member.state == "joined" and member.ghost_user_id
    status, answer = await w.h.running.call(
        "POST", f"/admin/v1/rooms/{avisos.room_id}/ban",
        {"user_id": member.ghost_user_id, "reason": "prueba"})
    assert status == 200, answer
    await w.sent_to(w.bea, says("le han retirado de la sala «Avisos»"))
    banned = await b.db.wa_rooms.find(avisos.room_id, w.bea.citizen_id)
    assert banned is not None and banned.state == "left"
    await w.staff.send_text(avisos.room_id, "Tras el veto")
    await w.h.running.idle("matrix")
    await w.h.running.idle("whatsapp")
    assert w.sent_count(w.bea, says("Tras el veto")) == 0


async def test_privacy_sweep(world: World) -> None:
    w = world
    seen = "\n".join(SEEN_BY_STAFF + SENT_TO_CITIZENS)
    received = "\n".join(json.dumps({k: v for k, v in s.items() if k not in ("to", "recipient")},
                                    ensure_ascii=False)
                         for s in w.h.wa.sent if to_citizen(s, w.bea.user))
    logs = "\n".join(w.h.log_lines)
    for identifier in [w.ana.user.wa_id, w.ana.user.user_id, w.bea.user.wa_id,
                       w.bea.user.user_id, "Ana Martínez", "Beatriz Gómez"]:
        assert identifier
        assert identifier not in seen
        assert identifier not in logs
        assert identifier not in received
    # No Matrix ID of anyone in what the WhatsApp members received.
    assert w.h.admin.user_id not in received
    assert w.ana.portal_ghost not in received
    # At rest: no wamid of this module's messages (to or from a room member), in any
    # table, in clear or inside base64; the message maps keep keyed hashes and
    # ciphertexts only.
    wamids = WAMIDS + [i for i in w.h.wa.sent_ids if i and any(
        _about(i, m.user) for m in (w.ana, w.bea))]
    assert len(wamids) > 20
    needles = [x for wamid in wamids for x in (wamid, wamid.removeprefix("wamid."))]
    stored = await dump(w.h.running.config.database.url)
    people = [w.ana.user.user_id, w.bea.user.user_id, w.ana.user.name, w.bea.user.name,
              *(f for m in (w.ana, w.bea) if m.user.wa_id for f in phone_forms(m.user.wa_id))]
    leaked = find_clear(stored.everything, [*needles, *people])
    assert not leaked, f"in clear at rest: {list(leaked.values())[:3]}"
    pairs = [row for row in stored.rows if row.startswith("wa_room_messages: ")]
    assert len(pairs) > 5


def _about(wamid: str, user: SimulatedUser) -> bool:
    """Whether a (simulated) wamid was issued for a message to or from `user`."""
    raw = base64.b64decode(wamid.removeprefix("wamid."))
    return (user.wa_id or user.user_id).encode() in raw


async def test_self_service_join_from_an_invite_link(world: World) -> None:
    w = world
    url = await invite_link(w.h, w.room_id)
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as resp:
            page = await resp.text()
        offer = re.search(r'href="([^"]+/whatsapp\?lang=es)"', page)
        assert offer, page
        async with http.get(w.h.running.url + html.unescape(offer.group(1))) as resp:
            assert resp.status == 200
            join = await resp.text()
    found = re.search(r"UNIRME ([A-Z0-9]{4}-[A-Z0-9]{4})", join)
    assert found and "https://wa.me/34900000000?text=UNIRME%20" in join
    carla = Member(new_citizen("Carla Ruiz"), "", 0)
    USED_IDENTIFIERS.append("Carla Ruiz")
    await w.write(carla, w.h.wa.text_message(carla.user, f"unirme {found.group(1)}"))
    invitation, _ = await w.sent_to(carla, lambda s: s.get("type") == "interactive")
    accept = invitation["interactive"]["action"]["buttons"][0]["reply"]["id"]
    assert accept.startswith(policy.ACCEPT_BUTTON)
    await w.write(carla, w.h.wa.button_reply(carla.user, accept, wa_text.ROOM_ACCEPT_BUTTON))
    await w.sent_to(carla, says("Ya participa en «Vecinos de Ejemplo»"))
    await w.staff.send_text(w.room_id, "Bienvenida a quien llega")
    await w.sent_to(carla, says("Bienvenida a quien llega"))
    # One room, no portal: what she writes goes to the room, no privacy notice of the
    # private conversation is asked for.
    await w.write(carla, w.h.wa.text_message(carla.user, "Gracias por añadirme"))
    await w.staff_sees(w.room_id, lambda ev: getattr(ev, "body", None) ==
                       "Gracias por añadirme")
    assert w.sent_count(carla, lambda s: s.get("type") == "interactive") == 1
    # Bea, who left with SALIR, is invited again and comes back (same pseudonym).
    again = await join_room(w, w.bea, w.room_id)
    assert again == w.bea.pseudonyms[w.room_id]
    # Carla's photo reaches the room (encrypted) and the other WhatsApp member, as hers.
    photo = b"\xff\xd8\xff\xe0" + os.urandom(4096)
    media_id = w.h.wa.add_media(photo, "image/jpeg")
    await w.write(carla, w.h.wa.media_message(carla.user, "image", media_id,
                                              caption="El bache de la calle Mayor"))
    row = await w.h.running.bridge.db.citizens.by_index(
        w.h.running.bridge.privacy.index.digest(carla.user.user_id))
    assert row is not None
    member = await w.h.running.bridge.db.wa_rooms.find(RoomID(w.room_id), row.id)
    assert member is not None
    image, _ = await w.sent_to(w.bea, lambda s: s.get("type") == "image" and
                               "bache" in s["image"].get("caption", ""))
    assert image["image"]["caption"] == (f"[Vecinos de Ejemplo] *{member.display_name}*: "
                                         "El bache de la calle Mayor")
    assert w.h.wa.media[image["image"]["id"]].data == photo
    assert w.sent_count(carla, lambda s: s.get("type") == "image") == 0  # no echo
    # The code was spent, and so was the link's one use.
    await w.write(carla, w.h.wa.text_message(carla.user, f"UNIRME {found.group(1)}"))
    await w.sent_to(carla, says("no es válido o ha caducado"))
    async with aiohttp.ClientSession() as http, \
            http.get(w.h.running.url + html.unescape(offer.group(1))) as resp:
        assert resp.status == 404
    # BAJA still opts out of everything: she leaves the room too, on record.
    await w.write(carla, w.h.wa.text_message(carla.user, "BAJA"))
    db = w.h.running.bridge.db

    async def left() -> bool:
        gone = await db.wa_rooms.find(RoomID(w.room_id), row.id)
        return gone is not None and gone.state == "left"
    await wait_until(left, 30, "left on BAJA")
    assert [r.state for r in await db.consent.for_citizen(row.id)
            if r.purpose == f"room:{w.room_id}"] == ["granted", "withdrawn"]


async def test_erasure_retires_every_room_pseudonym(world: World) -> None:
    w = world
    b = w.h.running.bridge
    ghosts = await b.db.wa_rooms.ghosts_of(w.ana.citizen_id)
    assert len(ghosts) == 2  # two rooms, two pseudonyms
    # The export shows her memberships (pseudonyms, states).
    path = f"/admin/v1/citizens/{quote(w.ana.portal_ghost, safe='')}"
    status, exported = await w.h.running.call("GET", path + "/export?reason=art.%2015")
    assert status == 200, exported
    rooms = {m["room_id"]: m for m in exported["room_memberships"]}
    assert rooms[w.room_id]["pseudonym"] == w.ana.pseudonyms[w.room_id]
    assert {m["matrix_user_id"] for m in rooms.values()} == set(ghosts)
    assert "room_backlog" in exported
    # (The export is the citizen's own, and may hold her webhooks; the memberships
    # themselves carry no message id.)
    assert not find_clear([json.dumps(exported["room_memberships"])], WAMIDS)
    # A room pseudonym names her too (staff know her by it in the room).
    status, by_room_ghost = await w.h.running.call(
        "GET", f"/admin/v1/citizens/{quote(ghosts[0], safe='')}/export?reason=art.%2015")
    assert status == 200 and by_room_ghost["pseudonym"] == exported["pseudonym"]
    joined = [r for r in exported["room_memberships"] if r["state"] == "joined"]
    # Something waiting for her window: erasure takes it too.
    citizen = await b.db.citizens.get(w.ana.citizen_id)
    assert citizen is not None
    await b.db.wa_rooms.keep(citizen.id, RoomID(w.room_id), "wr:$erased:1", "sealed")
    status, answer = await w.h.running.call(
        "DELETE", f"/admin/v1/citizens/{quote(w.ana.portal_ghost, safe='')}",
        {"reason": "derecho de supresión"})
    assert status == 200, answer
    assert await b.db.wa_rooms.ghosts_of(w.ana.citizen_id) == []
    for ghost in ghosts:
        assert await b.db.ghosts.get(ghost) is None
    assert await b.db.wa_rooms.of_citizen_all(w.ana.citizen_id) == []
    assert await b.db.wa_rooms.backlog(w.ana.citizen_id) == []
    assert await b.db.wa_rooms.find(RoomID(w.room_id), w.ana.citizen_id) is None
    # Each room she was in has its consent withdrawn on record (by pseudonym).
    async with b.db.session() as session:
        withdrawn = list(await session.scalars(select(ConsentRecordRow.purpose).where(
            ConsentRecordRow.pseudonym == exported["pseudonym"],
            ConsentRecordRow.purpose.startswith("room:"),
            ConsentRecordRow.state == "withdrawn", ConsentRecordRow.evidence == "erasure")))
    assert joined and set(withdrawn) == {f"room:{m['room_id']}" for m in joined}
