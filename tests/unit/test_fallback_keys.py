"""What an Olm account (nio 0.26 on vodozemac) keeps of its fallback keys, which the
bridge's replacement policy rests on (bridge.matrix.devices.FALLBACK_MAX_AGE_SECONDS):
after a new fallback key is made, a pre-key message encrypted to the one before still
opens a session; after a second new one it no longer does (`SessionCreationException`),
also through the pickle the bridge stores. nio never makes or forgets a fallback key
itself (bridge.matrix.devices.upload_fallback_key does), and its binding has no
`forget_fallback_key`: the previous key goes only when the next one is made."""

from __future__ import annotations

import pytest
import vodozemac
from nio.crypto import OlmAccount

PASSPHRASE = "pickle passphrase"


def _published_fallback(account: OlmAccount) -> str:
    """Make a new fallback key and publish it (bridge.matrix.devices.upload_fallback_key)."""
    inner = account._account
    inner.generate_fallback_key()
    (key,) = inner.fallback_key.values()
    inner.mark_keys_as_published()
    assert not inner.fallback_key  # published: no longer "pending"
    return str(key.to_base64())


def _prekey_to(bot: OlmAccount, fallback_key: str) -> tuple[OlmAccount, vodozemac.PreKeyMessage]:
    """A new sender's first Olm message to `bot`, on a session made with the claimed key."""
    sender = OlmAccount()
    session = sender.create_outbound_session(bot.identity_keys["curve25519"], fallback_key)
    message = session.encrypt(b'{"type": "m.room_key"}').to_pre_key()
    assert message is not None
    return sender, message


def _opens(bot: OlmAccount, sender: OlmAccount, message: vodozemac.PreKeyMessage) -> bool:
    try:
        bot.create_inbound_session(sender.identity_keys["curve25519"], message)
    except vodozemac.SessionCreationException:
        return False
    return True


def _stored(account: OlmAccount) -> OlmAccount:
    return OlmAccount.from_pickle(account.pickle(PASSPHRASE), PASSPHRASE, shared=True)


@pytest.mark.parametrize("through_pickle", [False, True])
def test_one_previous_fallback_key_is_kept_not_two(through_pickle: bool) -> None:
    bot = OlmAccount()
    first = _published_fallback(bot)
    # Three senders claimed the first fallback key; their messages are still on the way.
    waiting = [_prekey_to(bot, first) for _ in range(3)]
    assert _opens(bot, *waiting[0])
    _published_fallback(bot)  # replaced once
    if through_pickle:
        bot = _stored(bot)
    assert _opens(bot, *waiting[1])
    _published_fallback(bot)  # replaced twice: the first one's private half is gone
    if through_pickle:
        bot = _stored(bot)
    assert not _opens(bot, *waiting[2])


def test_a_used_fallback_key_serves_any_number_of_senders() -> None:
    """Unlike a one-time key, using the fallback key does not remove it."""
    bot = OlmAccount()
    key = _published_fallback(bot)
    assert all(_opens(bot, *_prekey_to(bot, key)) for _ in range(20))
