"""Unit tests of the run-summary decision logic (processors.run_summary): no Kafka."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

import processors
from connectors.agent_runs import ParsedRun, iter_runs
from processors.errors import RunMismatchError, UnprocessableEventError, UnsupportedEventError
from processors.run_summary.logic import (
    INSIGHT_SCHEMA,
    LLM_CALL,
    RUN_LIFECYCLE,
    TOOL_CALL,
    RunTotals,
    apply,
    classify,
    insight_id,
    reissue,
)
from streams.envelope import Event, deterministic_id
from streams.registry import EmbeddedRegistry
from streams.serde import AvroSerde

REAL_DATA = Path("/work/shared/data/agent_runs")
RUN = "demo__run-1"
T0 = datetime(2025, 11, 18, 22, 0, 0, tzinfo=UTC)


def _event(schema: str, data: dict[str, Any], event_id: str, run_id: str = RUN) -> Event:
    return Event.create(
        schema,
        run_id,
        data,
        source="/tests",
        time=data["event_time"],
        id=event_id,
        correlation_id=deterministic_id(run_id),
    )


def started(at: int = 0, run_id: str = RUN) -> Event:
    data = {
        "run_id": run_id,
        "phase": "STARTED",
        "event_time": T0 + timedelta(seconds=at),
        "agent": "agent 1.0",
    }
    return _event(RUN_LIFECYCLE, data, deterministic_id(run_id, "started"), run_id)


def finished(at: int, outcome: str = "RESOLVED", run_id: str = RUN) -> Event:
    data = {
        "run_id": run_id,
        "phase": "FINISHED",
        "event_time": T0 + timedelta(seconds=at),
        "agent": "agent 1.0",
        "outcome": outcome,
        "exit_status": "Submitted",
    }
    return _event(RUN_LIFECYCLE, data, deterministic_id(run_id, "finished"), run_id)


def llm(step: int, *, cost: float | None = 0.01, model: str = "m/large", run_id: str = RUN) -> Event:
    data = {
        "run_id": run_id,
        "step": step,
        "event_time": T0 + timedelta(seconds=step),
        "model": model,
        "prompt_tokens": 100,
        "completion_tokens": 10,
        "cached_tokens": 50,
        "cost_usd": cost,
    }
    return _event(LLM_CALL, data, deterministic_id(run_id, step, "llm"), run_id)


def tool(step: int, return_code: int | None, *, run_id: str = RUN, timed_out: bool = False) -> Event:
    data = {
        "run_id": run_id,
        "step": step,
        "event_time": T0 + timedelta(seconds=step),
        "command": "ls",
        "return_code": return_code,
        "timed_out": timed_out,
    }
    return _event(TOOL_CALL, data, deterministic_id(run_id, step, "tool"), run_id)


def fold(events: Iterable[Event], state: RunTotals | None = None) -> tuple[RunTotals | None, list[Event]]:
    insights = []
    for e in events:
        state, insight = apply(state, e)
        if insight is not None:
            insights.append(insight)
    return state, insights


def return_codes_run(codes: Sequence[int | None]) -> list[Event]:
    events = [started()]
    for i, rc in enumerate(codes, start=1):
        events += [llm(i), tool(i, rc)]
    return [*events, finished(len(codes) + 1)]


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


@pytest.fixture(scope="module")
def real_runs() -> list[ParsedRun]:
    if not REAL_DATA.is_dir():
        pytest.skip(f"{REAL_DATA} is not on this machine")
    runs = list(iter_runs(REAL_DATA))
    assert all(isinstance(r, ParsedRun) for r in runs)
    return runs  # type: ignore[return-value]


def test_totals_of_a_small_run() -> None:
    """A run's LLM calls, tokens, known cost, unknown-cost calls, tool calls and steps are summed."""
    state, insights = fold(
        [started(), llm(1), tool(1, 0), llm(2, cost=None), tool(2, 1), llm(3, cost=0.02), finished(10)]
    )
    assert state is not None and state.finished
    assert (state.llm_calls_count, state.tool_calls_count, state.steps_count) == (3, 2, 3)
    assert (state.prompt_tokens, state.completion_tokens, state.cached_tokens) == (300, 30, 150)
    assert state.cost_usd == pytest.approx(0.03)
    assert state.calls_without_cost_count == 1
    assert state.failing_tool_calls_count == 1
    assert len(insights) == 1


def test_insight_fields() -> None:
    """The FINISHED event yields a run.summary insight with a deterministic id, event time, metrics and labels."""
    finish = finished(100, outcome="UNRESOLVED")
    _, [insight] = fold([started(5), llm(1), tool(1, 2), llm(2, model="m/small"), llm(3), finish])
    d = insight.data
    assert insight.schema == INSIGHT_SCHEMA
    assert d["insight_id"] == insight_id(RUN) == deterministic_id(RUN, "run.summary")
    assert d["kind"] == "run.summary"
    assert d["entity"] == insight.key == f"run:{RUN}"
    assert d["event_time"] == finish.attributes.time == insight.attributes.time
    assert d["metrics"]["duration_seconds"] == 99.0  # first event (step 1 at +1 s) to FINISHED (+100 s)
    assert d["metrics"]["llm_calls_count"] == 3.0
    assert d["labels"] == {
        "outcome": "UNRESOLVED",
        "model": "m/large",
        "models": "m/large,m/small",
        "agent": "agent 1.0",
        "exit_status": "Submitted",
    }
    assert insight.attributes.causation_id == finish.attributes.id
    assert insight.attributes.correlation_id == deterministic_id(RUN)
    assert RUN in d["summary"] and "unresolved" in d["summary"]


def test_no_insight_before_finished() -> None:
    """Events other than FINISHED yield no insight."""
    _, insights = fold([started(), llm(1), tool(1, 0)])
    assert insights == []


@pytest.mark.parametrize(
    ("codes", "failing", "longest"),
    [
        ([1, 1, 0, 1], 3, 2),
        ([1, None, 1, 1], 3, 3),  # a null return code neither breaks nor extends the streak
        ([None, None], 0, 0),
        ([0, 2, 0, 127, 1, 1, 0], 4, 3),
    ],
)
def test_failing_streaks(codes: list[int | None], failing: int, longest: int) -> None:
    """Consecutive non-zero return codes make a streak; 0 ends it; a null return code is neutral."""
    state, _ = fold(return_codes_run(codes))
    assert state is not None
    assert (state.failing_tool_calls_count, state.longest_failing_streak_count) == (failing, longest)


def test_duplicates_are_ignored() -> None:
    """Redelivered events (same step and kind, second STARTED, second FINISHED) change nothing."""
    events = [started(), llm(1), tool(1, 1), llm(2), tool(2, 1), finished(5)]
    redelivered = [
        events[0],
        events[1],
        events[1],
        events[2],
        events[3],
        events[2],
        events[4],
        events[5],
        events[5],
    ]
    once, insights_once = fold(events)
    assert len(insights_once) == 1
    twice, insights_twice = fold(redelivered)
    assert once == twice
    assert len(insights_twice) == 1


def test_duplicate_returns_the_same_state_object() -> None:
    """apply returns the very same state for a duplicate, so a caller can skip the table write."""
    state, _ = fold([started(), llm(1)])
    assert state is not None
    assert classify(state, llm(1)) == "duplicate"
    again, insight = apply(state, llm(1))
    assert again is state and insight is None


def test_replayed_run_after_finish_emits_nothing() -> None:
    """A second import of a finished run is all duplicates: no second insight."""
    events = return_codes_run([0, 1])
    state, insights = fold(events)
    state, again = fold(events, state)
    assert len(insights) == 1 and again == []


def test_late_event_after_finish_is_ignored() -> None:
    """A new event after FINISHED is late: the summary is final and the state unchanged."""
    state, _ = fold([started(), llm(1), finished(3)])
    assert state is not None
    assert classify(state, llm(2)) == "late"
    after, insight = apply(state, llm(2))
    assert after is state and insight is None


def test_the_finishing_event_read_again_reissues_the_same_insight() -> None:
    """After a crash between the table write and the insight's acknowledgement the FINISHED record is read
    again: the very event that closed the run gives the same insight again; another FINISHED, or a state
    written before the run recorded its finishing event, gives nothing."""
    end = finished(3)
    state, [insight] = fold([started(), llm(1), end])
    assert state is not None and state.finished_event_id == end.attributes.id
    again = reissue(state, end)
    assert again is not None and again.data == insight.data and again.attributes == insight.attributes
    other = dataclasses.replace(end, attributes=dataclasses.replace(end.attributes, id="another-id"))
    assert reissue(state, other) is None  # another FINISHED event (another id)
    assert reissue(state, llm(1)) is None
    old = RunTotals.from_dict({k: v for k, v in state.to_dict().items() if k != "finished_event_id"})
    assert old.finished and old.finished_event_id is None and reissue(old, end) is None
    assert RunTotals.from_dict(state.to_dict()) == state


def test_determinism_byte_identical(serde: AvroSerde) -> None:
    """Replaying the same events gives byte-identical Avro for the insight."""
    events = return_codes_run([1, 0, None, 3])
    _, [a] = fold(events)
    _, [b] = fold(list(events))
    assert serde.encode(INSIGHT_SCHEMA, a.data) == serde.encode(INSIGHT_SCHEMA, b.data)
    assert a.attributes.to_headers() == b.attributes.to_headers()


def test_state_round_trip_mid_run() -> None:
    """A state survives to_dict -> JSON -> from_dict, and folding on from the copy gives the same result."""
    events = return_codes_run([1, 1, 0, None, 2])
    middle, _ = fold(events[:6])
    assert middle is not None
    copy = RunTotals.from_dict(json.loads(json.dumps(middle.to_dict())))
    assert copy == middle
    direct, [x] = fold(events[6:], middle)
    restored, [y] = fold(events[6:], copy)
    assert direct == restored and x == y


def test_from_dict_refuses_unknown_version() -> None:
    """A state with another version is refused."""
    with pytest.raises(ValueError, match="version"):
        RunTotals.from_dict({**RunTotals(run_id=RUN).to_dict(), "version": 99})


def test_other_schema_is_unsupported() -> None:
    """An event of a schema the processor does not handle raises UnsupportedEventError."""
    other = Event.create("sophia.insight.Insight", "x", {"event_time": T0}, source="/t", time=T0)
    with pytest.raises(UnsupportedEventError):
        apply(None, other)


def test_event_of_another_run_is_refused() -> None:
    """Applying an event of run B to the totals of run A raises RunMismatchError."""
    state, _ = fold([started()])
    with pytest.raises(RunMismatchError):
        apply(state, llm(1, run_id="other"))


def test_malformed_datum_is_unprocessable() -> None:
    """A datum without a required field raises UnprocessableEventError, not KeyError."""
    bad = Event.create(LLM_CALL, RUN, {"run_id": RUN, "event_time": T0}, source="/t", time=T0)
    with pytest.raises(UnprocessableEventError):
        apply(None, bad)


def test_real_data_totals(real_runs: list[ParsedRun], serde: AvroSerde) -> None:
    """Over the 120 real mini-swe-agent runs the insights add up to 4,623 LLM calls, 51.433 USD, 89 resolved."""
    insights = []
    for run in real_runs:
        _, found = fold(run.events)
        insights += found
    assert len(insights) == len(real_runs) == 120
    assert sum(i.data["metrics"]["llm_calls_count"] for i in insights) == 4623
    assert round(sum(i.data["metrics"]["cost_usd"] for i in insights), 3) == 51.433
    assert sum(i.data["labels"]["outcome"] == "RESOLVED" for i in insights) == 89
    assert len({i.data["insight_id"] for i in insights}) == 120
    for i in insights:
        serde.check(INSIGHT_SCHEMA, i.data)


def test_real_data_replay_is_deterministic(real_runs: list[ParsedRun], serde: AvroSerde) -> None:
    """Folding a real run twice, the second time with every event delivered twice, encodes to the same bytes."""
    for run in real_runs[:10]:
        _, [a] = fold(run.events)
        _, [b] = fold(e for ev in run.events for e in (ev, ev))
        assert serde.encode(INSIGHT_SCHEMA, a.data) == serde.encode(INSIGHT_SCHEMA, b.data)


def test_exports() -> None:
    """The run-summary subpackage exports exactly its public names (its app's names on first use)."""
    from processors import run_summary

    for name in run_summary.__all__:
        assert hasattr(run_summary, name), name
    assert {"apply", "RunTotals", "create_app", "run_worker", "wait_for_run_summaries"} <= set(
        run_summary.__all__
    )
    assert {"ProcessorError", "UnprocessableEventError"} <= set(processors.__all__)
