"""The healer: one deterministic state machine that takes events in event-time order and returns decisions.

:class:`Healer` combines the circuit breakers (:mod:`.breaker`), the retry scheduler (:mod:`.retry`),
agent health (:mod:`.agent_health`) and the rollback monitor (:mod:`.rollback`). Feed it the decoded
events of the agent and config topics with :meth:`Healer.feed`; it first advances event time to the
event's time (the watermark: the largest event time seen) and returns the decisions that time alone
caused (half-open transitions, due retries, stalls, rollback verdicts), then those of the event itself.
No wall clock is read anywhere, so the same history gives the same decisions, ids included.

Partitioned input: a worker reads several input partitions, interleaved as its fetches bring them, and that
interleaving is not part of the history (the next replay interleaves differently). An event fed with its
``partition`` goes to the agent-health monitor of that partition, which judges stalls against that
partition's own watermark and takes its runaway and trouble-gate peers from the runs finished on it, so its
decisions are those of the partition's records in their order whatever the interleaving
(``tests/unit/test_healing_partitions.py``). One watermark over all partitions made interleaved input raise
stall warnings that no partition's own records justified: the worker made 18,820 and 18,766 decisions in
two runs over the same 30,000 events on 6 partitions, and 404 in both runs with a monitor per partition
(``python bench/bench_processors.py --events 30000 --healer-rounds 2``, its decisions column, 2026-12-06). A
partition's time moves with its records only, so on a live stream a partition with no traffic would hold
its runs' stalls; the worker tells the healer which partitions it has read to their end
(:meth:`Healer.caught_up`), and those are judged against the healer's watermark until their next record
(an idle partition, in Flink's terms, decided by the log's end rather than by a wall-clock timeout, so a
replay of a closed history is not affected). Circuits, retries and
rollbacks aggregate calls of every partition and stay on the healer's watermark (the largest event time
of all input): their decisions can still depend on the interleaving where partitions are far apart in
event time.

State: :meth:`Healer.snapshot` gives the healer's whole state as a JSON-ready dict (deterministic: the
same history gives the same snapshot, byte for byte once dumped with ``sort_keys``), versioned by
:data:`SNAPSHOT_FORMAT`, and :meth:`Healer.restore` builds a healer from it that decides exactly what
the one it was taken from would have decided on the same further input. Every part keeps only what its
windows still need (see the docstrings of the parts), and at most :data:`MAX_OPEN_ESCALATIONS`
escalations wait for an ack (beyond that the oldest is forgotten; a count, not an age, because acks
carry the wall-clock time of the person's act, not the agents' event time), so the snapshot stays
bounded by the event rate within the windows, not by the length of the history.

Events understood (by Avro full name; anything else is ignored):

* ``sophia.agent.LlmCall``: an outcome for the circuits ``provider:P``, ``model:P/M`` and (when the
  call names one) ``agent:A``; with a ``request_id`` a failure goes to the retry scheduler; every
  call feeds the rollback monitor and the run's health. ``outcome`` absent (imported history) = ok.
* ``sophia.agent.ToolCall``, ``sophia.agent.RunLifecycle``: agent health.
* ``sophia.config.ConfigChange``: a key under ``healing.`` is the healer's own configuration and is
  applied at once (a value its schema refuses gives ``config_refused`` and the old one stays); any
  other key is watched for rollback.
* ``sophia.healing.Decision`` of kind ``escalation_acked`` (a person's ack, published on the acks topic
  by ``backbone healing ack``): see :meth:`Healer.acknowledge`. Other decision kinds are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from configuration.schemas import HealingThresholds
from processors.healing.agent_health import AgentHealth
from processors.healing.breaker import BreakerBoard, circuit_keys
from processors.healing.decisions import Decision, from_us, to_us, to_utc
from processors.healing.retry import RetryScheduler
from processors.healing.rollback import RollbackMonitor

__all__ = [
    "HEALING_CONFIG_PREFIX",
    "MAX_OPEN_ESCALATIONS",
    "READABLE_SNAPSHOT_FORMATS",
    "SNAPSHOT_FORMAT",
    "Healer",
    "HealingConfig",
    "InputEvent",
    "SnapshotError",
]

HEALING_CONFIG_PREFIX = "healing."
#: Version of the layout of :meth:`Healer.snapshot`. 2: the rollback monitor keeps buckets of calls
#: (counts and histograms) instead of calls; :meth:`Healer.restore` converts a format 1 snapshot (its
#: kept calls go into their buckets). 3: ``partition_watermarks_us`` and ``partition_health`` (one
#: agent-health monitor per input partition); a format 1 or 2 snapshot reads as none yet (its runs stay in
#: ``health`` until their next event, see :meth:`Healer.feed`). Any other format is refused.
SNAPSHOT_FORMAT = 3
#: Snapshot formats :meth:`Healer.restore` reads.
READABLE_SNAPSHOT_FORMATS = (1, 2, 3)
#: Escalations kept waiting for an ack; when one more is raised the oldest is forgotten (its ack is then unmatched).
MAX_OPEN_ESCALATIONS = 10_000


class SnapshotError(ValueError):
    """A snapshot that :meth:`Healer.restore` cannot take (another format, or not a healer's state)."""


@dataclass(frozen=True, slots=True)
class HealingConfig:
    """A healing configuration and its version in the config store (0 = built-in defaults)."""

    thresholds: HealingThresholds
    version: int = 0

    @classmethod
    def default(cls) -> HealingConfig:
        """The defaults of :class:`HealingThresholds`, version 0."""
        return cls(HealingThresholds(), 0)


@dataclass(frozen=True, slots=True)
class InputEvent:
    """An event as the healer takes it: Avro full name, decoded data, event id, and the input partition it
    was read from (``"topic:partition"``; None: not read from a partitioned input, see :meth:`Healer.feed`)."""

    schema: str
    data: Mapping[str, Any]
    id: str | None = None
    partition: str | None = None


def _as_input(event: Any) -> InputEvent:
    if isinstance(event, InputEvent):
        return event
    if isinstance(event, Mapping):
        return InputEvent(str(event["schema"]), event["data"], event.get("id"), event.get("partition"))
    attrs = getattr(event, "attributes", None)
    return InputEvent(event.schema, event.data, getattr(attrs, "id", None))


def _event_time(name: str, data: Mapping[str, Any]) -> datetime:
    if name == "ConfigChange":
        return to_utc(data["changed_at"])
    return to_utc(data["event_time"])


class Healer:
    """The healing decision logic.

    Args:
        config: thresholds and their version; default :meth:`HealingConfig.default`.
        config_key: the key under ``healing.`` whose changes reconfigure this healer.
    """

    def __init__(
        self, config: HealingConfig | None = None, *, config_key: str = "healing.thresholds"
    ) -> None:
        self.config = config or HealingConfig.default()
        self.config_key = config_key
        t, v = self.config.thresholds, self.config.version
        self.breakers = BreakerBoard(t, v)
        self.retries = RetryScheduler(t, v)
        self.health = AgentHealth(t, v)  # runs of the events fed without a partition
        self.rollbacks = RollbackMonitor(t, v)
        self.watermark: datetime | None = None
        # one agent-health monitor per input partition ("topic:partition"), judged on that partition's
        # own watermark (the largest event time of its records), so its decisions do not depend on how
        # the partitions interleave
        self.partition_health: dict[str, AgentHealth] = {}
        self.partition_watermarks: dict[str, datetime] = {}
        # partitions read to their end (see caught_up): judged against the healer's watermark meanwhile
        self.caught_up_partitions: set[str] = set()
        self.escalations: dict[str, Decision] = {}
        self.decisions_made = 0

    # -- configuration ----------------------------------------------------------------------------
    def reconfigure(self, config: HealingConfig) -> None:
        """Use ``config`` for every decision from now on."""
        self.config = config
        for part in (self.breakers, self.retries, self.health, self.rollbacks):
            part.reconfigure(config.thresholds, config.version)
        for health in self.partition_health.values():
            health.reconfigure(config.thresholds, config.version)

    # -- input ------------------------------------------------------------------------------------
    def feed(self, event: Any) -> list[Decision]:
        """Take one event (``InputEvent``, ``{"schema", "data", "id", "partition"}`` or a
        ``streams.envelope.Event``).

        ``partition`` (optional; ``"topic:partition"`` of the record, as the worker passes it) puts the
        event's run under the agent-health monitor of that partition, whose stalls are judged against that
        partition's watermark and whose peer medians are those of the runs finished on it: its decisions
        are then those of the partition's records in their order, whatever the interleaving of the other
        partitions (Kafka Streams keeps a task's stream time per partition group for the same reason).
        Without it the run is judged against the healer's watermark, the largest event time of all input
        (right for one input in event-time order, as ``backbone eval healing`` feeds it). Circuits, retries
        and rollbacks are judged against the healer's watermark in either case.

        Returns:
            The decisions, time-driven ones first, in a deterministic order.

        Raises:
            KeyError, TypeError: the event lacks a field its schema requires (the shell sends it to
                the dead-letter topic).
        """
        if type(event) is dict:  # what the worker passes: read as _as_input reads it, without the object
            schema, data, event_id = str(event["schema"]), event["data"], event.get("id")
            partition = event.get("partition")
        else:
            ev = _as_input(event)
            schema, data, event_id, partition = ev.schema, ev.data, ev.id, ev.partition
        name = schema.rsplit(".", 1)[-1]
        if name == "Decision" and data.get("kind") == "escalation_acked":
            return self.acknowledge(Decision.from_avro(dict(data)))
        if name not in ("LlmCall", "ToolCall", "RunLifecycle", "ConfigChange"):
            return []
        at = _event_time(name, data)
        if partition is not None:
            self.caught_up_partitions.discard(str(partition))
        out = self._advance(at)
        if partition is not None:
            out += self._advance_partition(str(partition), at)
        if name == "LlmCall":
            out += self._llm_call(schema, data, event_id, at, self._health_for(partition, data))
        elif name in ("ToolCall", "RunLifecycle"):
            out += self._health_for(partition, data).on_event(schema, data, causation_id=event_id)
        else:
            out += self._config_change(data, event_id, at)
        return self._note(out)

    def feed_all(self, events: Iterable[Any]) -> list[Decision]:
        """:meth:`feed` every event in order and return all decisions."""
        out: list[Decision] = []
        for e in events:
            out += self.feed(e)
        return out

    def advance(self, now: datetime | float) -> list[Decision]:
        """Move the watermark to ``now`` (never back) and return the decisions time alone causes."""
        return self._note(self._advance(now))

    def _advance(self, now: datetime | float) -> list[Decision]:
        """:meth:`advance` without noting the decisions (the caller notes them once, with its own)."""
        now = to_utc(now)
        if self.watermark is not None and now <= self.watermark:
            return []
        self.watermark = now
        out = self.breakers.advance(now)
        out += self.retries.due(now)
        out += self.rollbacks.advance(now)
        out += self.health.advance(now)
        for partition in sorted(self.caught_up_partitions):
            health = self.partition_health.get(partition)
            if health is not None:
                out += health.advance(now)
        return out

    def caught_up(self, partitions: Iterable[str]) -> list[Decision]:
        """Say which input partitions (``"topic:partition"``) are read to their end (the consumer holds
        their high watermark, nothing of them waits): until a record of one is fed again, its runs are
        judged against the healer's watermark, as they would be if that partition's time moved with the
        others', and this returns what that decides now (its runs' stalls). A live partition with no
        traffic would otherwise hold its runs' stalls until its next record.

        The incident worker calls the same condition ``drained`` (:mod:`processors.incidents.app`).
        Replaces the previous set. In a replay of a closed history a partition is read to its end only
        after its last record, so this changes nothing that its records decide; on a live stream a record
        that comes later with an older event time finds its run judged already (a late record), so what
        this decides depends on when it was called: the worker calls it only when started with
        ``idle_partitions="follow"`` (:func:`processors.healing.app.create_healing_app`)."""
        self.caught_up_partitions = {str(p) for p in partitions}
        out: list[Decision] = []
        if self.watermark is None:
            return out
        for partition in sorted(self.caught_up_partitions):
            health = self.partition_health.get(partition)
            if health is not None:
                out += health.advance(self.watermark)
        return self._note(out)

    def _advance_partition(self, partition: str, now: datetime) -> list[Decision]:
        """Move ``partition``'s watermark to ``now`` (never back); its runs' stalls and forgetting."""
        mark = self.partition_watermarks.get(partition)
        if mark is not None and now <= mark:
            return []
        self.partition_watermarks[partition] = now
        health = self.partition_health.get(partition)
        return health.advance(now) if health is not None else []

    def _health_for(self, partition: Any, data: Mapping[str, Any]) -> AgentHealth:
        """The agent-health monitor of ``partition`` (None: :attr:`health`), made on its first run.

        A run still in :attr:`health` (restored from a snapshot of format 2 or older, which had one
        monitor) moves to its partition's monitor at its first event with a partition, and a new
        partition monitor starts with that monitor's finished peers."""
        if partition is None:
            return self.health
        key = str(partition)
        health = self.partition_health.get(key)
        if health is None:
            health = self.partition_health[key] = AgentHealth(self.config.thresholds, self.config.version)
            health.adopt_peers(self.health)
        if self.health.runs:
            run_id = str(data["run_id"])
            if run_id in self.health.runs:
                health.adopt_run(self.health, run_id)
        return health

    def _llm_call(
        self, schema: str, d: Mapping[str, Any], event_id: str | None, at: datetime, health: AgentHealth
    ) -> list[Decision]:
        provider = d.get("provider") or "unknown"
        model = d.get("model")
        agent = d.get("agent")
        outcome = d.get("outcome") or "ok"
        ok = outcome == "ok"
        out = self.breakers.record(at, circuit_keys(provider, model, agent), ok)
        comps = [
            f"provider:{provider}",
            *([f"model:{model}"] if model else []),
            *([f"agent:{agent}"] if agent else []),
        ]
        self.rollbacks.on_call(comps, at, ok, d.get("latency_ms"), d.get("cost_usd"))
        request_id = d.get("request_id")
        if request_id:
            if ok:
                self.retries.on_success(str(request_id))
            else:
                out.append(
                    self.retries.on_failure(
                        request_id=str(request_id),
                        target=provider,
                        attempt=int(d.get("attempt") or 1),
                        error_kind=str(d.get("error_kind") or outcome),
                        at=at,
                        causation_id=event_id,
                    )
                )
        out += health.on_event(schema, d, causation_id=event_id)
        return out

    def _config_change(self, d: Mapping[str, Any], event_id: str | None, at: datetime) -> list[Decision]:
        key = str(d["key"])
        raw = d.get("value_json")
        value = json.loads(raw) if raw else None
        if key == self.config_key:
            try:
                thresholds = HealingThresholds.model_validate(value or {})
            except ValidationError as exc:
                return [
                    Decision(
                        kind="config_refused",
                        subject=f"config:{key}",
                        event_time=at,
                        config_version=self.config.version,
                        causation_id=event_id,
                        details={
                            "key": key,
                            "version": int(d["version"]),
                            "problems": [e["msg"] for e in exc.errors()],
                        },
                    )
                ]
            self.reconfigure(HealingConfig(thresholds, int(d["version"])))
            return [
                Decision(
                    kind="config_applied",
                    subject=f"config:{key}",
                    event_time=at,
                    config_version=self.config.version,
                    causation_id=event_id,
                    details={"key": key, "version": int(d["version"])},
                )
            ]
        if key.startswith(HEALING_CONFIG_PREFIX):
            return []
        return self.rollbacks.on_change(
            event_id=event_id or f"{key}@{d['version']}",
            key=key,
            version=int(d["version"]),
            at=at,
            change=str(d.get("change") or "CHANGED"),
            author=str(d.get("author") or ""),
            value=value if isinstance(value, Mapping) else None,
            restored_version=d.get("restored_version"),
        )

    # -- people ---------------------------------------------------------------------------------
    def ack(self, escalation_id: str, *, by: str, note: str, at: datetime | float) -> list[Decision]:
        """A person takes escalation ``escalation_id``; a pending rollback is then carried out.

        Raises:
            KeyError: no open escalation has that id.
        """
        return self._note(self._ack(escalation_id, by=by, note=note, at=at))

    def _ack(self, escalation_id: str, *, by: str, note: str, at: datetime | float) -> list[Decision]:
        """:meth:`ack` without noting the decisions."""
        at = to_utc(at)
        if escalation_id in self.rollbacks.pending:
            out = self.rollbacks.ack(escalation_id, by=by, note=note, at=at)
        else:
            esc = self.escalations[escalation_id]
            out = [
                Decision(
                    kind="escalation_acked",
                    subject=esc.subject,
                    event_time=at,
                    config_version=self.config.version,
                    causation_id=escalation_id,
                    details={"escalation_id": escalation_id, "by": by, "note": note},
                )
            ]
        self.escalations.pop(escalation_id, None)
        return out

    def acknowledge(self, ack: Decision) -> list[Decision]:
        """A person's ack as an event (``escalation_acked``, details ``escalation_id``, ``by``,
        ``note``; its event time is when they acked): the time it caused, then the ack itself
        (unchanged, so its id is the one the person's command recorded), then what the ack releases
        (the ``rollback`` an approval-mode escalation waited for).

        An ack the healer cannot match (no open escalation with that id: acked already, unknown, or
        dropped as the oldest of more than :data:`MAX_OPEN_ESCALATIONS`) gives ``ack_unmatched``
        with the reason instead of the release; nothing raises, nothing is retried.

        Raises:
            KeyError: ``details`` lacks ``escalation_id``, ``by`` or ``note`` (the shell dead-letters it).
        """
        det = ack.details
        escalation_id, by, note = str(det["escalation_id"]), str(det["by"]), str(det["note"])
        out = self.advance(ack.event_time)  # noted now: an escalation it raises is open for the ack
        try:
            released = self._ack(escalation_id, by=by, note=note, at=ack.event_time)
        except KeyError:
            unmatched = [
                ack,
                Decision(
                    kind="ack_unmatched",
                    subject=ack.subject,
                    event_time=ack.event_time,
                    config_version=self.config.version,
                    causation_id=ack.id,
                    details={
                        "escalation_id": escalation_id,
                        "reason": "no open escalation with this id in the healer's state (acked already,"
                        " unknown, or dropped as the oldest of too many open escalations)",
                    },
                ),
            ]
            return out + self._note(unmatched)
        return out + self._note([ack, *(d for d in released if d.kind != "escalation_acked")])

    def _note(self, decisions: list[Decision]) -> list[Decision]:
        """Open the escalations among ``decisions`` and count them; once per decision returned (the
        public entry points call it, the internal steps they are made of do not)."""
        for d in decisions:
            if d.kind == "escalation":
                self.escalations[d.id] = d
        while len(self.escalations) > MAX_OPEN_ESCALATIONS:  # the oldest raised first
            eid = next(iter(self.escalations))
            del self.escalations[eid]
            self.rollbacks.forget_pending(eid)
        self.decisions_made += len(decisions)
        return decisions

    # -- state ----------------------------------------------------------------------------------
    def snapshot(self, *, shared: bool = False) -> dict[str, Any]:
        """The healer's whole state, JSON-ready (``json.dumps`` takes it as is) and deterministic.

        Args:
            shared: the result may share mutable lists with the live state instead of copying them (the
                breakers' window buckets, most of the state's objects): cheaper, and it makes no garbage for
                the collector, but it must be serialised before the healer is fed again (as the worker's
                checkpoint does).

        Returns:
            ``{"format": SNAPSHOT_FORMAT, "config": {"thresholds": {...}, "version": int}, "config_key",
            "watermark_us" (epoch microseconds or null), "decisions_made", "escalations": [decision, ...]
            (open, oldest first; :meth:`Decision.to_state`), "breakers": {...}, "retries": {...},
            "health": {...}, "rollbacks": {...}, "partition_watermarks_us": {"topic:partition": int},
            "partition_health": {"topic:partition": {...}}}`` (the parts' ``dump_state()``; partitions in
            sorted order).
        """
        return {
            "format": SNAPSHOT_FORMAT,
            "config": {
                "thresholds": self.config.thresholds.model_dump(mode="json"),
                "version": self.config.version,
            },
            "config_key": self.config_key,
            "watermark_us": to_us(self.watermark),
            "decisions_made": self.decisions_made,
            "escalations": [d.to_state() for d in self.escalations.values()],
            "breakers": self.breakers.dump_state(shared=shared),
            "retries": self.retries.dump_state(),
            "health": self.health.dump_state(),
            "rollbacks": self.rollbacks.dump_state(),
            "partition_watermarks_us": {p: to_us(t) for p, t in sorted(self.partition_watermarks.items())},
            "partition_health": {p: h.dump_state() for p, h in sorted(self.partition_health.items())},
        }

    @classmethod
    def restore(cls, snapshot: Mapping[str, Any]) -> Healer:
        """A healer in the state :meth:`snapshot` described (its configuration included).

        Raises:
            SnapshotError: ``snapshot``'s ``format`` is not one of :data:`READABLE_SNAPSHOT_FORMATS` or
                it is not a healer's state (the cause is chained). A format 1 snapshot is converted
                (:meth:`RollbackMonitor.load_state`); the healer then snapshots in :data:`SNAPSHOT_FORMAT`.
        """
        if snapshot.get("format") not in READABLE_SNAPSHOT_FORMATS:
            raise SnapshotError(
                f"healer snapshot format {snapshot.get('format')!r}, this healer reads {READABLE_SNAPSHOT_FORMATS}"
            )
        try:
            cfg = snapshot["config"]
            config = HealingConfig(HealingThresholds.model_validate(cfg["thresholds"]), int(cfg["version"]))
            healer = cls(config, config_key=str(snapshot["config_key"]))
            healer.watermark = from_us(snapshot["watermark_us"])
            healer.decisions_made = int(snapshot["decisions_made"])
            for state in snapshot["escalations"]:
                d = Decision.from_state(state)
                healer.escalations[d.id] = d
            healer.breakers.load_state(snapshot["breakers"])
            healer.retries.load_state(snapshot["retries"])
            healer.health.load_state(snapshot["health"])
            healer.rollbacks.load_state(snapshot["rollbacks"])
            for p, us in snapshot.get("partition_watermarks_us", {}).items():
                mark = from_us(us)
                if mark is not None:
                    healer.partition_watermarks[str(p)] = mark
            for p, state in snapshot.get("partition_health", {}).items():
                health = healer.partition_health[str(p)] = AgentHealth(config.thresholds, config.version)
                health.load_state(state)
        except (KeyError, TypeError, ValueError, IndexError, ValidationError) as exc:
            raise SnapshotError(f"not a healer snapshot: {type(exc).__name__}: {exc}") from exc
        return healer

    def status(self) -> dict[str, Any]:
        """``{"watermark", "config_version", "circuits": [...], "warnings": [...], "escalations": [...], "retries": [...]}``."""
        return {
            "watermark": self.watermark.isoformat() if self.watermark else None,
            "config_version": self.config.version,
            "circuits": self.breakers.snapshot(),
            "warnings": sorted(
                [w for h in (self.health, *self.partition_health.values()) for w in h.snapshot()],
                key=lambda w: (w["run_id"], w["signal"]),
            ),
            "escalations": [d.as_json() for d in self.escalations.values()],
            "retries": self.retries.pending(),
        }
