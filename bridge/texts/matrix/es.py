"""What staff read in Matrix, in Spanish (the reference language): notices in a
citizen's portal about what arrived, what could not be relayed either way and what to
do, and the readable summaries of WhatsApp messages Matrix has no event type for.

Functions where the wording depends on the values (plurals, articles); a translation
writes its own with the same parameters. A summary shows only what the citizen chose to
send (names on a card they shared, their order, their form answers); notices carry only
our own words, kinds and codes: never a number, BSUID, profile name or wamid.
"""

from __future__ import annotations

from typing import Final

from bridge.texts.fill import field_label, join_present
from bridge.whatsapp.rich_content import ContactCard, FlowReply, Order, Referral

# --- What a citizen sent (bridge.whatsapp.mirror, identity, inbound) ---------------------

# Media kinds with gender and article, for "una imagen" / "el vídeo"...
MEDIA_WITH_ARTICLE: Final = {"image": "una imagen", "video": "un vídeo", "audio": "un audio",
                     "document": "un documento", "sticker": "un sticker"}
_MB: Final = 1024 * 1024
# Meta's codes on inbound messages, in words staff can act on.
WHATSAPP_ERRORS: Final = {
    131000: "error interno de WhatsApp",
    131026: "mensaje no entregable",
    131051: "tipo de mensaje no compatible",
    131052: "no se pudo descargar el archivo",
    131053: "no se pudo subir el archivo",
}


def contacts_summary(cards: tuple[ContactCard, ...]) -> str:
    """What staff read for a shared card: names and organisations, and whose choice it was."""
    shown = []
    for card in cards:
        org = join_present([card.company, card.job_title])
        name = card.display_name or "sin nombre"
        shown.append(f"{name} ({org})" if org and org != name else name)
    what = ("una tarjeta de contacto" if len(cards) == 1
            else f"{len(cards)} tarjetas de contacto")
    attached = "Se adjunta" if len(cards) == 1 else "Se adjuntan"
    return (f"La persona ha decidido compartir {what}: {'; '.join(shown)}. "
            f"{attached} como archivo .vcf.")


def order_summary(order: Order) -> str:
    lines = ["Pedido del catálogo:"]
    for item in order.items:
        price = join_present([item.item_price, item.currency], " ")
        lines.append(f"• {item.quantity} x {item.product_retailer_id}"
                     + (f" — {price}" if price else ""))
    if order.text:
        lines.append(f"Nota: {order.text}")
    return "\n".join(lines)


def flow_summary(flow: FlowReply) -> str:
    if not flow.answers:
        return "La persona ha enviado un formulario sin respuestas legibles."
    lines = ["Respuestas del formulario:"]
    lines += [f"• {field_label(key)}: {value}" for key, value in flow.answers]
    return "\n".join(lines)


def choice_text(title: str | None, description: str | None) -> str:
    """A tapped reply button or list row."""
    return join_present([title or "(opción sin título)", description], " — ")


def referral_notice(referral: Referral) -> str:
    source = "un anuncio" if referral.source_type == "ad" else "una publicación"
    detail = join_present([f"«{referral.headline}»" if referral.headline else None,
                    referral.source_url], " ")
    return f"Este mensaje llega desde {source}" + (f": {detail}." if detail else ".")


def product_notice(product_retailer_id: str) -> str:
    return f"Este mensaje pregunta por el producto «{product_retailer_id}» del catálogo."


def reaction_to_unknown(emoji: str) -> str:
    return f"Ha reaccionado con {emoji} a un mensaje que no está en esta sala."


def unsupported_notice(type_name: str | None) -> str:
    shown = f": {type_name}" if type_name else ""
    return (f"[Mensaje de WhatsApp de un tipo no compatible{shown}] No se puede "
            "mostrar aquí; pida a la persona que lo envíe como texto, foto o documento.")


def error_notice(code: int | None) -> str:
    shown = (f"código {code}: {WHATSAPP_ERRORS.get(code, 'error de WhatsApp')}" if code is not None
             else "sin código")
    return (f"WhatsApp no pudo entregar un mensaje de esta persona ({shown}). "
            "Pídale que lo vuelva a enviar, si es posible como texto, foto o documento.")


def too_large_notice(kind: str, size: int | None, limit: int) -> str:
    what = MEDIA_WITH_ARTICLE.get(kind, "un archivo")
    size_text = f" de {size / _MB:.1f} MB" if size is not None else ""
    return (f"La persona ha enviado {what}{size_text}, que supera el límite de "
            f"{limit / _MB:g} MB para este tipo: no se ha traído a la sala. Pídale que lo "
            "envíe más pequeño o por otro medio (por ejemplo, la sede electrónica).")


def media_failed_notice(kind: str, reason: str) -> str:
    what = MEDIA_WITH_ARTICLE.get(kind, "un archivo")
    return (f"No se ha podido traer a la sala {what} que envió la persona ({reason}). "
            "Pídale que lo vuelva a enviar.")


def identity_notice(change_type: str) -> str:
    if change_type == "user_changed_number":
        return ("WhatsApp informa de que esta persona ha cambiado de número. Es la misma "
                "conversación, con el mismo seudónimo y el mismo consentimiento.")
    if change_type == "user_changed_user_id":
        return ("WhatsApp ha cambiado el identificador de esta persona. Es la misma "
                "conversación, con el mismo seudónimo y el mismo consentimiento.")
    return ("WhatsApp informa de un cambio en la cuenta de esta persona (por ejemplo, "
            "reinstaló WhatsApp). La conversación sigue igual.")


REKEY_CONFLICT_NOTICE: Final = (
    "WhatsApp informa de que esta persona ha cambiado de número o de identificador, pero "
    "con el nuevo ya había escrito por separado: esa conversación sigue en otra sala, "
    "con otro seudónimo; continúe allí.")


# Default names of media without a file name (the `body` of the Matrix event).
MEDIA_DEFAULT_NAMES: Final = {"image": "imagen", "sticker": "sticker", "video": "vídeo",
                              "audio": "audio", "document": "documento"}
PERSONAL_ID_WARNING: Final = (
    "Atención: este mensaje parece contener datos personales sensibles ({kinds}). "
    "No los copie fuera de esta sala; recuerde a la persona que no es necesario enviarlos "
    "por este canal.")
MEDIA_FAILED_INTEGRITY: Final = "no superó la comprobación de integridad"
MEDIA_FAILED_CODE: Final = "WhatsApp no lo entregó, código {code}"
MEDIA_FAILED: Final = "WhatsApp no lo entregó"
DELIVERY_FAILED_NOTICE: Final = "WhatsApp no pudo entregar un mensaje: {title}"
DELIVERY_FAILED_UNKNOWN: Final = "error desconocido"

# --- The portal (bridge.whatsapp.portal) --------------------------------------------------

PORTAL_NAME: Final = "WhatsApp · {pseudonym}"
PORTAL_NAME_UNKNOWN: Final = "Ciudadano/a"  # no ghost profile yet
PORTAL_TOPIC: Final = "Conversación de WhatsApp (cifrada, con seudónimo)"
OPTED_OUT_NOTICE: Final = ("La persona ha retirado su consentimiento: el puente ya no reenvía "
                           "mensajes en ninguna dirección.")

# --- Staff messages not sent to WhatsApp (bridge.whatsapp.staff_events) -----------------

# Media kinds in the plural, as in "WhatsApp admite archivos de hasta 100 MB".
MEDIA_PLURALS: Final = {"image": "imágenes", "video": "vídeos", "audio": "audios",
                        "document": "archivos", "sticker": "stickers"}
POLL: Final = "una encuesta"
CALL: Final = "una llamada"
THIS_EVENT_TYPE: Final = "este tipo de evento"
THIS_MESSAGE_TYPE: Final = "este tipo de mensaje"
UNTYPED_MESSAGE: Final = "un mensaje sin tipo"
UNSUPPORTED_NOTICE: Final = ("No enviado a WhatsApp: {what} no se puede enviar por "
                             "WhatsApp. Envíe el contenido como texto, imagen, archivo o "
                             "ubicación.")
TOO_LARGE_NOTICE: Final = ("No enviado a WhatsApp: el archivo ocupa {size} y WhatsApp admite "
                           "{kind} de hasta {limit}. Envíe un archivo más pequeño o un "
                           "enlace para descargarlo.")
TOO_LARGE_ADVICE: Final = "Envíe un archivo más pequeño o un enlace para descargarlo."
INVALID_NOTICE: Final = ("No enviado a WhatsApp: {what}. Vuelva a enviarlo desde otro "
                         "cliente o como texto.")
INVALID_LOCATION: Final = "la ubicación no trae coordenadas válidas (geo:)"
INVALID_NO_FILE: Final = "el adjunto no trae su archivo"
INVALID_EMPTY: Final = "el mensaje está vacío"
EDIT_NOTICE: Final = ("Las ediciones no se envían a WhatsApp; envíe un mensaje nuevo si es "
                      "necesario.")
REDACTION_NOTICE: Final = ("WhatsApp no permite borrar un mensaje ya enviado: la persona lo "
                           "sigue viendo. Si es necesario, envíe una corrección.")
REACTION_TARGET_NOTICE: Final = ("Reacción no enviada a WhatsApp: ese mensaje no forma parte "
                                 "de la conversación con la persona (reaccione a uno suyo o "
                                 "a uno enviado a WhatsApp).")
# Staff messages held or not sent (bridge.whatsapp.outbound).
WINDOW_NOTICE: Final = (
    "No enviado: han pasado más de 24 horas desde el último mensaje de esta "
    "persona. WhatsApp solo permite enviar una plantilla aprobada (escriba "
    "!plantilla para verlas); el mensaje se podrá enviar cuando vuelva a "
    "escribir.")
NO_CONSENT_NOTICE: Final = "No enviado: esta persona no tiene activo el reenvío por WhatsApp."
HELD_NOTICE: Final = (
    "Retenido, no enviado: el mensaje parece contener datos personales ({kinds}). "
    "Si debe enviarse igualmente por WhatsApp, reaccione con ✅ a ese mensaje o "
    "respóndale «enviar».")
RELEASED_NOTICE: Final = "Enviado a WhatsApp tras su confirmación."
EXPIRED_NOTICE: Final = "No enviado: la confirmación llegó más de 24 horas después del mensaje."
DROPPED_HELD_NOTICE: Final = "Mensaje retenido descartado: no se enviará a WhatsApp."
OTHER_PORTAL_NOTICE: Final = ("No enviado: ese mensaje retenido es de otra sala y solo puede "
                              "confirmarse en la sala donde se escribió.")
# What staff can do after Graph refused a send for good.
ADVICE_WINDOW_CLOSED: Final = (
    "Han pasado más de 24 horas desde su último mensaje: solo puede enviarse una "
    "plantilla aprobada hasta que la persona vuelva a escribir.")
ADVICE_UNREACHABLE: Final = ("Puede que la persona no tenga WhatsApp o haya bloqueado el "
                             "número; contacte por otra vía.")
ADVICE_CHECK_FORMAT: Final = "Revise el formato o el archivo y vuelva a enviarlo."
ADVICE_RETRY: Final = "Vuelva a intentarlo; si se repite, avise a quien administra el puente."

# --- Encrypted messages the bridge could not read (bridge.matrix.relay) -----------------

UNDECRYPTABLE_NOTICE: Final = (
    "No se ha podido descifrar un mensaje de {sender} ({time} UTC): la clave de cifrado no "
    "ha llegado al puente, así que no se ha reenviado. Vuelva a enviarlo, por favor; si "
    "ocurre de nuevo, verifique su sesión (o cierre la sesión y vuelva a entrar) en su "
    "aplicación de Matrix.")

# --- Dead letters (bridge.deadletters), in the portal or the management room ------------

DEAD_LETTER_WHY: Final[dict[str, str]] = {
    "undecryptable": "no se puede descifrar",
    "bad_payload": "su contenido no tiene un formato válido",
    "matrix_refused": "el servidor Matrix lo rechazó",
    "graph_refused": "WhatsApp lo rechazó",
    "internal": "error interno del puente",
}
DEAD_LETTER_WHAT: Final[dict[str, str]] = {
    "whatsapp": "Un mensaje de WhatsApp no se ha podido reenviar a esta sala",
    "matrix": "Un evento de esta sala no se ha podido procesar",
    "outbox": "Mensaje no enviado a WhatsApp",
}
DEAD_LETTER_HEAD_OUTBOX: Final = "{what}: {why}."
DEAD_LETTER_HEAD: Final = "{what} ({why})."
DEAD_LETTER_NOTICE: Final = (
    "{head} Queda apartado como {id}: un administrador puede reintentarlo "
    "(civic-bridge admin dead-letters retry {id}) o descartarlo.")

# --- Approved templates, `!plantilla` in a portal (bridge.whatsapp.templates) ------------

TEMPLATES_NONE: Final = ("No hay plantillas aprobadas configuradas (whatsapp.templates). "
                         "Pida a la administración del puente que añada las que Meta haya "
                         "aprobado.")
TEMPLATES_HEADER: Final = ("Plantillas aprobadas (las únicas que se pueden enviar cuando han "
                           "pasado más de 24 horas desde el último mensaje de la persona):")
TEMPLATES_ITEM: Final = "• {name} ({category}, {language}): {description}"
TEMPLATES_ITEM_TEXT: Final = "  Texto: {body}"
TEMPLATES_ITEM_USAGE: Final = "  Uso: {usage}"
TEMPLATES_FOOTER: Final = "Los valores con espacios van entre comillas, o con nombre=valor."
TEMPLATE_UNKNOWN: Final = ("No hay ninguna plantilla aprobada llamada «{name}». "
                           "Escriba {command} para ver la lista.")
TEMPLATE_TAKES_NO_VALUES: Final = "La plantilla {name} no lleva parámetros. Uso: {usage}"
TEMPLATE_VALUE_TWICE: Final = "El parámetro {name} aparece dos veces."
TEMPLATE_UNCLOSED_QUOTE: Final = "Falta cerrar unas comillas. Uso: {usage}"
TEMPLATE_VALUE_COUNT: Final = ("La plantilla {name} necesita {needed} valores "
                               "y se han dado {given}. Uso: {usage}")
TEMPLATE_UNKNOWN_VALUE: Final = "Parámetro desconocido: {name}. Uso: {usage}"
TEMPLATE_MISSING_VALUES: Final = "Falta el valor de {names}. Uso: {usage}"
TEMPLATE_VALUE_TOO_LONG: Final = ("El valor de {name} es demasiado largo (máximo "
                                  "{max} caracteres).")
TEMPLATE_VALUE_SPACING: Final = ("El valor de {name} no puede tener saltos de línea, "
                                 "tabuladores ni más de cuatro espacios seguidos.")
TEMPLATE_VALUE_PERSONAL: Final = ("No enviado: el valor de {name} parece contener datos "
                                  "personales ({kinds}). Las plantillas no deben "
                                  "llevar teléfonos, DNI/NIE, IBAN ni tarjetas.")
# bridge.whatsapp.staff_templates
TEMPLATE_SENT: Final = "Plantilla «{name}» enviada a WhatsApp{by}. La persona recibirá:\n{text}"
TEMPLATE_SENT_BY_ADMIN: Final = " por la administración"
TEMPLATE_NO_CONSENT: Final = ("No enviado: esta persona no tiene activo el reenvío por "
                              "WhatsApp, así que tampoco se le pueden enviar plantillas.")

# --- Small words in events the bridge writes into portals (bridge.whatsapp.mirror) --------

LOCATION_LABEL: Final = "Ubicación"  # a shared location with neither name nor address
UNKNOWN_TYPE: Final = "desconocido"  # a message type name that is not safe to show
TEMPLATE_USAGE_VALUE: Final = "«{name}»"  # a positional value in `!plantilla` usage

# --- Admin actions seen in rooms (bridge.admin) -------------------------------------------

ERASED_NOTICE: Final = ("Los datos de esta persona se han borrado a petición suya: el puente "
                        "ya no reenvía mensajes en ninguna dirección.")
# The tombstone of a closed agency room: members may read either language.
ROOM_CLOSED_NOTICE: Final = "Esta sala se ha cerrado. / This room has been closed."

# --- Agency rooms with WhatsApp members (bridge.rooms_wa) --------------------------------

# Once, when the first WhatsApp member joins a room; the line added to its topic.
WA_ROOM_NOTICE: Final = (
    "Esta sala tiene participantes por WhatsApp. Lo que se escribe aquí se les reenvía: "
    "sale del cifrado de extremo a extremo en el puente y en WhatsApp puede reenviarse. "
    "Solo ven los nombres visibles de la sala, nunca los identificadores de Matrix.")
WA_ROOM_TOPIC_LINE: Final = ("Con participantes por WhatsApp: los mensajes se reenvían fuera "
                             "del cifrado de extremo a extremo.")
WA_ROOM_UNDELIVERED: Final = ("Un mensaje de esta sala no llegó por WhatsApp a «{pseudonym}»: "
                              "{title}. Si era importante, hágaselo llegar por otra vía.")
# `!invitar <sala>` in a citizen's portal (bridge.rooms_wa.commands).
WA_INVITE_USAGE: Final = ("Uso: !invitar <sala> (el nombre exacto de la sala o su ID, "
                          "!…:servidor).")
WA_INVITE_SENT_NOTICE: Final = ("Invitación enviada por WhatsApp a «{room}». En esa sala "
                                "aparecerá como «{pseudonym}» si acepta.")
WA_INVITE_WAITING_NOTICE: Final = (
    "Invitación a «{room}» en espera: la ventana de 24 horas de WhatsApp de esta "
    "persona está cerrada. {how} En esa sala aparecerá como «{pseudonym}» si acepta.")
WA_INVITE_ASKED: Final = "Se le ha pedido con una plantilla que responda; la recibirá al hacerlo."
WA_INVITE_NOT_ASKED: Final = ("No hay plantilla configurada para pedirle que responda "
                              "(rooms.invite_template): la recibirá cuando vuelva a escribir.")
WA_INVITE_REFUSED: Final = "No enviada: {why}"
WA_INVITE_CONFIRM: Final = (" La sala tiene más de {above} miembros: repita con «!invitar "
                            "{room} confirmar» para enviarla igualmente.")

# --- A staff message WhatsApp did not take for good (bridge.whatsapp.outbox_queue) -------

OUTBOX_NOT_SENT_NOTICE: Final = "Mensaje no enviado a WhatsApp: {title}. {advice}"
OUTBOX_TOO_LARGE: Final = "el archivo supera los 100 MB que admite WhatsApp"
OUTBOX_GRAPH_ERROR: Final = "error de WhatsApp"  # Graph gave no title of its own
OUTBOX_MATRIX_DOWNLOAD_FAILED: Final = "no se pudo descargar el archivo de Matrix"
OUTBOX_INTERNAL_ERROR: Final = "error interno del puente"
