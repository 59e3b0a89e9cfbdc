"""The Matrix side: the homeserver's client API as the appservice (`api`), ghosts and
their devices, rooms, the relay of staff events, E2EE key handling and trust.

`appservice` reads an appservice transaction (sans-I/O; the route is
bridge.web.appservice, the storing bridge.ingest); `room_policy`, `keyshare`,
`crosssign` and `management` are pure; the rest does the I/O.
"""
