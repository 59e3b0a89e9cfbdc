"""Administration: the verbs (`verbs`, declared once), the services they call
(`service`, `moderation`, `citizens`, `notices`, `reidentify`), token rules (`auth`) and
the CLI client (`cli`). The HTTP routes are bridge.web.admin (a `/admin/v1` sub-app);
the management-room commands are `commands`.
"""
