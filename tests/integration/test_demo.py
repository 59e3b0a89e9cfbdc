"""`civic-bridge demo` as a newcomer runs it: a real subprocess, driven headless.

The demo starts its own Synapse, simulator and bridge; `demo send` (a second process)
makes the simulated citizen write; a nio E2EE staff client reads it in the portal;
`demo reply` answers and the demo's console shows it delivered. Before the banner, a
second simulated citizen subscribes to notices of availability and the demo sends one
(the simulator is asked what it received). SIGINT stops everything, and a second run on
the same directory reuses it all, with a new notice.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from bridge.config import ENV_PREFIX
from bridge.devtools.demo_notices import ISSUER, REFERENCE_PREFIX
from bridge.devtools.demo_state import leftover_synapse, stop_leftover
from bridge.devtools.demo_text import READY
from bridge.devtools.simulator import SENT_PATH
from bridge.devtools.synapse import LocalSynapse
from tests.fixtures.staff import StaffClient, staff_login

pytestmark = [pytest.mark.integration, pytest.mark.timeout(900)]

# The first-ever run may build Synapse's virtualenv (scripts/bootstrap normally has).
BANNER_TIMEOUT = 180.0
STOP_TIMEOUT = 20.0


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    return env | {"PYTHONUTF8": "1"}


@dataclass
class DemoProcess:
    proc: asyncio.subprocess.Process
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    @classmethod
    async def start(cls, directory: Path) -> DemoProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "bridge", "demo", "--dir", str(directory),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=_env())
        demo = cls(proc)
        assert proc.stdout is not None and proc.stderr is not None
        demo.readers = [asyncio.create_task(_collect(proc.stdout, demo.out)),
                        asyncio.create_task(_collect(proc.stderr, demo.err))]
        return demo

    @property
    def output(self) -> str:
        return "".join(self.out) + "".join(self.err)

    async def wait_for(self, text: str, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not any(text in line for line in self.out):
            if self.proc.returncode is not None or loop.time() > deadline:
                await asyncio.sleep(0.5)  # let the readers catch the last words
                raise AssertionError(f"demo never printed {text!r} (exit code "
                                     f"{self.proc.returncode}):\n{self.output}")
            await asyncio.sleep(0.2)

    async def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT)
        await asyncio.gather(*self.readers)
        return code

    async def kill(self) -> None:
        """After a failure: a clean stop if it still obeys, else SIGKILL."""
        if self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 30)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await asyncio.gather(*self.readers, return_exceptions=True)


async def _collect(stream: asyncio.StreamReader, into: list[str]) -> None:
    while line := await stream.readline():
        into.append(line.decode("utf-8", errors="replace"))


async def demo_cli(directory: Path, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", "demo", *args[:1], "--dir", str(directory), *args[1:],
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=_env())
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode("utf-8", errors="replace")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def staff_in_portal(directory: Path, state: dict[str, Any], store: Path) -> StaffClient:
    # staff_login only needs the homeserver's URL and name: the demo's Synapse, unstarted here.
    synapse = LocalSynapse(directory / "synapse", port=state["ports"]["synapse"])
    # Not verified, as the walkthrough's Element session: the demo forwards earlier
    # keys to any device (e2ee.forward_keys_to: all).
    staff = await staff_login(synapse, "staff", state["staff_password"], store_root=store)
    await staff.join(state["portal_room_id"])
    return staff


async def get_json(url: str, token: str) -> Any:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http, \
            http.get(url, headers={"Authorization": f"Bearer {token}"}) as resp:
        assert resp.status == 200, url
        return await resp.json()


def sent_to(body: dict[str, Any], citizen: dict[str, Any]) -> bool:
    return body.get("to") == citizen["wa_id"] or body.get("recipient") == citizen["user_id"]


async def check_notices_step(state: dict[str, Any], output: str, n: int) -> None:
    """What the notices citizen received, per the simulator: the subscription dialogue
    (first run only) and one template whose only parameter is the issuer."""
    simulator = f"http://127.0.0.1:{state['ports']['simulator']}{SENT_PATH}"
    sent = [s["body"] for s in (await get_json(simulator, state["secrets"]["access_token"]))
            ["sent"]]
    citizen = state["notices_citizen"]
    kinds = [b.get("type") for b in sent if sent_to(b, citizen)]
    assert kinds == (["interactive", "interactive", "template"] if n == 1 else ["template"])
    [template] = [b for b in sent if b.get("type") == "template"]
    assert sent_to(template, citizen)
    assert template["template"]["components"] == [
        {"type": "body", "parameters": [{"type": "text", "text": ISSUER}]}]
    reference = f"{REFERENCE_PREFIX}{n:04d}"
    assert state["notices_sent"] == n
    assert reference not in json.dumps(template)

    code = state["notices_code"]
    assert code and f"subscription code {code}" in output
    if n == 1:
        assert "wrote “AVISOS”: asks for notices" in output, output
        assert "tapped «Acepto»: consent to notices recorded" in output, output
    subscribed = "(no ghost, no portal)" if n == 1 else "(kept from the last run)"
    assert any("✔ Notices" in line and subscribed in line for line in output.splitlines()), \
        output
    assert f"✔ Notice             {reference} for pseudonym {state['notices_pseudonym']}: " \
        "HTTP 202" in output, output
    assert "notice of availability sent to pseudonym" in output
    assert '"proof_of_notification": false' in output

    # Notices only: no portal of theirs (the chat citizen's is the only one).
    rooms = await get_json(f"{state['urls']['admin_api']}/rooms",
                           state["secrets"]["admin_token"])
    assert [r["room_id"] for r in rooms if r.get("kind") == "portal"] == \
        [state["portal_room_id"]]


FIRST_MESSAGE = "Hola, ¿me pueden ayudar?"


@dataclass
class RunResult:
    output: str  # everything the demo and the `send`/`reply` commands printed
    first_message_readable: bool  # relayed before the staff device existed


async def run_once(directory: Path, tmp_path: Path, n: int) -> RunResult:
    """One demo run as a newcomer does it: banner; staff logs in; citizen → staff;
    staff → citizen; Ctrl-C."""
    demo = await DemoProcess.start(directory)
    staff: StaffClient | None = None
    printed: list[str] = []
    try:
        await demo.wait_for(READY, BANNER_TIMEOUT)
        state = json.loads((directory / "demo.json").read_text(encoding="utf-8"))
        assert state["pid"] == demo.proc.pid
        room_id = state["portal_room_id"]
        await check_notices_step(state, "".join(demo.out), n)
        staff = await staff_in_portal(directory, state, tmp_path / f"nio-{n}")

        text = f"hola desde el test ({n})"
        code, said = await demo_cli(directory, "send", text)
        printed.append(said)
        assert code == 0 and "HTTP 200" in said, said
        await demo.wait_for(f"“{text}” from Ciudadano/a", 60)
        await staff.wait_for_message(room_id, lambda e: e.body == text, timeout=60)

        answer = f"respuesta del test ({n})"
        code, said = await demo_cli(directory, "reply", answer)
        printed.append(said)
        assert code == 0, said
        await demo.wait_for(f"staff reply “{answer}” delivered to the simulator", 60)
        await demo.wait_for("read receipt shown in the portal", 30)

        try:
            await staff.wait_for_message(room_id, lambda e: e.body == FIRST_MESSAGE, timeout=10)
            first_readable = True
        except AssertionError:
            first_readable = False

        assert await demo.interrupt() == 0, demo.output
        assert not port_open(state["ports"]["synapse"]), "Synapse still running"
        assert not port_open(state["ports"]["bridge"]), "bridge still running"
        assert "Traceback" not in demo.output, demo.output
        assert "Stopped:" in "".join(demo.out)
        after = json.loads((directory / "demo.json").read_text(encoding="utf-8"))
        assert after["pid"] is None and after["synapse_pid"] is None
        return RunResult(demo.output + "".join(printed), first_readable)
    finally:
        if staff is not None:
            await staff.close()
        await demo.kill()
        if (pid := leftover_synapse(directory)) is not None:  # a failed run: do not leak it
            stop_leftover(pid)


async def test_demo_headless(tmp_path: Path) -> None:
    directory = tmp_path / "demo-data"
    first = await run_once(directory, tmp_path, 1)
    assert "(created)" in first.output

    # Kept between runs: same accounts and portal, and the relay still works both ways.
    second = await run_once(directory, tmp_path, 2)
    assert "kept from the last run" in second.output
    assert "(created)" not in second.output

    state = json.loads((directory / "demo.json").read_text(encoding="utf-8"))
    for citizen in (state["citizen"], state["notices_citizen"]):
        for identifier in (citizen["wa_id"], citizen["wa_id"][2:], citizen["user_id"]):
            assert identifier not in first.output + second.output, \
                "a citizen identifier printed"

    # The citizen's first message was relayed before the staff device existed: the
    # ghost's device sends that device the earlier room key (bridge.matrix.keyshare).
    assert first.first_message_readable, \
        "a staff device that logged in after the first message cannot decrypt it"
