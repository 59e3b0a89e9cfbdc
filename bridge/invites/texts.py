"""What the invite page says, in Spanish and English.

Plain language on purpose: the notice is what citizens consent to, so it says who,
what, why and how to leave in short sentences. `notice(lang, ...)` is the exact text
shown; its SHA-256 goes into the consent record with `invites.notice_version`.
"""

from __future__ import annotations

import hashlib

LANGUAGES = ("es", "en")
DEFAULT_LANGUAGE = "es"

TEXTS: dict[str, dict[str, str]] = {
    "es": {
        "lang_name": "Español",
        "other_lang": "en",
        "switch": "English",
        "title_invite": "Invitación a «{room}»",
        "intro": "{agency} le invita a la sala de chat «{room}».",
        "notice_title": "Antes de unirse: su privacidad",
        "form_title": "Cree su cuenta",
        "pseudonym": "Nombre que verán los demás (seudónimo)",
        "pseudonym_hint": "Puede dejar el que le proponemos o escribir otro. No ponga su "
                          "nombre real, su teléfono ni su correo electrónico.",
        "password": "Contraseña",
        "password_hint": "Al menos {min} caracteres. Guárdela bien: no podemos recuperarla "
                         "porque no le pedimos teléfono ni correo.",
        "password2": "Repita la contraseña",
        "consent": "He leído el aviso de privacidad y quiero unirme a la sala con este "
                   "seudónimo.",
        "submit": "Crear mi cuenta",
        "whatsapp_offer": "¿Prefiere participar desde WhatsApp, sin crear una cuenta?",
        "whatsapp_link": "Unirme por WhatsApp",
        "title_whatsapp": "Unirse a «{room}» por WhatsApp",
        "whatsapp_steps": "Pulse el botón: se abrirá WhatsApp con un mensaje ya escrito "
                          "para {agency}. Envíelo y recibirá la invitación, con el "
                          "seudónimo que verán los demás y los botones para aceptar o no.",
        "whatsapp_open": "Abrir WhatsApp",
        "whatsapp_code": "Si no se abre, envíe este mensaje al {number}: {message}",
        "whatsapp_once": "El código sirve una sola vez y caduca en 24 horas. Nadie de la "
                         "sala verá su número ni su nombre de WhatsApp.",
        "errors_title": "Revise lo siguiente:",
        "err_pseudonym_contact": "El seudónimo no puede contener un número de teléfono ni "
                                 "un correo electrónico. Elija otro nombre.",
        "err_pseudonym_length": "El seudónimo debe tener entre {min} y {max} caracteres.",
        "err_pseudonym_chars": "El seudónimo solo puede tener letras, números, espacios y "
                               "signos de puntuación sencillos.",
        "err_password_short": "La contraseña debe tener al menos {min} caracteres.",
        "err_password_long": "La contraseña puede tener como mucho {max} caracteres.",
        "err_password_mismatch": "Las dos contraseñas no coinciden.",
        "err_consent": "Para unirse debe aceptar el aviso de privacidad.",
        "done_title": "Su cuenta está lista",
        "done_intro": "Le hemos invitado a la sala «{room}». Para entrar:",
        "done_step_app": "Abra una aplicación de Matrix, por ejemplo Element.",
        "done_step_web": "Abra el cliente web: {link}",
        "done_step_login": "Inicie sesión con estos datos y la contraseña que ha elegido:",
        "done_step_accept": "Acepte la invitación a «{room}».",
        "homeserver": "Servidor",
        "user_id": "Usuario",
        "your_pseudonym": "Su seudónimo",
        "done_keep": "Anote estos datos ahora: esta página no se puede volver a abrir.",
        "bad_title": "Este enlace no sirve",
        "bad_unknown": "Este enlace de invitación no es válido. Compruebe que lo ha copiado "
                       "entero.",
        "bad_expired": "Este enlace de invitación ha caducado.",
        "bad_used": "Este enlace de invitación ya se ha utilizado.",
        "bad_closed": "Esta sala ya no admite nuevas personas.",
        "bad_off": "Las invitaciones no están disponibles en este momento.",
        "bad_failed": "No hemos podido crear su cuenta. Inténtelo de nuevo en unos "
                      "minutos; el enlace sigue siendo válido.",
        "bad_ask": "Si quiere unirse, pida un enlace nuevo a {agency}. No se ha creado "
                   "ninguna cuenta.",
    },
    "en": {
        "lang_name": "English",
        "other_lang": "es",
        "switch": "Español",
        "title_invite": "Invitation to “{room}”",
        "intro": "{agency} invites you to the chat room “{room}”.",
        "notice_title": "Before you join: your privacy",
        "form_title": "Create your account",
        "pseudonym": "Name others will see (pseudonym)",
        "pseudonym_hint": "Keep the one we suggest or type another. Do not use your real "
                          "name, your phone number or your e-mail address.",
        "password": "Password",
        "password_hint": "At least {min} characters. Keep it safe: we cannot recover it, "
                         "because we do not ask for your phone number or e-mail.",
        "password2": "Repeat the password",
        "consent": "I have read the privacy notice and want to join the room with this "
                   "pseudonym.",
        "submit": "Create my account",
        "whatsapp_offer": "Would you rather take part from WhatsApp, without an account?",
        "whatsapp_link": "Join by WhatsApp",
        "title_whatsapp": "Join «{room}» by WhatsApp",
        "whatsapp_steps": "Press the button: WhatsApp opens with a message already written "
                          "to {agency}. Send it and you will get the invitation, with the "
                          "pseudonym others will see and buttons to accept or not.",
        "whatsapp_open": "Open WhatsApp",
        "whatsapp_code": "If it does not open, send this message to {number}: {message}",
        "whatsapp_once": "The code works once and expires in 24 hours. Nobody in the room "
                         "will see your number or your WhatsApp name.",
        "errors_title": "Please check the following:",
        "err_pseudonym_contact": "The pseudonym must not contain a phone number or an "
                                 "e-mail address. Choose another name.",
        "err_pseudonym_length": "The pseudonym must be {min} to {max} characters long.",
        "err_pseudonym_chars": "The pseudonym may only contain letters, digits, spaces and "
                               "simple punctuation.",
        "err_password_short": "The password must be at least {min} characters long.",
        "err_password_long": "The password may be at most {max} characters long.",
        "err_password_mismatch": "The two passwords do not match.",
        "err_consent": "To join, you must accept the privacy notice.",
        "done_title": "Your account is ready",
        "done_intro": "We have invited you to the room “{room}”. To get in:",
        "done_step_app": "Open a Matrix app, for example Element.",
        "done_step_web": "Open the web client: {link}",
        "done_step_login": "Sign in with these details and the password you chose:",
        "done_step_accept": "Accept the invitation to “{room}”.",
        "homeserver": "Server",
        "user_id": "User",
        "your_pseudonym": "Your pseudonym",
        "done_keep": "Write these details down now: this page cannot be opened again.",
        "bad_title": "This link does not work",
        "bad_unknown": "This invitation link is not valid. Check that you copied all of it.",
        "bad_expired": "This invitation link has expired.",
        "bad_used": "This invitation link has already been used.",
        "bad_closed": "This room no longer accepts new people.",
        "bad_off": "Invitations are not available at the moment.",
        "bad_failed": "We could not create your account. Please try again in a few "
                      "minutes; the link is still valid.",
        "bad_ask": "If you want to join, ask {agency} for a new link. No account has been "
                   "created.",
    },
}

NOTICE: dict[str, tuple[str, ...]] = {
    "es": (
        "{agency} creará para usted una cuenta de chat con un seudónimo. No le pedimos su "
        "teléfono ni su correo electrónico.",
        "Las demás personas de la sala solo verán su seudónimo y lo que usted escriba. Los "
        "mensajes están cifrados de extremo a extremo.",
        "{agency} usa esta cuenta solo para que participe en la sala «{room}». Las "
        "personas que moderan la sala pueden retirar mensajes o expulsar a quien no "
        "respete las normas, y esas acciones quedan registradas.",
        "Puede salir de la sala cuando quiera y pedir a {agency} que borre su cuenta.",
    ),
    "en": (
        "{agency} will create a chat account for you with a pseudonym. We do not ask for "
        "your phone number or e-mail address.",
        "Other people in the room only see your pseudonym and what you write. Messages are "
        "end-to-end encrypted.",
        "{agency} uses this account only so that you can take part in the room “{room}”. "
        "The room's moderators can remove messages or people who break the rules, and "
        "those actions are logged.",
        "You can leave the room at any time and ask {agency} to delete your account.",
    ),
}


def text(lang: str, key: str, **values: object) -> str:
    """A UI string; `values` fill `{placeholders}` (no format spec or attribute access)."""
    template = TEXTS[lang][key]
    out = template
    for name, value in values.items():
        out = out.replace("{" + name + "}", str(value))
    # "{agency} le invita": a name like "la entidad" still starts the sentence upper-case.
    return _sentence(out) if template.startswith("{") else out


def _sentence(value: str) -> str:
    return value[:1].upper() + value[1:]


def notice(lang: str, agency: str, room: str) -> tuple[str, ...]:
    """The privacy notice paragraphs as shown."""
    return tuple(_sentence(p.replace("{agency}", agency).replace("{room}", room))
                 for p in NOTICE[lang])


def notice_hash(paragraphs: tuple[str, ...]) -> str:
    return hashlib.sha256("\n\n".join(paragraphs).encode("utf-8")).hexdigest()
