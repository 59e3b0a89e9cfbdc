"""Prometheus metrics. Labels carry kinds and reasons only, never personal data."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """One registry per bridge instance (no module-global collectors).

    Every label value comes from a small fixed set: direction `in`/`out`; type a
    WhatsApp message kind (in) or an outbox payload type (out); reason
    `signature`/`json`/`format`; purpose `mirroring`/`notices`; state a consent state;
    source `matrix`/`whatsapp`; outcome of a notice `queued`/`repeat`/`no_consent`/
    `unknown_recipient`/`sent`/`delivered`/`read`/`failed`. Never an identifier, a
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
