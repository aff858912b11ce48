"""``python -m backbone`` runs the CLI."""

from backbone.cli import main

main()
