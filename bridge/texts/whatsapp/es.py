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
