"""What a citizen receives on WhatsApp, in Spanish (the reference language).

The consent question itself is the agency's (`consent.notice_text`,
`notices.consent_text`) and stays in config; these are the bridge's own answers.
Button titles are at most 20 characters (Meta's limit).
"""

from typing import Final

# Reply buttons under a consent question (chat and notices alike).
ACCEPT_BUTTON: Final = "Acepto"
DECLINE_BUTTON: Final = "No, gracias"

# Chat with staff (bridge.whatsapp.inbound).
CHAT_OPT_IN_CONFIRMATION: Final = (
    "Gracias. Hemos abierto una conversación privada con el personal de "
    "{agency}. Puede escribir BAJA en cualquier momento para dejarla.")
CHAT_OPT_OUT_CONFIRMATION: Final = (
    "Hecho: no reenviaremos sus mensajes ni recibirá más respuestas por "
    "este canal. Si vuelve a escribir, le preguntaremos de nuevo.")

# Notices of availability (bridge.whatsapp.notice_consent, subscriptions).
NOTICES_CONFIRM_IN: Final = (
    "Hecho: recibirá por WhatsApp avisos de {issuer} cuando tenga una notificación "
    "a su disposición. Su código de suscripción es {code}. Para activarlos, "
    "introdúzcalo en la sede electrónica ({sede}) tras identificarse. Los avisos "
    "son solo informativos y nunca contienen la notificación. Escriba {stop} "
    "o pulse el botón para dejar de recibirlos.")
NOTICES_CONFIRM_OUT: Final = (
    "Hecho: ya no recibirá avisos de notificaciones por WhatsApp. Sus "
    "notificaciones siguen disponibles en la sede electrónica ({sede}).")
# Appended to CHAT_OPT_OUT_CONFIRMATION when the opt-out withdrew notices too.
NOTICES_ALSO_WITHDRAWN: Final = (
    " También hemos anulado su suscripción a los avisos de notificaciones; "
    "escriba {start} si quiere volver a recibirlos.")
NOTICES_OUT_BUTTON: Final = "Baja de avisos"

# The file name of a document staff sent without one.
DEFAULT_FILENAME: Final = "archivo"

# --- Agency rooms with WhatsApp members (bridge.rooms_wa) --------------------------------

# The invitation is the consent text: its sha256 is kept with the membership and copied
# into the consent record (bump bridge.rooms_wa.policy.INVITATION_VERSION on a change).
ROOM_INVITATION: Final = (
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
ROOM_WHO_POSTS_ANNOUNCEMENT: Final = ("Es una sala de avisos: solo el personal publica; sus "
                                      "respuestas no se publicarán.")
ROOM_WHO_POSTS_CITIZEN: Final = "Lo que usted escriba lo leerán todas las personas de la sala."
ROOM_MEDIA_ON: Final = "Recibirá también imágenes y archivos.\n"
ROOM_MEDIA_OFF: Final = "No recibirá imágenes ni archivos de la sala, solo texto.\n"
ROOM_ACCEPT_BUTTON: Final = "Unirme"
ROOM_DECLINE_BUTTON: Final = "No, gracias"

ROOM_JOINED: Final = ("Ya participa en «{room}» como «{pseudonym}». Escriba SALIR para "
                      "dejarla.")
ROOM_DECLINED: Final = "De acuerdo: no se le ha añadido a «{room}»."
ROOM_INVITATION_GONE: Final = "Esa invitación ya no es válida."
ROOM_INVITATION_SUPERSEDED: Final = ("Esa invitación ha cambiado: le hemos enviado una más "
                                     "reciente. Responda, por favor, a la última.")
ROOM_LEFT: Final = "Ha dejado la sala «{room}»; no recibirá más mensajes de ella."
ROOM_REMOVED: Final = "Los moderadores le han retirado de la sala «{room}»."
ROOM_MUTED: Final = ("Los moderadores han silenciado su participación en «{room}»: sus "
                     "mensajes no se publican.")
ROOM_ANNOUNCEMENT_ONLY: Final = ("«{room}» es una sala de avisos: solo el personal publica, "
                                 "y su mensaje no se ha publicado.")
ROOM_NOT_MEMBER_NOW: Final = ("Ya no participa en la sala de ese mensaje: no se ha publicado "
                              "nada.")
# Choosing where the next messages go (a WhatsApp list; titles of at most 24 characters).
ROOM_PICK_BODY: Final = "¿En qué conversación quiere publicar su mensaje?"
ROOM_PICK_SWITCH_BODY: Final = "¿A qué conversación quiere que vayan sus próximos mensajes?"
ROOM_PICK_BUTTON: Final = "Elegir"
ROOM_PICK_SECTION: Final = "Conversaciones"
ROOM_PORTAL_TITLE: Final = "Atención personal"
ROOM_PICKED: Final = "Sus próximos mensajes irán a «{room}»."
# Room messages relayed to a member.
ROOM_NAMELESS_MEMBER: Final = "Participante"  # a room member with no display name
ROOM_EARLIER: Final = "… y {count} mensajes anteriores de sus salas que no se muestran."
ROOM_EDITED: Final = "{prefix}(editado) {text}"
ROOM_WITHDRAWN: Final = "{room_prefix}Los moderadores han retirado un mensaje."
ROOM_RETRACTED: Final = "{prefix}(ha retirado su mensaje)"
ROOM_FILE_NOT_RELAYED: Final = "{prefix}[ha enviado un archivo, que no se reenvía a WhatsApp]"
# What a member may write (compared without case or accents).
ROOM_LEAVE_WORDS: Final = ("SALIR",)
ROOM_SWITCH_WORDS: Final = ("CAMBIAR", "SALAS")
# Self-service joining from an invite link: "UNIRME <code>".
ROOM_JOIN_WORD: Final = "UNIRME"
ROOM_JOIN_CODE_BAD: Final = ("Ese código para unirse no es válido o ha caducado. Pida un "
                             "enlace nuevo a quien le invitó.")
