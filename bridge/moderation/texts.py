"""What reporters and moderators are told. Reporters get their own language (es, en;
Spanish otherwise); the management room speaks English, like its other answers.

No text here ever carries the reported content: the management room gets a link to the
event, which only members of that room can open.
"""

from __future__ import annotations

from urllib.parse import quote

from bridge.moderation.rules import Action, NameProblem

LANGUAGES = ("es", "en")

_RECEIVED = {
    "es": "Hemos recibido su denuncia (n.º {id}). El equipo de moderación la revisará y le "
          "diremos cuándo se haya atendido.",
    "en": "We have received your report (no. {id}). The moderators will review it and we "
          "will let you know when it has been handled.",
}
_HANDLED = {
    "es": "Su denuncia n.º {id} ha sido atendida: {what}. Gracias por avisar.",
    "en": "Your report no. {id} has been handled: {what}. Thank you for telling us.",
}
_OUTCOME: dict[str, dict[Action, str]] = {
    "es": {"redact": "se ha retirado el mensaje",
           "mute": "la persona ya no puede escribir en la sala",
           "kick": "se ha expulsado a la persona de la sala",
           "ban": "se ha vetado a la persona en la sala",
           "dismiss": "se ha revisado y no se ha tomado ninguna medida"},
    "en": {"redact": "the message was removed",
           "mute": "that person can no longer post in the room",
           "kick": "that person was removed from the room",
           "ban": "that person was banned from the room",
           "dismiss": "it was reviewed and no action was taken"},
}
_HOW_TO = {
    "es": "Para denunciar un mensaje, respóndalo (mantenga pulsado el mensaje y elija Responder) "
          "con la palabra DENUNCIAR y, si quiere, el motivo. No se ha enviado ninguna "
          "denuncia.",
    "en": "To report a message, reply to it (press and hold the message and choose Reply) with the "
          "word REPORT and, if you like, the reason. No report was sent.",
}
_NOT_FOUND = {
    "es": "No encontramos el mensaje que quiere denunciar (puede que sea suyo o muy "
          "antiguo). No se ha enviado ninguna denuncia; si es urgente, escríbanos aquí.",
    "en": "We could not find the message you want to report (it may be your own or too "
          "old). No report was sent; if it is urgent, write to us here.",
}
NAME_REVERTED = {
    "es": "Su nombre visible no puede contener un número de teléfono, un correo ni palabras "
          "reservadas al personal; se ha restablecido su seudónimo.",
    "en": "Your display name may not contain a phone number, an e-mail address or words "
          "reserved for staff; your pseudonym has been restored.",
}


def _lang(language: str | None) -> str:
    return language if language in LANGUAGES else "es"


def received(language: str | None, report_id: int) -> str:
    return _RECEIVED[_lang(language)].format(id=report_id)


def handled(language: str | None, report_id: int, action: Action) -> str:
    lang = _lang(language)
    return _HANDLED[lang].format(id=report_id, what=_OUTCOME[lang][action])


def how_to_report(language: str | None) -> str:
    return _HOW_TO[_lang(language)]


def not_found(language: str | None) -> str:
    return _NOT_FOUND[_lang(language)]


def event_link(room_id: str, event_id: str) -> str:
    """A matrix.to link: it opens only for members of the room."""
    return f"https://matrix.to/#/{quote(room_id, safe='!:')}/{quote(event_id, safe='$:')}"


_SOURCE = {"matrix": "from the Matrix report button", "whatsapp": "from WhatsApp (DENUNCIAR)",
           "flag": "flagged by the bridge (moderation.flag_terms)"}


def report_notice(*, report_id: int, source: str, room_name: str, room_id: str,
                  event_id: str, author: str, reporter: str, reason: str | None,
                  reporter_told: bool) -> str:
    """The management room's notice of a new report (or flag)."""
    lines = [f"🚩 Report {report_id} {_SOURCE.get(source, source)} in '{room_name}' ({room_id})",
             f"Message: {event_link(room_id, event_id)} (open it in the room; nothing "
             f"was deleted)",
             f"Author: {author}"]
    if source != "flag":
        lines.append(f"Reported by: {reporter}")
    lines.append(f"Reason: {reason}" if reason else "Reason: (none given)")
    if source != "flag" and not reporter_told:
        lines.append("⚠️ The reporter could not be told that the report arrived "
                     "(see docs/moderation.md, Reports).")
    lines.append(f"Act with: `report {report_id} redact|mute|kick|ban|dismiss` "
                 f"(or `denuncia {report_id} borrar|silenciar|expulsar|vetar|descartar`)")
    return "\n".join(lines)


_PROBLEM = {"phone": "a phone number", "email": "an e-mail address",
            "reserved": "a word reserved for staff"}


def name_notice(*, room_name: str, room_id: str, user_id: str, pseudonym: str,
                problems: list[NameProblem], shown: str | None, reverted: bool,
                why_not: str | None) -> str:
    """The management room's notice of a display name that broke the rules."""
    what = ", ".join(_PROBLEM[p] for p in problems)
    named = f" ('{shown}')" if shown else ""
    head = (f"🪪 A citizen in '{room_name}' ({room_id}) took a display name{named} with "
            f"{what}.")
    if reverted:
        return f"{head} It was set back to their pseudonym '{pseudonym}' ({user_id})."
    return (f"{head} It could NOT be set back to '{pseudonym}' ({user_id}): {why_not}. "
            f"Ask them to change it, or `kick {room_id} {user_id} REASON`.")
