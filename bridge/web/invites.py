"""The public invite page: `GET|POST /invite/{token}` and its stylesheet.

Served to anyone with the link, so: no JavaScript, a strict CSP, no caching, no
Referer (the token is in the URL), and nothing is created unless the token is valid.
"""

from __future__ import annotations

import logging
from importlib.resources import files

from aiohttp import web

from bridge.invites.forms import parse_form, pick_language
from bridge.invites.page import CSS_PATH, done_page, form_page, problem_page
from bridge.invites.service import FormInvalid, InviteLinks, LinkUnusable
from bridge.web.state import PAGES

log = logging.getLogger(__name__)
routes = web.RouteTableDef()
CSS = (files("bridge.web") / "static" / "civic-bridge.css").read_bytes()

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; style-src 'self'; form-action 'self'; "
                                "frame-ancestors 'none'; base-uri 'none'"),
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
}
STATUS = {"unknown": 404, "expired": 410, "used": 410, "closed": 410, "off": 503, "failed": 503}


def _html(body: str, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", charset="utf-8",
                        headers=SECURITY_HEADERS)


def _problem(links: InviteLinks, lang: str, exc: LinkUnusable) -> web.Response:
    return _html(problem_page(lang=lang, agency=links.agency, problem=exc.problem),
                 STATUS[exc.problem])


@routes.get("/invite/{token}")
async def show(request: web.Request) -> web.Response:
    links = request.config_dict[PAGES].invites
    lang = pick_language(request.query.get("lang"), request.headers.get("Accept-Language"))
    try:
        view = await links.view(request.match_info["token"])
    except LinkUnusable as exc:
        return _problem(links, lang, exc)
    except Exception as exc:  # see submit()
        log.error("invite page: link lookup failed (%s)", type(exc).__name__)
        return _problem(links, lang, LinkUnusable("failed"))
    rooms_wa = request.config_dict[PAGES].wa_rooms
    offer = rooms_wa is not None and await rooms_wa.join.offered(view.link.room_id)
    return _html(form_page(
        lang=lang, agency=links.agency, room=view.room_name, action=request.path,
        pseudonym=links.suggest_pseudonym(), consent=False,
        min_password=request.config_dict[PAGES].config.invites.min_password_length,
        whatsapp_href=f"{request.path}/whatsapp?lang={lang}" if offer else None))


@routes.post("/invite/{token}")
async def submit(request: web.Request) -> web.Response:
    links = request.config_dict[PAGES].invites
    token = request.match_info["token"]
    posted = await request.post()
    fields = {k: v for k, v in posted.items() if isinstance(v, str)}
    lang = pick_language(fields.get("lang"), request.headers.get("Accept-Language"))
    form = parse_form(fields, lang)
    try:
        view = await links.view(token)
        joined = await links.redeem(token, form)
    except LinkUnusable as exc:
        return _problem(links, lang, exc)
    except FormInvalid as exc:
        # Passwords are never sent back; the chosen pseudonym and the box are kept.
        return _html(form_page(
            lang=lang, agency=links.agency, room=view.room_name, action=request.path,
            pseudonym=form.pseudonym, consent=form.consent, errors=exc.errors,
            min_password=request.config_dict[PAGES].config.invites.min_password_length), 400)
    except Exception as exc:
        # E.g. the database is down: still a page in the citizen's language, not JSON;
        # and the log gets the kind only (the URL holds the link's token).
        log.error("invite page: redemption failed (%s)", type(exc).__name__)
        return _problem(links, lang, LinkUnusable("failed"))
    return _html(done_page(lang=lang, agency=links.agency, room=joined.room_name,
                           user_id=joined.user_id, display_name=joined.display_name,
                           homeserver_url=links.homeserver_url,
                           web_client_url=links.web_client_url))


@routes.get(CSS_PATH)
async def stylesheet(request: web.Request) -> web.Response:
    return web.Response(body=CSS, content_type="text/css", charset="utf-8",
                        headers={"Cache-Control": "public, max-age=3600",
                                 "X-Content-Type-Options": "nosniff"})
