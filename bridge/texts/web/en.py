"""What the invite pages say, in English (a translation of `es`)."""

from typing import Final

LANG_NAME: Final = "English"
OTHER_LANG: Final = "es"
SWITCH: Final = "Español"
TITLE_INVITE: Final = "Invitation to “{room}”"
INTRO: Final = "{agency} invites you to the chat room “{room}”."
NOTICE_TITLE: Final = "Before you join: your privacy"
FORM_TITLE: Final = "Create your account"
PSEUDONYM: Final = "Name others will see (pseudonym)"
PSEUDONYM_HINT: Final = ("Keep the one we suggest or type another. Do not use your real "
                         "name, your phone number or your e-mail address.")
PASSWORD: Final = "Password"
PASSWORD_HINT: Final = ("At least {min} characters. Keep it safe: we cannot recover it, "
                        "because we do not ask for your phone number or e-mail.")
PASSWORD2: Final = "Repeat the password"
CONSENT: Final = "I have read the privacy notice and want to join the room with this pseudonym."
SUBMIT: Final = "Create my account"
WHATSAPP_OFFER: Final = "Would you rather take part from WhatsApp, without an account?"
WHATSAPP_LINK: Final = "Join by WhatsApp"
TITLE_WHATSAPP: Final = "Join «{room}» by WhatsApp"
WHATSAPP_STEPS: Final = ("Press the button: WhatsApp opens with a message already written to "
                         "{agency}. Send it and you will get the invitation, with the "
                         "pseudonym others will see and buttons to accept or not.")
WHATSAPP_OPEN: Final = "Open WhatsApp"
WHATSAPP_CODE: Final = "If it does not open, send this message to {number}: {message}"
WHATSAPP_ONCE: Final = ("The code works once and expires in 24 hours. Nobody in the room "
                        "will see your number or your WhatsApp name.")
ERRORS_TITLE: Final = "Please check the following:"
ERR_PSEUDONYM_CONTACT: Final = ("The pseudonym must not contain a phone number or an e-mail "
                                "address. Choose another name.")
ERR_PSEUDONYM_LENGTH: Final = "The pseudonym must be {min} to {max} characters long."
ERR_PSEUDONYM_CHARS: Final = ("The pseudonym may only contain letters, digits, spaces and "
                              "simple punctuation.")
ERR_PASSWORD_SHORT: Final = "The password must be at least {min} characters long."
ERR_PASSWORD_LONG: Final = "The password may be at most {max} characters long."
ERR_PASSWORD_MISMATCH: Final = "The two passwords do not match."
ERR_CONSENT: Final = "To join, you must accept the privacy notice."
DONE_TITLE: Final = "Your account is ready"
DONE_INTRO: Final = "We have invited you to the room “{room}”. To get in:"
DONE_STEP_APP: Final = "Open a Matrix app, for example Element."
DONE_STEP_WEB: Final = "Open the web client: {link}"
DONE_STEP_LOGIN: Final = "Sign in with these details and the password you chose:"
DONE_STEP_ACCEPT: Final = "Accept the invitation to “{room}”."
HOMESERVER: Final = "Server"
USER_ID: Final = "User"
YOUR_PSEUDONYM: Final = "Your pseudonym"
DONE_KEEP: Final = "Write these details down now: this page cannot be opened again."
BAD_TITLE: Final = "This link does not work"
BAD_UNKNOWN: Final = "This invitation link is not valid. Check that you copied all of it."
BAD_EXPIRED: Final = "This invitation link has expired."
BAD_USED: Final = "This invitation link has already been used."
BAD_CLOSED: Final = "This room no longer accepts new people."
BAD_OFF: Final = "Invitations are not available at the moment."
BAD_FAILED: Final = ("We could not create your account. Please try again in a few minutes; "
                     "the link is still valid.")
BAD_ASK: Final = ("If you want to join, ask {agency} for a new link. No account has been "
                  "created.")

# The privacy notice, one paragraph per item.
NOTICE: Final = (
    "{agency} will create a chat account for you with a pseudonym. We do not ask for "
    "your phone number or e-mail address.",
    "Other people in the room only see your pseudonym and what you write. Messages "
    "are end-to-end encrypted.",
    "{agency} uses this account only so that you can take part in the room “{room}”. "
    "The room's moderators can remove messages or people who break the rules, and "
    "those actions are logged.",
    "You can leave the room at any time and ask {agency} to delete your account.",
)
