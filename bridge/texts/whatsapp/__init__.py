"""What a citizen receives on WhatsApp. `default` is the language the bridge speaks."""

from bridge.texts.whatsapp import es as default

__all__ = ["default"]
