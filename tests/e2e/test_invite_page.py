"""The invite page in a real headless Chromium, with JavaScript switched off, from the link
to an account that a matrix-nio client signs in with and finds the room in.

Selenium is synchronous: every browser session runs in a worker thread so the bridge
(same event loop as the test) keeps serving the browser's requests.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
from nio import AsyncClient, LoginResponse
from sqlalchemy import text

from bridge.invites.accounts import SynapseRegistrar
from bridge.invites.forms import parse_form
from bridge.invites.service import InviteLinks, LinkUnusable
from bridge.types import Pseudonym, RoomID
from tests.fixtures.bridge import BridgeHarness

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
SCREENSHOT_DIR = Path(os.environ.get("CIVIC_BRIDGE_SCREENSHOTS", tempfile.gettempdir()))
T = TypeVar("T")

if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
    reason = "needs Debian's chromium and chromium-driver (.ci/run installs them)"
    if os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import (  # noqa: E402
    StaleElementReferenceException,
    WebDriverException,
)
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.remote.webdriver import WebDriver  # noqa: E402
from selenium.webdriver.remote.webelement import WebElement  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402


@contextmanager
def chromium() -> Iterator[WebDriver]:
    """Headless Chromium with JavaScript disabled and a fresh, empty profile."""
    profile = tempfile.mkdtemp(prefix="cb-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--window-size=900,1500",
                f"--user-data-dir={profile}"):
        opts.add_argument(arg)
    # A Spanish visitor: the page picks its language from Accept-Language.
    opts.add_argument("--lang=es-ES")
    opts.add_experimental_option("prefs", {
        "profile.managed_default_content_settings.javascript": 2,
        "intl.accept_languages": "es-ES,es"})
    driver = webdriver.Chrome(options=opts, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def click_and_load(driver: WebDriver, css: str) -> None:
    """Click something that loads a new page, and wait until the new page is there."""
    old = driver.find_element(By.TAG_NAME, "html")
    driver.find_element(By.CSS_SELECTOR, css).click()
    WebDriverWait(driver, 20).until(lambda _: _gone(old))


def _gone(element: WebElement) -> bool:
    """True once `element` is no longer in the page (selenium's staleness_of, which
    misses how Chrome sometimes says so in the middle of a navigation)."""
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as exc:
        if "does not belong to the document" in str(exc):
            return True
        raise
    return False


async def in_browser(steps: Callable[[WebDriver], T]) -> T:
    def run() -> T:
        with chromium() as driver:
            return steps(driver)
    return await asyncio.to_thread(run)


async def citizen_room(h: BridgeHarness, name: str) -> str:
    status, body = await h.running.call("POST", "/admin/v1/rooms",
                                        {"name": name, "kind": "citizen"})
    assert status == 201, body
    return str(body["room_id"])


async def new_link(h: BridgeHarness, room_id: str, **options: Any) -> str:
    status, body = await h.running.call("POST", f"/admin/v1/rooms/{room_id}/invite-links",
                                        options)
    assert status == 201, body
    url = str(body["url"])
    assert url.startswith(f"{h.running.url}/invite/")
    return url


async def accounts_in(h: BridgeHarness, room_id: str) -> int:
    async with h.running.bridge.db.session() as session:
        count = await session.scalar(
            text("SELECT count(*) FROM invite_accounts WHERE room_id = :r"), {"r": room_id})
    return int(count or 0)


async def get(url: str, data: dict[str, str] | None = None,
              lang: str = "es") -> tuple[int, str, dict[str, str]]:
    headers = {"Accept-Language": lang}
    async with aiohttp.ClientSession() as http:
        if data is None:
            async with http.get(url, headers=headers) as resp:
                return resp.status, await resp.text(), dict(resp.headers)
        async with http.post(url, data=data, headers=headers) as resp:
            return resp.status, await resp.text(), dict(resp.headers)


async def test_link_to_working_account_in_a_real_browser(bridge: BridgeHarness) -> None:
    room_id = await citizen_room(bridge, "Vecinos de Ruzafa")
    url = await new_link(bridge, room_id)
    password = "correct horse " + secrets.token_hex(4)
    shot = SCREENSHOT_DIR / "civic-bridge-invite-page.png"

    def sign_up(driver: WebDriver) -> dict[str, str]:
        driver.get(url)
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "es"
        assert "Vecinos de Ruzafa" in driver.find_element(By.TAG_NAME, "h1").text
        notice = driver.find_element(By.CSS_SELECTOR, "section.notice").text
        assert "La entidad creará para usted una cuenta" in notice
        assert "No le pedimos su teléfono ni su correo" in notice
        consent = driver.find_element(By.ID, "consent")
        assert not consent.is_selected()
        # No field asks for a phone number or an e-mail address.
        types = {i.get_attribute("type") for i in driver.find_elements(By.TAG_NAME, "input")}
        assert types == {"hidden", "text", "password", "checkbox"}
        # Every visible input has a label pointing at it.
        for field in ("pseudonym", "password", "password2", "consent"):
            assert driver.find_elements(By.CSS_SELECTOR, f"label[for='{field}']")
        driver.save_screenshot(str(shot))

        # The English version, through the language link (a plain link, no script).
        click_and_load(driver, "nav.lang a")
        assert driver.find_element(By.TAG_NAME, "html").get_attribute("lang") == "en"
        assert "Invitation to" in driver.find_element(By.TAG_NAME, "h1").text
        assert "We do not ask for your phone number" in driver.page_source

        # A pseudonym with a phone number is refused; nothing is created.
        name = driver.find_element(By.ID, "pseudonym")
        name.clear()
        name.send_keys("Ana 612 345 678")
        driver.find_element(By.ID, "password").send_keys(password)
        driver.find_element(By.ID, "password2").send_keys(password)
        driver.find_element(By.ID, "consent").click()
        click_and_load(driver, "button[type=submit]")
        summary = driver.find_element(By.CSS_SELECTOR, "[role=alert]").text
        assert "must not contain a phone number" in summary
        assert driver.find_element(By.ID, "pseudonym").get_attribute("aria-invalid") == "true"
        assert driver.find_element(By.ID, "password").get_attribute("value") == ""

        name = driver.find_element(By.ID, "pseudonym")
        name.clear()
        name.send_keys("Vecina del barrio")
        driver.find_element(By.ID, "password").send_keys(password)
        driver.find_element(By.ID, "password2").send_keys(password)
        if not driver.find_element(By.ID, "consent").is_selected():
            driver.find_element(By.ID, "consent").click()
        click_and_load(driver, "button[type=submit]")
        assert "Your account is ready" in driver.find_element(By.TAG_NAME, "h1").text
        done = {"user_id": driver.find_element(By.ID, "user-id").text,
                "homeserver": driver.find_element(By.ID, "homeserver").text,
                "name": driver.find_element(By.ID, "display-name").text,
                "web": driver.find_element(By.CSS_SELECTOR, "ol.steps a").get_attribute("href")}
        driver.save_screenshot(str(SCREENSHOT_DIR / "civic-bridge-invite-done.png"))
        # Reloading the link now: it has been used.
        driver.get(url)
        done["again"] = driver.find_element(By.ID, "problem").get_attribute("data-problem")
        return done

    before = await accounts_in(bridge, room_id)
    done = await in_browser(sign_up)
    user_id = done["user_id"]
    assert user_id.startswith("@v_") and user_id.endswith(":localhost")
    assert done["homeserver"] == bridge.running.config.homeserver.url
    assert done["name"] == "Vecina del barrio"
    assert done["web"] == "https://web-client.invalid/"
    assert done["again"] == "used"
    assert await accounts_in(bridge, room_id) == before + 1

    # The citizen signs in with what the page showed and finds the invitation.
    client = AsyncClient(done["homeserver"], user_id)
    try:
        login = await client.login(password)
        assert isinstance(login, LoginResponse), login
        await client.sync(timeout=0)
        assert room_id in client.invited_rooms
        join = await client.join(room_id)
        assert getattr(join, "room_id", None) == room_id, join
        await client.sync(timeout=0)
        assert room_id in client.rooms
        room = client.rooms[room_id]
        assert room.display_name == "Vecinos de Ruzafa"
        assert room.user_name(user_id) == "Vecina del barrio"
    finally:
        await client.close()

    b = bridge.running.bridge
    records = await b.db.consent.for_pseudonym(Pseudonym(user_id))
    assert [(r.purpose, r.state, r.channel, r.language) for r in records] == [
        ("membership", "granted", "invite-link", "en")]
    actions = [(e.action, e.result) for e in await b.db.audit.list(limit=20)]
    assert ("invite_link.redeem", "ok") in actions
    assert ("consent.membership.granted", "ok") in actions
    # The admin API lists the citizen by pseudonym and role, nothing else.
    status, members = await bridge.running.call("GET", f"/admin/v1/rooms/{room_id}/members")
    assert status == 200
    mine = next(m for m in members if m["user_id"] == user_id)
    assert mine == {"user_id": user_id, "display_name": "Vecina del barrio", "kind": "citizen",
                    "membership": "join", "power": 0, "role": "member"}


async def test_used_expired_and_forged_links_create_nothing(bridge: BridgeHarness) -> None:
    room_id = await citizen_room(bridge, "Consulta vecinal")
    form = {"pseudonym": "", "password": "una clave larga", "password2": "una clave larga",
            "consent": "yes", "lang": "es"}

    # Forged: a well-formed token that was never issued, and a malformed one.
    base = f"{bridge.running.url}/invite/"
    for token in (secrets.token_urlsafe(32), "x", "A" * 300, "%00%3Cscript%3E"):
        status, page, headers = await get(base + token)
        assert status == 404, token
        assert 'data-problem="unknown"' in page
        status, page, _ = await get(base + token, form)
        assert status == 404 and 'data-problem="unknown"' in page
    assert headers["Referrer-Policy"] == "no-referrer"
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert headers["Cache-Control"] == "no-store"

    # Expired: the page says so and the form does nothing.
    url = await new_link(bridge, room_id, expires_in=3600)
    async with bridge.running.bridge.db.session() as session:
        await session.execute(text(
            "UPDATE invite_links SET expires_at = :t WHERE id = "
            "(SELECT max(id) FROM invite_links)"), {"t": "2000-01-01 00:00:00"})
    status, page, _ = await get(url)
    assert status == 410 and "ha caducado" in page
    status, page, _ = await get(url, form)
    assert status == 410 and 'data-problem="expired"' in page

    # Used: a two-use link works twice, then refuses.
    url = await new_link(bridge, room_id, uses=2)
    for _ in range(2):
        status, page, _ = await get(url, form)
        assert status == 200 and 'id="user-id"' in page
        assert "Ciudadano/a " in page  # an empty pseudonym gets a generated one
    status, page, _ = await get(url, {**form, "lang": "en"})
    assert status == 410 and "already been used" in page
    assert await accounts_in(bridge, room_id) == 2

    # Form errors keep the link usable and create nothing.
    url = await new_link(bridge, room_id)
    for bad, message in (
            ({"consent": ""}, "debe aceptar el aviso"),
            ({"password": "corta", "password2": "corta"}, "al menos 10 caracteres"),
            ({"password2": "otra clave larga"}, "no coinciden"),
            ({"pseudonym": "ana@example.org"}, "ni un correo electrónico"),
            ({"pseudonym": "ana@correo"}, "ni un correo electrónico"),
            ({"pseudonym": "Llámame al 6 1 2 3 4 5 6 7 8"}, "número de teléfono"),
            ({"pseudonym": "a\u202eb"}, "signos de puntuación sencillos")):
        status, page, _ = await get(url, {**form, **bad})
        assert status == 400, bad
        assert message in page, bad
        assert "una clave larga" not in page  # passwords are never echoed back
    assert await accounts_in(bridge, room_id) == 2
    status, page, _ = await get(url, form)
    assert status == 200


async def test_a_single_use_link_races_to_one_account(bridge: BridgeHarness) -> None:
    room_id = await citizen_room(bridge, "Carrera")
    url = await new_link(bridge, room_id)
    form = {"password": "una clave larga", "password2": "una clave larga", "consent": "yes"}
    results = await asyncio.gather(*(get(url, form) for _ in range(4)))
    assert sorted(status for status, _, _ in results) == [200, 410, 410, 410]
    assert await accounts_in(bridge, room_id) == 1


async def test_links_need_admin_and_respect_room_kind(bridge: BridgeHarness) -> None:
    room_id = await citizen_room(bridge, "Tokens")
    status, body = await bridge.running.call(
        "POST", f"/admin/v1/rooms/{room_id}/invite-links", {}, token=None)
    assert status == 401
    status, body = await bridge.running.call("POST", "/admin/v1/rooms",
                                             {"name": "Equipo", "kind": "team"})
    team = body["room_id"]
    status, body = await bridge.running.call("POST", f"/admin/v1/rooms/{team}/invite-links", {})
    assert status == 400 and "citizen or announcement" in body["error"]
    for bad in ({"uses": 0}, {"uses": "2"}, {"expires_in": 10}, {"expires_in": 10**9}):
        status, body = await bridge.running.call(
            "POST", f"/admin/v1/rooms/{room_id}/invite-links", bad)
        assert status == 400, bad
    b = bridge.running.bridge
    # The room behind a link is never something the link's holder picks.
    assert RoomID(room_id) in {r.room_id for r in await b.db.rooms.list()}


async def test_a_failed_registration_gives_the_use_back(bridge: BridgeHarness) -> None:
    """Synapse refusing the account (here: a wrong shared secret) creates nothing, keeps
    the link usable, and is audited."""
    b = bridge.running.bridge
    room_id = await citizen_room(bridge, "Sin cuenta")
    url = await new_link(bridge, room_id)
    token = url.rsplit("/", 1)[1]
    broken = InviteLinks(b.config, b.db, b.api, b.rooms, b.ghosts.bot, b.privacy,
                         SynapseRegistrar(b.http, b.config.homeserver.url, "not-the-secret" * 2))
    form = parse_form({"password": "una clave larga", "password2": "una clave larga",
                       "consent": "yes"}, "es")
    with pytest.raises(LinkUnusable) as err:
        await broken.redeem(token, form)
    assert err.value.problem == "failed"
    view = await b.invites.view(token)
    assert view.link.uses == 0
    entry = (await b.db.audit.list(limit=1))[0]
    assert (entry.action, entry.result) == ("invite_link.redeem",
                                           "error registration 403 M_UNKNOWN")
    assert await accounts_in(bridge, room_id) == 0
    status, page, _ = await get(url, {"password": "una clave larga",
                                      "password2": "una clave larga", "consent": "yes"})
    assert status == 200 and 'id="user-id"' in page
