"""``sftlab webui``: a browser front end over the same functions as the CLI (see docs/webui.md)."""
