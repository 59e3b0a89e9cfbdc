"""What the invite pages say. The visitor chooses the language (`?lang=`, then
Accept-Language); `default` is the one used when nothing matches."""

from bridge.texts.web import es as default

__all__ = ["default"]
