"""Parsed forms of the structured inbound types: contact cards, orders, Flow answers,
ad referrals. Sans-I/O, lenient like `webhook_parse`: a malformed part is dropped, an
unusable whole returns None (the message then arrives as "unsupported").

Reprs hide everything a citizen typed or shared (names, numbers, addresses, answers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Final

MAX_CARDS: Final = 20  # Meta allows 5 per send; more than 20 is not a real card list
MAX_FIELDS: Final = 20  # per card list (phones, emails...) and per order/Flow
MAX_TEXT: Final = 1000


def _s(value: Any) -> str | None:
    """A non-empty string, stripped and bounded; numbers are kept as their text."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) or (isinstance(value, float) and math.isfinite(value)):
        value = str(value)
    if not isinstance(value, str):
        return None
    value = value.strip()[:MAX_TEXT]
    return value or None


def _d(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _items(value: Any) -> list[dict[str, Any]]:
    return [v for v in value if isinstance(v, dict)][:MAX_FIELDS] if isinstance(value,
                                                                                list) else []


@dataclass(frozen=True, slots=True)
class CardValue:
    """One phone, email or URL of a card, with its label (HOME, WORK...)."""

    value: str = field(repr=False)
    type: str | None = None


@dataclass(frozen=True, slots=True)
class CardAddress:
    street: str | None = field(default=None, repr=False)
    city: str | None = field(default=None, repr=False)
    state: str | None = field(default=None, repr=False)
    zip: str | None = field(default=None, repr=False)
    country: str | None = field(default=None, repr=False)
    type: str | None = None


@dataclass(frozen=True, slots=True)
class ContactCard:
    """A contact card the citizen chose to share (message type `contacts`)."""

    formatted_name: str | None = field(default=None, repr=False)
    first_name: str | None = field(default=None, repr=False)
    last_name: str | None = field(default=None, repr=False)
    company: str | None = field(default=None, repr=False)
    department: str | None = field(default=None, repr=False)
    job_title: str | None = field(default=None, repr=False)
    birthday: str | None = field(default=None, repr=False)
    phones: tuple[CardValue, ...] = field(default=(), repr=False)
    emails: tuple[CardValue, ...] = field(default=(), repr=False)
    urls: tuple[CardValue, ...] = field(default=(), repr=False)
    addresses: tuple[CardAddress, ...] = field(default=(), repr=False)

    @property
    def display_name(self) -> str | None:
        joined = " ".join(p for p in (self.first_name, self.last_name) if p)
        return self.formatted_name or joined or self.company


def _values(items: Any, key: str) -> tuple[CardValue, ...]:
    found = []
    for item in _items(items):
        if (value := _s(item.get(key))) is not None:
            found.append(CardValue(value, _s(item.get("type"))))
    return tuple(found)


def _card(obj: dict[str, Any]) -> ContactCard | None:
    name, org = _d(obj.get("name")), _d(obj.get("org"))
    card = ContactCard(
        formatted_name=_s(name.get("formatted_name")),
        first_name=_s(name.get("first_name")),
        last_name=_s(name.get("last_name")),
        company=_s(org.get("company")),
        department=_s(org.get("department")),
        job_title=_s(org.get("title")),
        birthday=_s(obj.get("birthday")),
        phones=_values(obj.get("phones"), "phone"),
        emails=_values(obj.get("emails"), "email"),
        urls=_values(obj.get("urls"), "url"),
        addresses=tuple(
            CardAddress(_s(a.get("street")), _s(a.get("city")), _s(a.get("state")),
                        _s(a.get("zip")), _s(a.get("country")), _s(a.get("type")))
            for a in _items(obj.get("addresses"))),
    )
    usable = card.display_name or card.phones or card.emails
    return card if usable else None


def parse_contacts(value: Any) -> tuple[ContactCard, ...]:
    """The usable cards of a `contacts` message (empty: nothing usable)."""
    if not isinstance(value, list):
        return ()
    cards = (_card(obj) for obj in value[:MAX_CARDS] if isinstance(obj, dict))
    return tuple(c for c in cards if c is not None)


@dataclass(frozen=True, slots=True)
class OrderItem:
    product_retailer_id: str
    quantity: str
    item_price: str | None
    currency: str | None


@dataclass(frozen=True, slots=True)
class Order:
    """An order from the business's catalogue (message type `order`)."""

    catalog_id: str | None
    text: str | None = field(repr=False)
    items: tuple[OrderItem, ...]


def parse_order(obj: dict[str, Any]) -> Order | None:
    items = []
    for item in _items(obj.get("product_items")):
        product = _s(item.get("product_retailer_id"))
        if product is not None:
            items.append(OrderItem(product, _s(item.get("quantity")) or "1",
                                   _s(item.get("item_price")), _s(item.get("currency"))))
    text = _s(obj.get("text"))
    if not items and text is None:
        return None
    return Order(_s(obj.get("catalog_id")), text, tuple(items))


@dataclass(frozen=True, slots=True)
class FlowReply:
    """The answers of a WhatsApp Flow (`interactive.nfm_reply`), as (field, text) pairs.

    `flow_token` is the business's own correlation id, not an answer: it is dropped.
    """

    name: str | None
    answers: tuple[tuple[str, str], ...] = field(repr=False)


def _answer_text(value: Any) -> str | None:
    if isinstance(value, bool):
        return "sí" if value else "no"
    if isinstance(value, list):
        parts = [t for t in (_answer_text(v) for v in value[:MAX_FIELDS]) if t]
        return ", ".join(parts)[:MAX_TEXT] or None
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))[:MAX_TEXT]
    return _s(value)


def parse_flow(obj: dict[str, Any]) -> FlowReply:
    raw = obj.get("response_json")
    try:
        decoded = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        decoded = None
    answers = []
    if isinstance(decoded, dict):
        for key, value in list(decoded.items())[:MAX_FIELDS + 1]:
            text = _answer_text(value)
            if key != "flow_token" and text is not None:
                answers.append((str(key)[:100], text))
    return FlowReply(_s(obj.get("name")), tuple(answers[:MAX_FIELDS]))


@dataclass(frozen=True, slots=True)
class Referral:
    """Where a message came from when the citizen tapped an ad or post.

    The click id (`ctwa_clid`) is a tracking identifier: not kept.
    """

    source_type: str | None
    source_url: str | None
    headline: str | None
    body: str | None = field(repr=False)


def parse_referral(value: Any) -> Referral | None:
    obj = _d(value)
    referral = Referral(_s(obj.get("source_type")), _s(obj.get("source_url")),
                        _s(obj.get("headline")), _s(obj.get("body")))
    return referral if any((referral.source_url, referral.headline, referral.body)) else None
