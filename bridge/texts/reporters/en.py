"""What a reporter hears back, in English (a translation of `es`)."""

from typing import Final

REPORT_RECEIVED: Final = (
    "We have received your report (no. {id}). The moderators will review it and we "
    "will let you know when it has been handled.")
REPORT_HANDLED: Final = "Your report no. {id} has been handled: {what}. Thank you for telling us."
REPORT_OUTCOMES: Final = {"redact": "the message was removed",
                          "mute": "that person can no longer post in the room",
                          "kick": "that person was removed from the room",
                          "ban": "that person was banned from the room",
                          "dismiss": "it was reviewed and no action was taken"}
HOW_TO_REPORT: Final = (
    "To report a message, reply to it (press and hold the message and choose Reply) with the "
    "word REPORT and, if you like, the reason. No report was sent.")
REPORTED_MESSAGE_NOT_FOUND: Final = (
    "We could not find the message you want to report (it may be your own or too "
    "old). No report was sent; if it is urgent, write to us here.")
NAME_REVERTED: Final = (
    "Your display name may not contain a phone number, an e-mail address or words "
    "reserved for staff; your pseudonym has been restored.")
