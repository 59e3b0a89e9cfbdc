"""Cross-signing: signing and the decisions offline, the HTTP steps against a fake homeserver."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.matrix.crosssign import (
    CrossSigningError,
    CrossSigningSeeds,
    device_signing_upload_body,
    fingerprint,
    generate,
    key_id,
    plan,
    public_key,
    sign_device,
    sign_json,
    verify_signed_json,
)
from bridge.matrix.crosssign_upload import ensure_cross_signed

USER = "@ghost_ab12:localhost"
DEVICE = "GHOSTDEV"
AS_TOKEN = "as-token-for-tests"


def unpadded(data: bytes) -> str:
    return base64.b64encode(data).rstrip(b"=").decode()


def flip_char(text: str, index: int) -> str:
    return text[:index] + ("B" if text[index] != "B" else "C") + text[index + 1 :]


def nio_like_device(user_id: str = USER, device_id: str = DEVICE) -> dict[str, Any]:
    """A device object as /keys/query returns it: self-signed by the device's own key."""
    device_key = Ed25519PrivateKey.generate()
    ed = unpadded(device_key.public_key().public_bytes_raw())
    device: dict[str, Any] = {
        "algorithms": ["m.olm.v1.curve25519-aes-sha2", "m.megolm.v1.aes-sha2"],
        "device_id": device_id,
        "keys": {f"curve25519:{device_id}": unpadded(b"c" * 32), f"ed25519:{device_id}": ed},
        "user_id": user_id,
    }
    device = sign_json(device, user_id, device_key.private_bytes_raw())
    # sign_json names the key by its public key; a device key is named by its device id
    sig = device["signatures"][user_id].pop(f"ed25519:{ed}")
    device["signatures"][user_id][f"ed25519:{device_id}"] = sig
    device["unsigned"] = {"device_display_name": "ghost"}
    return device


# --- signing ---------------------------------------------------------------------------------


def test_key_id_is_unpadded_base64_of_public_key() -> None:
    raw = bytes(range(32))
    assert key_id(raw) == "ed25519:" + base64.b64encode(raw).decode().rstrip("=")
    assert "=" not in key_id(raw)


def test_sign_verify_round_trip() -> None:
    seed = generate().master
    obj = {"hello": "world", "n": 1, "nested": {"z": [1, 2], "a": None}}
    signed = sign_json(obj, USER, seed)
    assert verify_signed_json(signed, USER, public_key(seed))
    assert "signatures" not in obj  # input untouched
    assert list(signed["signatures"][USER]) == [key_id(public_key(seed))]


def test_unsigned_and_signatures_are_not_signed() -> None:
    seed = generate().master
    signed = sign_json({"a": 1, "unsigned": {"age": 5}}, USER, seed)
    signed["unsigned"] = {"age": 99}
    signed["signatures"]["@other:localhost"] = {"ed25519:X": "abc"}
    assert verify_signed_json(signed, USER, public_key(seed))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda o: o.__setitem__("a", 2),
        lambda o: o.__setitem__("extra", True),
        lambda o: o["nested"].__setitem__("b", "x"),
        lambda o: o["signatures"][USER].update(
            {k: flip_char(v, 10) for k, v in o["signatures"][USER].items()}
        ),
        lambda o: o.pop("signatures"),
        lambda o: o["signatures"][USER].update({k: "not base64!" for k in o["signatures"][USER]}),
    ],
)
def test_tampered_object_fails_verification(tamper: Any) -> None:
    seed = generate().master
    signed = sign_json({"a": 1, "nested": {"b": "y"}}, USER, seed)
    tamper(signed)
    assert not verify_signed_json(signed, USER, public_key(seed))


def test_wrong_key_or_user_fails_verification() -> None:
    seeds = generate()
    signed = sign_json({"a": 1}, USER, seeds.master)
    assert not verify_signed_json(signed, USER, seeds.self_signing_public)
    assert not verify_signed_json(signed, "@someone:localhost", seeds.master_public)


def test_canonical_json_independent_of_key_order() -> None:
    seed = generate().master
    one = {"b": 1, "a": {"y": "ü", "x": [3, {"q": 1, "p": 2}]}}
    other = json.loads('{"a": {"x": [3, {"p": 2, "q": 1}], "y": "\\u00fc"}, "b": 1}')
    assert list(one) != list(other)
    assert sign_json(one, USER, seed)["signatures"] == sign_json(other, USER, seed)["signatures"]
    assert verify_signed_json({**sign_json(one, USER, seed), **other}, USER, public_key(seed))


def test_signature_over_spec_canonical_form() -> None:
    # Matrix canonical JSON: sorted keys, no whitespace, UTF-8 (not \u escapes).
    seed = generate().master
    signed = sign_json({"b": "ü", "a": 1}, USER, seed)
    sig = base64.b64decode(signed["signatures"][USER][key_id(public_key(seed))] + "==")
    Ed25519PrivateKey.from_private_bytes(seed).public_key().verify(sig, '{"a":1,"b":"ü"}'.encode())


# --- upload bodies ---------------------------------------------------------------------------


def test_device_signing_upload_body_matches_spec() -> None:
    seeds = generate()
    body = device_signing_upload_body(USER, seeds)
    assert set(body) == {"master_key", "self_signing_key", "user_signing_key"}
    expected = {
        "master_key": ("master", seeds.master_public),
        "self_signing_key": ("self_signing", seeds.self_signing_public),
        "user_signing_key": ("user_signing", seeds.user_signing_public),
    }
    for name, (usage, public) in expected.items():
        key = body[name]
        assert key["user_id"] == USER
        assert key["usage"] == [usage]
        assert key["keys"] == {key_id(public): unpadded(public)}
    assert "signatures" not in body["master_key"]
    for name in ("self_signing_key", "user_signing_key"):
        assert verify_signed_json(body[name], USER, seeds.master_public)
        assert list(body[name]["signatures"][USER]) == [key_id(seeds.master_public)]


def test_sign_device_keeps_device_signature_and_adds_ours() -> None:
    seeds = generate()
    device = nio_like_device()
    original = copy.deepcopy(device)
    signed = sign_device(device, USER, seeds)
    assert device == original
    assert "unsigned" not in signed
    sigs = signed["signatures"][USER]
    assert sigs[f"ed25519:{DEVICE}"] == device["signatures"][USER][f"ed25519:{DEVICE}"]
    assert key_id(seeds.self_signing_public) in sigs
    assert verify_signed_json(signed, USER, seeds.self_signing_public)
    # the device's own signature still verifies over the same content
    device_pub = base64.b64decode(device["keys"][f"ed25519:{DEVICE}"] + "=")
    renamed = copy.deepcopy(signed)
    renamed["signatures"][USER][key_id(device_pub)] = sigs[f"ed25519:{DEVICE}"]
    assert verify_signed_json(renamed, USER, device_pub)


def test_sign_device_refuses_other_users_device() -> None:
    with pytest.raises(ValueError):
        sign_device(nio_like_device(user_id="@else:localhost"), USER, generate())


# --- seeds -------------------------------------------------------------------------------------


def test_seeds_json_round_trip() -> None:
    seeds = generate()
    assert CrossSigningSeeds.from_json(seeds.to_json()) == seeds
    assert CrossSigningSeeds.from_json(seeds.to_json().encode()) == seeds
    assert len({seeds.master, seeds.self_signing, seeds.user_signing}) == 3


def test_seeds_repr_hides_secrets() -> None:
    seeds = generate()
    text = repr(seeds)
    for secret in (seeds.master, seeds.self_signing, seeds.user_signing):
        assert unpadded(secret) not in text and repr(secret) not in text


@pytest.mark.parametrize(
    "data",
    [
        "not json",
        "[]",
        '{"version": 2}',
        '{"version": 1, "master": "AAAA", "self_signing": "AAAA", "user_signing": "AAAA"}',
        '{"version": 1, "master": "!!", "self_signing": "AAAA", "user_signing": "AAAA"}',
    ],
)
def test_seeds_from_json_rejects_malformed(data: str) -> None:
    with pytest.raises(ValueError):
        CrossSigningSeeds.from_json(data)


def test_seeds_length_checked() -> None:
    with pytest.raises(ValueError):
        CrossSigningSeeds(master=b"x" * 31, self_signing=b"x" * 32, user_signing=b"x" * 32)


def test_fingerprint_groups_of_four() -> None:
    fp = fingerprint(bytes(32))
    assert fp.replace(" ", "") == unpadded(bytes(32))
    assert all(len(group) == 4 for group in fp.split(" ")[:-1])


# --- plan ----------------------------------------------------------------------------------------


def query_answer(device: dict[str, Any] | None, seeds: CrossSigningSeeds | None) -> dict[str, Any]:
    answer: dict[str, Any] = {"device_keys": {USER: {DEVICE: device} if device else {}}}
    if seeds is not None:
        body = device_signing_upload_body(USER, seeds)
        answer["master_keys"] = {USER: body["master_key"]}
        answer["self_signing_keys"] = {USER: body["self_signing_key"]}
    return answer


def test_plan_fresh_user_uploads_and_signs() -> None:
    seeds = generate()
    todo = plan(query_answer(nio_like_device(), None), USER, DEVICE, seeds)
    assert todo.upload_keys and not todo.replaces_identity
    assert todo.signed_device is not None
    assert verify_signed_json(todo.signed_device, USER, seeds.self_signing_public)


def test_plan_done_when_keys_and_signature_present() -> None:
    seeds = generate()
    device = sign_device(nio_like_device(), USER, seeds)
    assert plan(query_answer(device, seeds), USER, DEVICE, seeds).nothing_to_do


def test_plan_signs_unsigned_device_of_known_identity() -> None:
    seeds = generate()
    todo = plan(query_answer(nio_like_device(), seeds), USER, DEVICE, seeds)
    assert not todo.upload_keys and todo.signed_device is not None


def test_plan_other_identity_is_a_replacement() -> None:
    ours, theirs = generate(), generate()
    device = sign_device(nio_like_device(), USER, theirs)
    todo = plan(query_answer(device, theirs), USER, DEVICE, ours)
    assert todo.upload_keys and todo.replaces_identity and todo.signed_device is not None


def test_plan_device_missing_raises() -> None:
    with pytest.raises(CrossSigningError):
        plan(query_answer(None, None), USER, DEVICE, generate())


# --- ensure_cross_signed against a fake homeserver -----------------------------------------------


class FakeKeyServer:
    """Records requests and keeps keys like Synapse does, checking signatures as it does."""

    def __init__(self, device: dict[str, Any]) -> None:
        self.device = device
        self.cross_signing: dict[str, dict[str, Any]] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []
        self.reject_signatures = False

    def app(self) -> web.Application:
        app = web.Application()
        prefix = "/_matrix/client/v3/keys"
        app.router.add_post(f"{prefix}/query", self.query)
        app.router.add_post(f"{prefix}/device_signing/upload", self.device_signing)
        app.router.add_post(f"{prefix}/signatures/upload", self.signatures)
        return app

    def _record(self, request: web.Request) -> None:
        assert request.headers["Authorization"] == f"Bearer {AS_TOKEN}"
        self.requests.append((request.path.rsplit("/keys/", 1)[1], dict(request.query)))

    async def query(self, request: web.Request) -> web.Response:
        self._record(request)
        body = await request.json()
        assert body == {"device_keys": {USER: [DEVICE]}}
        answer: dict[str, Any] = {"device_keys": {USER: {DEVICE: self.device}}, "failures": {}}
        for name, section in (
            ("master_key", "master_keys"),
            ("self_signing_key", "self_signing_keys"),
        ):
            if name in self.cross_signing:
                answer[section] = {USER: self.cross_signing[name]}
        return web.json_response(answer)

    async def device_signing(self, request: web.Request) -> web.Response:
        self._record(request)
        self.cross_signing = await request.json()
        return web.json_response({})

    async def signatures(self, request: web.Request) -> web.Response:
        self._record(request)
        signed = (await request.json())[USER][DEVICE]
        stored = {k: v for k, v in self.device.items() if k not in ("unsigned", "signatures")}
        ss_key = self.cross_signing["self_signing_key"]["keys"]
        (ss_b64,) = ss_key.values()
        ss_pub = base64.b64decode(ss_b64 + "=")
        if self.reject_signatures:
            failure = {"errcode": "M_INVALID_SIGNATURE", "error": "Invalid signature"}
            return web.json_response({"failures": {USER: {DEVICE: failure}}})
        if {k: v for k, v in signed.items() if k != "signatures"} != stored:
            failure = {"errcode": "M_INVALID_PARAM", "error": "Key does not match"}
            return web.json_response({"failures": {USER: {DEVICE: failure}}})
        assert verify_signed_json(signed, USER, ss_pub)
        self.device = {**self.device, "signatures": signed["signatures"]}
        return web.json_response({"failures": {}})


async def run(fake: FakeKeyServer, seeds: CrossSigningSeeds, **kwargs: Any) -> None:
    async with TestServer(fake.app()) as server, aiohttp.ClientSession() as session:
        await ensure_cross_signed(
            session, str(server.make_url("/")), AS_TOKEN, USER, DEVICE, seeds, **kwargs
        )


async def test_ensure_cross_signed_then_idempotent() -> None:
    fake = FakeKeyServer(nio_like_device())
    seeds = generate()
    await run(fake, seeds)
    masquerade = {"user_id": USER}
    assert fake.requests == [
        ("query", masquerade),
        ("device_signing/upload", masquerade),
        ("signatures/upload", masquerade),
    ]
    assert verify_signed_json(fake.device, USER, seeds.self_signing_public)
    assert f"ed25519:{DEVICE}" in fake.device["signatures"][USER]

    fake.requests.clear()
    await run(fake, seeds)
    assert fake.requests == [("query", masquerade)]


async def test_ensure_cross_signed_without_masquerade() -> None:
    fake = FakeKeyServer(nio_like_device())
    await run(fake, generate(), masquerade=False)
    assert [query for _, query in fake.requests] == [{}, {}, {}]


async def test_ensure_cross_signed_refuses_identity_reset_unless_allowed(
    caplog: pytest.LogCaptureFixture,
) -> None:
    fake = FakeKeyServer(nio_like_device())
    old, new = generate(), generate()
    await run(fake, old)
    fake.requests.clear()
    with pytest.raises(CrossSigningError, match="identity reset"):
        await run(fake, new)
    assert [path for path, _ in fake.requests] == ["query"]

    caplog.set_level("INFO", logger="bridge.matrix.crosssign")
    await run(fake, new, allow_replace=True)
    assert verify_signed_json(fake.device, USER, new.self_signing_public)
    assert any("identity reset" in r.getMessage() for r in caplog.records)
    # no key material in the logs
    logged = " ".join(r.getMessage() for r in caplog.records)
    for public in (new.master_public, new.self_signing_public, old.master_public):
        assert unpadded(public) not in logged


async def test_ensure_cross_signed_checks_failures() -> None:
    fake = FakeKeyServer(nio_like_device())
    fake.reject_signatures = True
    with pytest.raises(CrossSigningError, match="M_INVALID_SIGNATURE"):
        await run(fake, generate())


async def test_ensure_cross_signed_reports_http_errors() -> None:
    async def refuse(request: web.Request) -> web.Response:
        return web.json_response({"errcode": "M_FORBIDDEN", "error": "no"}, status=403)

    app = web.Application()
    app.router.add_post("/_matrix/client/v3/keys/query", refuse)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        with pytest.raises(CrossSigningError, match="403 M_FORBIDDEN"):
            await ensure_cross_signed(
                session, str(server.make_url("/")), AS_TOKEN, USER, DEVICE, generate()
            )
