"""The run-summary decision logic: fold the events of one agent run into totals, and on FINISHED
draw the ``run.summary`` insight. Plain Python, no Kafka: the Faust agent in :mod:`processors.run_summary.app`
is a thin shell around :func:`apply`.

Input: the events of topic ``agent.events`` (key = run id), i.e. ``sophia.agent.RunLifecycle``,
``sophia.agent.LlmCall`` and ``sophia.agent.ToolCall`` (``schemas/avro/``), as produced by the
mini-swe-agent importer (:mod:`connectors.agent_runs`) or a live agent runtime.

Rules (each chosen so that a replay of the same history gives the same state and the same insight):

* **Event time only.** Durations and the insight's time come from the events' ``event_time``; the
  wall clock is never read.
* **Duplicates are recognised by position, not by a growing set of ids.** Every event of a run is
  keyed by the run id, so one producer's events of a run sit on one partition in the order they were
  produced, and within a run LlmCalls and ToolCalls come in increasing ``step`` order (one of each
  kind at most per step; the importer's event ids are ``(run, step, kind)``). So the state keeps, per
  kind, the last step applied, plus whether STARTED and FINISHED were applied: an LlmCall (ToolCall)
  whose step is not above the last LlmCall (ToolCall) step applied, a second STARTED or a second
  FINISHED is a duplicate (an at-least-once redelivery, or a re-import of the same run). This bounds
  the state to a few integers per run, where a set of seen ids would grow with the run. It would
  wrongly drop an event only if a producer emitted a run's steps out of order, which no producer of
  this backbone does.
* **A finished run is closed.** Once FINISHED is applied, any later event of the run (not a
  duplicate) is *late*: it changes nothing and yields nothing, since its summary has been published.
* **Failing-command streak.** A ToolCall with a non-zero ``return_code`` extends the current streak,
  one with ``0`` ends it. A ToolCall with a null ``return_code`` (no observation recorded: the final
  submit, a timeout) neither extends nor breaks it: nothing is known about its success.
* **Unknown cost is not zero.** An LlmCall with a null ``cost_usd`` adds nothing to ``cost_usd`` and
  counts in ``calls_without_cost_count``.

The state, :class:`RunTotals`, is immutable; :meth:`RunTotals.to_dict` / :meth:`RunTotals.from_dict`
turn it into a JSON-able dict (the value of the Faust table ``run_totals``) and back, losslessly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, Protocol

from processors.errors import RunMismatchError, UnprocessableEventError, UnsupportedEventError
from streams.envelope import CloudEvent, Event, deterministic_id

__all__ = [
    "INSIGHT_KIND",
    "INSIGHT_SCHEMA",
    "INSIGHT_SOURCE",
    "LLM_CALL",
    "RUN_LIFECYCLE",
    "TOOL_CALL",
    "Disposition",
    "RunEvent",
    "RunTotals",
    "apply",
    "classify",
    "insight_id",
    "reissue",
    "run_id_of",
]

RUN_LIFECYCLE = "sophia.agent.RunLifecycle"
LLM_CALL = "sophia.agent.LlmCall"
TOOL_CALL = "sophia.agent.ToolCall"
INSIGHT_SCHEMA = "sophia.insight.Insight"
INSIGHT_KIND = "run.summary"
INSIGHT_SOURCE = "/processors/run-summary"
_STATE_VERSION = 1

Disposition = Literal["apply", "duplicate", "late"]
"""What :func:`apply` does with an event: fold it in, or ignore it as a duplicate or as late."""


class RunEvent(Protocol):
    """What :func:`apply` needs of an event: :class:`streams.envelope.Event` and
    :class:`streams.consumer.ConsumedEvent` both fit.

    Attributes:
        schema: Avro full name of the data's schema.
        data: the decoded datum (``event_time`` as an aware datetime).
        attributes: the CloudEvents attributes (id, correlation id).
    """

    @property
    def schema(self) -> str: ...

    @property
    def data(self) -> Mapping[str, Any]: ...

    @property
    def attributes(self) -> CloudEvent: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class RunTotals:
    """The running totals of one agent run.

    Attributes:
        run_id: the run.
        agent: agent software and version from the lifecycle events, ``None`` before one is seen.
        started: a STARTED event was applied.
        finished: a FINISHED event was applied (the run is closed).
        outcome: the evaluated outcome of FINISHED (``RESOLVED``, ``UNRESOLVED``, ``UNKNOWN``).
        exit_status: the agent's own exit status from FINISHED.
        steps_count: the highest ``step`` seen on an LlmCall or ToolCall.
        llm_calls_count: LlmCalls applied.
        tool_calls_count: ToolCalls applied.
        prompt_tokens: sum of ``prompt_tokens``.
        completion_tokens: sum of ``completion_tokens``.
        cached_tokens: sum of ``cached_tokens``.
        reasoning_tokens: sum of ``reasoning_tokens``.
        cost_usd: sum of the known ``cost_usd`` (USD).
        calls_without_cost_count: LlmCalls whose cost is unknown (null).
        failing_tool_calls_count: ToolCalls with a non-zero return code.
        timed_out_tool_calls_count: ToolCalls the runtime reports as timed out.
        failing_streak_count: length of the current run of consecutive failing ToolCalls.
        longest_failing_streak_count: the longest such run so far.
        model_calls: ``(model, LlmCalls)`` pairs, sorted by model name.
        first_event_time: the earliest event time applied (aware, UTC).
        last_event_time: the latest event time applied (aware, UTC).
        last_llm_step: the step of the last LlmCall applied (0: none), for de-duplication.
        last_tool_step: the step of the last ToolCall applied (0: none), for de-duplication.
        finished_event_id: the CloudEvents id of the FINISHED event that closed the run (``None``
            before, and in states written before 2026-12-04), so :func:`reissue` knows it again.
    """

    run_id: str
    agent: str | None = None
    started: bool = False
    finished: bool = False
    outcome: str | None = None
    exit_status: str | None = None
    steps_count: int = 0
    llm_calls_count: int = 0
    tool_calls_count: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    calls_without_cost_count: int = 0
    failing_tool_calls_count: int = 0
    timed_out_tool_calls_count: int = 0
    failing_streak_count: int = 0
    longest_failing_streak_count: int = 0
    model_calls: tuple[tuple[str, int], ...] = ()
    first_event_time: datetime | None = None
    last_event_time: datetime | None = None
    last_llm_step: int = 0
    last_tool_step: int = 0
    finished_event_id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (times as epoch milliseconds, models as an object); see :meth:`from_dict`."""
        return {
            "version": _STATE_VERSION,
            "run_id": self.run_id,
            "agent": self.agent,
            "started": self.started,
            "finished": self.finished,
            "outcome": self.outcome,
            "exit_status": self.exit_status,
            "steps_count": self.steps_count,
            "llm_calls_count": self.llm_calls_count,
            "tool_calls_count": self.tool_calls_count,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cached_tokens": self.cached_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "cost_usd": self.cost_usd,
            "calls_without_cost_count": self.calls_without_cost_count,
            "failing_tool_calls_count": self.failing_tool_calls_count,
            "timed_out_tool_calls_count": self.timed_out_tool_calls_count,
            "failing_streak_count": self.failing_streak_count,
            "longest_failing_streak_count": self.longest_failing_streak_count,
            "model_calls": dict(self.model_calls),
            "first_event_time_ms": _to_ms(self.first_event_time),
            "last_event_time_ms": _to_ms(self.last_event_time),
            "last_llm_step": self.last_llm_step,
            "last_tool_step": self.last_tool_step,
            "finished_event_id": self.finished_event_id,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RunTotals:
        """Rebuild the totals from :meth:`to_dict`'s output (e.g. read back from the table's changelog).

        Raises:
            ValueError: an unknown state version, or a missing or mistyped field.
        """
        if d.get("version") != _STATE_VERSION:
            raise ValueError(f"run totals state version {d.get('version')!r} is not {_STATE_VERSION}")
        try:
            return cls(
                run_id=str(d["run_id"]),
                agent=d["agent"],
                started=bool(d["started"]),
                finished=bool(d["finished"]),
                outcome=d["outcome"],
                exit_status=d["exit_status"],
                steps_count=int(d["steps_count"]),
                llm_calls_count=int(d["llm_calls_count"]),
                tool_calls_count=int(d["tool_calls_count"]),
                prompt_tokens=int(d["prompt_tokens"]),
                completion_tokens=int(d["completion_tokens"]),
                cached_tokens=int(d["cached_tokens"]),
                reasoning_tokens=int(d["reasoning_tokens"]),
                cost_usd=float(d["cost_usd"]),
                calls_without_cost_count=int(d["calls_without_cost_count"]),
                failing_tool_calls_count=int(d["failing_tool_calls_count"]),
                timed_out_tool_calls_count=int(d["timed_out_tool_calls_count"]),
                failing_streak_count=int(d["failing_streak_count"]),
                longest_failing_streak_count=int(d["longest_failing_streak_count"]),
                model_calls=tuple(sorted((str(m), int(n)) for m, n in d["model_calls"].items())),
                first_event_time=_from_ms(d["first_event_time_ms"]),
                last_event_time=_from_ms(d["last_event_time_ms"]),
                last_llm_step=int(d["last_llm_step"]),
                last_tool_step=int(d["last_tool_step"]),
                finished_event_id=d.get("finished_event_id"),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"malformed run totals state: {exc!r}") from exc

    @property
    def duration(self) -> timedelta:
        """Event time from the first to the last event applied (zero before any)."""
        if self.first_event_time is None or self.last_event_time is None:
            return timedelta(0)
        return self.last_event_time - self.first_event_time

    @property
    def main_model(self) -> str | None:
        """The model with the most LlmCalls (ties: the first by name), ``None`` before any."""
        if not self.model_calls:
            return None
        return min(self.model_calls, key=lambda mc: (-mc[1], mc[0]))[0]


def _to_ms(t: datetime | None) -> int | None:
    if t is None:
        return None
    return (t - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)


def _from_ms(ms: int | None) -> datetime | None:
    return None if ms is None else datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=int(ms))


def _event_time(event: RunEvent) -> datetime:
    t = event.data.get("event_time")
    if isinstance(t, datetime):
        return t.astimezone(UTC) if t.tzinfo else t.replace(tzinfo=UTC)
    if isinstance(t, int) and not isinstance(t, bool):
        return _from_ms(t)  # type: ignore[return-value]
    return event.attributes.time.astimezone(UTC)


def run_id_of(event: RunEvent) -> str:
    """The run an event belongs to (its ``run_id`` field).

    Raises:
        UnsupportedEventError: the schema is not RunLifecycle, LlmCall or ToolCall.
        UnprocessableEventError: the datum has no string ``run_id``.
    """
    if event.schema not in (RUN_LIFECYCLE, LLM_CALL, TOOL_CALL):
        raise UnsupportedEventError(
            f"schema {event.schema} is not one the run-summary processor handles",
            event_id=event.attributes.id,
        )
    run_id = event.data.get("run_id")
    if not isinstance(run_id, str):
        raise UnprocessableEventError("datum has no string run_id", event_id=event.attributes.id)
    return run_id


def insight_id(run_id: str) -> str:
    """The deterministic id of a run's summary insight: ``deterministic_id(run_id, "run.summary")``."""
    return deterministic_id(run_id, INSIGHT_KIND)


def classify(state: RunTotals, event: RunEvent) -> Disposition:
    """Say what :func:`apply` will do with ``event`` given ``state`` (see the module docstring).

    Returns:
        ``"duplicate"`` for an event already applied, ``"late"`` for a new event after FINISHED,
        ``"apply"`` otherwise.

    Raises:
        UnsupportedEventError: the schema is not one this processor handles.
    """
    d = event.data
    if event.schema == RUN_LIFECYCLE:
        duplicate = state.finished if d.get("phase") == "FINISHED" else state.started
    elif event.schema == LLM_CALL:
        duplicate = int(d["step"]) <= state.last_llm_step
    elif event.schema == TOOL_CALL:
        duplicate = int(d["step"]) <= state.last_tool_step
    else:
        raise UnsupportedEventError(
            f"schema {event.schema} is not one the run-summary processor handles",
            event_id=event.attributes.id,
        )
    if duplicate:
        return "duplicate"
    return "late" if state.finished else "apply"


def apply(state: RunTotals | None, event: RunEvent) -> tuple[RunTotals, Event | None]:
    """Fold one event of a run into its totals.

    Args:
        state: the run's totals so far, ``None`` for a run not seen yet.
        event: a RunLifecycle, LlmCall or ToolCall event of that run.

    Returns:
        ``(new_state, insight)``. ``insight`` is ``None`` except for the run's FINISHED event, for which
        it is the ``sophia.insight.Insight`` event ready to produce: key and ``entity``
        ``run:<run_id>``, id ``deterministic_id(run_id, "run.summary")``, time = the FINISHED event's
        time, correlation id and ``traceparent`` carried over (the processor replaces the latter with
        its ``send`` span's when tracing is on), causation id = the FINISHED event's id, and the datum in
        ``insight.data``. For a duplicate or late event ``new_state`` is ``state`` itself (the same
        object), so a caller can tell that nothing changed.

    Raises:
        UnsupportedEventError: the schema is not RunLifecycle, LlmCall or ToolCall.
        RunMismatchError: the event's ``run_id`` is not ``state.run_id``.
        UnprocessableEventError: the datum lacks a field the schema requires.
    """
    run_id = run_id_of(event)
    if state is None:
        state = RunTotals(run_id=run_id)
    elif state.run_id != run_id:
        raise RunMismatchError(
            f"event of run {run_id!r} applied to the totals of run {state.run_id!r}",
            event_id=event.attributes.id,
        )
    try:
        if classify(state, event) != "apply":
            return state, None
        new = _fold(state, event)
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, UnprocessableEventError):
            raise
        raise UnprocessableEventError(
            f"malformed {event.schema} datum: {exc!r}", event_id=event.attributes.id
        ) from exc
    if event.schema == RUN_LIFECYCLE and new.finished:
        return new, _insight(new, event)
    return new, None


def reissue(state: RunTotals, event: RunEvent) -> Event | None:
    """The run's summary insight again when ``event`` is the very FINISHED event (same id) that closed
    ``state``'s run, else None.

    The processor records a run as finished before the broker has acknowledged its insight (and acks
    the FINISHED record only after): after a crash between the two, the FINISHED record is read again,
    finds the run finished, and its insight is sent again, identical (same id, time, causation), for
    subscribers to de-duplicate. Another FINISHED event of a finished run is a duplicate and gives
    nothing.
    """
    if (
        state.finished
        and state.finished_event_id is not None
        and event.schema == RUN_LIFECYCLE
        and event.data.get("phase") == "FINISHED"
        and event.attributes.id == state.finished_event_id
    ):
        return _insight(state, event)
    return None


def _fold(state: RunTotals, event: RunEvent) -> RunTotals:
    d = event.data
    t = _event_time(event)
    times = {
        "first_event_time": t if state.first_event_time is None else min(state.first_event_time, t),
        "last_event_time": t if state.last_event_time is None else max(state.last_event_time, t),
    }
    if event.schema == RUN_LIFECYCLE:
        agent = d.get("agent") or state.agent
        if d["phase"] == "FINISHED":
            return replace(
                state,
                **times,
                agent=agent,
                finished=True,
                finished_event_id=event.attributes.id,
                outcome=str(d.get("outcome") or "UNKNOWN"),
                exit_status=d.get("exit_status"),
            )
        return replace(state, **times, agent=agent, started=True)
    step = int(d["step"])
    steps_count = max(state.steps_count, step)
    if event.schema == LLM_CALL:
        cost = d.get("cost_usd")
        models = dict(state.model_calls)
        model = str(d["model"])
        models[model] = models.get(model, 0) + 1
        return replace(
            state,
            **times,
            steps_count=steps_count,
            last_llm_step=step,
            llm_calls_count=state.llm_calls_count + 1,
            prompt_tokens=state.prompt_tokens + int(d.get("prompt_tokens") or 0),
            completion_tokens=state.completion_tokens + int(d.get("completion_tokens") or 0),
            cached_tokens=state.cached_tokens + int(d.get("cached_tokens") or 0),
            reasoning_tokens=state.reasoning_tokens + int(d.get("reasoning_tokens") or 0),
            cost_usd=state.cost_usd + float(cost) if cost is not None else state.cost_usd,
            calls_without_cost_count=state.calls_without_cost_count + (cost is None),
            model_calls=tuple(sorted(models.items())),
        )
    rc = d.get("return_code")
    streak = state.failing_streak_count
    if rc is not None:
        streak = streak + 1 if rc != 0 else 0
    return replace(
        state,
        **times,
        steps_count=steps_count,
        last_tool_step=step,
        tool_calls_count=state.tool_calls_count + 1,
        failing_tool_calls_count=state.failing_tool_calls_count + (rc is not None and rc != 0),
        timed_out_tool_calls_count=state.timed_out_tool_calls_count + bool(d.get("timed_out")),
        failing_streak_count=streak,
        longest_failing_streak_count=max(state.longest_failing_streak_count, streak),
    )


def _insight(state: RunTotals, finished: RunEvent) -> Event:
    entity = f"run:{state.run_id}"
    t = _event_time(finished)
    duration_seconds = state.duration.total_seconds()
    outcome = state.outcome or "UNKNOWN"
    metrics = {
        "steps_count": float(state.steps_count),
        "llm_calls_count": float(state.llm_calls_count),
        "tool_calls_count": float(state.tool_calls_count),
        "prompt_tokens": float(state.prompt_tokens),
        "completion_tokens": float(state.completion_tokens),
        "cached_tokens": float(state.cached_tokens),
        "cost_usd": state.cost_usd,
        "calls_without_cost_count": float(state.calls_without_cost_count),
        "failing_tool_calls_count": float(state.failing_tool_calls_count),
        "longest_failing_streak_count": float(state.longest_failing_streak_count),
        "timed_out_tool_calls_count": float(state.timed_out_tool_calls_count),
        "duration_seconds": duration_seconds,
    }
    labels = {
        "outcome": outcome,
        "model": state.main_model or "unknown",
        "models": ",".join(m for m, _ in state.model_calls),
        "agent": state.agent or "unknown",
    }
    if state.exit_status is not None:
        labels["exit_status"] = state.exit_status
    unknown = (
        f" (+{state.calls_without_cost_count} calls of unknown cost)"
        if state.calls_without_cost_count
        else ""
    )
    summary = (
        f"run {state.run_id} {outcome.lower()}: {state.steps_count} steps, {state.llm_calls_count} LLM calls, "
        f"{state.tool_calls_count} tool calls ({state.failing_tool_calls_count} failing, longest failing "
        f"streak {state.longest_failing_streak_count}), {state.cost_usd:.4f} USD{unknown}, "
        f"{duration_seconds:.0f} s"
    )
    datum = {
        "insight_id": insight_id(state.run_id),
        "kind": INSIGHT_KIND,
        "entity": entity,
        "event_time": t,
        "summary": summary,
        "metrics": metrics,
        "labels": labels,
    }
    return Event.create(
        INSIGHT_SCHEMA,
        entity,
        datum,
        source=INSIGHT_SOURCE,
        time=t,
        id=datum["insight_id"],
        subject=entity,
        correlation_id=finished.attributes.correlation_id,
        causation_id=finished.attributes.id,
        traceparent=finished.attributes.traceparent,
    )
