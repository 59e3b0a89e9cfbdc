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
        # account_error / failed (the worker gave up)
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
        # result: ok / failed (the anchor command failed; retried) / broken (the chain
        # check failed, so the head was not exported)
        self.audit_anchors = Counter(
            "civic_bridge_audit_anchors",
            "Daily exports of the audit chain's head (audit.anchor_command)", ["result"],
            registry=r)
