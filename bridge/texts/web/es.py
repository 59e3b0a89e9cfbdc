"""What the invite pages say, in Spanish (the reference language of this surface).

Plain language on purpose: the notice is what citizens consent to, so it says who,
what, why and how to leave in short sentences; its SHA-256 goes into the consent record
with `invites.notice_version`, so changing a word of NOTICE needs a new version.
"""

from typing import Final

LANG_NAME: Final = "Español"
OTHER_LANG: Final = "en"
SWITCH: Final = "English"
TITLE_INVITE: Final = "Invitación a «{room}»"
INTRO: Final = "{agency} le invita a la sala de chat «{room}»."
NOTICE_TITLE: Final = "Antes de unirse: su privacidad"
FORM_TITLE: Final = "Cree su cuenta"
PSEUDONYM: Final = "Nombre que verán los demás (seudónimo)"
PSEUDONYM_HINT: Final = ("Puede dejar el que le proponemos o escribir otro. No ponga su "
                         "nombre real, su teléfono ni su correo electrónico.")
PASSWORD: Final = "Contraseña"
PASSWORD_HINT: Final = ("Al menos {min} caracteres. Guárdela bien: no podemos recuperarla "
                        "porque no le pedimos teléfono ni correo.")
PASSWORD2: Final = "Repita la contraseña"
CONSENT: Final = "He leído el aviso de privacidad y quiero unirme a la sala con este seudónimo."
SUBMIT: Final = "Crear mi cuenta"
WHATSAPP_OFFER: Final = "¿Prefiere participar desde WhatsApp, sin crear una cuenta?"
WHATSAPP_LINK: Final = "Unirme por WhatsApp"
TITLE_WHATSAPP: Final = "Unirse a «{room}» por WhatsApp"
WHATSAPP_STEPS: Final = ("Pulse el botón: se abrirá WhatsApp con un mensaje ya escrito para "
                         "{agency}. Envíelo y recibirá la invitación, con el seudónimo que "
                         "verán los demás y los botones para aceptar o no.")
WHATSAPP_OPEN: Final = "Abrir WhatsApp"
WHATSAPP_CODE: Final = "Si no se abre, envíe este mensaje al {number}: {message}"
WHATSAPP_ONCE: Final = ("El código sirve una sola vez y caduca en 24 horas. Nadie de la sala "
                        "verá su número ni su nombre de WhatsApp.")
ERRORS_TITLE: Final = "Revise lo siguiente:"
ERR_PSEUDONYM_CONTACT: Final = ("El seudónimo no puede contener un número de teléfono ni un "
                                "correo electrónico. Elija otro nombre.")
ERR_PSEUDONYM_LENGTH: Final = "El seudónimo debe tener entre {min} y {max} caracteres."
ERR_PSEUDONYM_CHARS: Final = ("El seudónimo solo puede tener letras, números, espacios y "
                              "signos de puntuación sencillos.")
ERR_PASSWORD_SHORT: Final = "La contraseña debe tener al menos {min} caracteres."
ERR_PASSWORD_LONG: Final = "La contraseña puede tener como mucho {max} caracteres."
ERR_PASSWORD_MISMATCH: Final = "Las dos contraseñas no coinciden."
ERR_CONSENT: Final = "Para unirse debe aceptar el aviso de privacidad."
DONE_TITLE: Final = "Su cuenta está lista"
DONE_INTRO: Final = "Le hemos invitado a la sala «{room}». Para entrar:"
DONE_STEP_APP: Final = "Abra una aplicación de Matrix, por ejemplo Element."
DONE_STEP_WEB: Final = "Abra el cliente web: {link}"
DONE_STEP_LOGIN: Final = "Inicie sesión con estos datos y la contraseña que ha elegido:"
DONE_STEP_ACCEPT: Final = "Acepte la invitación a «{room}»."
HOMESERVER: Final = "Servidor"
USER_ID: Final = "Usuario"
YOUR_PSEUDONYM: Final = "Su seudónimo"
DONE_KEEP: Final = "Anote estos datos ahora: esta página no se puede volver a abrir."
BAD_TITLE: Final = "Este enlace no sirve"
BAD_UNKNOWN: Final = ("Este enlace de invitación no es válido. Compruebe que lo ha copiado "
                      "entero.")
BAD_EXPIRED: Final = "Este enlace de invitación ha caducado."
BAD_USED: Final = "Este enlace de invitación ya se ha utilizado."
BAD_CLOSED: Final = "Esta sala ya no admite nuevas personas."
BAD_OFF: Final = "Las invitaciones no están disponibles en este momento."
BAD_FAILED: Final = ("No hemos podido crear su cuenta. Inténtelo de nuevo en unos minutos; "
                     "el enlace sigue siendo válido.")
BAD_ASK: Final = ("Si quiere unirse, pida un enlace nuevo a {agency}. No se ha creado "
                  "ninguna cuenta.")

# The privacy notice, one paragraph per item.
NOTICE: Final = (
    "{agency} creará para usted una cuenta de chat con un seudónimo. No le pedimos "
    "su teléfono ni su correo electrónico.",
    "Las demás personas de la sala solo verán su seudónimo y lo que usted escriba. "
    "Los mensajes están cifrados de extremo a extremo.",
    "{agency} usa esta cuenta solo para que participe en la sala «{room}». Las "
    "personas que moderan la sala pueden retirar mensajes o expulsar a quien no "
    "respete las normas, y esas acciones quedan registradas.",
    "Puede salir de la sala cuando quiera y pedir a {agency} que borre su cuenta.",
)
