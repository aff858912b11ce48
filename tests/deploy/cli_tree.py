"""The mounted ``backbone`` click command tree (the CLI mounts its groups at start, in ``main``)."""

from __future__ import annotations

from functools import lru_cache


def mount_cli():
    """Mount every group on ``backbone.cli.app`` the way ``main`` does, once; return the typer app."""
    import backbone.cli as cli

    if not getattr(cli.app, "_deploy_tests_mounted", False):
        if hasattr(cli, "mount"):  # backbone/cli/ package (after the restructure)
            cli.mount(cli.app)
        else:  # backbone/cli.py module
            cli._mount()
        cli.app._deploy_tests_mounted = True
    return cli.app


@lru_cache(maxsize=1)
def root_command():
    """The click group of ``backbone`` with every sub-command."""
    import typer.main

    return typer.main.get_command(mount_cli())
