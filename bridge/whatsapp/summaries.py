"""Readable Spanish texts for what a citizen sends that Matrix has no event type for,
and the notices staff get when something cannot be brought into the room.

Pure functions. A summary shows only what the citizen chose to send (names on a card
they shared, their order, their form answers); it never shows the citizen's own
number, BSUID, profile name or a wamid, and the notices carry only our own words,
kinds and codes.
"""

from __future__ import annotations

import re
from typing import Final

from bridge.whatsapp.rich_content import ContactCard, FlowReply, Order, Referral

# Names with gender and article, for "una imagen" / "el vídeo"...
KIND_NAMES: Final = {"image": "una imagen", "video": "un vídeo", "audio": "un audio",
                     "document": "un documento", "sticker": "un sticker"}
_MB: Final = 1024 * 1024
# Meta's codes on inbound messages, in words staff can act on.
_ERRORS: Final = {
    131000: "error interno de WhatsApp",
    131026: "mensaje no entregable",
    131051: "tipo de mensaje no compatible",
    131052: "no se pudo descargar el archivo",
    131053: "no se pudo subir el archivo",
}


def _join(parts: list[str | None], sep: str = ", ") -> str:
    return sep.join(p for p in parts if p)


def contacts_summary(cards: tuple[ContactCard, ...]) -> str:
    """What staff read for a shared card: names and organisations, and whose choice it was."""
    shown = []
    for card in cards:
        org = _join([card.company, card.job_title])
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
        price = _join([item.item_price, item.currency], " ")
        lines.append(f"• {item.quantity} x {item.product_retailer_id}"
                     + (f" — {price}" if price else ""))
    if order.text:
        lines.append(f"Nota: {order.text}")
    return "\n".join(lines)


def flow_summary(flow: FlowReply) -> str:
    if not flow.answers:
        return "La persona ha enviado un formulario sin respuestas legibles."
    lines = ["Respuestas del formulario:"]
    lines += [f"• {_label(key)}: {value}" for key, value in flow.answers]
    return "\n".join(lines)


def _label(key: str) -> str:
    """`nombre_tramite` → `Nombre tramite`: field ids read better as words."""
    words = re.sub(r"[_\-]+", " ", key).strip()
    return words[:1].upper() + words[1:] if words else key


def choice_text(title: str | None, description: str | None) -> str:
    """A tapped reply button or list row."""
    return _join([title or "(opción sin título)", description], " — ")


def referral_notice(referral: Referral) -> str:
    source = "un anuncio" if referral.source_type == "ad" else "una publicación"
    detail = _join([f"«{referral.headline}»" if referral.headline else None,
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
    shown = (f"código {code}: {_ERRORS.get(code, 'error de WhatsApp')}" if code is not None
             else "sin código")
    return (f"WhatsApp no pudo entregar un mensaje de esta persona ({shown}). "
            "Pídale que lo vuelva a enviar, si es posible como texto, foto o documento.")


def too_large_notice(kind: str, size: int | None, limit: int) -> str:
    what = KIND_NAMES.get(kind, "un archivo")
    size_text = f" de {size / _MB:.1f} MB" if size is not None else ""
    return (f"La persona ha enviado {what}{size_text}, que supera el límite de "
            f"{limit / _MB:g} MB para este tipo: no se ha traído a la sala. Pídale que lo "
            "envíe más pequeño o por otro medio (por ejemplo, la sede electrónica).")


def media_failed_notice(kind: str, reason: str) -> str:
    what = KIND_NAMES.get(kind, "un archivo")
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
