"""The query commands' tables never cut a value: too wide for the terminal, they print one block per row."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from backbone.cli import helpers

ROWS = [
    {"run_id": "sympy__sympy-24213", "outcome": "UNRESOLVED", "steps": 33, "llm_calls": 34, "tool_calls": 33,
     "failing_tool_calls": 4, "prompt_tokens": 1_234_567, "cost_usd": 0.4567},
    {"run_id": "django__django-11066", "outcome": "RESOLVED", "steps": 9, "llm_calls": 10, "tool_calls": 9,
     "failing_tool_calls": 0, "prompt_tokens": 88_001, "cost_usd": 0.1},
]  # fmt: skip


def _printed(monkeypatch: pytest.MonkeyPatch, width: int, columns: list[str], rows: list[dict]) -> str:
    buffer = io.StringIO()
    monkeypatch.setattr(helpers, "out", Console(file=buffer, width=width, color_system=None))
    helpers.print_rows(rows, columns, "agent runs", as_json=False)
    return buffer.getvalue()


def test_a_table_too_wide_for_80_columns_prints_every_value_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = ROWS * 4  # more rows than are ever turned side by side
    text = _printed(monkeypatch, 80, list(ROWS[0]), rows)
    assert "…" not in text
    assert max(map(len, text.splitlines())) <= 80
    blocks = text.split("-[ agent runs: ")[1:]
    assert [b.splitlines()[0] for b in blocks] == [f"{n} of 8 ]-" for n in range(1, 9)]
    first = dict(line.split(None, 1) for line in blocks[0].splitlines()[1:])
    assert first == {"run_id": "sympy__sympy-24213", "outcome": "UNRESOLVED", "steps": "33", "llm_calls": "34",
                     "tool_calls": "33", "failing_tool_calls": "4", "prompt_tokens": "1,234,567",
                     "cost_usd": "0.4567"}  # fmt: skip


def test_a_table_that_fits_stays_a_table(monkeypatch: pytest.MonkeyPatch) -> None:
    narrow = _printed(monkeypatch, 80, ["run_id", "outcome", "prompt_tokens"], ROWS)
    wide = _printed(monkeypatch, 200, list(ROWS[0]), ROWS)
    for text in (narrow, wide):
        assert "-[ " not in text and "…" not in text
        assert any("sympy__sympy-24213" in line and "1,234,567" in line for line in text.splitlines())


def test_a_few_wide_rows_are_printed_side_by_side(monkeypatch: pytest.MonkeyPatch) -> None:
    """An evaluation's policies stay side by side: a line per field, a column per policy."""
    policies = [{"policy": p, "point": "before last step", "flagged": f, "precision": pr, "recall": r}
                for p, f, pr, r in (("healer", 54, 0.4259, 0.7419), ("baseline", 62, 0.3871, 0.7742))]  # fmt: skip
    text = _printed(monkeypatch, 60, list(policies[0]), policies)
    assert "…" not in text and "-[ " not in text
    lines = text.splitlines()
    assert max(map(len, lines)) <= 60
    header = [[c.strip() for c in line.split("┃")[1:4]] for line in lines if line.startswith("┃")]
    assert header == [["policy", "healer", "baseline"]], text
    grid = [[c.strip() for c in line.split("│")[1:4]] for line in lines]
    assert ["precision", "0.4259", "0.3871"] in grid and [
        "point",
        "before last step",
        "before last step",
    ] in grid
    assert not any(row[:1] == ["policy"] for row in grid), text


@pytest.mark.parametrize("width", [200, 60, 30])
def test_values_that_look_like_markup_are_printed_as_they_are(
    monkeypatch: pytest.MonkeyPatch, width: int
) -> None:
    """A value holding "[/usr]" raised Rich's MarkupError and one holding "[main]" lost it (a table's cells
    were markup); as a table, turned or as blocks, they print as they are."""
    rows = [{"command": "test -d [/usr] && ls [main]", "n": 1}, {"command": "[bold]x[/bold]", "n": 2}]
    text = _printed(monkeypatch, width, ["command", "n"], rows)
    assert "test -d [/usr] && ls [main]" in text and "[bold]x[/bold]" in text


def test_a_connector_plan_prints_a_regex_config_value_whole() -> None:
    """Debezium's RegexRouter takes a value such as ``([^.]+)\\.([^.]+)``: the plan shows it as it is."""
    from backbone.cli.connectors import _plan_table
    from connectors.kafka_connect import ConnectorDiff, KeyChange, PlanAction

    change = KeyChange(key="transforms.route.regex", live=None, desired=r"([^.]+)\.([^.]+)\.([^/]+)")
    buffer = io.StringIO()
    Console(file=buffer, width=200, color_system=None).print(
        _plan_table([ConnectorDiff(name="inventory", action=PlanAction.UPDATE, changes=(change,))])
    )
    assert r"([^.]+)\.([^.]+)\.([^/]+)" in buffer.getvalue()


def test_a_record_whose_data_looks_like_markup_is_printed_as_it_is(monkeypatch: pytest.MonkeyPatch) -> None:
    """``subscribe`` and ``replay`` print a record's data: an agent's command ``ls [/usr]`` raised Rich's
    MarkupError and ``grep -E '[a-z]+'`` lost its ``[a-z]``; both are printed as they are."""
    from datetime import UTC, datetime

    from backbone.cli import core
    from streams.consumer import ConsumedEvent
    from streams.envelope import Event

    event = Event.create("sophia.agent.ToolCall", "run-[1]", {"command": "ls [/usr] && grep -E '[a-z]+' f"},
                         source="/test", time=datetime(2025, 11, 19, tzinfo=UTC))  # fmt: skip
    record = ConsumedEvent(topic="agent.events", partition=0, offset=7, timestamp_ms=0, key=event.key,
                           attributes=event.attributes, schema=event.schema, data=dict(event.data), value=b"",
                           headers=())  # fmt: skip
    buffer = io.StringIO()
    monkeypatch.setattr(core, "out", Console(file=buffer, width=200, color_system=None))
    core._print_record(record, as_json=False)
    text = buffer.getvalue()
    assert "agent.events[0]@7" in text and "subject=run-[1]" in text
    assert "ls [/usr] && grep -E '[a-z]+' f" in text


def test_an_error_message_holding_brackets_is_printed_whole(monkeypatch: pytest.MonkeyPatch) -> None:
    """clear_errors prints the failure's message as text: "[/tmp]" in it neither raises nor vanishes."""
    import typer

    buffer = io.StringIO()
    monkeypatch.setattr(helpers, "err", Console(file=buffer, width=200, color_system=None))

    @helpers.clear_errors
    def command() -> None:
        raise ValueError("no such folder [/tmp/nab] (category [a-z])")

    with pytest.raises(typer.Exit):
        command()
    assert "error: no such folder [/tmp/nab] (category [a-z])" in buffer.getvalue()
