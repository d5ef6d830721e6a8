"""``python -m sftlab.cli``: what the ``sftlab`` command runs (tests, the web UI and torchrun start it this way)."""

from sftlab.cli import main

main()
