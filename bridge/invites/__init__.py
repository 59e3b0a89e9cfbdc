"""Invite links for pseudonymous citizens: the admin side creates them, a public page
served by the bridge turns one into a Matrix account invited to exactly one room."""
