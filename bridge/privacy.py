"""Privacy primitives: encryption at rest, keyed lookup hashes, pseudonyms, and
detectors for personal identifiers in free text.

Everything that touches a citizen's phone number, WhatsApp id (``wa_id``) or
business-scoped user id (BSUID) goes through this module:

* `Cipher` encrypts identifiers and small payloads (AES-256-GCM, `privacy.data_key`);
  tokens name their key so keys can rotate without a flag day.
* `KeyedIndex` gives the stable lookup value for a citizen (HMAC-SHA256 with the
  separate `privacy.index_key`), so the database can find a row without holding
  the identifier in clear; `KeyedIndex.wamid` does the same for WhatsApp message
  ids (a wamid embeds the number), under a key of their own.
* `new_localpart` / `new_pseudonym_code` / `display_name` make the Matrix-facing
  identity; they are random and letters-only, so they can never carry a digit of
  the phone number they stand for.
* `looks_like_personal_id` / `contains_phone_or_email` spot DNI/NIE, IBAN, card
  and phone numbers in text (data-protection requirement 13, pseudonym checks).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import phonenumbers
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from stdnum import iban as stdnum_iban
from stdnum import luhn
from stdnum.es import dni as stdnum_dni
from stdnum.es import nie as stdnum_nie

from bridge.types import WamidHash

if TYPE_CHECKING:
    from bridge.config import PrivacyConfig

__all__ = [
    "CODE_ALPHABET",
    "LOCALPART_ALPHABET",
    "Cipher",
    "DecryptError",
    "KeyedIndex",
    "Privacy",
    "contains_phone_or_email",
    "data_keys",
    "display_name",
    "is_keyed_hash",
    "key_id",
    "looks_like_personal_id",
    "new_localpart",
    "new_pseudonym_code",
    "normalise_identifier",
]

# --------------------------------------------------------------------------- encryption

_VERSION = "v1"
_NONCE_LEN = 12
_TAG_LEN = 16
_KEY_LEN = 32
_TOKEN = re.compile(r"v1\.([0-9a-f]{8})\.([A-Za-z0-9_-]+)")


class DecryptError(Exception):
    """A token could not be decrypted: tampered, truncated, wrong aad, or unknown key.

    The message never contains plaintext, key material or the token itself.
    """


def key_id(key: bytes) -> str:
    """The public name of a data key: first 8 hex chars of its SHA-256.

    Derived, so the config needs no id field; 32 bits of a hash of a 256-bit
    random key reveal nothing usable about the key.
    """
    return hashlib.sha256(key).hexdigest()[:8]


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise DecryptError("malformed token") from None
    # Base64 tolerates non-zero padding bits; re-encoding rejects those variants,
    # so every token has exactly one spelling and any changed character fails.
    if _b64encode(raw) != text:
        raise DecryptError("malformed token")
    return raw


class Cipher:
    """AES-256-GCM for identifiers and small payloads, with key rotation.

    Tokens look like ``v1.<keyid>.<urlsafe-base64(nonce || ciphertext || tag)>``
    and are pure ASCII, so they fit a ``TEXT`` column. New tokens use ``current``;
    tokens made with a key in ``previous`` still decrypt until `rekey` rewrites
    them. Nonces are 96 random bits: safe for far more than 2**32 encryptions
    per key, which a bridge will not reach.

    ``aad`` (additional authenticated data) is not stored in the token but must
    be given again to decrypt. Use it to bind a ciphertext to its purpose, e.g.
    ``aad=b"citizen.wa_id"``, so a value copied into another column (or a token
    from another row type) fails to decrypt instead of being silently misused.
    The version and key id are always authenticated as well.
    """

    def __init__(self, current: bytes, previous: Sequence[bytes] = ()) -> None:
        seen: dict[str, bytes] = {}
        for key in (current, *previous):
            if len(key) != _KEY_LEN:
                raise ValueError(f"data keys must be {_KEY_LEN} bytes, got {len(key)}")
            kid = key_id(key)
            if kid in seen:
                if hmac.compare_digest(seen[kid], key):
                    continue  # listed twice (e.g. current also left in previous)
                raise ValueError(f"two different data keys share key id {kid}")
            seen[kid] = key
        self._keys = {kid: AESGCM(key) for kid, key in seen.items()}
        self._current = key_id(current)

    @property
    def current_key_id(self) -> str:
        """Key id that new tokens carry."""
        return self._current

    @staticmethod
    def _header(kid: str) -> bytes:
        return f"{_VERSION}.{kid}.".encode("ascii")

    def encrypt(self, plaintext: bytes | str, *, aad: bytes = b"") -> str:
        """Encrypt with the current key; ``str`` is encoded as UTF-8."""
        data = plaintext.encode("utf-8") if isinstance(plaintext, str) else plaintext
        nonce = secrets.token_bytes(_NONCE_LEN)
        header = self._header(self._current)
        sealed = self._keys[self._current].encrypt(nonce, data, header + aad)
        return header.decode("ascii") + _b64encode(nonce + sealed)

    @staticmethod
    def _parse(token: str) -> tuple[str, bytes]:
        if not isinstance(token, str):
            raise DecryptError("token must be a str")
        match = _TOKEN.fullmatch(token)
        if match is None:
            raise DecryptError("malformed token")
        raw = _b64decode(match.group(2))
        if len(raw) < _NONCE_LEN + _TAG_LEN:
            raise DecryptError("malformed token: too short")
        return match.group(1), raw

    def decrypt(self, token: str, *, aad: bytes = b"") -> bytes:
        """Decrypt a token made by this or a previous key.

        Raises `DecryptError` if the token was altered, the aad differs, or its
        key is not configured.
        """
        kid, raw = self._parse(token)
        aead = self._keys.get(kid)
        if aead is None:
            raise DecryptError(
                f"token uses unknown key id {kid}; add the retired key to "
                "privacy.previous_data_keys"
            )
        try:
            return aead.decrypt(raw[:_NONCE_LEN], raw[_NONCE_LEN:], self._header(kid) + aad)
        except InvalidTag:
            raise DecryptError("token failed authentication (tampered or wrong aad)") from None

    def decrypt_str(self, token: str, *, aad: bytes = b"") -> str:
        """`decrypt` and decode UTF-8."""
        try:
            return self.decrypt(token, aad=aad).decode("utf-8")
        except UnicodeDecodeError:
            raise DecryptError("plaintext is not UTF-8") from None

    def encrypt_json(self, obj: Any, *, aad: bytes = b"") -> str:
        """Encrypt a JSON-serialisable value (compact, UTF-8)."""
        text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        return self.encrypt(text, aad=aad)

    def decrypt_json(self, token: str, *, aad: bytes = b"") -> Any:
        """Inverse of `encrypt_json`."""
        text = self.decrypt_str(token, aad=aad)
        try:
            return json.loads(text)
        except ValueError:
            raise DecryptError("plaintext is not JSON") from None

    @classmethod
    def is_token(cls, value: object) -> bool:
        """True if `value` is a well-formed token (of any key; nothing is decrypted)."""
        if not isinstance(value, str):
            return False
        try:
            cls._parse(value)
        except DecryptError:
            return False
        return True

    def needs_rekey(self, token: str) -> bool:
        """True if the token was not made with the current key.

        Only the header is read (no decryption); raises `DecryptError` if the
        token is malformed.
        """
        kid, _ = self._parse(token)
        return kid != self._current

    def rekey(self, token: str, aad: bytes = b"") -> str:
        """Re-encrypt a token under the current key; a current token is returned as is.

        ``aad`` must be the one the token was made with (it is kept).
        """
        if not self.needs_rekey(token):
            return token
        return self.encrypt(self.decrypt(token, aad=aad), aad=aad)


# --------------------------------------------------------------------------- lookup index

_NUMERIC_SEPARATORS = re.compile(r"[\s\-.()]")
_ASCII_DIGITS = re.compile(r"[0-9]+")


def normalise_identifier(identifier: str) -> str:
    """Canonical form of a WhatsApp identifier for hashing.

    A numeric ``wa_id`` however written (``+34 600 11-22-33``, ``34600112233``)
    becomes its bare digits; anything else (a BSUID such as ``US.1349...``) is
    kept as given apart from surrounding whitespace, because BSUIDs are opaque
    and case-sensitive.
    """
    stripped = identifier.strip()
    compact = _NUMERIC_SEPARATORS.sub("", stripped)
    compact = compact.removeprefix("+")
    if _ASCII_DIGITS.fullmatch(compact):
        return compact
    if not stripped:
        raise ValueError("empty identifier")
    return stripped


class KeyedIndex:
    """HMAC-SHA256 lookup values for citizen identifiers (`privacy.index_key`).

    Deterministic, so equal identifiers find the same row; keyed, so a leaked
    database cannot be reversed by hashing every phone number (a plain hash of
    the ~10**9 Spanish mobile numbers is brute-forced in seconds).

    ``previous`` keys (`privacy.previous_index_keys`) are retired by rotation: rows
    hashed with them are still found (`digests`) until `rekey` recomputes them.
    """

    def __init__(self, key: bytes, previous: Sequence[bytes] = ()) -> None:
        keys: list[bytes] = []
        for k in (key, *previous):
            if len(k) != _KEY_LEN:
                raise ValueError(f"index keys must be {_KEY_LEN} bytes, got {len(k)}")
            if not any(hmac.compare_digest(k, seen) for seen in keys):
                keys.append(k)
        self._keys = tuple(keys)
        # Message ids get a key derived for them alone: a wamid's hash can never equal
        # a citizen's, whatever the two strings are.
        self._wamid_key = hmac.new(key, _WAMID_DOMAIN, hashlib.sha256).digest()
        self._txn_key = hmac.new(key, _TXN_DOMAIN, hashlib.sha256).digest()

    def digest(self, identifier: str) -> str:
        """Hex HMAC-SHA256 of `normalise_identifier(identifier)` (64 chars), current key."""
        return self._mac(self._keys[0], identifier)

    def digests(self, identifier: str) -> tuple[str, ...]:
        """The lookup values under the current key, then under each previous key."""
        return tuple(self._mac(k, identifier) for k in self._keys)

    @staticmethod
    def _mac(key: bytes, identifier: str) -> str:
        data = normalise_identifier(identifier).encode("utf-8")
        return hmac.new(key, data, hashlib.sha256).hexdigest()

    def wamid(self, wamid: str) -> WamidHash:
        """The stored form of a WhatsApp message id: hex HMAC-SHA256 (64 chars) under
        the wamid key. A wamid is base64 that embeds the counterpart's number, so it is
        never stored as it is; lookups (statuses, replies, reactions, redeliveries) go
        by this hash. Ids are opaque: hashed exactly as given."""
        data = wamid.encode("utf-8", "surrogatepass")
        return WamidHash(hmac.new(self._wamid_key, data, hashlib.sha256).hexdigest())

    def txn(self, wamid: str, suffix: str = "") -> str:
        """Hex HMAC-SHA256 of a wamid (and a suffix) under a key of its own: what the
        Matrix transaction ids of its events derive from. Stable, so a retried message
        finds the events the homeserver stored; keyed, so the ids the homeserver keeps
        cannot be matched by hashing wamids (they embed numbers)."""
        data = (wamid + suffix).encode("utf-8", "surrogatepass")
        return hmac.new(self._txn_key, data, hashlib.sha256).hexdigest()


_WAMID_DOMAIN = b"civic-bridge wamid index v1"
_TXN_DOMAIN = b"civic-bridge matrix txn id v1"
_KEYED_HASH = re.compile(r"[0-9a-f]{64}")


def is_keyed_hash(value: str) -> bool:
    """Whether `value` has the shape of a `KeyedIndex` hash (64 lowercase hex): tells a
    value stored since revision 0010 from a wamid stored in clear before it."""
    return _KEYED_HASH.fullmatch(value) is not None


# --------------------------------------------------------------------------- pseudonyms

# Letters only: a localpart or code can never contain a digit, so it can never
# leak (part of) the phone number it stands for, by accident or by a bug.
LOCALPART_ALPHABET = "abcdefghijklmnopqrstuvwxyz"
_LOCALPART_LEN = 16  # 16 * log2(26) ~= 75.2 bits: collisions need ~2**37 ghosts.
# Consonants only, without vowels (and Y), so a code never spells a word (rude
# or otherwise) in Spanish, Catalan or English; no I/O to confuse with 1/0.
CODE_ALPHABET = "BCDFGHJKLMNPQRSTVWXZ"
_CODE_GROUP = 4  # two groups: 20**8 ~= 2.6e10 codes (~34.6 bits)


def new_localpart(prefix: str) -> str:
    """A fresh ghost localpart: ``prefix`` + 16 random lowercase letters (~75 bits)."""
    return prefix + "".join(secrets.choice(LOCALPART_ALPHABET) for _ in range(_LOCALPART_LEN))


def new_pseudonym_code() -> str:
    """A short human-friendly code like ``KQTR-MWXZ`` (~34.6 bits).

    Short enough to read over the phone, so not unique by construction: with
    10_000 citizens the chance of any repeat is ~0.2 %. Callers that need
    uniqueness draw again on a conflict (a UNIQUE column does this naturally).
    """
    groups = (
        "".join(secrets.choice(CODE_ALPHABET) for _ in range(_CODE_GROUP)) for _ in range(2)
    )
    return "-".join(groups)


def display_name(template: str, code: str) -> str:
    """The Matrix display name for a pseudonym code, e.g. ``Ciudadano/a KQTR-MWXZ``.

    Plain substitution rather than `str.format`, so stray braces in an
    operator's template cannot raise or pull in attributes.
    """
    return template.replace("{code}", code)


# Associated data binding each kind of ciphertext to its purpose: a token copied into
# another column does not decrypt there.
AAD_IDENTIFIER = b"citizen.identifier"
AAD_WA_ID = b"citizen.wa_id"
AAD_PAYLOAD = b"queue.payload"
# A bridge device's signed Megolm session key (bridge.matrix.keystore adds the row's owner,
# session and index, so a key copied to another row does not decrypt there).
AAD_ROOM_KEY = b"room_key.session_key"
# The random key the E2EE (nio) stores are pickled with, wrapped by the data key
# (bridge.matrix.storekey).
AAD_STORE_KEY = b"e2ee.store_key"


def data_keys(cfg: PrivacyConfig) -> list[bytes]:
    """`privacy.data_key`, then `privacy.previous_data_keys`, decoded."""
    return [base64.b64decode(k, validate=True)
            for k in (cfg.data_key, *cfg.previous_data_keys)]


def wamid_aad(wamid_hash: str) -> bytes:
    """A message map wamid's associated data: its own hash, so the ciphertext opens
    only in the row it was written for."""
    return b"message_map.wamid:" + wamid_hash.encode("ascii")


@dataclass(frozen=True, slots=True)
class Privacy:
    """The privacy primitives configured for this bridge, built once in the app."""

    cipher: Cipher
    index: KeyedIndex
    pseudonym_template: str = "Ciudadano/a {code}"

    @classmethod
    def from_config(cls, cfg: PrivacyConfig) -> Privacy:
        """Decode the base64 keys of a validated `PrivacyConfig`."""
        data_key, *previous = data_keys(cfg)
        index_key, *old_index = (base64.b64decode(k, validate=True)
                                 for k in (cfg.index_key, *cfg.previous_index_keys))
        return cls(
            cipher=Cipher(data_key, previous),
            index=KeyedIndex(index_key, old_index),
            pseudonym_template=cfg.pseudonym_template,
        )

    def display_name(self, code: str) -> str:
        """`display_name` with the configured template."""
        return display_name(self.pseudonym_template, code)

    def seal_wamid(self, wamid: str, digest: WamidHash | None = None
                   ) -> tuple[WamidHash, str]:
        """(keyed hash, ciphertext) of a wamid the bridge must be able to send back to
        Graph (a reply's context, a reaction's target, a read receipt). `digest`: its
        keyed hash (`KeyedIndex.wamid`) when the caller has it already."""
        if digest is None:
            digest = self.index.wamid(wamid)
        return digest, self.cipher.encrypt(wamid, aad=wamid_aad(digest))

    def open_wamid(self, wamid_hash: str, wamid_ct: str) -> str:
        """The wamid `seal_wamid` sealed (raises DecryptError if it was moved or altered)."""
        return self.cipher.decrypt_str(wamid_ct, aad=wamid_aad(wamid_hash))


# --------------------------------------------------------------------------- detectors

PERSONAL_ID_KINDS = ("phone", "dni", "nie", "iban", "card")

_IBAN = re.compile(r"(?<![A-Za-z0-9])[A-Za-z]{2}[0-9]{2}(?:[ \-]?[A-Za-z0-9]){11,32}")
_DNI = re.compile(r"(?<![A-Za-z0-9])[0-9]{2}\.?[0-9]{3}\.?[0-9]{3}[ \-]?[A-Za-z](?![A-Za-z0-9])")
_NIE = re.compile(r"(?<![A-Za-z0-9])[XYZxyz][ \-]?[0-9]{7}[ \-]?[A-Za-z](?![A-Za-z0-9])")
# A run of digits with single space/dash separators (how cards are written).
_DIGIT_RUN = re.compile(r"(?<![0-9])[0-9](?:[ \-]?[0-9])*(?![0-9])")
_EMAIL = re.compile(r"[^\s@<>()\[\]]+@[^\s@<>()\[\]]+\.[A-Za-z]{2,}")
_MIN_IBAN = 15  # Norway; the longest (Russia) is 33 and the regex allows 36


def _iban_spans(text: str) -> list[tuple[int, int]]:
    """Spans of valid IBANs, written compact or in groups."""
    spans = []
    for match in _IBAN.finditer(text):
        # Greedy matching may swallow a following word ("... 1332 para"); try
        # each prefix that ends at a group boundary, longest first. The country's
        # fixed length and the mod-97 check make a wrong hit very unlikely.
        ends = [
            i + 1
            for i in range(match.start(), match.end())
            if text[i].isalnum() and (i + 1 == len(text) or not text[i + 1].isalnum())
        ]
        for end in reversed(ends):
            if stdnum_iban.is_valid(text[match.start():end]):
                spans.append((match.start(), end))
                break
    return spans


def _mask(text: str, spans: Sequence[tuple[int, int]]) -> str:
    for start, end in spans:
        text = text[:start] + " " * (end - start) + text[end:]
    return text


def _has_phone(text: str) -> bool:
    # POSSIBLE leniency finds candidates; a national (no +/00) one must then be a
    # valid Spanish number, while an international one only needs a possible
    # length, since the metadata lags behind new ranges abroad.
    matcher = phonenumbers.PhoneNumberMatcher(text, "ES", leniency=phonenumbers.Leniency.POSSIBLE)
    for match in matcher:
        raw = match.raw_string.lstrip("( ")
        if phonenumbers.is_valid_number(match.number):
            return True
        if raw.startswith(("+", "00")) and phonenumbers.is_possible_number(match.number):
            return True
    return False


def looks_like_personal_id(text: str) -> list[str]:
    """Kinds of personal identifiers that ``text`` seems to contain.

    Returns a subset of ``("phone", "dni", "nie", "iban", "card")`` in that
    order. Meant to warn staff and remind citizens (requirement 13), so it errs
    towards flagging: checksums (DNI/NIE letter, IBAN mod 97, Luhn) keep
    ordinary numbers such as dates and amounts from being reported.
    """
    found: set[str] = set()
    ibans = _iban_spans(text)
    if ibans:
        found.add("iban")
    rest = _mask(text, ibans)
    for match in _DNI.finditer(rest):
        if stdnum_dni.is_valid(match.group().replace(".", "")):
            found.add("dni")
    for match in _NIE.finditer(rest):
        if stdnum_nie.is_valid(match.group()):
            found.add("nie")
    for match in _DIGIT_RUN.finditer(rest):
        digits = match.group().replace(" ", "").replace("-", "")
        if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
            found.add("card")
    if _has_phone(rest):
        found.add("phone")
    return [kind for kind in PERSONAL_ID_KINDS if kind in found]


def contains_phone_or_email(text: str) -> bool:
    """True if a user-chosen name could reveal a phone number or email address.

    Deliberately strict, as names are short: any email-like string, any phone
    number the parser recognises, or seven or more digits anywhere (in any
    script, separated or not) rejects the name.
    """
    if _EMAIL.search(text):
        return True
    if sum(ch.isdigit() for ch in text) >= 7:
        return True
    return _has_phone(text)
