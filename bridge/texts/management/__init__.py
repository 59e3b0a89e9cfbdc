"""What the bridge's admins read in the management room (command replies, help, report
and display-name notices). English, like the admin CLI and API; `default` is the
language used."""

from bridge.texts.management import en as default

__all__ = ["default"]
