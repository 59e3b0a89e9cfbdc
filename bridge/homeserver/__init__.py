"""The agency's homeserver: the Synapse settings and policy module the bridge relies on.

`settings` derives the homeserver.yaml fragment from the bridge's config, `checks`
verifies a homeserver.yaml against it (pure), `probe` asks a running homeserver.
"""
