"""Which staff devices are owed which earlier room keys (pure selection logic)."""

from __future__ import annotations

from bridge.matrix.keyshare import KeyLedger, Target, audience

ROOM = "!portal"
STAFF = "@desk:localhost"
LATE = "@late:localhost"
GHOST = "@cb_other:localhost"
BOT = "@cb_bot:localhost"


def ours(user_id: str) -> bool:
    return user_id.startswith("@cb_")


def dev(user_id: str, name: str) -> Target:
    return Target(user_id, name, f"curve-{user_id}-{name}")


def ledger_with_one_session() -> KeyLedger:
    ledger = KeyLedger()
    ledger.note(ROOM, "s1", 0, "key@0", audience("invited", [BOT, GHOST], [STAFF]))
    return ledger


def test_audience_follows_history_visibility() -> None:
    assert audience("invited", ["@a"], ["@b"]) == {"@a", "@b"}
    assert audience("shared", ["@a"], ["@b"]) == {"@a", "@b"}
    assert audience("joined", ["@a"], ["@b"]) == {"@a"}


def test_new_device_of_member_is_owed_index_zero() -> None:
    ledger = ledger_with_one_session()
    old, new = dev(STAFF, "OLD"), dev(STAFF, "NEW")
    ledger.mark("s1", old.curve25519, 0)  # nio shared with it when encrypting
    owed = ledger.owed({ROOM: {STAFF, BOT}}, {STAFF: [old, new]}, ours)
    assert [(o.target, o.session_id, o.checkpoint.session_key) for o in owed] == \
        [(new, "s1", "key@0")]
    ledger.mark("s1", new.curve25519, 0)
    assert ledger.owed({ROOM: {STAFF}}, {STAFF: [old, new]}, ours) == []


def test_left_users_and_non_members_get_nothing() -> None:
    ledger = ledger_with_one_session()
    devices = {STAFF: [dev(STAFF, "NEW")], LATE: [dev(LATE, "X")]}
    # STAFF left (not a member now); LATE was never one.
    assert ledger.owed({ROOM: {BOT}}, devices, ours) == []
    # LATE joins now, but was not entitled when the session encrypted: still nothing.
    assert ledger.owed({ROOM: {BOT, LATE}}, devices, ours) == []


def test_bridge_users_are_skipped() -> None:
    ledger = ledger_with_one_session()
    devices = {GHOST: [dev(GHOST, "G")], BOT: [dev(BOT, "B")]}
    assert ledger.owed({ROOM: {GHOST, BOT}}, devices, ours) == []


def test_later_invitee_gets_key_from_their_invitation_only() -> None:
    ledger = ledger_with_one_session()
    # Messages 0..4 went out; then LATE was invited and message 5 encrypted.
    ledger.note(ROOM, "s1", 5, "key@5", audience("invited", [BOT], [STAFF, LATE]))
    late = dev(LATE, "L")
    owed = ledger.owed({ROOM: {STAFF, LATE}}, {LATE: [late]}, ours)
    assert [(o.checkpoint.index, o.checkpoint.session_key) for o in owed] == [(5, "key@5")]
    # A device that has index 5 but the member is entitled from 0 is still owed 0.
    staff = dev(STAFF, "S")
    ledger.mark("s1", staff.curve25519, 5)
    owed = ledger.owed({ROOM: {STAFF}}, {STAFF: [staff]}, ours)
    assert [o.checkpoint.index for o in owed] == [0]


def test_same_audience_adds_no_checkpoint() -> None:
    ledger = ledger_with_one_session()
    ledger.note(ROOM, "s1", 3, "key@3", audience("invited", [BOT], [STAFF]))
    assert len(ledger.records[(ROOM, "s1")].checkpoints) == 1


def test_joined_visibility_excludes_invitees_at_encryption_time() -> None:
    ledger = KeyLedger()
    ledger.note(ROOM, "s2", 0, "k", audience("joined", [BOT], [STAFF]))
    assert ledger.owed({ROOM: {STAFF}}, {STAFF: [dev(STAFF, "N")]}, ours) == []


def test_other_rooms_sessions_stay_in_their_room() -> None:
    ledger = ledger_with_one_session()
    assert ledger.owed({"!other": {STAFF}}, {STAFF: [dev(STAFF, "N")]}, ours) == []


def test_rooms_left_are_forgotten() -> None:
    ledger = ledger_with_one_session()
    ledger.mark("s1", "curve", 0)
    ledger.forget_rooms_except({"!other"})
    assert ledger.records == {} and ledger.delivered == {}


def test_someone_new_at_the_same_index_widens_that_checkpoint() -> None:
    ledger = ledger_with_one_session()
    widened = ledger.note(ROOM, "s1", 0, "key@0", audience("invited", [BOT], [LATE]))
    assert widened is not None and widened.audience == {BOT, GHOST, STAFF, LATE}
    assert ledger.records[(ROOM, "s1")].checkpoints == [widened]
    assert ledger.entitles(ROOM, "s1", 0, "key@0", frozenset({LATE})) is None


def test_a_ledger_rebuilt_from_stored_parts_keeps_index_order() -> None:
    stored = ledger_with_one_session().records[(ROOM, "s1")].checkpoints[0]
    ledger = KeyLedger()
    later = ledger.note(ROOM, "s1", 5, "key@5", frozenset({LATE}))
    assert later is not None
    ledger.add(ROOM, "s1", stored)  # restored after a newer one: still first
    assert [c.index for c in ledger.records[(ROOM, "s1")].checkpoints] == [0, 5]


def test_marks_only_ever_go_down_and_say_so() -> None:
    ledger = KeyLedger()
    assert ledger.mark("s1", "curve", 5)
    assert not ledger.mark("s1", "curve", 7) and not ledger.lowers("s1", "curve", 5)
    assert ledger.mark("s1", "curve", 2) and ledger.delivered == {("s1", "curve"): 2}


def test_forgetting_rooms_names_the_sessions_dropped() -> None:
    ledger = ledger_with_one_session()
    ledger.note("!other", "s9", 0, "k", frozenset({STAFF}))
    assert ledger.forget_rooms_except({"!other"}) == ["s1"]
    assert set(ledger.records) == {("!other", "s9")}
