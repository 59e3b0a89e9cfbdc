"""Every inbound WhatsApp message type, from Meta-shaped payloads (tests/fixtures/
whatsapp_payloads.py) posted as signed webhooks to the running bridge, read back by a
staff nio client in the E2EE portal; then a privacy sweep over all of it."""

from __future__ import annotations

import asyncio
import secrets
import string
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from nio import EncryptionError, MegolmEvent
from nio.crypto.attachments import decrypt_attachment

from bridge.db import outcome
from bridge.devtools.simulator import SimulatedUser
from bridge.privacy import AAD_WA_ID
from bridge.whatsapp.limits import MEDIA_LIMITS
from tests.fixtures import whatsapp_payloads as wp
from tests.fixtures.bridge import BridgeHarness
from tests.integration.test_whatsapp import Journey, opt_in, to_citizen, wait_until

pytestmark = pytest.mark.integration

# What the sweep at the end looks for: citizens' numbers, BSUIDs and profile names,
# and the wamids of every payload this module sent.
SECRETS: list[str] = []
WAMIDS: list[str] = []
SEEN: list[str] = []  # every decrypted event source staff saw


def new_citizen() -> SimulatedUser:
    wa_id = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
    bsuid = "ES." + "".join(secrets.choice(string.ascii_letters + string.digits)
                            for _ in range(20))
    name = "Remedios " + secrets.choice(["Tejada", "Vilalta", "Olmedo"]) + secrets.token_hex(2)
    SECRETS.extend([wa_id, wa_id[2:], bsuid, name])
    return SimulatedUser(wa_id=wa_id, user_id=bsuid, name=name)


def who(c: SimulatedUser) -> wp.Who:
    return wp.Who(c.wa_id, c.user_id, c.name)


class Portal:
    """A journey plus what this module needs: Meta-shaped posts and decrypted reads."""

    def __init__(self, j: Journey) -> None:
        self.j = j
        self.h = j.h
        self.business = wp.Business(j.h.wa.phone_number_id)

    @property
    def b(self) -> Any:
        return self.h.running.bridge

    async def post(self, value: dict[str, Any], field: str = "messages") -> str:
        if "messages" in value:
            WAMIDS.append(value["messages"][0]["id"])
        assert await self.h.wa.deliver(self.h.webhook_url, value, field=field) == 200
        return str(value["messages"][0]["id"]) if "messages" in value else ""

    async def seen(self, predicate: Callable[[dict[str, Any]], bool],
                   timeout: float = 30) -> dict[str, Any]:
        """The first decrypted portal event whose source matches (keys arriving late
        are retried, as a client would)."""
        desk, room_id = self.j.desk, self.j.room_id

        async def find() -> dict[str, Any] | None:
            await desk.sync_once(timeout_ms=200)
            events = desk._timeline.get(room_id, [])
            for i, ev in enumerate(events):
                if isinstance(ev, MegolmEvent):
                    try:
                        ev = events[i] = desk.client.decrypt_event(ev)
                    except EncryptionError:
                        continue
                source = dict(ev.source)
                SEEN.append(str(source))
                if predicate(source):
                    return source
            return None
        found: dict[str, Any] = await wait_until(find, timeout, "event in portal")
        return found

    async def download(self, content: dict[str, Any]) -> bytes:
        f = content["file"]
        server, media_id = f["url"][len("mxc://"):].split("/", 1)
        url = (f"{self.h.synapse.synapse.url}/_matrix/client/v1/media/download/"
               f"{server}/{media_id}")
        headers = {"Authorization": f"Bearer {self.j.desk.client.access_token}"}
        async with aiohttp.ClientSession() as http, http.get(url, headers=headers) as resp:
            assert resp.status == 200
            data = await resp.read()
        return bytes(decrypt_attachment(data, f["key"]["k"], f["hashes"]["sha256"], f["iv"]))

    def not_relayed(self, reason: str) -> float:
        value = self.b.metrics.registry.get_sample_value(
            "civic_bridge_inbound_not_relayed_total", {"reason": reason})
        return float(value or 0)


def content(source: dict[str, Any]) -> dict[str, Any]:
    return dict(source.get("content", {}))


def body_is(text: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: content(s).get("body") == text


def body_has(*parts: str) -> Callable[[dict[str, Any]], bool]:
    return lambda s: all(p in str(content(s).get("body", "")) for p in parts)


@pytest_asyncio.fixture(loop_scope="session", scope="module")
async def portal(bridge: BridgeHarness) -> AsyncIterator[Portal]:
    j = await opt_in(bridge, new_citizen(), "Hola, tengo varias cosas que enviarles")
    yield Portal(j)
    await j.desk.close()


async def test_text_reply_and_ad_referral(portal: Portal) -> None:
    p, c = portal, who(portal.j.citizen)
    first = await p.post(wp.text(p.business, c, "Quería pedir cita"))
    first_ev = await p.seen(body_is("Quería pedir cita"))
    assert content(first_ev)["msgtype"] == "m.text"
    await p.post(wp.text(p.business, c, "Para el martes", reply_to=first))
    reply = await p.seen(body_is("Para el martes"))
    assert content(reply)["m.relates_to"]["m.in_reply_to"]["event_id"] == first_ev["event_id"]

    await p.post(wp.text_from_ad(p.business, c, "Vengo del anuncio"))
    assert content(await p.seen(body_is("Vengo del anuncio")))["msgtype"] == "m.text"
    notice = await p.seen(body_has("llega desde un anuncio", "Cita previa en el Ayuntamiento"))
    assert content(notice)["msgtype"] == "m.notice" and "fb.me" in content(notice)["body"]
    assert notice["sender"] == p.b.ghosts.bot
    SECRETS.append("Afe3M6yA1nHw8vK4K1A7lQ0Yc1aRkBm5u0B3n")  # the ad click id is not shown

    await p.post(wp.product_inquiry(p.business, c, "¿Esta tasa se puede fraccionar?"))
    await p.seen(body_is("¿Esta tasa se puede fraccionar?"))
    await p.seen(body_is("Este mensaje pregunta por el producto «tasa-basuras-2026» del "
                         "catálogo."))


async def test_media_types(portal: Portal) -> None:
    p, c, wa = portal, who(portal.j.citizen), portal.h.wa
    cases = [("image", "m.image", b"\x89PNG meta image", "image/jpeg", {"caption": "foto"}),
             ("video", "m.video", b"\x00\x00\x00\x18ftypmp42", "video/mp4", {"caption": "vid"}),
             ("audio", "m.audio", b"OggS voice note", "audio/ogg; codecs=opus",
              {"voice": True}),
             ("document", "m.file", b"%PDF-1.7 solicitud", "application/pdf",
              {"caption": "doc", "filename": "solicitud.pdf"}),
             ("sticker", "m.image", b"RIFF\x00\x00WEBPVP8 ", "image/webp", {})]
    for kind, msgtype, data, mime, extra in cases:
        media_id = wa.add_media(data, mime)
        sha = wa.media[media_id].sha256
        await p.post(wp.media(p.business, c, kind, media_id, mime, sha, **extra))
        ev = await p.seen(lambda s, t=msgtype, m=mime: content(s).get("msgtype") == t
                          and content(s).get("info", {}).get("mimetype") == m)
        assert "url" not in content(ev), "attachments are encrypted"
        assert await p.download(content(ev)) == data
        if kind == "document":
            assert content(ev)["filename"] == "solicitud.pdf"


async def test_location(portal: Portal) -> None:
    p = portal
    await p.post(wp.location(p.business, who(p.j.citizen)))
    ev = await p.seen(lambda s: content(s).get("msgtype") == "m.location")
    assert content(ev)["geo_uri"] == "geo:40.4154,-3.7074"
    assert content(ev)["body"] == ("Plaza Mayor, Plaza Mayor, 1, 28012 Madrid (40.4154, -3.7074)"
                                   " https://maps.example/plaza-mayor")


async def test_contact_card_summary_and_vcf(portal: Portal) -> None:
    p = portal
    await p.post(wp.contacts(p.business, who(p.j.citizen)))
    summary = await p.seen(body_has("ha decidido compartir una tarjeta de contacto"))
    assert content(summary)["msgtype"] == "m.text"
    assert "Lucía Gómez Ruiz (Gestoría Gómez, Gestora)" in content(summary)["body"]
    assert "910" not in str(summary)  # the card's number is only in the attachment
    vcf = await p.seen(lambda s: content(s).get("filename") == "contacto.vcf")
    assert content(vcf)["msgtype"] == "m.file"
    assert content(vcf)["info"]["mimetype"] == "text/vcard"
    card = (await p.download(content(vcf))).decode()
    assert "FN:Lucía Gómez Ruiz\r\n" in card and "TEL;TYPE=WORK:+34 910 000 123\r\n" in card


async def test_reaction_its_removal_and_a_reaction_to_what_is_not_here(portal: Portal) -> None:
    p, c = portal, who(portal.j.citizen)
    target = await p.post(wp.text(p.business, c, "Mensaje al que reaccionaré"))
    target_ev = await p.seen(body_is("Mensaje al que reaccionaré"))
    await p.post(wp.reaction(p.business, c, target, "🙏"))
    reaction = await p.seen(lambda s: s.get("type") == "m.reaction")
    assert content(reaction)["m.relates_to"] == {
        "rel_type": "m.annotation", "event_id": target_ev["event_id"], "key": "🙏"}
    await p.post(wp.reaction(p.business, c, target, ""))

    async def redacted() -> bool:
        ev = await p.b.api.request("GET", f"/_matrix/client/v3/rooms/{p.j.room_id}/event/"
                                   f"{reaction['event_id']}", as_user=p.b.ghosts.bot)
        return "redacted_because" in ev.get("unsigned", {})
    await wait_until(redacted, 30, "reaction removed")

    await p.post(wp.reaction(p.business, c, wp.new_wamid(), "👍"))
    await p.seen(body_is("Ha reaccionado con 👍 a un mensaje que no está en esta sala."))


async def test_a_reaction_right_after_its_message_finds_it_while_its_outcome_lands(
        portal: Portal, monkeypatch: pytest.MonkeyPatch) -> None:
    """The citizen's next message starts while the previous one's outcome is recorded
    (bridge.worker, overlap): a reaction to it, in the same delivery, must still find
    its event. Every WhatsApp item's outcome is made slow here, so the reaction reaches
    its look-up long before the message's link is recorded."""
    p, c = portal, who(portal.j.citizen)
    worker = p.b.worker
    relay = worker._handlers["whatsapp"]

    async def slow_outcome(item: Any) -> Any:
        result = await relay(item)
        await outcome.with_outcome(p.b.db, lambda tx: asyncio.sleep(0.5))
        return result

    monkeypatch.setitem(worker._handlers, "whatsapp", slow_outcome)
    first = wp.text(p.business, c, "Primero de tres")
    second = wp.text(p.business, c, "Segundo de tres")
    reaction = wp.reaction(p.business, c, second["messages"][0]["id"], "👌")
    value = first | {"messages": [*first["messages"], *second["messages"],
                                  *reaction["messages"]]}
    WAMIDS.extend(m["id"] for m in value["messages"][1:])
    await p.post(value)
    second_ev = await p.seen(body_is("Segundo de tres"))
    annotation = await p.seen(lambda s: s.get("type") == "m.reaction"
                              and content(s)["m.relates_to"].get("key") == "👌")
    assert content(annotation)["m.relates_to"]["event_id"] == second_ev["event_id"]


async def test_buttons_lists_flows_and_orders_read_as_text(portal: Portal) -> None:
    p, c = portal, who(portal.j.citizen)
    await p.post(wp.button_reply(p.business, c, "cita-si", "Sí, confirmo"))
    await p.seen(body_is("Sí, confirmo"))
    await p.post(wp.list_reply(p.business, c, "padron", "Padrón",
                               "Certificado de empadronamiento"))
    await p.seen(body_is("Padrón — Certificado de empadronamiento"))
    await p.post(wp.template_button(p.business, c, "RECORDATORIO_OK", "Recibido"))
    await p.seen(body_is("Recibido"))
    await p.post(wp.flow_reply(p.business, c, {"tipo_tramite": "Licencia de obra",
                                               "fecha_preferida": "2026-12-14",
                                               "acepta_condiciones": True}))
    flow = await p.seen(body_has("Respuestas del formulario:"))
    assert content(flow)["body"] == ("Respuestas del formulario:\n"
                                     "• Tipo tramite: Licencia de obra\n"
                                     "• Fecha preferida: 2026-12-14\n"
                                     "• Acepta condiciones: sí")
    assert "FLOW-TOKEN" not in str(flow)
    await p.post(wp.order(p.business, c))
    order = await p.seen(body_has("Pedido del catálogo:"))
    assert content(order)["body"] == ("Pedido del catálogo:\n"
                                      "• 1 x tasa-basuras-2026 — 45.5 EUR\n"
                                      "• 2 x abono-piscina — 12 EUR\n"
                                      "Nota: Lo recojo el lunes")


async def test_unsupported_and_errors_become_notices(portal: Portal) -> None:
    p, c = portal, who(portal.j.citizen)
    unsupported, errors = p.not_relayed("unsupported"), p.not_relayed("whatsapp_error")
    await p.post(wp.unsupported(p.business, c))
    notice = await p.seen(body_has("tipo no compatible: poll]", "texto, foto o documento"))
    assert content(notice)["msgtype"] == "m.notice" and notice["sender"] == p.b.ghosts.bot
    await p.post(wp.message_with_errors(p.business, c))
    await p.seen(body_has("WhatsApp no pudo entregar un mensaje de esta persona",
                          "código 131000"))
    # Counted right after the notice is sent: wait for it rather than race it.
    await wait_until(lambda: p.not_relayed("unsupported") == unsupported + 1, 10, "metric")
    await wait_until(lambda: p.not_relayed("whatsapp_error") == errors + 1, 10, "metric")


async def test_oversize_media_gets_a_notice_and_its_caption(portal: Portal) -> None:
    p, wa = portal, portal.h.wa
    before = p.not_relayed("media_too_large")
    data = b"\xff\xd8" + b"J" * MEDIA_LIMITS["image"]  # one MB-cap plus two bytes
    media_id = wa.add_media(data, "image/jpeg")
    downloads = len([r for r in wa.requests if r.path.startswith("/whatsapp_business/")])
    await p.post(wp.media(p.business, who(p.j.citizen), "image", media_id, "image/jpeg",
                          wa.media[media_id].sha256, caption="el escaneo completo"))
    notice = await p.seen(body_has("una imagen de 5.0 MB", "límite de 5 MB", "Pídale"))
    assert content(notice)["msgtype"] == "m.notice"
    await p.seen(body_is("el escaneo completo"))
    await wait_until(lambda: p.not_relayed("media_too_large") == before + 1, 10, "metric")
    # Refused on Graph's reported size: the file itself was never fetched.
    assert len([r for r in wa.requests if r.path.startswith("/whatsapp_business/")]) == downloads


async def test_media_that_cannot_be_fetched_gets_a_notice(portal: Portal) -> None:
    p, wa, c = portal, portal.h.wa, who(portal.j.citizen)
    before = p.not_relayed("media_failed")
    media_id = wa.add_media(b"%PDF-1.7 original", "application/pdf")
    sha = wa.media[media_id].sha256
    wa.tamper_media(media_id)
    await p.post(wp.media(p.business, c, "document", media_id, "application/pdf", sha,
                          filename="nomina.pdf"))
    await p.seen(body_has("un documento", "comprobación de integridad", "vuelva a enviar"))
    gone = "9" * 16  # a media id Graph does not know (expired)
    await p.post(wp.media(p.business, c, "video", gone, "video/mp4", "0" * 64,
                          caption="el vídeo de la obra"))
    await p.seen(body_has("un vídeo", "código 100", "vuelva a enviar"))
    await p.seen(body_is("el vídeo de la obra"))
    await wait_until(lambda: p.not_relayed("media_failed") == before + 2, 10, "metric")


async def test_a_message_whose_media_keeps_failing_is_retried_until_it_arrives(
        portal: Portal) -> None:
    """Graph answers 500 to five attempts in a row (the worker used to give up after
    five): a transient failure is retried for as long as it lasts, and the image
    arrives, once, with nothing dead-lettered (docs/reliability.md)."""
    p, wa = portal, portal.h.wa
    dead_before = len(await p.b.db.dead_letters.list())
    media_id = wa.add_media(b"\x89PNG llega al sexto intento", "image/png")
    wa.fail_next(code=1, http_status=500, count=5)  # each attempt's media lookup
    await p.post(wp.media(p.business, who(p.j.citizen), "image", media_id, "image/png",
                          wa.media[media_id].sha256, caption="la foto insistente"))
    await p.seen(body_is("la foto insistente"), timeout=120)
    assert len(await p.b.db.dead_letters.list()) == dead_before


async def test_other_fields_and_account_errors_are_acknowledged(portal: Portal) -> None:
    p = portal
    await p.h.running.idle("whatsapp")
    pending = await p.b.db.inbound.pending("whatsapp")
    await p.post(wp.group_lifecycle(p.business), field="group_lifecycle_update")
    await p.post(wp.value_errors(p.business))
    assert await p.b.db.inbound.pending("whatsapp") == pending  # nothing stored
    await wait_until(lambda: p.not_relayed("account_error") >= 1, 10, "account error metric")
    assert any("error for this number (code 131000)" in line for line in p.h.log_lines)


async def test_number_and_bsuid_changes_keep_the_same_citizen(bridge: BridgeHarness) -> None:
    """Same row, pseudonym, ghost, portal and consent; an audit entry; no number shown;
    replies go to the new number."""
    h = bridge
    citizen = new_citizen()
    j = await opt_in(h, citizen, "Antes de cambiar de número")
    p = Portal(j)
    try:
        b = p.b
        row = await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id))
        assert row is not None
        new_number = "346" + "".join(secrets.choice(string.digits) for _ in range(8))
        SECRETS.extend([new_number, new_number[2:]])
        change = wp.system_number_change(p.business, who(citizen), new_number)
        del change["messages"][0]["from_user_id"]  # as in Meta's example: `from` only
        await p.post(change)
        await p.seen(body_has("ha cambiado de número", "mismo seudónimo"))

        moved = await wait_until(lambda: _citizen_with(b, citizen.user_id, wa_id=new_number),
                                 30, "re-keyed citizen")
        assert (moved.id, moved.pseudonym_code, moved.ghost_user_id, moved.consent_state) == (
            row.id, row.pseudonym_code, row.ghost_user_id, "granted")
        after = SimulatedUser(wa_id=new_number, user_id=citizen.user_id, name=citizen.name)
        await p.post(wp.text(p.business, who(after), "Ya desde el número nuevo"))
        ev = await p.seen(body_is("Ya desde el número nuevo"))
        assert ev["sender"] == row.ghost_user_id
        await j.desk.send_text(j.room_id, "Le contestamos al número nuevo")
        sent = await h.wa.wait_for_sent(lambda s: s.get("text", {}).get("body")
                                        == "Le contestamos al número nuevo", timeout=30)
        assert to_citizen(sent, after) and sent["to"] == new_number

        new_bsuid = "ES." + secrets.token_hex(10)
        SECRETS.append(new_bsuid)
        await p.post(wp.system_user_id_change(p.business, who(after), new_bsuid))
        await p.seen(body_has("ha cambiado el identificador", "mismo seudónimo"))
        again = await wait_until(lambda: b.db.citizens.by_index(b.privacy.index.digest(
            new_bsuid)), 30, "BSUID re-key")
        assert (again.id, again.consent_state) == (row.id, "granted")
        assert await b.db.citizens.by_index(b.privacy.index.digest(citizen.user_id)) is None
        latest = SimulatedUser(wa_id=new_number, user_id=new_bsuid, name=citizen.name)
        await p.post(wp.text(p.business, who(latest), "Y con el identificador nuevo"))
        assert (await p.seen(body_is("Y con el identificador nuevo")))["sender"] == \
            row.ghost_user_id

        audit = [(e.action, e.result, e.reason) for e in await b.db.audit.list(limit=50)]
        assert ("citizen.rekey", "ok", "user_changed_number") in audit
        assert ("citizen.rekey", "ok", "user_changed_user_id") in audit
    finally:
        await j.desk.close()


async def _citizen_with(b: Any, key: str, *, wa_id: str) -> Any:
    row = await b.db.citizens.by_index(b.privacy.index.digest(key))
    if row is None or row.wa_id_ct is None:
        return None
    return row if b.privacy.cipher.decrypt_str(row.wa_id_ct, aad=AAD_WA_ID) == wa_id else None


async def test_privacy_sweep_over_inbound_types(bridge: BridgeHarness) -> None:
    """No number, BSUID or profile name of this module's citizens in what staff saw
    decrypted, in room state, in metrics, or in any log record; no wamid in any of these
    either, the database driver's debug log of SQL parameters included (the database
    gets keyed hashes and ciphertexts of wamids only)."""
    b = bridge.running.bridge
    assert SECRETS and SEEN, "run with the other tests of this module"
    await asyncio.sleep(0)
    haystack = list(SEEN)
    for room in await b.db.rooms.list(include_closed=True):
        haystack.append(str(await b.api.get_state(b.ghosts.bot, room.room_id)))
    for ghost in await b.db.ghosts.all():
        haystack.append(ghost.user_id + ghost.display_name)
    status, metrics = await bridge.running.call("GET", "/metrics", token=None)
    assert status == 200
    haystack.append(str(metrics))
    haystack.extend(bridge.log_lines)
    text = "\n".join(haystack)
    leaked = [s for s in SECRETS if s in text]
    where = sorted({part[:160] for part in haystack for s in leaked if s in part})
    assert not leaked, f"{len(leaked)} identifiers leaked, e.g. in {where[:3]}"
    assert WAMIDS and not [w for w in WAMIDS if w in text], "a wamid leaked"
