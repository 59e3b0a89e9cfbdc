"""What WhatsApp members and room members read (Spanish, like the rest of the bridge).

The invitation text is the consent text: its sha256 is kept with the membership and
copied into the consent record, with INVITATION_VERSION and the language.
"""

from __future__ import annotations

from typing import Final

INVITATION_VERSION: Final = "rooms-1"
LANGUAGE: Final = "es"

ACCEPT_BUTTON: Final = "wr-acc:"  # + membership id + ":" + the text's sha256 (16 hex)
DECLINE_BUTTON: Final = "wr-dec:"  # + membership id + ":" + the text's sha256 (16 hex)
PICK_ROW: Final = "wr-pick:"  # + membership id, or PORTAL_CHOICE
PORTAL_CHOICE: Final = "portal"

LEAVE_WORDS: Final = ("SALIR",)
SWITCH_WORDS: Final = ("CAMBIAR", "SALAS")

INVITATION: Final = (
    "{inviter} le invita a la sala «{room}» de {agency}.\n\n"
    "Si acepta, participará desde este chat con el seudónimo «{pseudonym}»: las demás "
    "personas de la sala verán solo ese nombre, nunca su número ni su nombre de perfil, "
    "y usted verá sus mensajes aquí, con el nombre de quien escribe. {who_posts}\n"
    "{media}"
    "Lo que escriba en la sala sale del cifrado de extremo a extremo en el puente y "
    "quien la lea puede reenviarlo.\n\n"
    "Para responder en una sala concreta, responda (deslizando) a un mensaje de esa sala; "
    "si no, su mensaje va a la última sala que eligió (si no ha elegido, le preguntaremos). "
    "Escriba SALIR para dejar la sala y BAJA para dejarlo todo.")
WHO_POSTS_ANNOUNCEMENT: Final = ("Es una sala de avisos: solo el personal publica; sus "
                                 "respuestas no se publicarán.")
WHO_POSTS_CITIZEN: Final = "Lo que usted escriba lo leerán todas las personas de la sala."
MEDIA_ON: Final = "Recibirá también imágenes y archivos.\n"
MEDIA_OFF: Final = "No recibirá imágenes ni archivos de la sala, solo texto.\n"
ACCEPT_TITLE: Final = "Unirme"
DECLINE_TITLE: Final = "No, gracias"

JOINED: Final = ("Ya participa en «{room}» como «{pseudonym}». Escriba SALIR para dejarla.")
DECLINED: Final = "De acuerdo: no se le ha añadido a «{room}»."
INVITATION_GONE: Final = "Esa invitación ya no es válida."
INVITATION_SUPERSEDED: Final = ("Esa invitación ha cambiado: le hemos enviado una más "
                                "reciente. Responda, por favor, a la última.")
LEFT: Final = "Ha dejado la sala «{room}»; no recibirá más mensajes de ella."
REMOVED: Final = "Los moderadores le han retirado de la sala «{room}»."
MUTED: Final = ("Los moderadores han silenciado su participación en «{room}»: sus mensajes "
                "no se publican.")
ANNOUNCEMENT_ONLY: Final = ("«{room}» es una sala de avisos: solo el personal publica, y su "
                            "mensaje no se ha publicado.")
NOT_MEMBER_NOW: Final = ("Ya no participa en la sala de ese mensaje: no se ha publicado "
                         "nada.")
NOT_IN_ROOM: Final = "No participa en ninguna sala ahora mismo."
PICK_BODY: Final = "¿En qué conversación quiere publicar su mensaje?"
PICK_SWITCH_BODY: Final = "¿A qué conversación quiere que vayan sus próximos mensajes?"
PICK_BUTTON: Final = "Elegir"
PICK_SECTION: Final = "Conversaciones"
PORTAL_TITLE: Final = "Atención personal"
PICKED: Final = "Sus próximos mensajes irán a «{room}»."
EARLIER: Final = "… y {count} mensajes anteriores de sus salas que no se muestran."
EDITED: Final = "{prefix}(editado) {text}"
WITHDRAWN: Final = "{room_prefix}Los moderadores han retirado un mensaje."
RETRACTED: Final = "{prefix}(ha retirado su mensaje)"
FILE_NOT_RELAYED: Final = "{prefix}[ha enviado un archivo, que no se reenvía a WhatsApp]"

# Room members (Matrix), once when the first WhatsApp member joins.
ROOM_NOTICE: Final = (
    "Esta sala tiene participantes por WhatsApp. Lo que se escribe aquí se les reenvía: "
    "sale del cifrado de extremo a extremo en el puente y en WhatsApp puede reenviarse. "
    "Solo ven los nombres visibles de la sala, nunca los identificadores de Matrix.")
UNDELIVERED: Final = ("Un mensaje de esta sala no llegó por WhatsApp a «{pseudonym}»: "
                      "{title}. Si era importante, hágaselo llegar por otra vía.")
TOPIC_LINE: Final = ("Con participantes por WhatsApp: los mensajes se reenvían fuera del "
                     "cifrado de extremo a extremo.")

# Self-service joining from an invite link.
JOIN_WORD: Final = "UNIRME"
JOIN_CODE_BAD: Final = ("Ese código para unirse no es válido o ha caducado. Pida un enlace "
                        "nuevo a quien le invitó.")
