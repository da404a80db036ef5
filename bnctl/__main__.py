"""``python -m bnctl`` runs the CLI."""

from bnctl.cli import main

main()
