"""HTML of the invite page: plain, server-rendered, no JavaScript.

Every interpolated value goes through `e()` (HTML-escaped, quotes too). Accessibility:
the page declares its language, every input has a label and its hint and error are
tied to it with aria-describedby, errors are summarised at the top (role=alert) with
links to the fields, and the layout works at 320 px and 200 % zoom (see the CSS).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from html import escape

from bridge.invites.forms import PSEUDONYM_MAX, FieldError
from bridge.invites.texts import notice, text

CSS_PATH = "/static/civic-bridge.css"


def e(value: object) -> str:
    return escape(str(value), quote=True)


def _layout(lang: str, agency: str, title: str, main: str, switch_href: str | None) -> str:
    switch = ""
    if switch_href is not None:
        other = text(lang, "other_lang")
        switch = (f'<nav class="lang" aria-label="{e(text(lang, "lang_name"))}">'
                  f'<a href="{e(switch_href)}" hreflang="{other}" lang="{other}">'
                  f'{e(text(lang, "switch"))}</a></nav>')
    return (
        "<!doctype html>\n"
        f'<html lang="{lang}">\n<head>\n<meta charset="utf-8">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="robots" content="noindex, nofollow">\n'
        f"<title>{e(title)} · {e(agency)}</title>\n"
        f'<link rel="stylesheet" href="{CSS_PATH}">\n</head>\n<body>\n'
        f'<header class="top"><p class="agency">{e(agency)}</p>{switch}</header>\n'
        f'<main id="main">\n{main}\n</main>\n</body>\n</html>\n'
    )


def _field_error(errors: Sequence[FieldError], name: str, lang: str) -> str | None:
    for err in errors:
        if err.field == name:
            return text(lang, err.key, **dict(err.values))
    return None


def _input(name: str, label: str, hint: str | None, error: str | None, attrs: str) -> str:
    described = " ".join(x for x in (f"{name}-hint" if hint else "",
                                     f"{name}-error" if error else "") if x)
    return (
        f'<div class="field{" has-error" if error else ""}">\n'
        f'<label for="{name}">{e(label)}</label>\n'
        + (f'<p class="hint" id="{name}-hint">{e(hint)}</p>\n' if hint else "")
        + (f'<p class="error" id="{name}-error">{e(error)}</p>\n' if error else "")
        + f'<input id="{name}" name="{name}" {attrs}'
        + (f' aria-describedby="{described}"' if described else "")
        + (' aria-invalid="true"' if error else "")
        + ">\n</div>"
    )


def form_page(*, lang: str, agency: str, room: str, action: str, pseudonym: str,
              consent: bool, min_password: int, errors: Sequence[FieldError] = (),
              whatsapp_href: str | None = None) -> str:
    """The invitation: who invites to what, the privacy notice, and the sign-up form;
    with `whatsapp_href`, also the way to take part from WhatsApp (bridge.rooms_wa)."""
    t = partial(text, lang)
    paragraphs = "".join(f"<p>{e(p)}</p>\n" for p in notice(lang, agency, room))
    summary = ""
    if errors:
        items = "".join(f'<li><a href="#{e(err.field)}">'
                        f"{e(text(lang, err.key, **dict(err.values)))}</a></li>"
                        for err in errors)
        summary = (f'<div class="errors" role="alert" id="errors">'
                   f'<h2>{e(t("errors_title"))}</h2><ul>{items}</ul></div>\n')
    consent_error = _field_error(errors, "consent", lang)
    main = (
        f'<h1>{e(t("title_invite", room=room))}</h1>\n'
        f'<p class="lead">{e(t("intro", agency=agency, room=room))}</p>\n'
        f"{summary}"
        f'<section class="notice" aria-labelledby="notice-title">\n'
        f'<h2 id="notice-title">{e(t("notice_title"))}</h2>\n{paragraphs}</section>\n'
        f'<form method="post" action="{e(action)}" accept-charset="utf-8">\n'
        f'<input type="hidden" name="lang" value="{lang}">\n'
        f'<h2>{e(t("form_title"))}</h2>\n'
        + _input("pseudonym", t("pseudonym"), t("pseudonym_hint"),
                 _field_error(errors, "pseudonym", lang),
                 f'type="text" value="{e(pseudonym)}" maxlength="{PSEUDONYM_MAX}" '
                 'autocomplete="off" spellcheck="false"') + "\n"
        + _input("password", t("password"), t("password_hint", min=min_password),
                 _field_error(errors, "password", lang),
                 f'type="password" minlength="{min_password}" autocomplete="new-password" '
                 "required") + "\n"
        + _input("password2", t("password2"), None, _field_error(errors, "password2", lang),
                 f'type="password" minlength="{min_password}" autocomplete="new-password" '
                 "required") + "\n"
        + f'<div class="field checkbox{" has-error" if consent_error else ""}">\n'
        + (f'<p class="error" id="consent-error">{e(consent_error)}</p>\n'
           if consent_error else "")
        + '<input type="checkbox" id="consent" name="consent" value="yes" required'
        + (" checked" if consent else "")
        + (' aria-describedby="consent-error" aria-invalid="true"' if consent_error else "")
        + f'>\n<label for="consent">{e(t("consent"))}</label>\n</div>\n'
        f'<button type="submit">{e(t("submit"))}</button>\n</form>'
        + (f'\n<p class="whatsapp">{e(t("whatsapp_offer"))} '
           f'<a href="{e(whatsapp_href)}">{e(t("whatsapp_link"))}</a></p>'
           if whatsapp_href else "")
    )
    return _layout(lang, agency, t("title_invite", room=room), main, f"?lang={t('other_lang')}")


def whatsapp_page(*, lang: str, agency: str, room: str, href: str, number: str,
                  message: str) -> str:
    """Join by WhatsApp: a wa.me link with the one-time code (bridge.rooms_wa.join)."""
    t = partial(text, lang)
    main = (
        f'<h1>{e(t("title_whatsapp", room=room))}</h1>\n'
        f'<p class="lead">{e(t("whatsapp_steps", agency=agency))}</p>\n'
        f'<p><a class="button" href="{e(href)}" rel="noopener">'
        f'{e(t("whatsapp_open"))}</a></p>\n'
        f'<p>{e(t("whatsapp_code", number=number, message=message))}</p>\n'
        f'<p class="hint">{e(t("whatsapp_once"))}</p>'
    )
    return _layout(lang, agency, t("title_whatsapp", room=room), main, None)


def done_page(*, lang: str, agency: str, room: str, user_id: str, display_name: str,
              homeserver_url: str, web_client_url: str | None) -> str:
    """How to sign in: homeserver, user ID, pseudonym; a link to the web client if any."""
    t = partial(text, lang)
    if web_client_url:
        link = f'<a href="{e(web_client_url)}" rel="noreferrer">{e(web_client_url)}</a>'
        first = e(t("done_step_web", link="\x00")).replace("\x00", link)
    else:
        first = e(t("done_step_app"))
    main = (
        f'<h1>{e(t("done_title"))}</h1>\n'
        f'<p class="lead">{e(t("done_intro", room=room))}</p>\n'
        f'<ol class="steps">\n<li>{first}</li>\n'
        f'<li>{e(t("done_step_login"))}\n<dl class="credentials">\n'
        f'<dt>{e(t("homeserver"))}</dt><dd><code id="homeserver">{e(homeserver_url)}</code></dd>\n'
        f'<dt>{e(t("user_id"))}</dt><dd><code id="user-id">{e(user_id)}</code></dd>\n'
        f'<dt>{e(t("your_pseudonym"))}</dt><dd id="display-name">{e(display_name)}</dd>\n'
        f"</dl></li>\n"
        f'<li>{e(t("done_step_accept", room=room))}</li>\n</ol>\n'
        f'<p class="important">{e(t("done_keep"))}</p>'
    )
    return _layout(lang, agency, t("done_title"), main, None)


def problem_page(*, lang: str, agency: str, problem: str) -> str:
    """Used, expired, forged or unusable link: what happened and what to do."""
    t = partial(text, lang)
    ask = "" if problem == "failed" else f'<p>{e(t("bad_ask", agency=agency))}</p>'
    main = (f'<h1>{e(t("bad_title"))}</h1>\n'
            f'<p class="lead" id="problem" data-problem="{e(problem)}">'
            f'{e(t("bad_" + problem))}</p>\n{ask}')
    return _layout(lang, agency, t("bad_title"), main,
                   None if problem == "failed" else f"?lang={t('other_lang')}")
