"""The ``backbone`` command line (typer).

Every option has an environment twin (shown in ``--help``); every command that prints data has
``--json``. Sub-command groups live in their own modules and are mounted here.
"""

from __future__ import annotations

import typer

__all__ = ["app", "main"]

app = typer.Typer(
    name="backbone",
    help="Sophia backbone: event-sourced streaming backbone for an AI-agent platform.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)


@app.callback()
def _setup() -> None:
    """Configure structlog once (to stderr) from the settings."""
    from backbone.observability import configure_logging
    from backbone.settings import get_settings

    try:
        s = get_settings()
        configure_logging(s.log_level, s.log_format)
    except Exception:  # noqa: BLE001 - a bad setting is reported by the command that needs it
        configure_logging()


def _mount() -> None:
    from backbone import cli_dev

    app.add_typer(cli_dev.app, name="dev", help="The embedded dev stack: Tansu, PostgreSQL, Redis.")
    from backbone import cli_core

    cli_core.mount(app)


def main() -> None:
    """Entry point of the ``backbone`` console script."""
    _mount()
    app()


if __name__ == "__main__":
    main()
