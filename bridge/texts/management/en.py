"""What admins read in the management room, in English (the reference language of this
surface). Never a reported message's content: a link to the event, which only members
of its room can open."""

from typing import Final

# --- Reports and flags (bridge.moderation) -------------------------------------------------

REPORT_SOURCES: Final = {"matrix": "from the Matrix report button",
                         "whatsapp": "from WhatsApp (DENUNCIAR)",
                         "flag": "flagged by the bridge (moderation.flag_terms)"}
REPORT_HEAD: Final = "🚩 Report {id} {source} in '{room_name}' ({room_id})"
REPORT_MESSAGE: Final = "Message: {link} (open it in the room; nothing was deleted)"
REPORT_AUTHOR: Final = "Author: {author}"
REPORT_REPORTER: Final = "Reported by: {reporter}"
REPORT_REASON: Final = "Reason: {reason}"
REPORT_NO_REASON: Final = "Reason: (none given)"
REPORT_REPORTER_NOT_TOLD: Final = ("⚠️ The reporter could not be told that the report arrived "
                                   "(see docs/moderation.md, Reports).")
FLAG_REASON: Final = "matches «{term}»"  # a flagged term, as a flag's reason
REPORT_ACT_WITH: Final = ("Act with: `report {id} redact|mute|kick|ban|dismiss` "
                          "(or `denuncia {id} borrar|silenciar|expulsar|vetar|descartar`)")
# A display name that broke the rules: what it had, then what the bridge did.
NAME_PROBLEMS: Final = {"phone": "a phone number", "email": "an e-mail address",
                        "reserved": "a word reserved for staff"}
NAME_SHOWN: Final = " ('{shown}')"
NAME_HEAD: Final = ("🪪 A citizen in '{room_name}' ({room_id}) took a display name{named} "
                    "with {what}.")
NAME_RESET: Final = "{head} It was set back to their pseudonym '{pseudonym}' ({user_id})."
NAME_NOT_RESET: Final = ("{head} It could NOT be set back to '{pseudonym}' ({user_id}): "
                         "{why_not}. Ask them to change it, or `kick {room_id} {user_id} REASON`.")

# --- Commands (bridge.admin.commands, bridge.matrix.management) ---------------------------

HELP_HEAD: Final = ("civic-bridge commands (ROOM = !room ID, USER = @user:server, "
                    "EVENT = $event ID):")
HELP_FOOT: Final = ("Actions on more than rooms.confirm_above members, and every "
                    "announcement, ask for `confirm` first.")
INTERNAL_ERROR: Final = "Internal error; see the bridge's log. Nothing more was done."
BAD_COMMAND: Final = "⚠️ {problem}"
NOT_AN_ADMIN: Final = "Only the bridge's admins (admin.users) can run commands here."
NOTHING_TO_CONFIRM: Final = "Nothing is waiting for confirmation."
CANCELLED: Final = "Cancelled; nothing was done."
CONFIRM_FIRST: Final = ("Room '{room_name}' has {members} members. Reply `confirm` "
                        "within {minutes} minutes to go ahead, or `cancel`.")
REFUSED: Final = "⚠️ Refused: {problem}"
INVITE_LINK: Final = "Invite link ({uses} use(s), expires {expires:%Y-%m-%d %H:%M} UTC):\n{url}"
REPORT_DONE: Final = "Report {id}: {status} done{told}."
REPORTER_NOT_TOLD: Final = " (the reporter could not be told)"
OPEN_REPORTS: Final = "Open reports:"
OPEN_REPORT: Final = "• {id} ({source}) {link} — author {author}"
OPEN_REPORT_REASON: Final = " — reason: {reason}"
UNKNOWN_AUTHOR: Final = "(unknown)"
NO_OPEN_REPORTS: Final = "No open reports."
AUDIT_INTACT: Final = "Audit chain intact."
AUDIT_BROKEN: Final = "⚠️ AUDIT CHAIN BROKEN at entry {entry}: the log was altered."

# --- Admin verbs' replies (bridge.admin.verbs): {room}, {user}, {event} and the handler's
# answer by key.

ROOMS: Final = "Rooms:"
ROOM_ITEM: Final = "• {name} ({kind}) — {room_id}"
NO_ROOMS: Final = "No rooms yet."
MEMBERS: Final = "Members of {room}:"
MEMBER_ITEM: Final = "• {name} — {role}, {kind}, {membership} — {user_id}"
NO_NAME: Final = "(no name)"
INVITED: Final = "Invited {user}."
KICKED: Final = "Done: kick {user}."
BANNED: Final = "Done: ban {user}."
UNBANNED: Final = "Done: unban {user}."
MUTED: Final = "Muted {user}."
UNMUTED: Final = "Unmuted {user}."
REDACTED: Final = "Redacted {event}."
KNOCK_APPROVED: Final = "Approved {user}'s knock."
KNOCK_DENIED: Final = "Denied {user}'s knock."
CLOSED: Final = "Closed {room}; {removed} member(s) removed."
ANNOUNCED: Final = "Announcement posted in {room}."

# --- Rooms over WhatsApp (bridge.admin.commands: `whatsapp ROOM CITIZEN`) ----------------

WA_INVITE: Final = "WhatsApp invitation for «{pseudonym}» (their name in that room)"
WA_INVITE_ASKED: Final = "they were sent the rooms.invite_template asking them to answer"
WA_INVITE_NO_TEMPLATE: Final = ("no rooms.invite_template is set, so nothing can ask them "
                                "to answer")
WA_INVITE_WAITING: Final = ("{said} is waiting for their reply: their 24-hour WhatsApp window "
                            "is closed; {how}. They get it when they next write.")
WA_INVITE_SENT: Final = "{said} sent; they accept or decline on WhatsApp."
