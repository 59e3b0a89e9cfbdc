"""Invite links: create one for a room, show what it is for, and redeem it.

A link's token is 32 random bytes (base64url); the database keeps only its SHA-256.
The token is also the form's CSRF token: the form posts back to the link's own URL,
and without a valid, unused token nothing is created. Redeeming takes one use
atomically *before* creating the account and gives it back if that fails, so a
single-use link yields at most one account however many browsers race for it.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from bridge.config import Config
from bridge.db import Database, Room
from bridge.db.invites import InviteLink
from bridge.errors import InvalidParam, Unavailable
from bridge.invites.accounts import RegistrationError, SynapseRegistrar
from bridge.invites.forms import FieldError, SignupForm, validate
from bridge.invites.texts import notice, notice_hash
from bridge.matrix.api import MatrixAPI, MatrixError
from bridge.matrix.rooms import Rooms
from bridge.privacy import Privacy, new_localpart, new_pseudonym_code
from bridge.roomguard import guard_size, open_room
from bridge.types import Pseudonym, UserID

log = logging.getLogger(__name__)

TOKEN = re.compile(r"^[A-Za-z0-9_-]{43}$")  # secrets.token_urlsafe(32)
LINK_KINDS = ("citizen", "announcement")
MAX_USES = 1000
MIN_EXPIRY = timedelta(minutes=5)
MAX_EXPIRY = timedelta(hours=720)
# Undoing a failed redemption: tries to deactivate a half-made account, seconds apart.
CLEANUP_ATTEMPTS = 3
CLEANUP_DELAY = 1.0
Problem = Literal["unknown", "expired", "used", "closed", "off", "failed"]


class LinkUnusable(Exception):
    """The link cannot be used (any more); `problem` says why, for the page."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem)
        self.problem: Problem = problem


class FormInvalid(Exception):
    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("form invalid")
        self.errors = errors


@dataclass(frozen=True)
class LinkView:
    """What the page shows about a usable link."""

    link: InviteLink
    room_name: str


@dataclass(frozen=True)
class CreatedLink:
    url: str
    link_id: int
    uses: int
    expires_at: datetime


@dataclass(frozen=True)
class Joined:
    user_id: UserID
    display_name: str
    room_name: str


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


class InviteLinks:
    """Invite links end to end; `registrar` is None while invites are not configured."""

    def __init__(self, config: Config, db: Database, api: MatrixAPI, rooms: Rooms, bot: UserID,
                 privacy: Privacy, registrar: SynapseRegistrar | None) -> None:
        self._config = config
        self._db = db
        self._api = api
        self._rooms = rooms
        self._bot = bot
        self._privacy = privacy
        self._registrar = registrar
        cfg = config.invites
        self.public_url = (cfg.public_url or config.appservice.public_url).rstrip("/")
        self.homeserver_url = cfg.homeserver_url or config.homeserver.url
        self.web_client_url = cfg.web_client_url or None
        self.agency = config.consent.agency_name

    def url(self, token: str) -> str:
        return f"{self.public_url}/invite/{token}"

    def suggest_pseudonym(self) -> str:
        return self._privacy.display_name(new_pseudonym_code())

    async def create(self, actor: str, room_id: str, uses: int = 1,
                     expires_in: timedelta | None = None, confirm: bool = False) -> CreatedLink:
        if self._registrar is None:
            raise Unavailable("invite links are off: set invites.registration_shared_secret")
        room = await open_room(self._db, room_id)
        if room.kind not in LINK_KINDS:
            raise InvalidParam(f"invite links are for rooms of kind {' or '.join(LINK_KINDS)}")
        if not 1 <= uses <= MAX_USES:
            raise InvalidParam(f"uses must be 1-{MAX_USES}")
        ttl = expires_in or timedelta(hours=self._config.invites.default_expiry_hours)
        if not MIN_EXPIRY <= ttl <= MAX_EXPIRY:
            raise InvalidParam("expires_in must be between 300 seconds and 720 hours")
        await guard_size(self._rooms, room, confirm, self._config.rooms.confirm_above)
        token = secrets.token_urlsafe(32)
        expires_at = datetime.now(UTC) + ttl
        link = await self._db.invites.create(token_hash=token_hash(token), room_id=room.room_id,
                                             max_uses=uses, expires_at=expires_at,
                                             created_by=actor)
        await self._db.audit.append(actor, "invite_link.create",
                                    f"{room.room_id} link:{link.id}", "ok",
                                    f"uses={uses} expires={expires_at.isoformat()}")
        return CreatedLink(self.url(token), link.id, uses, expires_at)

    async def _lookup(self, token: str) -> tuple[InviteLink | None, Room | None, Problem | None]:
        if self._registrar is None:
            return None, None, "off"
        if not TOKEN.match(token):
            return None, None, "unknown"
        link = await self._db.invites.by_hash(token_hash(token))
        if link is None:
            return None, None, "unknown"
        room = await self._db.rooms.get(link.room_id)
        if room is None or room.closed_at is not None or link.revoked_at is not None:
            return link, room, "closed"
        if link.uses >= link.max_uses:
            return link, room, "used"
        if datetime.now(UTC) >= link.expires_at:
            return link, room, "expired"
        return link, room, None

    async def view(self, token: str) -> LinkView:
        link, room, problem = await self._lookup(token)
        if problem is not None or link is None or room is None:
            raise LinkUnusable(problem or "unknown")
        return LinkView(link, room.name)

    async def redeem(self, token: str, form: SignupForm) -> Joined:
        """Create the account and invite it; LinkUnusable, FormInvalid or SignupFailed."""
        view = await self.view(token)
        link = view.link
        errors = validate(form, self._config.invites.min_password_length)
        if errors:
            raise FormInvalid(errors)
        if not await self._db.invites.claim(link.id, datetime.now(UTC)):
            _, _, problem = await self._lookup(token)
            await self._refused(link, problem or "used")
        made: list[str] = []  # the localpart Synapse may have made (an answer was lost)
        try:
            user_id, name = await self._create_account(form, made)
            await self._api.invite(self._bot, link.room_id, user_id, "invite link")
            await self._record(link, view.room_name, user_id, name, form.lang)
        except Exception as exc:
            # Anything (a refusal, a timeout, a cut connection, a database error): undo,
            # so the link stays usable and no account is left behind.
            await self._undo(link, made, form.password, exc)
            raise LinkUnusable("failed") from None
        return Joined(user_id, name, view.room_name)

    async def _undo(self, link: InviteLink, made: list[str], password: str,
                    exc: Exception) -> None:
        """Give the use back and deactivate a half-made account; never raises. Logs and
        audits kinds and the link's id only, never its token."""
        code = (f"registration {exc.status} {exc.errcode}" if isinstance(exc, RegistrationError)
                else f"invite {exc.errcode}" if isinstance(exc, MatrixError)
                else type(exc).__name__)
        outcome = "no account made"
        if made:
            outcome = await self._remove_account(made[-1], password)
        try:
            await self._db.invites.release(link.id)
        except Exception as db_exc:
            outcome += f"; use not given back ({type(db_exc).__name__})"
        # The outcome names the account (for the audit); the log line says less.
        log.warning("invite link %d: account not made (%s); %s", link.id, code,
                    "cleanup needs an admin, see the audit log" if "may exist" in outcome
                    else "cleaned up")
        try:
            await self._db.audit.append(f"invite-link:{link.id}", "invite_link.redeem",
                                        link.room_id, f"error {code}", outcome)
        except Exception as db_exc:
            log.error("invite link %d: could not audit the failure (%s)", link.id,
                      type(db_exc).__name__)

    async def _remove_account(self, localpart: str, password: str) -> str:
        assert self._registrar is not None
        user_id = f"@{localpart}:{self._config.homeserver.domain}"
        for attempt in range(CLEANUP_ATTEMPTS):
            try:
                if await self._registrar.remove(localpart, password):
                    return f"account {user_id} deactivated"
                return "no account made"
            except Exception as exc:
                problem = type(exc).__name__
                if attempt + 1 < CLEANUP_ATTEMPTS:
                    await asyncio.sleep(CLEANUP_DELAY * (attempt + 1))
        # The pseudonymous id only (random letters): an admin deactivates it by hand.
        return f"account {user_id} may exist, deactivate it ({problem})"

    async def _refused(self, link: InviteLink, problem: Problem) -> None:
        await self._db.audit.append(f"invite-link:{link.id}", "invite_link.redeem",
                                    link.room_id, f"refused {problem}", None)
        raise LinkUnusable(problem)

    async def _create_account(self, form: SignupForm, made: list[str]
                              ) -> tuple[UserID, str]:
        """Register a fresh localpart; `made` gets each one Synapse may have created
        (all but those it definitely refused)."""
        assert self._registrar is not None
        name = form.pseudonym or self.suggest_pseudonym()
        prefix = self._config.invites.localpart_prefix
        for attempt in range(3):
            localpart = new_localpart(prefix)
            made.append(localpart)
            try:
                return await self._registrar.register(localpart, form.password, name), name
            except RegistrationError as exc:
                made.remove(localpart)  # a definite answer: nothing was made
                # 16 random letters collide practically never; retry all the same.
                if exc.errcode != "M_USER_IN_USE" or attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _record(self, link: InviteLink, room_name: str, user_id: UserID, name: str,
                      lang: str) -> None:
        shown = notice(lang, self.agency, room_name)
        actor = f"invite-link:{link.id}"
        async with self._db.transaction() as tx:
            await tx.invites.add_account(user_id=user_id, link_id=link.id,
                                         room_id=link.room_id, display_name=name)
            await tx.consent.append(
                citizen_id=None, pseudonym=Pseudonym(user_id), purpose="membership",
                state="granted", notice_version=self._config.invites.notice_version,
                notice_hash=notice_hash(shown), channel="invite-link", language=lang,
                evidence=f"invite-link:{link.id}")
            await tx.audit.append(actor, "consent.membership.granted", user_id, "ok",
                                  f"notice v{self._config.invites.notice_version} ({lang})")
            await tx.audit.append(actor, "invite_link.redeem", f"{link.room_id} {user_id}",
                                  "ok", None)


def parse_expires_in(value: object) -> timedelta | None:
    """`expires_in` from the API: whole seconds, or absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidParam("expires_in: must be a whole number of seconds")
    return timedelta(seconds=value)
