"""The outbox's `biz_opaque_callback_data`: what it sets on a send, and what it accepts
back from a status (anything else names no row)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bridge.whatsapp.limits import MAX_CALLBACK_DATA
from bridge.whatsapp.outbox import callback_data, callback_item


@pytest.mark.parametrize("item_id", [1, 42, 10**12])
def test_round_trip(item_id: int) -> None:
    data = callback_data(item_id)
    assert data == f"cb1.{item_id}" and len(data) <= MAX_CALLBACK_DATA
    assert callback_item(data) == item_id


@pytest.mark.parametrize("junk", [None, "", "cb1.", "cb1.0", "cb1.-1", "cb1.01", "cb1.1 ",
                                  " cb1.1", "cb1.1.2", "cb2.1", "CB1.1", "cb1.abc",
                                  "cb1.\uff11\uff12", "cb1." + "9" * 19, "wamid.cb1.1"])
def test_junk_names_no_row(junk: Any) -> None:
    assert callback_item(junk) is None


@given(st.text(max_size=40))
def test_only_our_own_format_names_a_row(text: str) -> None:
    item_id = callback_item(text)
    assert item_id is None or (item_id > 0 and callback_data(item_id) == text)
