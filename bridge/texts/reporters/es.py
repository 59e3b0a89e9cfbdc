"""What a reporter hears back, in Spanish (the reference language). Never the reported
content."""

from typing import Final

REPORT_RECEIVED: Final = (
    "Hemos recibido su denuncia (n.º {id}). El equipo de moderación la revisará y le "
    "diremos cuándo se haya atendido.")
REPORT_HANDLED: Final = "Su denuncia n.º {id} ha sido atendida: {what}. Gracias por avisar."
# {what} in REPORT_HANDLED, by the moderators' action.
REPORT_OUTCOMES: Final = {"redact": "se ha retirado el mensaje",
                          "mute": "la persona ya no puede escribir en la sala",
                          "kick": "se ha expulsado a la persona de la sala",
                          "ban": "se ha vetado a la persona en la sala",
                          "dismiss": "se ha revisado y no se ha tomado ninguna medida"}
HOW_TO_REPORT: Final = (
    "Para denunciar un mensaje, respóndalo (mantenga pulsado el mensaje y elija Responder) "
    "con la palabra DENUNCIAR y, si quiere, el motivo. No se ha enviado ninguna "
    "denuncia.")
REPORTED_MESSAGE_NOT_FOUND: Final = (
    "No encontramos el mensaje que quiere denunciar (puede que sea suyo o muy "
    "antiguo). No se ha enviado ninguna denuncia; si es urgente, escríbanos aquí.")
NAME_REVERTED: Final = (
    "Su nombre visible no puede contener un número de teléfono, un correo ni palabras "
    "reservadas al personal; se ha restablecido su seudónimo.")
