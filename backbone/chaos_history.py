"""The histories a chaos run collects, and the one checker over them (pure: no I/O, no clock).

:mod:`backbone.chaos` produces a workload, injects faults and then collects a :class:`ChaosHistory`;
:func:`check_history` decides, from that history alone, which of the backbone's guarantees were
violated. Keeping the checker pure lets the tests feed it deliberately broken histories.

Guarantees checked (the names are the keys of the report's ``violations``):

* ``acknowledged_lost``: every event whose delivery was acknowledged is on the topic (the agent events
  and, in :mod:`backbone.chaos`, the telemetry records too, their keys prefixed with their topic), whichever
  way it was sent: by the workload's producer (the flush that covered it returned) or over HTTP ingest (the API
  answered 2xx; the event's id is the one the API derives from the request's ``Idempotency-Key``, so
  a retried request produces the same ids and its duplicates are removed by id). After a broker
  restart (the embedded broker's log is in memory and is re-seeded from the event archive), an
  acknowledged event missing from the topic that the archive did not hold when the broker went down is
  in the documented window of loss (:func:`lost_in_window`): counted and reported, not a violation; one
  the archive held is a violation (the re-seed lost it).
* ``counted_once``: the projection's per-run figures (LLM calls, tool calls, cost) equal those of the
  dataset, each event counted once, whatever duplicates the log holds.
* ``order_per_key``: per key, all on one partition, the topic's records (first occurrences) are a
  subsequence of the key's sends, redeliveries included.
* ``rebuild_equal``: the live projection equals, row for row, a from-scratch build of the same log.
* ``insights_equal``: after de-duplication by run id, the run-summary insights equal those of the pure
  logic (:mod:`processors.run_summary.logic`) folded over the same events; every copy of an insight is
  identical, and none is missing or extra.
* ``decisions_equal``: after de-duplication by decision id, the healer worker's decisions on its topic
  equal those of the pure healer (:class:`processors.healing.healer.Healer`) fed the same log, each
  partition in offset order: every copy of a decision identical, none missing, none extra. The worker
  was killed, stopped, restarted with the broker and cut off from PostgreSQL meanwhile, so this holds only
  if its checkpoints (state + offsets) never let a record be skipped or decided twice into a different
  state.
* ``incidents_equal``: after de-duplication by insight id, the incident worker's insights equal those of
  the pure :class:`processors.incidents.incident.IncidentEngine` fed the same telemetry in event-time
  order (the engine decides the same for any interleaving within its allowed lateness): every copy
  identical, none missing, none extra. The worker was killed, stopped and restarted with the broker
  meanwhile, so this holds only if a restarted worker resumes the state it had, rather than re-learning
  from the records after its committed offset.
* ``lag_recovered``: after the last fault, the processor, the healer, the incident worker and the
  projection caught up with the log within the bound.
* ``config_current``: every configuration change the store acknowledged reached the config topic
  (through the outbox relay), and the Redis read model holds, for every key, the store's current
  version (the newest version on the topic when the newest ones were lost in a broker restart's window,
  which is counted, not a violation).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any, Final

__all__ = [
    "GUARANTEES",
    "SEND_PATHS",
    "ChaosHistory",
    "ConfigWrite",
    "InsightRecord",
    "OutputRecord",
    "ProducedEvent",
    "RunFigures",
    "TopicRecord",
    "Violation",
    "acknowledged_by_path",
    "check_history",
    "config_lost_in_window",
    "lost_in_window",
    "violation_counts",
]

GUARANTEES: Final[tuple[str, ...]] = (
    "acknowledged_lost",
    "counted_once",
    "order_per_key",
    "rebuild_equal",
    "insights_equal",
    "decisions_equal",
    "incidents_equal",
    "inference_equal",
    "lag_recovered",
    "config_current",
)
SEND_PATHS: Final[tuple[str, ...]] = ("producer", "http")
"""How the workload sends an event: the typed Kafka producer, or ``POST /events/{type}`` of the API."""
_COST_TOLERANCE_USD: Final = 1e-6


@dataclass(frozen=True, slots=True)
class ProducedEvent:
    """One send of an event by the workload, in send order.

    Attributes:
        event_id: the CloudEvents id (deterministic: run, step, kind for the producer; over HTTP the id
            the API derives from the request's ``Idempotency-Key`` and the event's index in it).
        key: the record key (the run).
        acknowledged: the broker acknowledged it (``producer``: the flush that covered it returned
            without error; ``http``: the API answered 2xx, which it does only once the broker has
            acknowledged every record of the request).
        via: one of :data:`SEND_PATHS`.
    """

    event_id: str
    key: str
    acknowledged: bool
    via: str = "producer"


@dataclass(frozen=True, slots=True)
class TopicRecord:
    """One record found on the events topic after the run."""

    partition: int
    offset: int
    key: str
    event_id: str


@dataclass(frozen=True, slots=True)
class RunFigures:
    """What a run adds up to: LLM calls, tool calls, and cost in USD."""

    llm_calls: int
    tool_calls: int
    cost_usd: float


@dataclass(frozen=True, slots=True)
class InsightRecord:
    """One run-summary insight found on the insights topic (JSON-able ``data``)."""

    run_id: str
    insight_id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class OutputRecord:
    """One record of a processor's output found on its topic: its id (``output_id``: the CloudEvents id,
    deterministic) and its JSON-able ``data``: a healer decision (``sophia.healing.Decision``: kind, subject, event time,
    details, causation id...) or an incident insight (``sophia.insight.Insight``: ``incident.opened`` /
    ``updated`` / ``closed`` with the ranked candidates and their evidence)."""

    output_id: str
    data: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ConfigWrite:
    """One configuration change the workload made: ``store.set`` returned (acknowledged) with this version."""

    key: str
    version: int
    event_id: str


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken guarantee: which, a one-line description, and the evidence (JSON-able)."""

    guarantee: str
    detail: str
    evidence: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(slots=True)
class ChaosHistory:
    """Everything a chaos run observed, as plain data.

    Attributes:
        produced: every send, in send order (redeliveries of an event appear again, and so do the
            events of a failed HTTP request each time it is retried).
        topic: every record on the events topic.
        expected_runs: per run id, the dataset's figures (each event once).
        projected_runs: per run id, the live projection's figures.
        live_rows: per table, the live projection's rows (each row a list of strings), sorted.
        rebuilt_rows: the same tables built from scratch from the same log.
        insights: every run-summary insight on the insights topic.
        expected_insights: per run id, the insight data of the pure logic over the topic's events.
        decisions: every decision record on the healer's decisions topic (copies included).
        expected_decisions: per decision id, the data of the pure healer's decision over the topic's
            events (each partition in offset order).
        incidents: every insight record on the incident worker's insights topic (copies included).
        expected_incidents: per insight id, the insight of the pure incident engine over the telemetry
            topics' records.
        inference_results: per embedding request id, the vector of every answer on the results topic
            (copies included; empty when the run had no inference worker).
        expected_embeddings: per acknowledged request id, the model's embedding of its text, computed by
            the harness in one batch after the run.
        lag_recovered_seconds: seconds from the end of the faults and of the workload until the
            processor, the healer and the projection had caught up; ``None`` when they had not within the
            bound.
        lag_bound_seconds: the bound.
        archived_before_restart: event ids the archive held when the broker went down (union over the
            restarts); empty without a restart.
        broker_restarts: how many times the broker was restarted (0: every loss is a violation).
    """

    produced: list[ProducedEvent]
    topic: list[TopicRecord]
    expected_runs: dict[str, RunFigures]
    projected_runs: dict[str, RunFigures]
    live_rows: dict[str, list[list[str]]]
    rebuilt_rows: dict[str, list[list[str]]]
    insights: list[InsightRecord]
    expected_insights: dict[str, dict[str, Any]]
    lag_recovered_seconds: float | None
    lag_bound_seconds: float
    archived_before_restart: frozenset[str] = frozenset()
    broker_restarts: int = 0
    config_writes: list[ConfigWrite] = field(default_factory=list)
    config_store: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    config_topic_ids: frozenset[str] = frozenset()
    config_read_model: dict[str, int | None] = field(default_factory=dict)
    decisions: list[OutputRecord] = field(default_factory=list)
    expected_decisions: dict[str, dict[str, Any]] = field(default_factory=dict)
    incidents: list[OutputRecord] = field(default_factory=list)
    expected_incidents: dict[str, dict[str, Any]] = field(default_factory=dict)
    inference_results: dict[str, list[list[float]]] = field(default_factory=dict)
    expected_embeddings: dict[str, list[float]] = field(default_factory=dict)


def check_history(h: ChaosHistory) -> list[Violation]:
    """Every violation of the guarantees in :data:`GUARANTEES` that ``h`` shows (empty: none)."""
    return [
        *_acknowledged_lost(h),
        *_counted_once(h),
        *_order_per_key(h),
        *_rebuild_equal(h),
        *_insights_equal(h),
        *_outputs_equal("decisions_equal", "the pure healer", h.decisions, h.expected_decisions),
        *_outputs_equal("incidents_equal", "the pure incident engine", h.incidents, h.expected_incidents),
        *_inference_equal(h),
        *_lag_recovered(h),
        *_config_current(h),
    ]


def violation_counts(violations: list[Violation]) -> dict[str, int]:
    """Violations per guarantee, every guarantee present (0 when none)."""
    counts = dict.fromkeys(GUARANTEES, 0)
    for v in violations:
        counts[v.guarantee] = counts.get(v.guarantee, 0) + 1
    return counts


def acknowledged_by_path(produced: list[ProducedEvent]) -> dict[str, int]:
    """Distinct event ids acknowledged per send path (every path of :data:`SEND_PATHS` present): the
    events :func:`check_history` asks to find on the topic."""
    ids: dict[str, set[str]] = {path: set() for path in SEND_PATHS}
    for p in produced:
        if p.acknowledged:
            ids.setdefault(p.via, set()).add(p.event_id)
    return {path: len(v) for path, v in ids.items()}


def lost_in_window(
    produced: list[ProducedEvent],
    topic: list[TopicRecord],
    archived: frozenset[str] | set[str],
    restarts: int,
) -> set[str]:
    """Acknowledged event ids missing from the topic that the archive did not hold when the broker went
    down: the documented window of loss of a broker restart (empty without a restart)."""
    if not restarts:
        return set()
    on_topic = {r.event_id for r in topic}
    return {
        p.event_id
        for p in produced
        if p.acknowledged and p.event_id not in on_topic and p.event_id not in archived
    }


def _acknowledged_lost(h: ChaosHistory) -> list[Violation]:
    on_topic = {r.event_id for r in h.topic}
    window = lost_in_window(h.produced, h.topic, h.archived_before_restart, h.broker_restarts)
    missing: dict[str, ProducedEvent] = {}
    for p in h.produced:
        if p.acknowledged and p.event_id not in on_topic and p.event_id not in window:
            missing.setdefault(p.event_id, p)
    return [
        Violation(
            "acknowledged_lost",
            f"acknowledged event {eid} (key {p.key}, sent by {p.via}) is not on the topic"
            + (" (the archive held it when the broker went down)" if h.broker_restarts else ""),
            {"event_id": eid, "key": p.key, "via": p.via},
        )
        for eid, p in missing.items()
    ]


def _counted_once(h: ChaosHistory) -> list[Violation]:
    out = []
    for run_id in sorted(set(h.expected_runs) | set(h.projected_runs)):
        want, got = h.expected_runs.get(run_id), h.projected_runs.get(run_id)
        if want is None or got is None:
            out.append(Violation("counted_once", f"run {run_id} is {'missing from' if got is None else 'extra in'} the projection",
                                 {"run_id": run_id, "expected": _figs(want), "projected": _figs(got)}))  # fmt: skip
            continue
        if (
            want.llm_calls != got.llm_calls
            or want.tool_calls != got.tool_calls
            or not math.isclose(want.cost_usd, got.cost_usd, abs_tol=_COST_TOLERANCE_USD)
        ):
            out.append(Violation("counted_once", f"run {run_id}: projected {_figs(got)} != dataset {_figs(want)}",
                                 {"run_id": run_id, "expected": _figs(want), "projected": _figs(got)}))  # fmt: skip
    return out


def _figs(f: RunFigures | None) -> dict[str, Any] | None:
    return None if f is None else asdict(f)


def _order_per_key(h: ChaosHistory) -> list[Violation]:
    """Each key on one partition, and its records there in the order they were sent: the topic's records of
    a key (a record already seen is skipped: duplicates are the de-duplication guarantee's business) must
    be a subsequence of the key's sends, redeliveries included. So an event lost in a broker restart's
    window that a later redelivery brought back sits at its redelivery's place, not its first send's."""
    sends: dict[str, list[str]] = defaultdict(list)
    for p in h.produced:
        sends[p.key].append(p.event_id)
    on_topic: dict[str, list[str]] = defaultdict(list)
    partitions: dict[str, set[int]] = defaultdict(set)
    for r in sorted(h.topic, key=lambda r: (r.partition, r.offset)):
        partitions[r.key].add(r.partition)
        on_topic[r.key].append(r.event_id)
    out = []
    for key in sorted(sends):
        if len(partitions.get(key, ())) > 1:
            out.append(Violation("order_per_key", f"key {key} is spread over partitions {sorted(partitions[key])}",
                                 {"key": key, "partitions": sorted(partitions[key])}))  # fmt: skip
            continue
        sent, at, matched = sends[key], 0, set()
        for i, eid in enumerate(on_topic.get(key, [])):
            if eid in matched:
                continue
            try:
                at = sent.index(eid, at) + 1
            except ValueError:
                nxt = sent[at] if at < len(sent) else None
                out.append(Violation("order_per_key", f"key {key}: position {i} holds {eid}, not sent after the "
                                     f"records before it (the produced order has {nxt} next)",
                                     {"key": key, "position": i, "on_topic": eid, "produced": nxt}))  # fmt: skip
                break
            matched.add(eid)
    return out


def _rebuild_equal(h: ChaosHistory) -> list[Violation]:
    out = []
    for table in sorted(set(h.live_rows) | set(h.rebuilt_rows)):
        live = _multiset(h.live_rows.get(table, []))
        rebuilt = _multiset(h.rebuilt_rows.get(table, []))
        for row in sorted(set(live) | set(rebuilt)):
            if live.get(row, 0) != rebuilt.get(row, 0):
                where = "live only" if live.get(row, 0) > rebuilt.get(row, 0) else "rebuild only"
                out.append(Violation("rebuild_equal", f"{table}: row {row[:1]} differs ({where})",
                                     {"table": table, "row": list(row), "side": where}))  # fmt: skip
    return out


def _multiset(rows: list[list[str]]) -> dict[tuple[str, ...], int]:
    counts: dict[tuple[str, ...], int] = defaultdict(int)
    for r in rows:
        counts[tuple(r)] += 1
    return counts


def _insights_equal(h: ChaosHistory) -> list[Violation]:
    by_run: dict[str, list[InsightRecord]] = defaultdict(list)
    for rec in h.insights:
        by_run[rec.run_id].append(rec)
    out = []
    for run_id in sorted(set(by_run) | set(h.expected_insights)):
        copies, want = by_run.get(run_id, []), h.expected_insights.get(run_id)
        if not copies:
            out.append(Violation("insights_equal", f"run {run_id}: no insight", {"run_id": run_id}))
            continue
        if want is None:
            out.append(Violation("insights_equal", f"run {run_id}: an insight for a run not in the log",
                                 {"run_id": run_id, "insight": copies[0].data}))  # fmt: skip
            continue
        differing = [c for c in copies if c.data != want]
        if differing:
            diff = sorted(
                k for k in set(want) | set(differing[0].data) if want.get(k) != differing[0].data.get(k)
            )
            out.append(Violation("insights_equal",
                                 f"run {run_id}: {len(differing)} of {len(copies)} insight copies differ from the "
                                 f"pure logic (fields {', '.join(diff)})",
                                 {"run_id": run_id, "fields": diff, "got": {k: differing[0].data.get(k) for k in diff},
                                  "expected": {k: want.get(k) for k in diff}}))  # fmt: skip
    return out


INFERENCE_TOLERANCE: Final = 1e-4
"""Largest absolute difference per component between a served embedding and the model's own embedding of the
same text (unit-norm float32 vectors). A request batched with longer texts is padded: the harness's 275 texts
embedded one by one and in batches of 64 differed by at most 1.6e-7 (2026-12-06, a one-off check with a script),
so the bound leaves room for other batchings and nothing for another model or text."""


def _inference_equal(h: ChaosHistory) -> list[Violation]:
    """Every acknowledged embedding request answered, each answer (copies included) the model's embedding of
    its text, and no answer for a request that was not sent."""
    out = []
    for rid in sorted(set(h.expected_embeddings) | set(h.inference_results)):
        want, got = h.expected_embeddings.get(rid), h.inference_results.get(rid)
        if want is None:
            out.append(Violation("inference_equal", f"request {rid}: answered, never requested",
                                 {"request_id": rid}))  # fmt: skip
            continue
        if not got:
            out.append(Violation("inference_equal", f"request {rid}: acknowledged, never answered",
                                 {"request_id": rid}))  # fmt: skip
            continue
        for vector in got:
            diff = (max(abs(a - b) for a, b in zip(vector, want, strict=True))
                    if len(vector) == len(want) else math.inf)  # fmt: skip
            if diff > INFERENCE_TOLERANCE:
                out.append(Violation("inference_equal",
                                     f"request {rid}: an answer differs from the model's embedding by {diff:.2e}",
                                     {"request_id": rid, "max_abs_diff": diff}))  # fmt: skip
                break
    return out


def _outputs_equal(
    guarantee: str, pure: str, records: list[OutputRecord], expected: dict[str, dict[str, Any]]
) -> list[Violation]:
    copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        copies[rec.output_id].append(rec.data)
    out = []
    missing = sorted(set(expected) - set(copies))
    extra = sorted(set(copies) - set(expected))
    if missing:
        out.append(Violation(guarantee, f"{len(missing)} of {pure}'s {len(expected)} outputs are not on the topic",
                             {"missing": missing[:10], "first": expected[missing[0]]}))  # fmt: skip
    if extra:
        out.append(Violation(guarantee, f"{len(extra)} outputs on the topic that {pure} does not make over the log",
                             {"extra": extra[:10], "first": copies[extra[0]][0]}))  # fmt: skip
    for output_id in sorted(set(copies) & set(expected)):
        want = expected[output_id]
        differing = [c for c in copies[output_id] if c != want]
        if differing:
            diff = sorted(k for k in set(want) | set(differing[0]) if want.get(k) != differing[0].get(k))
            out.append(Violation(guarantee,
                                 f"{output_id}: {len(differing)} of {len(copies[output_id])} copies differ from "
                                 f"{pure}'s (fields {', '.join(diff)})",
                                 {"output_id": output_id, "got": {k: differing[0].get(k) for k in diff},
                                  "expected": {k: want.get(k) for k in diff}}))  # fmt: skip
    return out


def _lag_recovered(h: ChaosHistory) -> list[Violation]:
    if h.lag_recovered_seconds is not None and h.lag_recovered_seconds <= h.lag_bound_seconds:
        return []
    return [
        Violation(
            "lag_recovered",
            f"lag not back to zero within {h.lag_bound_seconds:.0f} s of the last fault",
            {"recovered_seconds": h.lag_recovered_seconds, "bound_seconds": h.lag_bound_seconds},
        )
    ]


def config_lost_in_window(h: ChaosHistory) -> set[str]:
    """Config event ids the store holds that are neither on the config topic nor were archived when the
    broker went down: the documented window of loss (empty without a broker restart)."""
    if not h.broker_restarts:
        return set()
    return {
        eid
        for versions in h.config_store.values()
        for _, eid in versions
        if eid not in h.config_topic_ids and eid not in h.archived_before_restart
    }


def _config_current(h: ChaosHistory) -> list[Violation]:
    out = []
    window = config_lost_in_window(h)
    for w in h.config_writes:
        if w.event_id not in h.config_topic_ids and w.event_id not in window:
            out.append(Violation("config_current", f"config change {w.key} v{w.version} was acknowledged by the "
                                 "store but is not on the config topic", {"key": w.key, "version": w.version}))  # fmt: skip
    for key, versions in sorted(h.config_store.items()):
        on_topic = [v for v, eid in versions if eid in h.config_topic_ids]
        want = max(on_topic, default=None)
        got = h.config_read_model.get(key)
        if got != want:
            out.append(Violation("config_current", f"config key {key}: the Redis read model holds version {got}, "
                                 f"the topic's newest is {want} (the store's: {max(v for v, _ in versions)})",
                                 {"key": key, "read_model": got, "topic": want}))  # fmt: skip
    return out
