"""Prometheus metrics. Labels carry kinds and reasons only, never personal data."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per bridge instance (no module-global collectors).

    Every label value comes from a small fixed set: direction `in`/`out`; type a
    WhatsApp message kind (in) or an outbox payload type (out); reason
    `signature`/`json`/`format`; purpose `mirroring`/`notices`; state a consent state;
    source `matrix`/`whatsapp`; outcome of a notice `queued`/`repeat`/`no_consent`/
    `unknown_recipient`/`sent`/`delivered`/`read`/`failed`; an inbound message not
    relayed as sent `media_too_large`/`media_failed`/`unsupported`/`whatsapp_error`/
    `account_error`/`failed`; an identity change and its result. Never an identifier, a
    number or content.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.transactions = Counter("civic_bridge_as_transactions",
                                    "Appservice transactions stored", registry=r)
        self.relayed = Counter("civic_bridge_messages_relayed",
                               "Messages relayed", ["direction", "type"], registry=r)
        self.webhook_rejects = Counter("civic_bridge_webhook_rejects",
                                       "Webhook requests rejected", ["reason"], registry=r)
        # part: message / status, sent before the replay window (bridge.retention)
        self.webhook_replays = Counter(
            "civic_bridge_webhook_replays",
            "Webhook messages and statuses acknowledged but ignored: sent too long ago to "
            "tell a redelivery from a new one", ["part"], registry=r)
        self.consent_changes = Counter("civic_bridge_consent_changes",
                                       "Consent state changes", ["purpose", "state"], registry=r)
        self.outbox_depth = Gauge("civic_bridge_outbox_depth",
                                  "Outbound messages waiting to be sent", registry=r)
        self.outbox_retries = Counter("civic_bridge_outbox_retries",
                                      "Outbound send retries", registry=r)
        self.relay_latency = Histogram("civic_bridge_relay_seconds",
                                       "Time to relay one message", ["direction"], registry=r)
        self.undecryptable = Counter("civic_bridge_undecryptable_events",
                                     "Staff events the bridge could not decrypt", registry=r)
        self.inbound_retries = Counter("civic_bridge_inbound_retries",
                                       "Queued inbound items retried after a failure",
                                       ["source"], registry=r)
        self.webhook_latency = Histogram("civic_bridge_webhook_seconds",
                                         "Time to verify, store and acknowledge a webhook",
                                         registry=r)
        self.transaction_latency = Histogram("civic_bridge_as_transaction_seconds",
                                             "Time to store and acknowledge a transaction",
                                             registry=r)
        self.notices = Counter("civic_bridge_notices",
                               "Notices of availability, by outcome", ["outcome"], registry=r)
        self.send_batches = Histogram("civic_bridge_matrix_send_batch",
                                      "Room sends of the E2EE devices that left together "
                                      "(the send gate)", buckets=(1, 2, 4, 8, 16, 32),
                                      registry=r)
        self.open_devices = Gauge("civic_bridge_open_devices",
                                  "E2EE devices (bot and ghosts) open in memory", registry=r)
        self.active = Gauge("civic_bridge_active",
                            "1 while this process holds the leader lock and processes",
                            registry=r)
        # outcome: listed/queued/repeat/unknown/refused_parameters/no_consent/not_portal.
        self.staff_templates = Counter("civic_bridge_staff_templates",
                                       "Approved templates staff asked to send, by outcome",
                                       ["outcome"], registry=r)
        # kind: read/typing; outcome: sent/failed/no_message/repeat/rate_limited/
        # window_closed.
        self.receipts = Counter("civic_bridge_whatsapp_receipts",
                                "Staff read receipts and typing sent on to WhatsApp",
                                ["kind", "outcome"], registry=r)
        # reason: media_too_large / media_failed / unsupported / whatsapp_error /
        # account_error
        self.inbound_not_relayed = Counter(
            "civic_bridge_inbound_not_relayed",
            "WhatsApp messages staff got a notice for instead of the content, by reason",
            ["reason"], registry=r)
        # change: user_changed_number / user_changed_user_id / other;
        # result: rekeyed / notice_only / conflict / unknown_citizen
        self.identity_changes = Counter(
            "civic_bridge_identity_changes",
            "WhatsApp number or BSUID changes reported for citizens", ["change", "result"],
            registry=r)
        # Appended by the robustness fixes (issue 14): kept at the end for easy merges.
        self.ignored_parts = Counter(
            "civic_bridge_ignored_parts",
            "Malformed parts of accepted webhooks or transactions, ignored", ["source"],
            registry=r)
        self.bot_invites_declined = Counter(
            "civic_bridge_bot_invites_declined",
            "Invites of the bot declined: not from admin.users/portals.staff, not a "
            "bridge room", registry=r)
        # what: held_inbound, finished_queue_rows, transaction_ids, held_staff_messages,
        # notice_log (bridge.retention.STEPS).
        self.retention_purged = Counter("civic_bridge_retention_purged",
                                        "Rows deleted by the retention purge", ["what"],
                                        registry=r)
        self.retention_failures = Counter(
            "civic_bridge_retention_failures",
            "Rows (or whole steps) the retention purge could not handle", ["what"],
            registry=r)
        self.retention_runs = Counter("civic_bridge_retention_runs",
                                      "Retention purge runs", registry=r)
        self.retention_last_run = Gauge("civic_bridge_retention_last_run_timestamp_seconds",
                                        "When the retention purge last ran", registry=r)
        # Dead letters (bridge.deadletters): source matrix/whatsapp/outbox, reason a
        # bridge.retry.DeadReason.
        self.dead_letters = Counter("civic_bridge_dead_letters",
                                    "Queued items set aside after a permanent failure",
                                    ["source", "reason"], registry=r)
        self.dead_letters_current = Gauge("civic_bridge_dead_letters_current",
                                          "Dead letters waiting for an admin to retry or "
                                          "discard them", registry=r)
        # reason: unauthenticated (no or an unknown token) or forbidden (a token without
        # the route's scope): refused admin API calls (bridge.admin.auth).
        self.admin_refusals = Counter("civic_bridge_admin_refusals",
                                      "Admin API calls refused", ["reason"], registry=r)
        # reason: one of bridge.whatsapp.staff_events.NotSentReason
        self.outbound_not_sent = Counter(
            "civic_bridge_outbound_not_sent",
            "Staff events in portals not sent to WhatsApp (staff were told), by reason",
            ["reason"], registry=r)
        # Rooms over WhatsApp (bridge.rooms_wa): a room message not relayed to or from a
        # WhatsApp member, who (or whose room) was told. reason: `announcement` (a
        # member's post in an announcement room), `muted` (a muted member's post),
        # `media_off` (a file, to one member, in a room that does not relay media),
        # `left_out` (older waiting messages beyond rooms.backlog_max), `not_member`
        # (queued for someone who left or was removed before it went), `unsupported`
        # (a room event with no WhatsApp form, per member), `undelivered` (accepted by
        # WhatsApp, then reported failed; the room is told).
        self.room_not_relayed = Counter(
            "civic_bridge_room_not_relayed",
            "Agency-room messages not relayed to or from a WhatsApp member, by reason",
            ["reason"], registry=r)
        self.media_delete_failures = Counter(
            "civic_bridge_media_delete_failures",
            "Media uploaded to Meta for a send that could not be deleted afterwards",
            registry=r)
        # Moderation (bridge.moderation): origin `matrix`/`whatsapp`/`flag`; action one of
        # redact/mute/kick/ban/dismiss; result `reverted`/`not_reverted`; what
        # `management`/`reporter`/`poll` (Synapse's event reports could not be read).
        self.reports = Counter("civic_bridge_reports", "Reports filed for moderators, by "
                               "origin (flags included)", ["origin"], registry=r)
        self.report_actions = Counter("civic_bridge_report_actions",
                                      "Reports closed by a moderator, by action", ["action"],
                                      registry=r)
        self.flags = Counter("civic_bridge_flags",
                             "Messages flagged to moderators by moderation.flag_terms",
                             registry=r)
        self.display_names = Counter("civic_bridge_display_names_refused",
                                     "Citizens' display names that broke the rules",
                                     ["result"], registry=r)
        self.moderation_undelivered = Counter(
            "civic_bridge_moderation_undelivered",
            "Moderation notices or answers to reporters that could not be delivered, and "
            "failed reads of Synapse's event reports",
            ["what"], registry=r)
        # outcome: released / expired / other_portal (a ✅ or «enviar» written in another
        # portal than the held message's: refused, with a notice there)
        self.held_confirmations = Counter(
            "civic_bridge_held_confirmations",
            "Confirmations of staff messages held for personal data, by outcome",
            ["outcome"], registry=r)
        self.room_keys_withheld = Counter(
            "civic_bridge_room_keys_withheld",
            "Times earlier room keys were withheld from a device its owner has not "
            "cross-signed (e2ee.forward_keys_to: cross-signed)", registry=r)
        # result: ok / failed (the anchor command failed; retried) / broken (the chain
        # check failed, so the head was not exported)
        self.audit_anchors = Counter(
            "civic_bridge_audit_anchors",
            "Daily exports of the audit chain's head (audit.anchor_command)", ["result"],
            registry=r)
        # reason: malformed (no recipient) / not_ours (outside the namespace) /
        # unknown_device (a device of ours the bridge does not use, an erased ghost)
        self.to_device_dropped = Counter(
            "civic_bridge_to_device_dropped",
            "To-device events from appservice transactions no device of the bridge could "
            "take", ["reason"], registry=r)
        # result: recovered (new to-device events fetched) / nothing_new / failed
        # (bridge.matrix.catchup: one /sync after a staff event stayed undecryptable)
        self.to_device_catch_ups = Counter(
            "civic_bridge_to_device_catch_ups",
            "Device inbox fetches after a staff event stayed undecryptable", ["result"],
            registry=r)
        # result: ok / failed (bridge.matrix.as_recovery: MSC2659 pings that end
        # Synapse's hold on the appservice after a failed transaction or a restart)
        self.homeserver_pings = Counter(
            "civic_bridge_homeserver_pings",
            "Pings asking the homeserver to retry its appservice transactions now",
            ["result"], registry=r)
