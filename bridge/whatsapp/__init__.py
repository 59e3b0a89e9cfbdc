"""WhatsApp Cloud API: webhook parsing (sans-I/O), the Graph API client, and a simulator.

- `bridge.whatsapp.webhook_parse`: `parse_webhook(body, phone_number_id) -> WebhookBatch`.
- `bridge.whatsapp.graph`: `GraphClient`, `Recipient`, `GraphError`, `MediaIntegrityError`.
- `bridge.whatsapp.simulator`: `CloudAPISimulator` for tests and `civic-bridge demo`.
- `bridge.whatsapp.contract`: Meta's request contract (`schemas/messages.json`):
  `validate_message(body) -> GraphContractError | None`, `validate_upload(...)`.
"""
