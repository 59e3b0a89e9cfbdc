"""civic-bridge's Synapse module inside the real Synapse of the test fixture.

A citizen account (the invite-link prefix, created with Synapse's shared-secret admin
API as the invite page does) tries each forbidden action and gets M_FORBIDDEN with the
documented Spanish/English reason; staff do the same and succeed.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import Config
from bridge.devtools.synapse import LocalSynapse, default_venv_path, free_port
from bridge.homeserver.probe import NO_MODULE
from bridge.homeserver.settings import module_entry
from bridge.registration import registration_yaml
from tests.fixtures.bridge import BridgeHarness, RunningBridge
from tests.fixtures.synapse import SynapseHarness, build_test_config

pytestmark = pytest.mark.integration
Json = dict[str, Any]


@dataclass(frozen=True)
class User:
    user_id: str
    token: str


async def new_user(h: SynapseHarness, localpart: str, display_name: str) -> User:
    password = secrets.token_urlsafe(12)
    await h.synapse.register_user(localpart, password)
    user_id, token, _ = await h.synapse.login(localpart, password)
    user = User(user_id, token)
    status, body = await call(h, user, "PUT", f"/_matrix/client/v3/profile/{q(user_id)}/"
                              "displayname", {"displayname": display_name})
    assert status == 200, body
    return user


async def citizen(h: SynapseHarness, display_name: str) -> User:
    prefix = h.config.invites.localpart_prefix
    return await new_user(h, f"{prefix}{secrets.token_hex(8)}", display_name)


async def staff(h: SynapseHarness, display_name: str) -> User:
    return await new_user(h, f"staff_{secrets.token_hex(4)}", display_name)


def q(value: str) -> str:
    return quote(value, safe="")


async def call(h: SynapseHarness, user: User | None, method: str, path: str,
               body: Json | None = None) -> tuple[int, Json]:
    return await h.synapse.request(method, path, body if body is not None else {},
                                   user.token if user else None)


async def create_room(h: SynapseHarness, user: User, **body: Any) -> tuple[int, Json]:
    return await call(h, user, "POST", "/_matrix/client/v3/createRoom", body)


async def invite(h: SynapseHarness, user: User, room_id: str, target: str) -> tuple[int, Json]:
    return await call(h, user, "POST", f"/_matrix/client/v3/rooms/{q(room_id)}/invite",
                      {"user_id": target})


async def join(h: SynapseHarness, user: User, room_id: str) -> tuple[int, Json]:
    return await call(h, user, "POST", f"/_matrix/client/v3/join/{q(room_id)}", {})


def assert_refused(result: tuple[int, Json], action: str) -> None:
    status, body = result
    assert status == 403, body
    assert body["errcode"] == "M_FORBIDDEN"
    assert body["org.civic_bridge.policy"] == action
    spanish, _, english = body["error"].partition(" / ")
    assert spanish and english, body  # both languages, in the documented order


async def policy_counts(h: SynapseHarness) -> dict[str, int]:
    async with aiohttp.ClientSession() as session, session.get(
            f"{h.synapse.url}/_civic_bridge/policy",
            headers={"Authorization": f"Bearer {h.as_token}"}) as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["citizen_prefixes"] == [h.config.invites.localpart_prefix]
    return dict(body["refusals"])


async def test_citizen_cannot_create_rooms_or_direct_chats(synapse: SynapseHarness) -> None:
    h = synapse
    vecina, ana = await citizen(h, "Vecina Lucía"), await staff(h, "Ana")
    before = await policy_counts(h)
    assert_refused(await create_room(h, vecina, preset="private_chat"), "create_room")
    assert_refused(await create_room(h, vecina, is_direct=True, invite=[ana.user_id],
                                     preset="trusted_private_chat"), "create_room")
    assert (await create_room(h, ana, preset="private_chat"))[0] == 200
    after = await policy_counts(h)
    assert after["create_room"] == before["create_room"] + 2
    # The same count on Synapse's own Prometheus endpoint.
    assert await prometheus_count(h, "create_room") == after["create_room"]


async def prometheus_count(h: SynapseHarness, action: str) -> float:
    async with aiohttp.ClientSession() as session, session.get(
            f"http://127.0.0.1:{h.synapse.metrics_port}/_synapse/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "civic_bridge_policy_refusals_total" and \
                    sample.labels == {"server_name": "localhost", "action": action}:
                return sample.value
    raise AssertionError("civic_bridge_policy_refusals_total not exposed")


async def test_citizen_cannot_invite_but_staff_can(synapse: SynapseHarness) -> None:
    h = synapse
    vecina, otra = await citizen(h, "Vecina Lucía"), await citizen(h, "Vecino Paco")
    ana, luis = await staff(h, "Ana"), await staff(h, "Luis")
    # power_level_content_override: invite at 0, so only the module stands in the way.
    status, room = await create_room(h, ana, preset="private_chat", invite=[vecina.user_id],
                                     power_level_content_override={"invite": 0})
    assert status == 200, room
    room_id = room["room_id"]
    assert (await join(h, vecina, room_id))[0] == 200  # invited: allowed
    assert_refused(await invite(h, vecina, room_id, otra.user_id), "invite")
    assert_refused(await invite(h, vecina, room_id, luis.user_id), "invite")
    assert (await invite(h, ana, room_id, otra.user_id))[0] == 200
    assert (await join(h, otra, room_id))[0] == 200


async def test_citizen_cannot_join_uninvited(synapse: SynapseHarness) -> None:
    h = synapse
    vecina, ana, luis = await citizen(h, "Vecina Lucía"), await staff(h, "Ana"), \
        await staff(h, "Luis")
    status, room = await create_room(h, ana, preset="public_chat")
    assert status == 200, room
    assert_refused(await join(h, vecina, room["room_id"]), "join")
    assert (await join(h, luis, room["room_id"]))[0] == 200


async def test_forbidden_display_names(synapse: SynapseHarness) -> None:
    h = synapse
    vecina, ana = await citizen(h, "Vecina Lucía"), await staff(h, "Ana")
    status, room = await create_room(h, ana, preset="private_chat", invite=[vecina.user_id])
    room_id = room["room_id"]
    assert (await join(h, vecina, room_id))[0] == 200
    member_path = f"/_matrix/client/v3/rooms/{q(room_id)}/state/m.room.member/"

    # In a room: the member event is refused outright.
    for name, action in (("612 345 678", "display_name"), ("Soporte", "display_name")):
        assert_refused(await call(h, vecina, "PUT", member_path + q(vecina.user_id),
                                  {"membership": "join", "displayname": name}), action)
    # An avatar never reaches the room: the member event is stored without it.
    before_avatar = (await policy_counts(h))["avatar"]
    status, _ = await call(h, vecina, "PUT", member_path + q(vecina.user_id),
                           {"membership": "join", "displayname": "Vecina Lucía",
                            "avatar_url": "mxc://localhost/abc"})
    assert status == 200
    status, member = await call(h, ana, "GET", member_path + q(vecina.user_id))
    assert status == 200 and "avatar_url" not in member
    assert (await policy_counts(h))["avatar"] == before_avatar + 1

    # The global profile (what Element changes): put back within the same request.
    before = (await policy_counts(h))["display_name"]
    profile = f"/_matrix/client/v3/profile/{q(vecina.user_id)}/displayname"
    assert (await call(h, vecina, "PUT", profile, {"displayname": "+34 612-345-678"}))[0] == 200
    status, shown = await call(h, vecina, "GET", profile)
    assert (status, shown.get("displayname")) == (200, "Vecina Lucía")
    assert (await policy_counts(h))["display_name"] == before + 1
    status, member = await call(h, ana, "GET", member_path + q(vecina.user_id))
    assert (status, member.get("displayname")) == (200, "Vecina Lucía")

    # An ordinary name is fine, and reaches the room even with an avatar in the profile.
    avatar = f"/_matrix/client/v3/profile/{q(vecina.user_id)}/avatar_url"
    assert (await call(h, vecina, "PUT", avatar, {"avatar_url": "mxc://localhost/x"}))[0] \
        == 200
    assert (await call(h, vecina, "PUT", profile, {"displayname": "Lucía"}))[0] == 200
    assert (await call(h, vecina, "GET", profile))[1].get("displayname") == "Lucía"
    for _ in range(100):  # Synapse copies the profile into rooms in the background
        member = (await call(h, ana, "GET", member_path + q(vecina.user_id)))[1]
        if member.get("displayname") == "Lucía":
            break
        await asyncio.sleep(0.1)
    assert member.get("displayname") == "Lucía" and "avatar_url" not in member, member
    # Staff may use any name.
    staff_profile = f"/_matrix/client/v3/profile/{q(ana.user_id)}/displayname"
    assert (await call(h, ana, "PUT", staff_profile, {"displayname": "Soporte 012"}))[0] == 200
    assert (await call(h, ana, "PUT", member_path + q(ana.user_id),
                       {"membership": "join", "displayname": "Soporte"}))[0] == 200


async def search(h: SynapseHarness, user: User, term: str) -> set[str]:
    status, body = await call(h, user, "POST", "/_matrix/client/v3/user_directory/search",
                              {"search_term": term, "limit": 50})
    assert status == 200, body
    return {r["user_id"] for r in body["results"]}


async def until_found(h: SynapseHarness, user: User, term: str, target: str) -> None:
    """Synapse indexes the directory in the background: wait for a control search."""
    for _ in range(100):
        if target in await search(h, user, term):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{target} never showed up in the directory")


async def test_directory_hides_citizens_outside_shared_rooms(synapse: SynapseHarness) -> None:
    """A public room would show its members to everyone (search_all_users: false still
    lists public rooms' members): the module narrows citizens to shared rooms."""
    h = synapse
    tag = secrets.token_hex(3)
    ana, luis, eva = (await staff(h, f"Ana {tag}"), await staff(h, f"Luis {tag}"),
                      await staff(h, f"Eva {tag}"))
    vecina, otra = await citizen(h, f"Lucía {tag}"), await citizen(h, f"Paco {tag}")
    status, public = await create_room(h, luis, preset="public_chat", invite=[otra.user_id])
    assert status == 200 and (await join(h, otra, public["room_id"]))[0] == 200
    status, private = await create_room(h, ana, preset="private_chat", invite=[vecina.user_id])
    assert status == 200 and (await join(h, vecina, private["room_id"]))[0] == 200

    # Shared rooms: found both ways.
    await until_found(h, ana, f"Lucía {tag}", vecina.user_id)
    await until_found(h, vecina, f"Ana {tag}", ana.user_id)
    await until_found(h, luis, f"Paco {tag}", otra.user_id)
    # Eva (staff) shares no room with Paco, who is in a public room: hidden from her;
    # Luis is in a public room, but Lucía (a citizen) shares none with him: hidden.
    await until_found(h, eva, f"Luis {tag}", luis.user_id)  # the index has the room
    assert otra.user_id not in await search(h, eva, f"Paco {tag}")
    assert luis.user_id not in await search(h, vecina, f"Luis {tag}")
    assert otra.user_id not in await search(h, vecina, f"Paco {tag}")


async def test_policy_resource_needs_the_bridge_or_an_admin(synapse: SynapseHarness) -> None:
    h = synapse
    vecina = await citizen(h, "Vecina Lucía")
    status, _ = await call(h, None, "GET", "/_civic_bridge/policy")
    assert status == 401
    status, body = await call(h, vecina, "GET", "/_civic_bridge/policy")
    assert (status, body["errcode"]) == (403, "M_FORBIDDEN")
    counts = await policy_counts(h)
    assert set(counts) == {"create_room", "invite", "join", "room_directory",
                           "display_name", "avatar"}


# --- the bridge's side: homeserver-config, check-homeserver, check-config, /ready ------

ROOT = Path(__file__).resolve().parents[2]
FRAGMENT = ROOT / "deploy" / "synapse" / "homeserver-hardening.yaml"


async def cli(*args: str, cwd: Path) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge", *args, cwd=cwd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


def write_config(config: Config, directory: Path) -> Path:
    path = directory / "bridge-config.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")), encoding="utf-8")
    return path


async def test_homeserver_config_prints_the_module_entry(synapse: SynapseHarness,
                                                         tmp_path: Path) -> None:
    path = write_config(synapse.config, tmp_path)
    code, out, err = await cli("homeserver-config", "-c", str(path), cwd=tmp_path)
    assert code == 0, err
    data = yaml.safe_load(out)
    assert data["modules"] == [module_entry(synapse.config)]
    assert data["enable_registration"] is False


async def test_homeserver_config_installs_into_synapse_python(synapse: SynapseHarness,
                                                               tmp_path: Path) -> None:
    path = write_config(synapse.config, tmp_path)
    python = default_venv_path() / "bin" / "python"
    code, out, err = await cli("homeserver-config", "-c", str(path), "--synapse-python",
                               str(python), cwd=tmp_path)
    assert code == 0, err
    assert "installed civic-bridge-synapse" in err
    assert yaml.safe_load(out)["modules"] == [module_entry(synapse.config)]
    proc = await asyncio.create_subprocess_exec(
        str(python), "-c", "import civic_bridge_synapse.module as m; print(m.POLICY_PATH)",
        stdout=asyncio.subprocess.PIPE)
    assert (await proc.communicate())[0].decode().strip() == "/_civic_bridge/policy"

    # An interpreter without pip/Synapse: nothing printed, exit 1 with the reason.
    code, out, err = await cli("homeserver-config", "-c", str(path), "--synapse-python",
                               str(tmp_path / "no-python"), cwd=tmp_path)
    assert (code, out) == (1, "")
    assert err.startswith("error: cannot run ") and "Traceback" not in err, err


async def test_check_homeserver_flags_a_weak_config_line_by_line(synapse: SynapseHarness,
                                                                 tmp_path: Path) -> None:
    path = write_config(synapse.config, tmp_path)
    weak = tmp_path / "homeserver.yaml"
    # The fixture's own file: open registration, no hardening, but the module loaded.
    weak.write_text(synapse.synapse.config_path.read_text(encoding="utf-8"), encoding="utf-8")
    code, out, _ = await cli("check-homeserver", "-c", str(path), "--homeserver-config",
                             str(weak), cwd=tmp_path)
    assert code == 1
    lines = dict(line.split(": ", 1)[0].split(None, 1)[::-1] for line in out.splitlines()
                 if line.startswith(("OK", "FAIL")))
    assert lines == {
        "enable_registration": "FAIL",
        "limit_profile_requests_to_users_who_share_rooms": "FAIL",
        "require_auth_for_profile_requests": "FAIL",
        "user_directory.search_all_users": "OK",
        "federation_domain_whitelist": "OK",
        "retention": "FAIL",
        "modules (civic_bridge_synapse)": "OK",
        "experimental_features": "OK",
        f"appservice registration ({synapse.config.appservice.id})": "OK",
        "homeserver (live)": "OK",
        "registration (live)": "FAIL",  # the fixture's Synapse lets tests register
        "policy module (live)": "OK",
    }, out
    assert all("; fix: " in line for line in out.splitlines() if line.startswith("FAIL"))
    assert out.splitlines()[-1] == "5 of 12 checks failed"

    code, out, _ = await cli("check-homeserver", "-c", str(path), "--homeserver-config",
                             str(FRAGMENT), "--no-live", cwd=tmp_path)
    assert (code, out.splitlines()[-1]) == (0, "all 8 checks passed"), out


async def test_without_the_module_check_config_and_ready_warn(tmp_path: Path) -> None:
    """A Synapse without the module (installed in its venv, not configured): the bridge
    still works and is ready, but says so in check-config, /ready and check-homeserver."""
    hs_port, as_port = free_port(), free_port()
    config = build_test_config(f"http://127.0.0.1:{hs_port}", as_port, tmp_path)
    registration = tmp_path / "registration.yaml"
    registration.write_text(registration_yaml(config), encoding="utf-8")
    bare = LocalSynapse(tmp_path / "synapse", registration_files=[registration], port=hs_port)
    path = write_config(config, tmp_path)
    async with bare:
        code, out, err = await cli("check-config", "-c", str(path), cwd=tmp_path)
        assert code == 0 and "ok" in out
        assert err.strip() == f"warning: {NO_MODULE}"
        code, out, _ = await cli("check-homeserver", "-c", str(path), cwd=tmp_path)
        assert code == 1
        assert "FAIL  policy module (live): the homeserver runs without" in out
        running = RunningBridge(config)
        await running.start()
        try:
            status, ready = await running.call("GET", "/ready", token=None)
        finally:
            await running.stop()
    assert status == 200, ready
    assert ready["warnings"] == [NO_MODULE]


async def test_a_citizen_from_an_invite_link(bridge: BridgeHarness) -> None:
    """The real path: an invite link redeemed on the bridge's page (empty pseudonym, so
    a generated "Ciudadano/a …" name), then the account tries what it may not do."""
    h = bridge.synapse
    status, room = await bridge.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Vecinos", "kind": "citizen"})
    assert status == 201, room
    room_id = room["room_id"]
    status, link = await bridge.running.call(
        "POST", f"/admin/v1/rooms/{room_id}/invite-links", {})
    assert status == 201, link
    password = "una clave larga " + secrets.token_hex(4)
    async with aiohttp.ClientSession() as http, http.post(link["url"], data={
            "pseudonym": "", "password": password, "password2": password,
            "consent": "yes", "lang": "es"}) as resp:
        assert resp.status == 200
        page = await resp.text()
    match = re.search(r'id="user-id"[^>]*>([^<]+)<', page)
    assert match is not None, page
    localpart = match.group(1).strip().removeprefix("@").split(":")[0]
    user_id, token, _ = await h.synapse.login(localpart, password)
    vecina = User(user_id, token)

    assert (await join(h, vecina, room_id))[0] == 200  # invited by the bridge: allowed
    assert_refused(await create_room(h, vecina, preset="private_chat"), "create_room")
    assert_refused(await invite(h, vecina, room_id, bridge.desk.user_id), "invite")
    profile = f"/_matrix/client/v3/profile/{q(user_id)}/displayname"
    name = (await call(h, vecina, "GET", profile))[1]["displayname"]
    assert name.startswith("Ciudadano/a ")
    assert (await call(h, vecina, "PUT", profile, {"displayname": "vecina@correo.es"}))[0] \
        == 200
    assert (await call(h, vecina, "GET", profile))[1]["displayname"] == name
