"""What a person who reported a message (or whose display name was reset) hears back,
on WhatsApp or in Matrix, in their own language: invite-link citizens chose it on the
invite page; everyone else gets `default`."""

from bridge.texts.reporters import es as default

__all__ = ["default"]
