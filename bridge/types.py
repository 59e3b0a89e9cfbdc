"""Typed identifiers, so a room id is never passed where a user id belongs."""

from typing import NewType

UserID = NewType("UserID", str)
RoomID = NewType("RoomID", str)
EventID = NewType("EventID", str)
DeviceID = NewType("DeviceID", str)
Pseudonym = NewType("Pseudonym", str)
# A WhatsApp message id's keyed hash (bridge.privacy.KeyedIndex.wamid): what is stored.
WamidHash = NewType("WamidHash", str)
