"""Every ``--help`` reads as text: no Sphinx roles or double backticks, no docstring line breaks mid-sentence."""

from __future__ import annotations

import re

import typer
from typer.testing import CliRunner

from backbone.cli import help_text, mounted_app

_MARKUP = re.compile(r"``|:(?:func|class|mod|meth|attr|data|exc):`")


def _commands(group: typer.Typer, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = [
        (*path, c.name or c.callback.__name__.replace("_", "-"))
        for c in group.registered_commands
        if c.callback
    ]
    for sub in group.registered_groups:
        if sub.typer_instance is not None and sub.name:
            found += [(*path, sub.name), *_commands(sub.typer_instance, (*path, sub.name))]
    return found


def test_help_text_turns_sphinx_markup_into_backticks_and_joins_wrapped_lines() -> None:
    doc = """Incidents from the ``incidents`` projection, newest first: when opened and
    closed (see :func:`projections.incidents.list_incidents`, :class:`~core.settings.Settings`).

    A second paragraph:
    * one item
    * another item
    """
    assert help_text(doc) == (
        "Incidents from the `incidents` projection, newest first: when opened and closed (see "
        "`projections.incidents.list_incidents`, `Settings`).\n\n"
        "A second paragraph:\n* one item\n* another item"
    )


def test_no_help_shows_sphinx_markup() -> None:
    app = mounted_app()
    runner = CliRunner()
    commands = _commands(app)
    assert len(commands) > 60, commands
    shown = {}
    for command in commands:
        result = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert result.exit_code == 0, (command, result.output)
        shown[" ".join(command)] = result.output
    assert {c: _MARKUP.findall(text) for c, text in shown.items() if _MARKUP.search(text)} == {}
