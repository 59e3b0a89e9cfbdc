"""Builds the rooms-over-WhatsApp parts (called from the composition root only)."""

from __future__ import annotations

from dataclasses import dataclass

from bridge.config import Config
from bridge.db import Database
from bridge.matrix.api import MatrixAPI
from bridge.matrix.ghosts import Ghosts
from bridge.matrix.relay import Relay, StaffHandler
from bridge.matrix.rooms import Rooms
from bridge.metrics import Metrics
from bridge.privacy import Privacy
from bridge.rooms_wa.commands import PortalCommands
from bridge.rooms_wa.fanout import FanOut
from bridge.rooms_wa.join import SelfServiceJoin
from bridge.rooms_wa.members import Members
from bridge.rooms_wa.replies import RoomReplies
from bridge.whatsapp.mirror import Mirror
from bridge.whatsapp.outbox import Outbox
from bridge.whatsapp.portal import Portals


@dataclass(frozen=True)
class WhatsAppRooms:
    members: Members
    fanout: FanOut
    replies: RoomReplies
    commands: PortalCommands
    join: SelfServiceJoin


def build_rooms_wa(config: Config, db: Database, api: MatrixAPI, ghosts: Ghosts,
                   rooms: Rooms, relay: Relay, outbox: Outbox, privacy: Privacy,
                   mirror: Mirror, portals: Portals, portal_handler: StaffHandler,
                   metrics: Metrics) -> WhatsAppRooms:
    """`portal_handler`: the staff-event handler `!invitar` stands in front of."""
    members = Members(config, db, api, ghosts, rooms, relay, outbox, privacy, metrics)
    fanout = FanOut(config, db, api, ghosts, members, outbox, privacy, metrics)
    join = SelfServiceJoin(config, db, members, outbox)
    replies = RoomReplies(config, db, privacy, relay, mirror, outbox, members, fanout, join,
                          metrics)
    commands = PortalCommands(db, portals, members, fanout, config.rooms.staff_label,
                              config.rooms.confirm_above, then=portal_handler)
    relay.add_handler(fanout)
    relay.add_member_handler(members.on_member_event)
    return WhatsAppRooms(members, fanout, replies, commands, join)
