"""The mounted ``backbone`` click command tree (the CLI mounts its groups at start, in ``main``)."""

from __future__ import annotations

from functools import lru_cache


def mount_cli():
    """Mount every group on ``backbone.cli.app`` the way ``main`` does, once; return the typer app."""
    from backbone.cli import mounted_app

    return mounted_app()


@lru_cache(maxsize=1)
def root_command():
    """The click group of ``backbone`` with every sub-command."""
    import typer.main

    return typer.main.get_command(mount_cli())
