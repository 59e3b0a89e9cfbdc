"""The demo's second purpose: notices of availability (aviso de puesta a disposición).

A second simulated citizen, who only wants notices (no ghost, no portal), writes
AVISOS, taps «Acepto» and gets a subscription code. The demo then does what the
agency's notification platform would: `POST /admin/v1/notices` with that code and a
reference of its own, over HTTP with the admin token. The citizen's phone reports the
template delivered and read, and the demo shows the log entry, which is informative
only. Each run uses a new reference (`DEMO-AVISO-0001`, `-0002`, ...); a repeat of one
is answered 200 and sends nothing, which the step accepts too.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote as url_quote

import aiohttp

from bridge.devtools.demo_state import Citizen, DemoState
from bridge.devtools.demo_text import Print
from bridge.devtools.simulator import CloudAPISimulator, SimulatedUser
from bridge.services import Bridge
from bridge.whatsapp.notice_consent import NOTICES_IN_BUTTON, NOTICES_OUT_BUTTON

ISSUER = "Ayuntamiento de Ejemplo (demo)"  # the template's {{1}}; same body as the chat's
SEDE_URL = "https://sede.demo.example/notificaciones"
KEYWORD = "AVISOS"
REFERENCE_PREFIX = "DEMO-AVISO-"
# The template text suggested in docs/notices.md: it is approved at Meta, and the bridge
# only sends its name, its language and {{1}}.
TEMPLATE_TEXT = ("{issuer} le informa de que tiene una notificación a su disposición en la "
                 "sede electrónica. Para acceder a ella, identifíquese (Cl@ve, certificado o "
                 "DNIe) en {sede}. Este aviso es solo informativo: no contiene la "
                 "notificación ni la sustituye.")
INDENT = " " * 23  # under the text after "  ✔ Notice             "
WIDTH = 80

Deliver = Callable[[dict[str, Any]], Awaitable[None]]


class NoticesStepError(RuntimeError):
    """The notices step failed; the message says why and where to look."""


def notices_config() -> dict[str, Any]:
    """The demo config's `notices` section (off by default in real configs)."""
    return {"enabled": True, "issuer": ISSUER, "sede_url": SEDE_URL}


def simulated(citizen: Citizen) -> SimulatedUser:
    return SimulatedUser(wa_id=citizen.wa_id, user_id=citizen.user_id, name=citizen.name)


def _to(body: dict[str, Any], user: SimulatedUser) -> bool:
    return body.get("to") == user.wa_id or body.get("recipient") == user.user_id


def _button_ids(body: dict[str, Any]) -> list[str]:
    if body.get("type") != "interactive":
        return []
    return [b["reply"]["id"] for b in body["interactive"]["action"]["buttons"]]


class NoticesStep:
    """Runs once per demo start, after the chat's portal is ready."""

    def __init__(self, bridge: Bridge, sim: CloudAPISimulator, state: DemoState, out: Print,
                 deliver: Deliver, drained: Callable[[], Awaitable[None]],
                 timeout: float, log_path: str) -> None:
        self._bridge = bridge
        self._sim = sim
        self._state = state
        self._out = out
        self._deliver = deliver
        self._drained = drained
        self._timeout = timeout
        self._log_path = log_path
        self._user = simulated(state.notices_citizen)

    async def run(self) -> None:
        await self._subscribe()
        await self._send_notice()

    # --- the citizen subscribes over WhatsApp ----------------------------------------

    async def _subscription_state(self) -> str:
        b = self._bridge
        citizen = await b.db.citizens.by_index(b.privacy.index.digest(self._user.user_id))
        sub = await b.db.subscriptions.get(citizen.id) if citizen else None
        return sub.state if sub else "unknown"

    async def _subscribe(self) -> None:
        state = await self._subscription_state()
        kept = state == "granted"
        if not kept:
            self._out(f"  … a second simulated citizen, who only wants notices of availability, "
                      f"writes “{KEYWORD}” and accepts:")
            if state != "prompted":  # otherwise the consent text is out already
                await self._deliver(self._sim.text_message(self._user, KEYWORD))
                await self._sim.wait_for_sent(
                    lambda s: _to(s, self._user) and NOTICES_IN_BUTTON in _button_ids(s),
                    timeout=self._timeout)
                await self._drained()  # the consent text on screen before the tap
            await self._deliver(self._sim.button_reply(self._user, NOTICES_IN_BUTTON, "Acepto"))
            await self._sim.wait_for_sent(
                lambda s: _to(s, self._user) and _button_ids(s) == [NOTICES_OUT_BUTTON],
                timeout=self._timeout)
            await self._until(self._granted, "the subscription was not recorded")
            await self._drained()
        b = self._bridge
        citizen = await b.db.citizens.by_index(b.privacy.index.digest(self._user.user_id))
        sub = await b.db.subscriptions.get(citizen.id) if citizen else None
        assert citizen is not None and sub is not None
        self._state.notices_code = sub.code
        self._state.notices_pseudonym = citizen.pseudonym_code
        self._out(f"  ✔ Notices            subscription code {sub.code} for pseudonym "
                  f"{citizen.pseudonym_code}  ("
                  + ("kept from the last run" if kept else "no ghost, no portal") + ")")

    async def _granted(self) -> bool:
        return await self._subscription_state() == "granted"

    # --- the notification platform sends a notice ------------------------------------

    async def _send_notice(self) -> None:
        state, code = self._state, self._state.notices_code
        assert code is not None
        reference = f"{REFERENCE_PREFIX}{state.notices_sent + 1:04d}"
        request = {"recipient": code, "reference": reference}
        self._out("  … the agency's notification platform asks for a notice: POST "
                  f"/admin/v1/notices {json.dumps(request)}")
        status, entry = await self._admin("POST", "/notices", request)
        if status not in (200, 202):
            raise NoticesStepError(f"POST /admin/v1/notices answered HTTP {status} "
                                   f"({entry.get('error', entry)}); see {self._log_path}")
        state.notices_sent += 1
        if status == 202:
            body = await self._sim.wait_for_sent(
                lambda s: _to(s, self._user) and s.get("type") == "template",
                timeout=self._timeout)
            wamid = self._sim.sent_ids[next(i for i, s in enumerate(self._sim.sent)
                                            if s is body)]
            assert wamid is not None
            await self._drained()  # the send on screen before its delivery reports
            for report in ("delivered", "read"):  # the citizen opens WhatsApp
                await self._deliver(self._sim.status_update(wamid, report, self._user))

            async def read() -> bool:
                return (await self._entry(reference)).get("status") == "read"
            await self._until(read, "the notice's delivery reports were not logged")
            await self._drained()
            entry = await self._entry(reference)
        outcome = ("new, sent" if status == 202
                   else "a repeat: the existing entry, nothing sent again")
        template = TEMPLATE_TEXT.format(issuer=ISSUER, sede=SEDE_URL)
        details = [
            "The citizen's phone shows the template approved at Meta, {{1}} = the issuer",
            "(the bridge sends only its name, language and {{1}}; never the reference):",
            *textwrap.wrap(f"“{template}”", WIDTH),
            *textwrap.wrap("The log entry is informative, not proof of notification: "
                           "\"proof_of_notification\": "
                           f"{json.dumps(entry.get('proof_of_notification'))}, "
                           f"«{entry.get('label')}»", WIDTH),
        ]
        self._out("\n".join([
            f"  ✔ Notice             {reference} for pseudonym {entry.get('pseudonym')}: "
            f"HTTP {status} ({outcome}); log entry {entry.get('id')}, status "
            f"{entry.get('status')}",
            *(INDENT + line for line in details)]))

    async def _entry(self, reference: str) -> dict[str, Any]:
        status, data = await self._admin("GET", f"/notices?reference={url_quote(reference)}")
        notices = data.get("notices") if status == 200 else None
        return dict(notices[0]) if notices else {}

    async def _admin(self, method: str, path: str, body: Any = None
                     ) -> tuple[int, dict[str, Any]]:
        headers = {"Authorization": f"Bearer {self._state.secrets['admin_token']}"}
        url = f"{self._state.admin_url}/admin/v1{path}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
                    http.request(method, url, json=body, headers=headers) as resp:
                data = await resp.json(content_type=None)
                return resp.status, data if isinstance(data, dict) else {}
        except (aiohttp.ClientError, ValueError) as exc:
            raise NoticesStepError(f"the admin API at {url} did not answer "
                                   f"({type(exc).__name__}); see {self._log_path}") from None

    async def _until(self, check: Callable[[], Awaitable[bool]], what: str) -> None:
        deadline = time.monotonic() + self._timeout
        while not await check():
            if time.monotonic() > deadline:
                raise NoticesStepError(f"{what} after {self._timeout:.0f} s; "
                                       f"see {self._log_path}")
            await asyncio.sleep(0.2)
