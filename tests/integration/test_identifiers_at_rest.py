"""Identifiers at rest (issue #15, point 1): only as keyed hash or ciphertext.

The full journey runs over the real HTTP API, with the real Synapse and the Cloud API
simulator (whose wamids embed the number, as Meta's do), on SQLite and on PostgreSQL:
first contact, opt-in, portal, staff replies, statuses, replies and reactions with
context both ways, an edit and a revoke, a report, notices of availability with their
statuses, opt-out, two WhatsApp citizens in an agency room (issue 17: a staff post, a
quoted answer relayed to the room and the other member, a staff reply quoting it), and
two citizens' erasure. Then every table and column of the
database (on SQLite also the raw file bytes) is searched for the citizens' numbers in
every common spelling, their BSUIDs and profile names, and every wamid the simulator
issued or the test sent — also inside anything that decodes as base64.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import secrets
import string
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from sqlalchemy import func, insert, select, text

from bridge.db import downgrade, upgrade
from bridge.db.engine import create_engine
from bridge.db.models import Base, InboundRow
from bridge.devtools.simulator import SimulatedUser
from bridge.legacy_wamids import key_legacy_wamids
from bridge.rooms_wa.policy import ACCEPT_BUTTON
from bridge.texts.whatsapp import default as wa_text
from bridge.types import WamidHash
from bridge.whatsapp.consent import EVIDENCE_PREFIX, OPT_IN_BUTTON, message_evidence
from bridge.whatsapp.notice_consent import NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON
from bridge.whatsapp.subscriptions import SUBSCRIPTION_CODE
from tests.fixtures.bridge import BridgeHarness, in_place_of, new_prefix, own_bridge
from tests.fixtures.db import PgServer
from tests.fixtures.dbdump import dump, files_under, find_clear, phone_forms
from tests.fixtures.staff import staff_login
from tests.integration.test_whatsapp import Journey, body_is, to_citizen, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(params=["sqlite", "postgresql"])
def pg(request: pytest.FixtureRequest) -> PgServer | None:
    # Sync, so that only the chosen backend's session fixture is asked for.
    return request.getfixturevalue("pg_server") if request.param == "postgresql" else None


CRYPTO_TABLES = [t for t in Base.metadata.sorted_tables if t.name.startswith("crypto_")]


async def _crypto_rows(url: str) -> dict[str, list[dict[str, Any]]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return {t.name: [dict(r._mapping) for r in await conn.execute(select(t))]
                    for t in CRYPTO_TABLES}
    finally:
        await engine.dispose()


async def _put_back_crypto_rows(url: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    engine = create_engine(url)
    try:
        async with engine.begin() as conn:
            for table in CRYPTO_TABLES:
                if rows[table.name]:
                    await conn.execute(insert(table), rows[table.name])
    finally:
        await engine.dispose()


async def new_db(pg: PgServer | None, tmp: Path) -> str:
    url = await pg.create() if pg else f"sqlite+aiosqlite:///{tmp / 'bridge.db'}"
    await upgrade(url)
    return url


@dataclasses.dataclass
class Traces:
    """What the test must not find at rest: identifiers, wamids; and every admin answer."""

    identifiers: list[str] = dataclasses.field(default_factory=list)
    wamids: list[str] = dataclasses.field(default_factory=list)
    answers: list[str] = dataclasses.field(default_factory=list)

    def number(self) -> str:
        wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
        self.identifiers += phone_forms(wa_id)
        return wa_id

    def citizen(self, name: str, with_number: bool = True) -> SimulatedUser:
        wa_id = self.number() if with_number else None
        bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                                for _ in range(20))
        profile = f"{name} {secrets.choice(['Tejada', 'Vilalta', 'Olmedo'])} " \
                  f"{secrets.token_hex(3)}"
        self.identifiers += [bsuid, profile]
        return SimulatedUser(wa_id=wa_id, user_id=bsuid, name=profile)

    def wamid_needles(self) -> list[str]:
        # The whole id, and its base64 part alone (stored without the "wamid." prefix).
        return [w for wamid in self.wamids for w in (wamid, wamid.removeprefix("wamid."))]


class Run:
    """One journey's helpers: webhooks, admin calls, what staff see and WhatsApp got."""

    def __init__(self, h: BridgeHarness, traces: Traces) -> None:
        self.h, self.t = h, traces
        self.first_sent = len(h.wa.sent)

    async def write(self, value: dict[str, Any]) -> str:
        assert await self.h.wa.deliver(self.h.webhook_url, value) == 200
        if "messages" in value:
            wamid = str(value["messages"][0]["id"])
            self.t.wamids.append(wamid)
            return wamid
        return ""

    async def admin(self, method: str, path: str, body: Any = None) -> Any:
        status, data = await self.h.running.call(method, path, body)
        assert status < 300, (method, path, status, data)
        self.t.answers.append(json.dumps(data, ensure_ascii=False))
        return data

    def issued(self) -> list[str]:
        """Every wamid the simulator gave out during this run."""
        return [w for w in self.h.wa.sent_ids[self.first_sent:] if w]

    def wamid_of(self, sent: dict[str, Any]) -> str:
        wamid = self.h.wa.sent_ids[next(i for i, s in enumerate(self.h.wa.sent) if s is sent)]
        assert wamid is not None
        return wamid

    async def statuses(self, sent: dict[str, Any], citizen: SimulatedUser,
                       *kinds: str) -> None:
        wamid = self.wamid_of(sent)
        for kind in kinds:
            await self.write(self.h.wa.status_update(wamid, kind, citizen))

    async def subscribe(self, citizen: SimulatedUser) -> str:
        """AVISOS → consent text → «Acepto» → confirmation with the code."""
        wa = self.h.wa
        await self.write(wa.text_message(citizen, "Avisos"))
        await wa.wait_for_sent(lambda s: to_citizen(s, citizen) and _buttons(s) == [
            NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON], timeout=30)
        await self.write(wa.button_reply(citizen, NOTICES_IN_BUTTON, "Acepto"))
        confirm = await wa.wait_for_sent(
            lambda s: to_citizen(s, citizen) and _buttons(s) == [NOTICES_OUT_BUTTON], timeout=30)
        code = SUBSCRIPTION_CODE.search(confirm["interactive"]["body"]["text"])
        assert code is not None
        return code.group()

    async def notice(self, citizen: SimulatedUser, code: str, reference: str) -> None:
        """A notice of availability, delivered and read; the log entry over the API."""
        await self.admin("POST", "/admin/v1/notices", {"recipient": code, "reference": reference})
        sent = await self.h.wa.wait_for_sent(
            lambda s: to_citizen(s, citizen) and s.get("type") == "template", timeout=30)
        await self.statuses(sent, citizen, "sent", "delivered", "read")

        async def read() -> bool:
            data = await self.admin("GET", "/admin/v1/notices?reference=" + quote(reference))
            return bool(data["notices"]) and data["notices"][0]["status"] == "read"
        await wait_until(read, 30, "notice read")


def _buttons(sent: dict[str, Any]) -> list[str]:
    if sent.get("type") != "interactive":
        return []
    # (Interactive lists, the room picker of bridge.rooms_wa, have rows, not buttons.)
    return [b["reply"]["id"] for b in sent["interactive"]["action"].get("buttons", [])]


def _text(body: str) -> Any:
    return lambda s: s.get("text", {}).get("body") == body


async def _conversation(run: Run, j: Journey) -> None:
    """Staff and citizen talk: replies and reactions with context both ways, statuses,
    an edit, a revoke, a report of a staff message."""
    c, wa = j.citizen, run.h.wa
    await j.desk.send_text(j.room_id, "Buenos días, ¿en qué le ayudo?")
    staff_msg = await j.sent_to_citizen(_text("Buenos días, ¿en qué le ayudo?"))
    await run.statuses(staff_msg, c, "sent", "delivered", "read")
    staff_wamid = run.wamid_of(staff_msg)
    # The citizen answers in reply to it, and reacts to it.
    await run.write(wa.text_message(c, "Sobre el padrón", context_id=staff_wamid))
    await j.seen(body_is("Sobre el padrón"))
    await run.write(wa.reaction_message(c, staff_wamid, "👍"))
    await j.seen(lambda e: e.source.get("content", {}).get("m.relates_to", {}).get("key")
                 == "👍")
    # Staff answer in reply to the citizen's message and react to it: WhatsApp gets the
    # citizen's wamid back (the message map must still give it).
    asked = await run.write(wa.text_message(c, "¿Qué necesito?"))
    asked_ev = await j.seen(body_is("¿Qué necesito?"))
    await j.desk.client.room_send(j.room_id, "m.room.message", {
        "msgtype": "m.text", "body": f"> <{asked_ev.sender}> ¿Qué necesito?\n\nEl DNI",
        "m.relates_to": {"m.in_reply_to": {"event_id": asked_ev.event_id}}},
        ignore_unverified_devices=True)
    reply = await j.sent_to_citizen(_text("El DNI"))
    assert reply["context"] == {"message_id": asked}
    await j.desk.client.room_send(j.room_id, "m.reaction", {"m.relates_to": {
        "rel_type": "m.annotation", "event_id": asked_ev.event_id, "key": "✅"}},
        ignore_unverified_devices=True)
    react = await j.sent_to_citizen(lambda s: s.get("type") == "reaction")
    assert react["reaction"] == {"message_id": asked, "emoji": "✅"}
    await run.statuses(reply, c, "delivered", "read")
    # An edit and a revoke find their originals.
    await run.write(wa.edit_message(c, asked, "¿Qué documentos necesito?"))
    await j.seen(body_is("* ¿Qué documentos necesito?"))
    doomed = await run.write(wa.text_message(c, "me equivoqué"))
    await j.seen(body_is("me equivoqué"))
    await run.write(wa.revoke_message(c, doomed))
    # A report of the staff message, by replying DENUNCIAR to it.
    await run.write(wa.text_message(c, "DENUNCIAR no me gusta", context_id=staff_wamid))
    async def reported() -> bool:
        data = await run.admin("GET", "/admin/v1/reports")
        return any(r["source"] == "whatsapp" and r["room_id"] == j.room_id
                   for r in data["reports"])
    await wait_until(reported, 30, "report filed")


async def _journey(run: Run) -> dict[str, Any]:
    """The whole journey; returns what the checks need."""
    h, wa, t = run.h, run.h.wa, run.t
    b = h.running.bridge
    # A citizen who opts in, talks, takes notices, and opts out of both.
    ana = t.citizen("Anabel")
    j = await _opt_in(run, ana, "Hola, quería preguntar por el padrón")
    try:
        await j.seen(body_is("Hola, quería preguntar por el padrón"))
        await _conversation(run, j)
        code = await run.subscribe(ana)
        await run.notice(ana, code, "NOT-2026/ID-0001")
        # She changes her number: the same conversation, the new number kept like the old.
        moved = dataclasses.replace(ana, wa_id=t.number())
        await run.write(wa.system_message(ana, new_wa_id=moved.wa_id))
        await j.seen(lambda e: "ha cambiado de número" in getattr(e, "body", ""))
        await run.write(wa.text_message(moved, "BAJA"))
        await wa.wait_for_sent(lambda s: to_citizen(s, moved) and "no reenviaremos" in
                               s.get("text", {}).get("body", ""), timeout=30)
    finally:
        await j.desk.close()
    # A citizen without a number (BSUID only) who talks, then is erased.
    bea = t.citizen("Begoña Muñoz", with_number=False)
    j = await _opt_in(run, bea, "Buenas, soy nueva por aquí")
    try:
        await j.seen(body_is("Buenas, soy nueva por aquí"))
        await _conversation(run, j)
        code = await run.subscribe(bea)
        await run.notice(bea, code, "NOT-2026/ID-0002")
        row = await b.db.citizens.by_index(b.privacy.index.digest(bea.user_id))
        assert row is not None and row.ghost_user_id is not None
        path = "/admin/v1/citizens/" + quote(row.ghost_user_id, safe="")
        # The export is the one answer that may carry identifiers: it is for the citizen.
        status, exported = await h.running.call("GET", path + "/export?reason=art.%2015")
        assert status == 200 and exported["whatsapp"]["identifier"] == bea.user_id
        erased = await run.admin("DELETE", path, {"reason": "art. 17"})
        assert erased["erased"] is True
        await j.seen(lambda e: getattr(e, "body", "").startswith("Los datos de esta persona"))
    finally:
        await j.desk.close()
    bea_wamids = [w for w in t.wamids if _about(w, bea)] + [
        w for w in run.issued() if _about(w, bea)]
    room_erased = await _room_members(run)
    # A citizen who writes once and never answers the privacy notice (held, prompted).
    cai = t.citizen("Caietana")
    await run.write(wa.text_message(cai, "¿Está abierto el registro?"))
    await wa.wait_for_sent(lambda s: to_citizen(s, cai) and OPT_IN_BUTTON in _buttons(s),
                           timeout=30)
    # Every list an admin can read.
    for path in ("/admin/v1/notices", "/admin/v1/audit?limit=500", "/admin/v1/reports",
                 "/admin/v1/dead-letters", "/admin/v1/rooms"):
        await run.admin("GET", path)
    t.wamids.extend(run.issued())
    return {"erased_wamids": bea_wamids + room_erased, "erased": bea}


def _sent_text(sent: dict[str, Any]) -> str:
    if sent.get("type") == "interactive":
        return str(sent["interactive"]["body"]["text"])
    return str(sent.get("text", {}).get("body", ""))


async def _room_members(run: Run) -> list[str]:
    """Two WhatsApp citizens in an agency room (issue 17): a staff post reaches both,
    one answers quoting it (posted in the room under her room pseudonym, relayed to the
    other), staff reply quoting her message (WhatsApp gets her wamid back, from the
    room's sealed map); then the other is erased. Returns the erased one's wamids."""
    h, wa, t = run.h, run.h.wa, run.t
    b = h.running.bridge
    staff = await staff_login(h.synapse.synapse, h.admin.localpart, h.admin.password)
    try:
        created = await run.admin("POST", "/admin/v1/rooms",
                                  {"name": "Vecinos del barrio", "kind": "citizen"})
        room = created["room_id"]
        await staff.join(room)
        members = []
        for name in ("Dorotea", "Eloísa"):
            user = t.citizen(name)
            j = await _opt_in(run, user, "Hola, una consulta")
            await j.desk.close()
            row = await b.db.citizens.by_index(b.privacy.index.digest(user.user_id))
            assert row is not None and row.ghost_user_id is not None
            answer = await run.admin(
                "POST", f"/admin/v1/rooms/{quote(room, safe='')}/whatsapp-members",
                {"citizen": row.ghost_user_id})
            invitation = await wa.wait_for_sent(
                lambda s, u=user: to_citizen(s, u) and any(
                    i.startswith(ACCEPT_BUTTON) for i in _buttons(s)), timeout=30)
            await run.write(wa.button_reply(user, _buttons(invitation)[0],
                                            wa_text.ROOM_ACCEPT_BUTTON))
            await wa.wait_for_sent(lambda s, u=user: to_citizen(s, u) and "Ya participa"
                                   in _sent_text(s), timeout=30)
            members.append((user, row, str(answer["pseudonym"])))
        (dora, _, dora_name), (eli, eli_row, _) = members
        await staff.send_text(room, "Corte de agua el lunes")
        post = await wa.wait_for_sent(lambda s: to_citizen(s, dora) and "Corte de agua" in
                                      _sent_text(s), timeout=30)
        asked = await run.write(wa.text_message(dora, "¿A qué hora?",
                                                context_id=run.wamid_of(post)))
        event = await staff.wait_for_message(room, lambda ev: ev.body == "¿A qué hora?",
                                             timeout=30)
        await wa.wait_for_sent(lambda s: to_citizen(s, eli) and _sent_text(s) ==
                               f"*{dora_name}*: ¿A qué hora?", timeout=30)
        await staff.client.room_send(room, "m.room.message", {
            "msgtype": "m.text", "body": f"> <{event.sender}> ¿A qué hora?\n\nDe 9 a 12",
            "m.relates_to": {"m.in_reply_to": {"event_id": event.event_id}}},
            ignore_unverified_devices=True)
        reply = await wa.wait_for_sent(lambda s: to_citizen(s, dora) and "De 9 a 12" in
                                       _sent_text(s), timeout=30)
        assert reply["context"] == {"message_id": asked}
        erased = await run.admin("DELETE", "/admin/v1/citizens/" + quote(
            str(eli_row.ghost_user_id), safe=""), {"reason": "art. 17"})
        assert erased["erased"] is True
    finally:
        await staff.close()
    return [w for w in [*t.wamids, *run.issued()] if _about(w, eli)]


def _about(wamid: str, citizen: SimulatedUser) -> bool:
    """Whether a (simulated) wamid was issued for a message to or from `citizen`."""
    raw = base64.b64decode(wamid.removeprefix("wamid."))
    return (citizen.wa_id or citizen.user_id).encode() in raw


async def _opt_in(run: Run, citizen: SimulatedUser, first: str) -> Journey:
    """`opt_in` of test_whatsapp, with every posted wamid recorded."""
    h = run.h
    desk = await staff_login(h.synapse.synapse, h.desk.localpart, h.desk.password)
    try:
        await run.write(h.wa.text_message(citizen, first))
        await h.wa.wait_for_sent(lambda s: OPT_IN_BUTTON in _buttons(s)
                                 and to_citizen(s, citizen), timeout=30)
        await run.write(h.wa.button_reply(citizen, OPT_IN_BUTTON, "Acepto"))
        b = h.running.bridge

        async def portal() -> Any:
            row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
            if row is None or row.consent_state != "granted":
                return None
            return await b.db.rooms.portal_for(row.id)
        room = await wait_until(portal, 30, "portal")
        await desk.join(room.room_id)
    except BaseException:
        await desk.close()
        raise
    return Journey(h, citizen, room.room_id, desk)


async def test_no_identifier_or_wamid_in_clear_at_rest(
        bridge: BridgeHarness, pg: PgServer | None, tmp_path: Path) -> None:
    traces = Traces()
    db_url = await new_db(pg, tmp_path)
    async with in_place_of(bridge), own_bridge(bridge, tmp_path, db_url) as h:
        run = Run(h, traces)
        seen = await _journey(run)
        privacy = h.running.bridge.privacy
        stored = await dump(db_url)
        store = files_under(tmp_path / "store")
    wamids = traces.wamid_needles()
    assert len(traces.wamids) > 20
    leaked = find_clear(stored.everything + store, traces.identifiers + wamids)
    assert not leaked, f"{len(leaked)} identifiers or wamids in clear at rest: " + \
        "; ".join(f"{'wamid' if k in wamids else 'identifier'} in {v!r}"
                  for k, v in list(leaked.items())[:5])
    # No admin answer but the citizen's own export carries any of them either.
    in_answers = find_clear(traces.answers, traces.identifiers + wamids)
    assert not in_answers, f"in admin API answers: {list(in_answers.values())[:3]}"
    assert not any('"wamid"' in a for a in traces.answers)
    # Erasure: the erased citizen's wamids are unlinkable — their keyed hashes are kept
    # only as consent evidence (legal evidence, by pseudonym).
    erased = {privacy.index.wamid(w) for w in seen["erased_wamids"]}
    assert len(erased) > 5
    linked = [row[:90] for row in stored.rows for digest in erased
              if digest in row and not row.startswith("consent_records: ")]
    assert not linked, f"the erased citizen's wamid hashes are still stored: {linked[:3]}"


# --- rows stored in clear before revision 0010 -----------------------------------------

# Where the code before revision 0010 put wamids (as they were, or inside a key).
_AS_IS = (("message_map", "wamid"), ("outbox", "wamid"), ("notices", "wamid"))
_INSIDE = (("inbound", "dedupe_key"), ("outbox", "idempotency_key"))


async def _as_before_0010(db_url: str, clear: dict[str, str]) -> None:
    """Put back, at revision 0009, the clear wamids the old code stored: `clear` maps
    each keyed hash to its wamid."""
    engine = create_engine(db_url)
    try:
        async with engine.begin() as conn:
            for digest, wamid in clear.items():
                params = {"h": digest, "w": wamid, "e": message_evidence(WamidHash(digest))}
                for table, column in _AS_IS:
                    await conn.execute(text(
                        f"UPDATE {table} SET {column} = :w WHERE {column} = :h"), params)
                for table, column in _INSIDE:
                    await conn.execute(text(
                        f"UPDATE {table} SET {column} = replace({column}, :h, :w)"), params)
                await conn.execute(text(
                    "UPDATE consent_records SET evidence = :w WHERE evidence = :e"), params)
    finally:
        await engine.dispose()


async def _inbound_rows(b: Any) -> int:
    async with b.db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(InboundRow)))


async def test_wamids_stored_in_clear_before_0010_are_keyed_at_start(
        bridge: BridgeHarness, pg: PgServer | None, tmp_path: Path) -> None:
    """A conversation stored by the code before revision 0010 (its wamids in clear), then
    the upgrade and a start: nothing is left in clear, and every use of the stored ids
    still works — a reply's context and a reaction's target, a redelivery's dedupe, a
    notice's status."""
    traces = Traces()
    db_url = await new_db(pg, tmp_path)
    c = traces.citizen("Dolores")
    desks: list[Journey] = []
    try:
        await _legacy_journey(bridge, db_url, tmp_path, traces, c, desks)
    finally:
        for j in desks:
            await j.desk.close()


async def _legacy_journey(bridge: BridgeHarness, db_url: str, tmp_path: Path, traces: Traces,
                          c: SimulatedUser, desks: list[Journey]) -> None:
    prefix, wa = new_prefix(), bridge.wa
    async with in_place_of(bridge):
        async with own_bridge(bridge, tmp_path, db_url, prefix) as h:
            run = Run(h, traces)
            b = h.running.bridge
            j = await _opt_in(run, c, "Hola, buenas")
            desks.append(j)
            await j.seen(body_is("Hola, buenas"))
            asked_value = wa.text_message(c, "¿Cuál es el horario?")
            asked = await run.write(asked_value)
            asked_ev = await j.seen(body_is("¿Cuál es el horario?"))
            staff_event = await j.desk.send_text(j.room_id, "De 9 a 14")
            staff_msg = await j.sent_to_citizen(_text("De 9 a 14"))
            staff_wamid = run.wamid_of(staff_msg)
            status_value = wa.status_update(staff_wamid, "delivered", c)
            await run.write(status_value)
            await wait_until(lambda: b.db.messages.by_event(staff_event), 30, "staff link")
            code = await run.subscribe(c)
            reference = "NOT-2026/LEGACY"
            await run.admin("POST", "/admin/v1/notices", {"recipient": code,
                                                         "reference": reference})
            template = await wa.wait_for_sent(
                lambda s: to_citizen(s, c) and s.get("type") == "template", timeout=30)
            notice_wamid = run.wamid_of(template)

            async def notice_status(status: str) -> bool:
                data = await run.admin("GET", "/admin/v1/notices?reference=" + quote(reference))
                return bool(data["notices"]) and data["notices"][0]["status"] == status
            await wait_until(lambda: notice_status("sent"), 30, "notice accepted")
            await h.running.idle("whatsapp")
            privacy = b.privacy
        known = traces.wamids + run.issued()
        # Before 0016 the devices' E2EE state was in files the downgrade left alone; it
        # is in the database now, and kept across the round trip as the files were.
        devices = await _crypto_rows(db_url)
        await downgrade(db_url, "0009")
        await _as_before_0010(db_url, {privacy.index.wamid(w): w for w in known})
        before = await dump(db_url)
        assert len(find_clear(before.rows, known)) > 5  # what the old code kept in clear
        await upgrade(db_url)
        await _put_back_crypto_rows(db_url, devices)

        async with own_bridge(bridge, tmp_path, db_url, prefix) as h:
            run.h = h
            b = h.running.bridge
            stored = await dump(db_url)
            leaked = find_clear(stored.everything, traces.wamid_needles() + traces.identifiers)
            assert not leaked, f"left in clear after the start: {list(leaked.values())[:3]}"
            assert any("wamids stored in clear before revision 0010 are now keyed" in line
                       for line in h.log_lines)
            # Redeliveries of a message and of a status stored before are no-ops.
            rows = await _inbound_rows(b)
            assert await wa.deliver(h.webhook_url, asked_value) == 200
            assert await wa.deliver(h.webhook_url, status_value) == 200
            assert await _inbound_rows(b) == rows
            # Staff answer the citizen's old message: WhatsApp gets its wamid back.
            await j.desk.client.room_send(j.room_id, "m.room.message", {
                "msgtype": "m.text", "body": f"> <{asked_ev.sender}> ¿Cuál…\n\nEso es",
                "m.relates_to": {"m.in_reply_to": {"event_id": asked_ev.event_id}}},
                ignore_unverified_devices=True)
            reply = await j.sent_to_citizen(_text("Eso es"))
            assert reply["context"] == {"message_id": asked}
            # The citizen reacts to the old staff message: the reaction finds its event.
            await run.write(wa.reaction_message(c, staff_wamid, "🙏"))
            await j.seen(lambda e: e.source.get("content", {}).get("m.relates_to") == {
                "rel_type": "m.annotation", "event_id": staff_event, "key": "🙏"})
            # A status of the old notice fills in its log entry.
            await run.write(wa.status_update(notice_wamid, "delivered", c))
            await wait_until(lambda: notice_status("delivered"), 30, "notice delivered")
            # Consent evidence names the messages by their keyed hash.
            row = await b.db.citizens.by_index(b.privacy.index.digest(c.user_id))
            assert row is not None
            evidence = [r.evidence for r in await b.db.consent.for_citizen(row.id)
                        if r.channel == "whatsapp"]
            assert evidence and all(e and e.startswith(EVIDENCE_PREFIX) for e in evidence)
            # Done once: the next start does not look again.
            assert await key_legacy_wamids(b.db, b.privacy) == {}
