"""Invite links for pseudonymous citizens: the admin side creates them, a public page
served by the bridge (bridge.web.invites) turns one into a Matrix account invited to
exactly one room; `forms` and `page` read and draw that page, `service` does the rest."""
