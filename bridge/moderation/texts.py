"""What reporters and moderators are told, filled in. Reporters get their own language
(`bridge.texts.reporters`: es, en; Spanish otherwise); the management room speaks
English, like its other answers (`bridge.texts.management`).

No text here ever carries the reported content: the management room gets a link to the
event, which only members of that room can open.
"""

from __future__ import annotations

from types import ModuleType
from urllib.parse import quote

from bridge import texts
from bridge.moderation.rules import Action, NameProblem
from bridge.texts.management import default as mgmt_text

LANGUAGES = texts.languages("reporters")
NAME_REVERTED: dict[str, str] = {lang: texts.load("reporters", lang).NAME_REVERTED
                                 for lang in LANGUAGES}


def _say(language: str | None) -> ModuleType:
    return texts.load("reporters", language if language in LANGUAGES else "es")


def received(language: str | None, report_id: int) -> str:
    return str(_say(language).REPORT_RECEIVED.format(id=report_id))


def handled(language: str | None, report_id: int, action: Action) -> str:
    say = _say(language)
    return str(say.REPORT_HANDLED.format(id=report_id, what=say.REPORT_OUTCOMES[action]))


def how_to_report(language: str | None) -> str:
    return str(_say(language).HOW_TO_REPORT)


def not_found(language: str | None) -> str:
    return str(_say(language).REPORTED_MESSAGE_NOT_FOUND)


def event_link(room_id: str, event_id: str) -> str:
    """A matrix.to link: it opens only for members of the room."""
    return f"https://matrix.to/#/{quote(room_id, safe='!:')}/{quote(event_id, safe='$:')}"


def report_notice(*, report_id: int, source: str, room_name: str, room_id: str,
                  event_id: str, author: str, reporter: str, reason: str | None,
                  reporter_told: bool) -> str:
    """The management room's notice of a new report (or flag)."""
    say = mgmt_text
    lines = [say.REPORT_HEAD.format(id=report_id, source=say.REPORT_SOURCES.get(source, source),
                                    room_name=room_name, room_id=room_id),
             say.REPORT_MESSAGE.format(link=event_link(room_id, event_id)),
             say.REPORT_AUTHOR.format(author=author)]
    if source != "flag":
        lines.append(say.REPORT_REPORTER.format(reporter=reporter))
    lines.append(say.REPORT_REASON.format(reason=reason) if reason else say.REPORT_NO_REASON)
    if source != "flag" and not reporter_told:
        lines.append(say.REPORT_REPORTER_NOT_TOLD)
    lines.append(say.REPORT_ACT_WITH.format(id=report_id))
    return "\n".join(lines)


def name_notice(*, room_name: str, room_id: str, user_id: str, pseudonym: str,
                problems: list[NameProblem], shown: str | None, reverted: bool,
                why_not: str | None) -> str:
    """The management room's notice of a display name that broke the rules."""
    say = mgmt_text
    what = ", ".join(say.NAME_PROBLEMS[p] for p in problems)
    named = say.NAME_SHOWN.format(shown=shown) if shown else ""
    head = say.NAME_HEAD.format(room_name=room_name, room_id=room_id, named=named, what=what)
    if reverted:
        return say.NAME_RESET.format(head=head, pseudonym=pseudonym, user_id=user_id)
    return say.NAME_NOT_RESET.format(head=head, pseudonym=pseudonym, user_id=user_id,
                                     why_not=why_not, room_id=room_id)
