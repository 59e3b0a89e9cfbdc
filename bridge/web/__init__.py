"""The HTTP edge: every aiohttp handler, thin (parse the request, call one handler
method, shape the answer).

- `appservice`: the appservice API Synapse calls (`/_matrix/app/v1/*`) → bridge.ingest;
- `whatsapp`: `GET|POST /whatsapp/webhook` → bridge.ingest;
- `admin`: the `/admin/v1` sub-app, behind the token check of `admin_auth`, driven by
  the verbs of bridge.admin.verbs; `rooms_wa`: the rooms-over-WhatsApp routes;
- `invites`: the public invite pages; `ops`: `/health`, `/ready`, `/metrics`;
- `middleware`: errors as JSON; `standby`: 503 until elected.

Handlers read the process through the narrow views of `state` (one `AppKey` each), never
the composition root (tests/unit/test_layers.py); bridge.app mounts them per listener.
"""
