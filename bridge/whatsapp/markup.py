"""Matrix formatting → WhatsApp markup, and long texts → WhatsApp-sized parts.

Pure: imports nothing but the standard library. The HTML is parsed with the standard
library's `html.parser` (a tolerant tokenizer that copes with the unclosed and
misnested tags clients send), never with regexes: each element renders its children
into a string that it then wraps, prefixes or drops.

WhatsApp's own syntax: `*bold*`, `_italic_`, `~strike~`, ```monospace``` blocks,
`inline code`, `- ` and `1. ` lists, `> ` quotes. A marker only works next to
non-space text on the same line, so inline markers are applied per line and the
whitespace is moved outside them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from html.parser import HTMLParser

MAX_TEXT = 4096  # Graph's limit on text.body
MAX_CAPTION = 1024  # Graph's limit on a media caption

_INLINE = {"b": "*", "strong": "*", "i": "_", "em": "_", "s": "~", "del": "~",
           "strike": "~"}
_HEADINGS = frozenset({"h1", "h2", "h3", "h4", "h5", "h6"})
_BLOCKS = frozenset({"p", "div", "blockquote", "pre", "ul", "ol", "li", "table", "tr",
                     "details", "summary", "hr", *_HEADINGS})
_VOID = frozenset({"br", "hr", "img", "input", "meta", "link", "wbr", "col", "area",
                   "base", "embed", "source", "track"})
_SKIPPED = frozenset({"mx-reply", "script", "style", "head", "title"})
_PLACEHOLDER = re.compile("\x00(\\d+)\x00")


@dataclass
class _Frame:
    tag: str
    attrs: dict[str, str]
    parts: list[str] = field(default_factory=list)
    items: int = 0  # list items or table cells seen so far

    def text(self) -> str:
        return "".join(self.parts)


def _wrap_lines(text: str, marker: str) -> str:
    """`marker` around the non-blank text of each line, whitespace kept outside."""
    out = []
    for line in text.split("\n"):
        core = line.strip()
        if not core:
            out.append(line)
            continue
        start = line.index(core[0])
        out.append(f"{line[:start]}{marker}{core}{marker}{line[start + len(core):]}")
    return "\n".join(out)


def _prefix_lines(text: str, first: str, rest: str) -> str:
    lines = text.split("\n")
    return "\n".join([first + lines[0], *(rest + line if line else rest.rstrip()
                                          for line in lines[1:])])


def _link(text: str, href: str) -> str:
    href = href.strip()
    if href.startswith("https://matrix.to/#/"):
        return text  # a mention or room link: its name, never a Matrix address
    if href.startswith("mailto:"):
        address = href[len("mailto:"):]
        return text if text.strip() in (address, "") else f"{text} ({address})"
    if not href.startswith(("http://", "https://")):
        return text
    bare = text.strip()
    if not bare or bare in (href, href.split("://", 1)[1], href.rstrip("/")):
        return href
    return f"{text} ({href})"


class _Converter(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[_Frame] = [_Frame("#root", {})]
        self.blocks: list[str] = []  # rendered <pre> blocks, kept out of later rewriting
        self.skipping = 0
        self.pre = 0

    # -- tokenizer callbacks -------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self.skipping:
            if tag in _SKIPPED:
                self.skipping += 1
            return
        if tag in _SKIPPED:
            self.skipping = 1
            return
        values = {k: (v or "").replace("\x00", "") for k, v in attrs}
        if tag == "br":
            self._emit("\n")
        elif tag == "hr":
            self._emit("\n\n———\n\n")
        elif tag == "img":
            self._emit(values.get("alt") or values.get("title") or "")
        elif tag not in _VOID:
            if tag == "li":
                self._close_until({"li"}, stop={"ul", "ol"})
            elif tag == "p":
                self._close_until({"p"}, stop=_BLOCKS - {"p"})
            if tag == "pre":
                self.pre += 1
            self.stack.append(_Frame(tag, values))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.handle_starttag(tag, attrs)
        if tag not in _VOID:
            self.handle_endtag(tag)

    def handle_endtag(self, tag: str) -> None:
        if self.skipping:
            if tag in _SKIPPED:
                self.skipping -= 1
            return
        if any(frame.tag == tag for frame in self.stack[1:]):
            self._close_until({tag})

    def handle_data(self, data: str) -> None:
        if self.skipping:
            return
        data = data.replace("\x00", "")  # NUL marks our placeholders: never from input
        if self.pre:
            self._emit(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self._at_line_start():
            text = text.lstrip(" ")
        self._emit(text)

    # -- rendering -----------------------------------------------------------------------

    def _emit(self, text: str) -> None:
        if text:
            self.stack[-1].parts.append(text)

    def _at_line_start(self) -> bool:
        for frame in reversed(self.stack):
            for part in reversed(frame.parts):
                if part:
                    return part.endswith((" ", "\n"))
            if frame.tag in _BLOCKS:
                return True
        return True

    def _close_until(self, tags: set[str], stop: frozenset[str] | set[str] = frozenset()
                     ) -> None:
        """Close frames down to and including the innermost one in `tags` (an open
        frame in `stop` first means there is none to close)."""
        for index in range(len(self.stack) - 1, 0, -1):
            if self.stack[index].tag in tags:
                break
            if self.stack[index].tag in stop:
                return
        else:
            return
        while len(self.stack) > index:
            self._close_top()

    def _close_top(self) -> None:
        frame = self.stack.pop()
        parent = self.stack[-1]
        parent.parts.append(self._render(frame, parent))

    def _render(self, frame: _Frame, parent: _Frame) -> str:
        tag, text = frame.tag, frame.text()
        if tag == "pre":
            self.pre -= 1
            code = text.strip("\n")
            if not code.strip():
                return ""
            self.blocks.append(f"```{code}```")
            return f"\n\n\x00{len(self.blocks) - 1}\x00\n\n"
        if tag == "code" and not self.pre:
            return _wrap_lines(text, "`")
        if tag in _INLINE:
            return _wrap_lines(text, _INLINE[tag])
        if tag == "a":
            return _link(text, frame.attrs.get("href", ""))
        if tag in ("td", "th"):
            parent.items += 1
            return (" | " if parent.items > 1 else "") + text.strip()
        if tag not in _BLOCKS:
            return text
        body = re.sub(r"\n{3,}", "\n\n", text.strip("\n").strip(" "))
        if tag in _HEADINGS:
            body = _wrap_lines(body, "*")
        elif tag == "blockquote":
            body = _prefix_lines(body, "> ", "> ")
        elif tag in ("li", "tr"):
            marker = ""
            if tag == "li":
                parent.items += 1
                marker = (f"{frame_start(parent) + parent.items - 1}. " if parent.tag == "ol"
                          else "- ")
            so_far = parent.text()
            lead = "\n" if so_far and not so_far.endswith("\n") else ""
            return lead + _prefix_lines(body, marker, " " * len(marker)) + "\n"
        if not body:
            return ""
        inside_item = parent.tag == "li" or tag == "summary"
        gap = "\n" if inside_item else "\n\n"
        return f"{gap}{body}{gap}"

    def result(self) -> str:
        while len(self.stack) > 1:
            self._close_top()
        text = self.stack[0].text()
        text = "\n".join(line.rstrip() for line in text.split("\n"))
        text = re.sub(r"\n{3,}", "\n\n", text).strip("\n")
        return _PLACEHOLDER.sub(lambda m: self.blocks[int(m.group(1))], text)


def frame_start(frame: _Frame) -> int:
    """An <ol>'s first number (`start` attribute, default 1)."""
    value = frame.attrs.get("start", "1").strip()
    return int(value) if value.isdigit() else 1


def html_to_whatsapp(html: str) -> str:
    """The WhatsApp rendering of a Matrix `formatted_body` (org.matrix.custom.html),
    reply fallback (<mx-reply>) removed."""
    converter = _Converter()
    converter.feed(html)
    converter.close()
    return converter.result()


def utf16_len(text: str) -> int:
    """Length in UTF-16 code units: how a JavaScript-minded API counts "characters",
    and never less than Python's count, so a limit checked this way is safe either way."""
    return len(text.encode("utf-16-le")) // 2


# Where a cut is best made, best first: between paragraphs, between lines, after a
# sentence, between words. Each gives the cut position: the part ends there and the
# whitespace after it is dropped.
_BOUNDARIES: tuple[tuple[re.Pattern[str], bool], ...] = (
    (re.compile(r"\n[^\S\n]*\n"), False), (re.compile(r"\n"), False),
    (re.compile(r"[.!?…;:][)\]\"'»”]*(?=\s)"), True), (re.compile(r"\s"), False))


def _fit(text: str, start: int, limit: int) -> int:
    """The largest end such that text[start:end] is within `limit` UTF-16 units, and
    at least one character (progress, even for an astral character and a limit of 1)."""
    end, used = start, 0
    while end < len(text):
        width = 2 if ord(text[end]) > 0xFFFF else 1
        if used + width > limit:
            break
        used += width
        end += 1
    return max(end, min(start + 1, len(text)))


def _cut(text: str, start: int, end: int) -> int:
    """Where to end the part that starts at `start` and may run to `end` at most."""
    floor = start + (end - start) // 2  # a good boundary in the back half, if any
    fallback = None
    for pattern, after in _BOUNDARIES:
        cuts = [m.end() if after else m.start()
                for m in pattern.finditer(text, start, min(end + 1, len(text)))]
        cuts = [c for c in cuts if start < c <= end]
        if cuts and cuts[-1] > floor:
            return cuts[-1]
        if cuts and fallback is None:
            fallback = cuts[-1]
    return fallback or end  # one word longer than the limit: cut it


def split_text(text: str, limit: int = MAX_TEXT) -> list[str]:
    """`text` in order as parts of at most `limit` UTF-16 units, each stripped and
    non-empty, cut at the best boundary (paragraph, line, sentence, word) in the back
    half of what fits; only a word longer than the limit is cut inside."""
    if limit < 2:
        raise ValueError("limit must be at least 2 (one astral character)")
    parts: list[str] = []
    start = 0
    while start < len(text):
        end = _fit(text, start, limit)
        if end < len(text):
            end = _cut(text, start, end)
        piece = text[start:end].strip()
        if piece:
            parts.append(piece)
        start = end
    return parts
