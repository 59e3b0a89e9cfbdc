"""Synapse glue: register callbacks, turn `rules` decisions into Matrix errors, count them.

Imports only what Synapse provides (its module API, prometheus_client). Every refusal
is M_FORBIDDEN with a Spanish/English `error` (Synapse lets a callback's extra fields
replace its generic text) and counts in `civic_bridge_policy_refusals_total`, which
Synapse's own metrics listener exposes, and in the counts of `/_civic_bridge/policy`.
"""

from __future__ import annotations

import logging
from collections import Counter as Tally
from dataclasses import replace
from typing import Any, Literal

from prometheus_client import Counter
from synapse.module_api import NOT_SPAM, DirectServeJsonResource, ModuleApi, UserID
from synapse.module_api.errors import Codes, ConfigError, SynapseError

from civic_bridge_synapse import __version__
from civic_bridge_synapse.rules import ACTIONS, Policy, Refusal, parse_policy

log = logging.getLogger(__name__)

POLICY_PATH = "/_civic_bridge/policy"
FALLBACK_NAME = "Participante"  # when no earlier acceptable name is known

REFUSALS = Counter("civic_bridge_policy_refusals",
                   "Actions of citizens' accounts refused by civic-bridge's Synapse module",
                   ["server_name", "action"])

SpamResult = Literal["NOT_SPAM"] | tuple[Codes, dict[str, Any]]
# Synapse's own object: it compares with `is`.
ALLOWED: Literal["NOT_SPAM"] = NOT_SPAM


class PolicyModule:
    """Configured under `modules:` as `civic_bridge_synapse.PolicyModule`."""

    def __init__(self, config: Policy, api: ModuleApi) -> None:
        # Default to Synapse's own server name: the fragment in deploy/ needs no domain.
        self._policy = config if config.server_name else replace(config,
                                                                 server_name=api.server_name)
        self._api = api
        self.counts: Tally[str] = Tally({action: 0 for action in ACTIONS})
        api.register_spam_checker_callbacks(
            user_may_create_room=self.user_may_create_room,
            user_may_invite=self.user_may_invite,
            user_may_send_3pid_invite=self.user_may_send_3pid_invite,
            user_may_join_room=self.user_may_join_room,
            user_may_create_room_alias=self.user_may_create_room_alias,
            user_may_publish_room=self.user_may_publish_room,
            check_username_for_spam=self.check_username_for_spam,
        )
        api.register_third_party_rules_callbacks(check_event_allowed=self.check_event_allowed,
                                                 on_profile_update=self.on_profile_update)
        api.register_web_resource(POLICY_PATH, PolicyResource(self, api))
        log.info("civic-bridge policy module %s loaded", __version__)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> Policy:
        try:
            return parse_policy(config)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None

    @property
    def policy(self) -> Policy:
        return self._policy

    def _refuse(self, refusal: Refusal | None) -> SpamResult:
        if refusal is None:
            return ALLOWED
        self._count(refusal.action)
        return Codes.FORBIDDEN, refusal.fields()

    def _count(self, action: str) -> None:
        self.counts[action] += 1
        REFUSALS.labels(server_name=self._policy.server_name, action=action).inc()
        # No user ID or name here: the count is what operators need.
        log.info("civic-bridge policy refused %s (%d since start)", action,
                 self.counts[action])

    # --- spam-checker callbacks -----------------------------------------------------

    async def user_may_create_room(self, user_id: str, room_config: dict[str, Any]) -> SpamResult:
        return self._refuse(self._policy.may_create_room(user_id))

    async def user_may_invite(self, inviter: str, invitee: str, room_id: str) -> SpamResult:
        return self._refuse(self._policy.may_invite(inviter))

    async def user_may_send_3pid_invite(self, inviter: str, medium: str, address: str,
                                        room_id: str) -> SpamResult:
        return self._refuse(self._policy.may_invite(inviter))

    async def user_may_join_room(self, user_id: str, room_id: str,
                                 is_invited: bool) -> SpamResult:
        refusal = self._policy.may_join(user_id, is_invited)
        # Synapse asks again for every join->join event (a profile change copied into
        # the room): someone already in the room is not joining it.
        if refusal is not None and await self._membership(user_id, room_id) == "join":
            return ALLOWED
        return self._refuse(refusal)

    async def user_may_create_room_alias(self, user_id: str, alias: object) -> SpamResult:
        return self._refuse(self._policy.may_use_room_directory(user_id))

    async def user_may_publish_room(self, user_id: str, room_id: str) -> SpamResult:
        return self._refuse(self._policy.may_use_room_directory(user_id))

    async def check_event_allowed(self, event: Any,
                                  state: Any) -> tuple[bool, dict[str, Any] | None]:
        """A citizen's own member event (a per-room name, or the profile copied into
        their rooms) may not carry a forbidden display name, and loses its avatar.

        The spam checker's `check_event_for_spam` never sees member events, so this is a
        third-party-rules callback; Synapse passes a SynapseError raised here to the
        client as is, which is how the refusal keeps its reason. An avatar is left out
        rather than refused: refusing would also block every later copy of the profile
        (a harmless rename) into the citizen's rooms while the avatar stays set.
        """
        if event.type != "m.room.member" or event.sender != event.state_key:
            return True, None
        content = event.content
        if content.get("membership") != "join":
            return True, None
        refusal = self._policy.may_set_profile(event.sender, content.get("displayname"))
        if refusal is not None:
            self._count(refusal.action)
            raise SynapseError(403, refusal.error, Codes.FORBIDDEN,
                               additional_fields=refusal.fields())
        if self._policy.strips_avatar(event.sender, content.get("avatar_url")):
            self._count("avatar")
            replacement = event.get_dict()
            replacement["content"] = {k: v for k, v in content.items() if k != "avatar_url"}
            return True, replacement
        return True, None

    async def check_username_for_spam(self, profile: dict[str, Any], searcher: str) -> bool:
        """True hides `profile` from `searcher`'s user-directory results."""
        found = str(profile.get("user_id", ""))
        if self._policy.may_see_in_directory(searcher, found, share_room=False):
            return False
        return not await self._share_joined_room(searcher, found)

    # --- profile --------------------------------------------------------------------

    async def on_profile_update(self, user_id: str, profile: Any, by_admin: bool,
                                deactivation: bool) -> None:
        """Put back a citizen's previous display name when they set a forbidden one.

        Synapse (up to 1.163 at least) has no callback that runs before a profile
        change, so `PUT /profile/.../displayname` still answers 200; but this runs
        inside that request, before the name is copied into any room (and that copy
        is refused by `check_event_allowed`), so nobody sees the forbidden name.
        Admins (`by_admin`, which includes this module's own revert) are not checked.
        """
        if by_admin or deactivation or not self._policy.restricted(user_id):
            return
        refusal = self._policy.may_set_profile(user_id, profile.display_name)
        if refusal is None:
            return
        self._count(refusal.action)
        previous = await self._previous_name(user_id)
        await self._api.set_displayname(UserID.from_string(user_id), previous)

    async def _previous_name(self, user_id: str) -> str:
        """The name their rooms still show (the profile copy comes after this check)."""
        def query(txn: Any) -> list[str]:
            txn.execute(
                "SELECT m.display_name FROM local_current_membership AS c"
                " JOIN room_memberships AS m ON m.event_id = c.event_id"
                " WHERE c.user_id = ? AND c.membership = 'join'"
                " AND m.display_name IS NOT NULL", (user_id,))
            return [str(row[0]) for row in txn.fetchall()]

        names: list[str] = await self._api.run_db_interaction("civic_bridge_previous_name",
                                                              query)
        for name in names:
            if self._policy.may_set_profile(user_id, name) is None:
                return name
        return FALLBACK_NAME

    async def _membership(self, user_id: str, room_id: str) -> str | None:
        def query(txn: Any) -> str | None:
            txn.execute("SELECT membership FROM local_current_membership"
                        " WHERE user_id = ? AND room_id = ?", (user_id, room_id))
            row = txn.fetchone()
            return None if row is None else str(row[0])

        result = await self._api.run_db_interaction("civic_bridge_membership", query)
        return None if result is None else str(result)

    async def _share_joined_room(self, one: str, other: str) -> bool:
        def query(txn: Any) -> bool:
            txn.execute(
                "SELECT 1 FROM local_current_membership AS a"
                " JOIN local_current_membership AS b ON a.room_id = b.room_id"
                " WHERE a.user_id = ? AND b.user_id = ?"
                " AND a.membership = 'join' AND b.membership = 'join' LIMIT 1",
                (one, other))
            return txn.fetchone() is not None

        return bool(await self._api.run_db_interaction("civic_bridge_share_room", query))


class PolicyResource(DirectServeJsonResource):  # type: ignore[misc]
    """`GET /_civic_bridge/policy`: lets the bridge (and admins) see the module is loaded,
    with which prefixes, and how many refusals since Synapse started.

    Needs an access token of the bridge (its as_token) or a server admin: the answer
    says which accounts are citizens, which is nobody else's business.
    """

    def __init__(self, module: PolicyModule, api: ModuleApi) -> None:
        super().__init__()
        self._module = module
        self._api = api

    async def _async_render_GET(self, request: Any) -> tuple[int, dict[str, Any]]:
        requester = await self._api.get_user_by_req(request)
        user_id = requester.user.to_string()
        policy = self._module.policy
        if policy.kind(user_id) != "bridge" and not await self._api.is_user_admin(user_id):
            raise SynapseError(403, "Only the bridge or a server admin may read this",
                               Codes.FORBIDDEN)
        return 200, {
            "module": "civic_bridge_synapse", "version": __version__,
            "server_name": policy.server_name,
            "citizen_prefixes": list(policy.citizen_prefixes),
            "ghost_prefixes": list(policy.ghost_prefixes),
            "bridge_localparts": sorted(policy.bridge_localparts),
            "allow_citizen_avatars": policy.allow_citizen_avatars,
            "refusals": dict(self._module.counts),
        }
