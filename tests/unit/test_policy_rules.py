"""The Synapse module's pure rules (synapse_module/civic_bridge_synapse/rules.py)."""

from __future__ import annotations

import pytest
from civic_bridge_synapse.rules import Policy, fold, name_problem, parse_policy

POLICY = parse_policy({"server_name": "agency.example", "citizen_prefixes": ["v_"],
                       "ghost_prefixes": ["cb_"], "bridge_localparts": ["civicbridge", "cb_bot"],
                       "extra_reserved_words": ["Ayuntamiento de Villa", "Ciudadano/a"]})
CITIZEN, OTHER_CITIZEN = "@v_abcdefghijklmnop:agency.example", "@v_qrstuvwxyzabcdef:agency.example"
GHOST, BOT, SENDER = "@cb_k2j3h4:agency.example", "@cb_bot:agency.example", \
    "@civicbridge:agency.example"
STAFF, REMOTE = "@ana:agency.example", "@v_x:elsewhere.example"


def test_kinds() -> None:
    assert [POLICY.kind(u) for u in (CITIZEN, GHOST, BOT, SENDER, STAFF, REMOTE)] == [
        "citizen", "ghost", "bridge", "bridge", "staff", "staff"]


@pytest.mark.parametrize("name", [
    "612 345 678", "+34 612-345-678", "6.1.2.3.4.5.6", "٦١٢٣٤٥٦٧٨",
    "".join(chr(0xFF10 + int(d)) for d in "612345678"),  # fullwidth digits
    "juan@correo.es", "juan\uff20correo.es", "@ana:agency.example", "ana arroba correo punto es",
])
def test_contact_details_are_refused(name: str) -> None:
    assert name_problem(name, POLICY.reserved_words) == ("contact", "")


@pytest.mark.parametrize(("name", "word"), [
    ("Admin", "admin"), ("ADMINISTRADORA María", "administradora"),
    ("Soporte técnico", "soporte"), ("Ad\u200bmin", "admin"), ("el.moderador", "moderador"),
    ("Ayuntamiento de Villa", "ayuntamiento"), ("Ciudadano/a 4F2K", "ciudadano a"),
])
def test_reserved_words_are_refused(name: str, word: str) -> None:
    assert name_problem(name, POLICY.reserved_words) == ("reserved", word)


@pytest.mark.parametrize("name", ["María", "Vecina del 3º B", "Pepe 1990", "Administrativa",
                                  "Ciudadana", "Botella"])
def test_ordinary_names_pass(name: str) -> None:
    assert name_problem(name, POLICY.reserved_words) is None


def test_fold() -> None:
    assert fold("  Ádmin__Señor/a\u200b ") == "admin senor a"


def test_citizens_are_restricted_and_nobody_else() -> None:
    for action in (lambda u: POLICY.may_create_room(u), lambda u: POLICY.may_invite(u),
                   lambda u: POLICY.may_join(u, False), POLICY.may_use_room_directory):
        refused = action(CITIZEN)
        assert refused is not None and " / " in refused.error
        assert refused.fields()["org.civic_bridge.policy"] == refused.action
        assert all(action(u) is None for u in (GHOST, BOT, SENDER, STAFF, REMOTE))
    assert POLICY.may_join(CITIZEN, True) is None


def test_profile_rules() -> None:
    assert POLICY.may_set_profile(CITIZEN, "María") is None
    phone = POLICY.may_set_profile(CITIZEN, "612345678")
    assert phone is not None and phone.action == "display_name"
    assert "teléfono" in phone.error and "phone number" in phone.error
    reserved = POLICY.may_set_profile(CITIZEN, "Soporte")
    assert reserved is not None and "«soporte»" in reserved.error
    assert POLICY.may_set_profile(STAFF, "Soporte 612345678") is None
    assert POLICY.strips_avatar(CITIZEN, "mxc://agency.example/x")
    assert not POLICY.strips_avatar(CITIZEN, None)
    assert not any(POLICY.strips_avatar(u, "mxc://a/b") for u in (STAFF, GHOST, BOT))
    allowed = parse_policy({"citizen_prefixes": ["v_"], "allow_citizen_avatars": True})
    assert not allowed.strips_avatar("@v_a:", "mxc://a/b")


def test_directory_visibility() -> None:
    see = POLICY.may_see_in_directory
    # Without a shared room: citizens find nobody; nobody finds citizens or ghosts.
    assert not see(CITIZEN, STAFF, share_room=False)
    assert not see(CITIZEN, OTHER_CITIZEN, share_room=False)
    assert not see(STAFF, CITIZEN, share_room=False)
    assert not see(STAFF, GHOST, share_room=False)
    assert see(STAFF, "@luis:agency.example", share_room=False)
    assert see(STAFF, BOT, share_room=False)
    # A shared room makes them visible to each other.
    assert see(CITIZEN, STAFF, share_room=True) and see(STAFF, CITIZEN, share_room=True)


@pytest.mark.parametrize(("raw", "key"), [
    ({}, "citizen_prefixes"), ({"citizen_prefixes": "v_"}, "citizen_prefixes"),
    ({"citizen_prefixes": ["cb_x"], "ghost_prefixes": ["cb_"]}, "citizen_prefixes"),
    ({"citizen_prefixes": ["v_"], "bridge_localparts": ["@bot:x"]}, "bridge_localparts"),
    ({"citizen_prefixes": ["v_"], "allow_citizen_avatars": "yes"}, "allow_citizen_avatars"),
    ({"citizen_prefixes": ["v_"], "typo": 1}, "typo"),
])
def test_bad_config_names_the_key(raw: dict[str, object], key: str) -> None:
    with pytest.raises(ValueError, match=f"^{key}:"):
        parse_policy(raw)


def test_defaults() -> None:
    policy = parse_policy({"citizen_prefixes": ["v_"]})
    assert isinstance(policy, Policy) and policy.server_name == ""
    assert "admin" in policy.reserved_words and not policy.allow_citizen_avatars
