"""WhatsApp Cloud API: webhook parsing (sans-I/O) and the Graph API client (the
simulator tests and the demo use is `bridge.devtools.simulator`).

- `bridge.whatsapp.webhook_parse`: `parse_webhook(body, phone_number_id) -> WebhookBatch`.
- `bridge.whatsapp.webhook`: a signed delivery checked and split into queue rows, each
  holding one parsed message or status (`bridge.whatsapp.stored`); the HTTP route is
  `bridge.web.whatsapp`, the storing `bridge.ingest`.
- `bridge.whatsapp.graph`: `GraphClient`, `Recipient`, `GraphError`, `MediaIntegrityError`.
- `bridge.whatsapp.contract`: Meta's request contract (`schemas/messages.json`):
  `validate_message(body) -> GraphContractError | None`, `validate_upload(...)`.
"""
