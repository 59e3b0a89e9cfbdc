"""WhatsApp citizens as members of agency rooms, relayed one-to-one (issue 17).

`policy` decides (pure: who gets what, where a reply goes, what a closed window
means); `texts` holds what citizens and staff read; `members` runs invitations,
consent and leaving; `fanout` takes room events to WhatsApp members; `inbound` takes
their WhatsApp messages to rooms; `commands` is the management-room edge (the HTTP
routes are bridge.web.rooms_wa).
"""
