"""Matrix HTML → WhatsApp markup, and the 4,096-character splitter."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bridge.whatsapp.markup import MAX_TEXT, html_to_whatsapp, split_text, utf16_len


@pytest.mark.parametrize(("html", "expected"), [
    ("<b>negrita</b> y <strong>fuerte</strong>", "*negrita* y *fuerte*"),
    ("<i>cursiva</i> <em>énfasis</em>", "_cursiva_ _énfasis_"),
    ("<del>tachado</del> <s>s</s> <strike>st</strike>", "~tachado~ ~s~ ~st~"),
    ("usa <code>x = 1</code>", "usa `x = 1`"),
    ("<b> con espacios </b>fin", "*con espacios* fin"),
    ("<b></b>vacío", "vacío"),
    ("<strong><em>ambos</em></strong>", "*_ambos_*"),
    ("<b>dos<br>líneas</b>", "*dos*\n*líneas*"),
    ("a &amp; b &lt;i&gt;", "a & b <i>"),
    ("<u>subrayado</u> <span data-mx-color='#f00'>color</span>", "subrayado color"),
])
def test_inline_markup(html: str, expected: str) -> None:
    assert html_to_whatsapp(html) == expected


def test_code_block_keeps_its_whitespace() -> None:
    html = "<p>Ejemplo:</p><pre><code>def f():\n    return  1\n</code></pre><p>fin</p>"
    assert html_to_whatsapp(html) == "Ejemplo:\n\n```def f():\n    return  1```\n\nfin"


def test_lists_ordered_unordered_and_nested() -> None:
    html = ("<ul>\n<li>uno</li>\n<li>dos<ol start='3'><li>tres</li><li>cuatro</li></ol></li>"
            "</ul><ol><li><p>a</p></li><li>b</li></ol>")
    assert html_to_whatsapp(html) == ("- uno\n- dos\n  3. tres\n  4. cuatro\n\n"
                                      "1. a\n2. b")


def test_links_as_text_and_url() -> None:
    html = ('Vea <a href="https://sede.ejemplo.es/tramite">la sede</a>, '
            '<a href="https://ejemplo.es">https://ejemplo.es</a>, '
            '<a href="mailto:info@ejemplo.es">info@ejemplo.es</a>, '
            '<a href="https://matrix.to/#/@ana:ejemplo.es">Ana</a> y '
            '<a href="javascript:alert(1)">esto</a>')
    assert html_to_whatsapp(html) == ("Vea la sede (https://sede.ejemplo.es/tramite), "
                                      "https://ejemplo.es, info@ejemplo.es, Ana y esto")


def test_blockquote_heading_and_paragraphs() -> None:
    html = "<h3>Horario</h3><blockquote><p>cita</p><p>otra</p></blockquote><p>Hola</p>"
    assert html_to_whatsapp(html) == "*Horario*\n\n> cita\n>\n> otra\n\nHola"


def test_reply_fallback_is_stripped() -> None:
    html = ("<mx-reply><blockquote><a href='https://matrix.to/#/!r/$e'>En respuesta a</a>"
            "<a href='https://matrix.to/#/@x:y'>@x:y</a><br>¿Qué necesito?</blockquote>"
            "</mx-reply>El <b>DNI</b>")
    assert html_to_whatsapp(html) == "El *DNI*"


def test_unclosed_and_misnested_tags() -> None:
    assert html_to_whatsapp("<p>uno<p>dos <b>tres<i>cuatro</b> cinco") == \
        "uno\n\ndos *tres_cuatro_* cinco"
    assert html_to_whatsapp("<script>x()</script><b>ok") == "*ok*"


def test_nul_characters_in_the_input_are_dropped() -> None:
    """NUL marks the converter's own placeholders: input cannot forge one."""
    assert html_to_whatsapp("a\x005\x00b<pre>x</pre>\x000\x00") == "a5b\n\n```x```\n\n0"


@given(st.text())
@settings(max_examples=200, deadline=None)  # timing varies on a shared machine
def test_converter_never_fails_on_any_input(html: str) -> None:
    assert isinstance(html_to_whatsapp(html), str)


def test_split_prefers_paragraphs_then_sentences() -> None:
    para = "Primera frase. " * 200  # 3,000 characters
    text = para.strip() + "\n\n" + para.strip()
    parts = split_text(text)
    assert parts == [para.strip(), para.strip()]
    long = "Esta es una frase de prueba. " * 300  # 8,700 characters, no paragraphs
    parts = split_text(long)
    assert len(parts) == 3 and all(p.endswith(".") for p in parts)
    assert all(utf16_len(p) <= MAX_TEXT for p in parts)


def test_split_short_text_is_one_part() -> None:
    assert split_text("  hola  ") == ["hola"]
    assert split_text("   ") == []


def test_split_counts_emoji_as_two_units() -> None:
    text = "😀" * 3000
    parts = split_text(text)
    assert "".join(parts) == text and all(utf16_len(p) <= MAX_TEXT for p in parts)


_words = st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs", "Zs", "Cc")),
                          min_size=1, max_size=12), min_size=1, max_size=200)
_separators = st.sampled_from([" ", "  ", "\n", "\n\n", ". ", "! ", ".\n\n", "\t"])


@given(_words, st.lists(_separators, min_size=200, max_size=200),
       st.integers(min_value=24, max_value=300))
@settings(max_examples=300, deadline=None)  # timing varies on a shared machine
def test_split_preserves_text_in_order_within_the_limit(
        words: list[str], seps: list[str], limit: int) -> None:
    text = "".join(w + s for w, s in zip(words, seps, strict=False))
    parts = split_text(text, limit)
    assert all(p and p == p.strip() and utf16_len(p) <= limit for p in parts)
    # Only whitespace between parts is dropped: the text, in order, is all there.
    assert re.sub(r"\s", "", "".join(parts)) == re.sub(r"\s", "", text)
    position = 0
    for part in parts:
        found = text.find(part, position)
        assert found >= position
        position = found + len(part)
        # Words are at most 12 characters (24 units): no part ends inside one.
        assert position == len(text) or text[position].isspace()


def test_split_limit_must_fit_any_character() -> None:
    with pytest.raises(ValueError, match="at least 2"):
        split_text("😀", 1)
    assert split_text("😀😀a", 2) == ["😀", "😀", "a"]


@given(st.text(min_size=1, max_size=2000), st.integers(min_value=2, max_value=100))
@settings(max_examples=200, deadline=None)  # timing varies on a shared machine
def test_split_any_text(text: str, limit: int) -> None:
    parts = split_text(text, limit)
    assert all(0 < utf16_len(p) <= limit for p in parts)
    assert re.sub(r"\s", "", "".join(parts)) == re.sub(r"\s", "", text)
