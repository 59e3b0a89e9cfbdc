"""Privacy primitives: encryption, keyed index, pseudonyms, personal-id detection."""

from __future__ import annotations

import base64
import re
import string

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from bridge.config import PrivacyConfig
from bridge.privacy import (
    CODE_ALPHABET,
    Cipher,
    DecryptError,
    KeyedIndex,
    Privacy,
    contains_phone_or_email,
    data_keys,
    display_name,
    is_keyed_hash,
    key_id,
    looks_like_personal_id,
    new_localpart,
    new_pseudonym_code,
    normalise_identifier,
)

KEY_A = bytes(range(32))
KEY_B = bytes(range(100, 132))
KEY_C = b"\xa5" * 32
TOKEN_RE = re.compile(r"v1\.[0-9a-f]{8}\.[A-Za-z0-9_-]+")
DEFAULT_TEMPLATE = "Ciudadano/a {code}"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def flip_bit(token: str, bit: int) -> str:
    raw = bytearray(token.encode("ascii"))
    raw[bit // 8] ^= 1 << (bit % 8)
    return raw.decode("latin-1")


def phone_digits(text: str) -> str:
    return re.sub(r"[^0-9]", "", text)


# --------------------------------------------------------------------------- Cipher


@given(st.binary())
def test_cipher_round_trips_bytes(data: bytes) -> None:
    cipher = Cipher(KEY_A)
    token = cipher.encrypt(data)
    assert TOKEN_RE.fullmatch(token)
    assert cipher.decrypt(token) == data


@given(st.text())
def test_cipher_round_trips_text(text: str) -> None:
    cipher = Cipher(KEY_A)
    assert cipher.decrypt_str(cipher.encrypt(text)) == text


@given(json_values)
def test_cipher_round_trips_json(value: object) -> None:
    cipher = Cipher(KEY_A)
    assert cipher.decrypt_json(cipher.encrypt_json(value, aad=b"row"), aad=b"row") == value


def test_token_format_names_current_key() -> None:
    token = Cipher(KEY_A).encrypt("34600112233")
    version, kid, body = token.split(".")
    assert (version, kid) == ("v1", key_id(KEY_A))
    # 12-byte nonce + 11-byte plaintext + 16-byte tag
    assert len(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))) == 12 + 11 + 16


@settings(max_examples=60)
@given(st.binary(max_size=40), st.data())
def test_any_single_bit_flip_is_rejected(data: bytes, draw: st.DataObject) -> None:
    cipher = Cipher(KEY_A)
    token = cipher.encrypt(data)
    bit = draw.draw(st.integers(0, len(token) * 8 - 1), label="bit")
    with pytest.raises(DecryptError):
        cipher.decrypt(flip_bit(token, bit))


@pytest.mark.parametrize("size", [9, 10, 11])  # every length mod 3: with and without
def test_every_bit_flip_is_rejected(size: int) -> None:  # unused base64 bits at the end
    cipher = Cipher(KEY_A, [KEY_B])
    token = cipher.encrypt(b"3" * size, aad=b"citizen.wa_id")
    for bit in range(len(token) * 8):
        with pytest.raises(DecryptError):
            cipher.decrypt(flip_bit(token, bit), aad=b"citizen.wa_id")


@given(st.binary(max_size=40), st.data())
def test_truncated_or_extended_token_is_rejected(data: bytes, draw: st.DataObject) -> None:
    cipher = Cipher(KEY_A)
    token = cipher.encrypt(data)
    cut = draw.draw(st.integers(0, len(token) - 1), label="cut")
    with pytest.raises(DecryptError):
        cipher.decrypt(token[:cut])
    extra = draw.draw(st.sampled_from(["A", "=", "AA", "_-", "."]), label="extra")
    with pytest.raises(DecryptError):
        cipher.decrypt(token + extra)


@given(st.text(min_size=12) | st.from_regex(r"\+?[0-9]{12,15}", fullmatch=True))
def test_token_never_contains_plaintext(text: str) -> None:
    token = Cipher(KEY_A).encrypt(text)
    assert text not in token
    assert token.isascii()


def test_same_plaintext_encrypts_differently() -> None:
    cipher = Cipher(KEY_A)
    tokens = {cipher.encrypt("34600112233") for _ in range(200)}
    assert len(tokens) == 200


def test_rotation_old_tokens_decrypt_and_rekey() -> None:
    old = Cipher(KEY_A)
    token = old.encrypt("34600112233", aad=b"citizen.wa_id")
    rotated = Cipher(KEY_B, [KEY_A])
    assert rotated.decrypt_str(token, aad=b"citizen.wa_id") == "34600112233"
    assert rotated.needs_rekey(token)

    fresh = rotated.rekey(token, aad=b"citizen.wa_id")
    assert fresh.split(".")[1] == key_id(KEY_B) == rotated.current_key_id
    assert not rotated.needs_rekey(fresh)
    assert rotated.rekey(fresh, aad=b"citizen.wa_id") == fresh
    # Once the old key is dropped only the rekeyed token survives.
    new_only = Cipher(KEY_B)
    assert new_only.decrypt_str(fresh, aad=b"citizen.wa_id") == "34600112233"
    with pytest.raises(DecryptError):
        new_only.decrypt(token, aad=b"citizen.wa_id")


def test_new_tokens_use_current_key() -> None:
    rotated = Cipher(KEY_B, [KEY_A])
    assert rotated.encrypt("x").split(".")[1] == key_id(KEY_B)
    assert not rotated.needs_rekey(rotated.encrypt("x"))


def test_unknown_key_id_is_rejected_without_leaking() -> None:
    token = Cipher(KEY_A).encrypt("34600112233")
    with pytest.raises(DecryptError) as info:
        Cipher(KEY_B, [KEY_C]).decrypt(token)
    message = str(info.value)
    assert "34600112233" not in message
    assert token.split(".")[2] not in message
    assert base64.b64encode(KEY_A).decode() not in message
    assert base64.b64encode(KEY_B).decode() not in message


def test_key_id_swap_to_another_configured_key_is_rejected() -> None:
    cipher = Cipher(KEY_B, [KEY_A])
    token = Cipher(KEY_A).encrypt("34600112233")
    forged = token.replace(key_id(KEY_A), key_id(KEY_B), 1)
    with pytest.raises(DecryptError):
        cipher.decrypt(forged)


@given(st.binary(max_size=64), st.binary(max_size=16), st.binary(max_size=16))
def test_aad_mismatch_is_rejected(data: bytes, aad: bytes, other: bytes) -> None:
    assume(aad != other)
    cipher = Cipher(KEY_A)
    token = cipher.encrypt(data, aad=aad)
    assert cipher.decrypt(token, aad=aad) == data
    with pytest.raises(DecryptError):
        cipher.decrypt(token, aad=other)


@pytest.mark.parametrize(
    "token",
    ["", "v1", "v1..", "v2.00000000.AAAA", "v1.ABCDEF12.AAAA", "v1.0000000.AAAA",
     "v1.00000000.AAAA", "v1.00000000.!!!!", " v1.00000000.AAAA", "v1.00000000.AAA="],
)
def test_malformed_tokens_are_rejected(token: str) -> None:
    with pytest.raises(DecryptError):
        Cipher(KEY_A).decrypt(token)


def test_needs_rekey_rejects_malformed() -> None:
    with pytest.raises(DecryptError):
        Cipher(KEY_A).needs_rekey("not-a-token")


def test_decrypt_str_and_json_reject_wrong_payloads() -> None:
    cipher = Cipher(KEY_A)
    with pytest.raises(DecryptError):
        cipher.decrypt_str(cipher.encrypt(b"\xff\xfe"))
    with pytest.raises(DecryptError):
        cipher.decrypt_json(cipher.encrypt("{not json"))


def test_cipher_rejects_bad_keys() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        Cipher(b"short")
    with pytest.raises(ValueError, match="32 bytes"):
        Cipher(KEY_A, [b"x" * 16])
    # Listing the current key among the previous ones is harmless.
    cipher = Cipher(KEY_A, [KEY_A, KEY_B, KEY_B])
    assert cipher.decrypt(Cipher(KEY_B).encrypt(b"ok")) == b"ok"


# --------------------------------------------------------------------------- KeyedIndex


def test_index_is_deterministic_and_hex() -> None:
    index = KeyedIndex(KEY_A)
    digest = index.digest("34600112233")
    assert digest == KeyedIndex(KEY_A).digest("34600112233")
    assert re.fullmatch(r"[0-9a-f]{64}", digest)
    assert "34600112233" not in digest


@pytest.mark.parametrize(
    "written", ["+34 600 11 22 33", "34600112233", " +34600112233 ", "+34 600-11-22-33",
                "(+34) 600.11.22.33"],
)
def test_index_normalises_phone_spellings(written: str) -> None:
    index = KeyedIndex(KEY_A)
    assert index.digest(written) == index.digest("34600112233")


def test_index_keeps_bsuids_as_is() -> None:
    index = KeyedIndex(KEY_A)
    assert normalise_identifier("US.13491208655302741918") == "US.13491208655302741918"
    assert index.digest("US.AbCdEfGh12") != index.digest("us.abcdefgh12")
    assert index.digest("US.13491208655302741918") != index.digest("13491208655302741918")


def test_index_rejects_empty() -> None:
    with pytest.raises(ValueError):
        KeyedIndex(KEY_A).digest("  ")
    with pytest.raises(ValueError):
        KeyedIndex(b"short")


@given(st.from_regex(r"[1-9][0-9]{7,14}", fullmatch=True), st.data())
def test_index_ignores_separators_in_numbers(digits: str, draw: st.DataObject) -> None:
    seps = draw.draw(st.lists(st.sampled_from(["", " ", "-", "."]), min_size=len(digits),
                              max_size=len(digits)), label="seps")
    written = "+" + "".join(d + s for d, s in zip(digits, seps, strict=True))
    index = KeyedIndex(KEY_A)
    assert index.digest(written.strip()) == index.digest(digits)


@given(st.text(min_size=1, max_size=30).filter(lambda s: s.strip()))
def test_different_keys_give_different_digests(identifier: str) -> None:
    assert KeyedIndex(KEY_A).digest(identifier) != KeyedIndex(KEY_B).digest(identifier)


def test_previous_index_keys_give_the_old_lookup_values_after_the_current_one() -> None:
    rotated = KeyedIndex(KEY_B, [KEY_A, KEY_B, KEY_A])  # repeats count once
    assert rotated.digest("34600112233") == KeyedIndex(KEY_B).digest("+34 600 11 22 33")
    assert rotated.digests("34600112233") == (KeyedIndex(KEY_B).digest("34600112233"),
                                              KeyedIndex(KEY_A).digest("34600112233"))
    assert KeyedIndex(KEY_A).digests("x") == (KeyedIndex(KEY_A).digest("x"),)
    with pytest.raises(ValueError, match="32 bytes"):
        KeyedIndex(KEY_A, [b"short"])


def test_is_token_accepts_only_well_formed_tokens_of_any_key() -> None:
    token = Cipher(KEY_A).encrypt("x")
    assert Cipher.is_token(token) and Cipher(KEY_B).is_token(token)
    for value in (None, 3, "", "v1.", "{}", "v1.0000000g.AAAA", token[:-1] + "*",
                  "v1.00000000.AAAA"):
        assert not Cipher.is_token(value), value


identifiers = st.from_regex(r"[1-9][0-9]{7,14}", fullmatch=True) | st.from_regex(
    r"[A-Z]{2}\.[A-Za-z0-9]{8,24}", fullmatch=True
)


@given(st.lists(identifiers, min_size=2, max_size=300, unique_by=normalise_identifier))
def test_distinct_identifiers_do_not_collide(ids: list[str]) -> None:
    index = KeyedIndex(KEY_A)
    assert len({index.digest(i) for i in ids}) == len(ids)


def test_ten_thousand_numbers_do_not_collide() -> None:
    index = KeyedIndex(KEY_A)
    digests = {index.digest(f"34600{n:06d}") for n in range(10_000)}
    assert len(digests) == 10_000


WAMID = "wamid.HBgLMzQ2MDAxMTIyMzMVAgASGBQzRUIwRjJCMjQ4NjA2QzU3MTk0NQA="


def test_wamid_hash_is_keyed_hex_and_never_a_citizen_digest() -> None:
    index = KeyedIndex(KEY_A)
    digest = index.wamid(WAMID)
    assert digest == KeyedIndex(KEY_A).wamid(WAMID) and is_keyed_hash(digest)
    assert digest != KeyedIndex(KEY_B).wamid(WAMID)
    # A key of its own: the same string hashed as an identifier gives something else.
    assert digest != index.digest(WAMID)
    assert index.wamid("34600112233") != index.digest("34600112233")
    # Opaque: not normalised like a number.
    assert index.wamid(" " + WAMID) != digest
    assert not is_keyed_hash(WAMID) and not is_keyed_hash(digest.upper())


@given(st.lists(st.text(min_size=1, max_size=80), min_size=2, max_size=100, unique=True))
def test_distinct_wamids_do_not_collide(wamids: list[str]) -> None:
    index = KeyedIndex(KEY_A)
    assert len({index.wamid(w) for w in wamids}) == len(wamids)


def test_a_sealed_wamid_opens_only_with_its_own_hash() -> None:
    privacy = Privacy(cipher=Cipher(KEY_B), index=KeyedIndex(KEY_C))
    digest, sealed = privacy.seal_wamid(WAMID)
    assert digest == privacy.index.wamid(WAMID) and WAMID not in sealed
    assert privacy.open_wamid(digest, sealed) == WAMID
    other, _ = privacy.seal_wamid(WAMID + "x")
    with pytest.raises(DecryptError):  # copied to another row of the message map
        privacy.open_wamid(other, sealed)
    with pytest.raises(DecryptError):  # or to another column
        privacy.cipher.decrypt_str(sealed)


# --------------------------------------------------------------------------- pseudonyms


def test_localpart_format() -> None:
    localpart = new_localpart("cb_")
    assert re.fullmatch(r"cb_[a-z]{16}", localpart)


def test_code_format() -> None:
    code = new_pseudonym_code()
    assert re.fullmatch(r"[A-Z]{4}-[A-Z]{4}", code)
    assert set(code.replace("-", "")) <= set(CODE_ALPHABET)
    assert not set(CODE_ALPHABET) & set("AEIOUY")


def test_ten_thousand_localparts_are_unique() -> None:
    localparts = [new_localpart("cb_") for _ in range(10_000)]
    assert len(set(localparts)) == 10_000


def test_ten_thousand_codes_are_unique_up_to_birthday_bound() -> None:
    # 20**8 ~ 2.6e10 codes: among 10_000 the expected number of repeated pairs
    # is ~0.002, so one repeat is possible (callers retry on conflict) but two
    # would mean far less randomness than claimed (P ~ 2e-6 by chance).
    codes = [new_pseudonym_code() for _ in range(10_000)]
    assert 10_000 - len(set(codes)) <= 1
    # Every letter of the alphabet is used in every position (no stuck position).
    for pos in (0, 3, 5, 8):
        assert {c[pos] for c in codes} == set(CODE_ALPHABET)


@given(st.from_regex(r"\+?[0-9][0-9 \-]{6,16}[0-9]", fullmatch=True))
def test_pseudonyms_contain_no_digits_of_phone(phone: str) -> None:
    digits = set(phone_digits(phone))
    code = new_pseudonym_code()
    generated = [new_localpart("cb_"), code, display_name(DEFAULT_TEMPLATE, code)]
    for value in generated:
        assert not digits & set(value)
        assert not any(ch.isdigit() for ch in value)


def test_display_name_uses_template_literally() -> None:
    assert display_name(DEFAULT_TEMPLATE, "KQTR-MWXZ") == "Ciudadano/a KQTR-MWXZ"
    assert display_name("{code} } {0} {code}", "KQTR-MWXZ") == "KQTR-MWXZ } {0} KQTR-MWXZ"


# --------------------------------------------------------------------------- Privacy


def _b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_privacy_from_config() -> None:
    cfg = PrivacyConfig(data_key=_b64(KEY_B), index_key=_b64(KEY_C),
                        previous_data_keys=[_b64(KEY_A)], pseudonym_template="Vecino/a {code}")
    privacy = Privacy.from_config(cfg)
    old_token = Cipher(KEY_A).encrypt("34600112233")
    assert privacy.cipher.decrypt_str(old_token) == "34600112233"
    assert privacy.cipher.current_key_id == key_id(KEY_B)
    assert privacy.index.digest("+34 600112233") == KeyedIndex(KEY_C).digest("34600112233")
    assert privacy.display_name("KQTR-MWXZ") == "Vecino/a KQTR-MWXZ"
    assert data_keys(cfg) == [KEY_B, KEY_A]


def test_privacy_from_config_with_a_previous_index_key() -> None:
    cfg = PrivacyConfig(data_key=_b64(KEY_B), index_key=_b64(KEY_C),
                        previous_index_keys=[_b64(KEY_A)])
    assert Privacy.from_config(cfg).index.digests("x") == (KeyedIndex(KEY_C).digest("x"),
                                                           KeyedIndex(KEY_A).digest("x"))


def test_privacy_default_template() -> None:
    cfg = PrivacyConfig(data_key=_b64(KEY_B), index_key=_b64(KEY_C))
    assert Privacy.from_config(cfg).display_name("ABCD-FGHJ") == "Ciudadano/a ABCD-FGHJ"


# --------------------------------------------------------------------------- detectors

DNI_LETTERS = "TRWAGMYFPDXBNJZSQVHLCKE"


def dni(number: int) -> str:
    return f"{number:08d}{DNI_LETTERS[number % 23]}"


def nie(prefix: str, number: int) -> str:
    value = int("XYZ".index(prefix) * 10**7 + number)
    return f"{prefix}{number:07d}{DNI_LETTERS[value % 23]}"


def luhn_complete(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:
            d = d * 2 - 9 if d * 2 > 9 else d * 2
        total += d
    return partial + str((10 - total % 10) % 10)


@given(st.integers(0, 99_999_999))
def test_detects_dni_with_correct_letter_only(number: int) -> None:
    good = dni(number)
    assert "dni" in looks_like_personal_id(f"mi DNI es {good}, gracias")
    wrong = good[:-1] + DNI_LETTERS[(number + 1) % 23]
    assert "dni" not in looks_like_personal_id(f"mi DNI es {wrong}, gracias")


def test_detects_dni_spellings() -> None:
    assert looks_like_personal_id("12345678Z") == ["dni"]
    assert looks_like_personal_id("DNI 12.345.678-z") == ["dni"]


@given(st.sampled_from("XYZ"), st.integers(0, 9_999_999))
def test_detects_nie(prefix: str, number: int) -> None:
    assert "nie" in looks_like_personal_id(f"NIE {nie(prefix, number)}")


def test_detects_iban() -> None:
    for text in ["ES9121000418450200051332", "cuenta ES91 2100 0418 4502 0005 1332 para pagar",
                 "es91 2100 0418 4502 0005 1332", "IBAN: DE89 3704 0044 0532 0130 00."]:
        assert looks_like_personal_id(text) == ["iban"], text
    assert "iban" not in looks_like_personal_id("ES9221000418450200051332")


@given(st.from_regex(r"4[0-9]{14}", fullmatch=True), st.sampled_from(["", " ", "-"]))
def test_detects_luhn_valid_cards(partial: str, sep: str) -> None:
    number = luhn_complete(partial)
    written = sep.join(number[i : i + 4] for i in range(0, 16, 4))
    assert "card" in looks_like_personal_id(f"tarjeta {written} caduca 12/27")
    bad = number[:-1] + str((int(number[-1]) + 1) % 10)
    assert "card" not in looks_like_personal_id(f"tarjeta {bad}")


def test_detects_known_cards() -> None:
    assert looks_like_personal_id("4111 1111 1111 1111") == ["card"]
    assert looks_like_personal_id("amex 378282246310005") == ["card"]


@pytest.mark.parametrize(
    "text",
    ["llámame al 600 11 22 33", "mi móvil: 612345678", "+34 612 34 56 78", "0034612345678",
     "+44 7911 123456", "fijo 91 123 45 67"],
)
def test_detects_phones(text: str) -> None:
    assert looks_like_personal_id(text) == ["phone"]


def test_reports_several_kinds_in_fixed_order() -> None:
    text = f"tel 612345678, DNI {dni(12345678)}, IBAN ES9121000418450200051332"
    assert looks_like_personal_id(text) == ["phone", "dni", "iban"]


@pytest.mark.parametrize(
    "text",
    ["La cita es el 27/11/2026 a las 10:30.", "Importe: 1.234,56 € (IVA incluido)",
     "El plazo termina el 2026-11-27T21:00:00", "Expediente 2026/000123, registro 45",
     "Tengo 34 años y 2 hijos", "Pago de 600 euros el 12 de marzo de 2025",
     "código postal 08001, Barcelona", "Hola, ¿a qué hora abre el ayuntamiento?", ""],
)
def test_ordinary_text_is_not_flagged(text: str) -> None:
    assert looks_like_personal_id(text) == []


@given(st.text(alphabet=string.ascii_letters + " .,;:!?¿¡áéíóúñ", max_size=200))
def test_digit_free_text_is_never_flagged(text: str) -> None:
    assert looks_like_personal_id(text) == []


@pytest.mark.parametrize(
    "name",
    ["ana@example.org", "Ana 600 11 22 33", "Pepe +34612345678", "6 1 2 3 4 5 6 7 8",
     "contacto: x.y@ayto.es",
     "Luis \uff16\uff11\uff12\uff13\uff14\uff15\uff16\uff17\uff18"],  # fullwidth digits
)
def test_pseudonym_with_phone_or_email_is_rejected(name: str) -> None:
    assert contains_phone_or_email(name)


@pytest.mark.parametrize("name", ["Ana García", "Juan 1990", "Vecina del 3º B", "María-José"])
def test_plain_names_are_accepted(name: str) -> None:
    assert not contains_phone_or_email(name)
