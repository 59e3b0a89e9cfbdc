"""What staff and admins read in Matrix: portal notices, management-room replies and
notices, the bot's answers. `default` is the language the bridge speaks there."""

from bridge.texts.matrix import es as default

__all__ = ["default"]
