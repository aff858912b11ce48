"""Decision logic of the correlation processor: which Slack messages and commits belong together.

Plain Python, no Kafka. One :class:`Correlator` holds the state of one *correlation scope* (a Slack
workspace and the GitHub organisation it talks about, see :func:`scope_of`); the Faust shell in
:mod:`processors.correlation.app` keeps one per scope and persists its items in a table.

Two methods are each a property of a *pair* (message, commit), never of the order things arrive in:

* ``reference``: the message's ``refs`` name the commit: a SHA (full, or a prefix of at least 7 hex
  digits) of the commit's repository, or ``#N`` / an issue or pull-request URL where the commit subject
  ends with ``(#N)`` (GitHub's squash-merge convention). No time window inside the retention: an
  explicit reference is evidence whatever the distance in time, as long as both ends are held (see
  *Retention*).
* ``embedding``: both texts have an embedding (all-MiniLM-L6-v2, unit length), their event times are at
  most ``window`` apart, and the cosine of the two vectors is at least ``min_cosine``.

A pair is linked once per method, at the moment its last missing piece arrives (the message, the
commit, or one of the two vectors), whichever it is; a piece seen again changes nothing. So the *set* of
links after any sequence of inputs is the set of pairs that satisfy the rule, and every permutation
or replay of the same inputs gives the same links with the same deterministic ids (:func:`link_id`),
event times (the later of the two event times) and figures.

A third method, ``discussion`` (with ``CorrelationConfig.discussion``), is a property of a message and
all the commits around it, not of one pair: a message without a reference link is linked to the commit
that :class:`processors.correlation.masked.DiscussionLinker` ranks first (text, timing, pending merge,
author affinity learned from the reference links of earlier messages), when it clears a score and a
margin. It is decided once the scope's watermark (the smallest of its sources' largest event times:
the worker names every partition of its events topic as a source) passes the
message's time + ``window_after`` + ``allowed_lateness`` (8 days by default), so every permutation whose
events arrive within the allowed lateness gives the same discussion links; later events are counted
(``DiscussionLinker.late_events``). :meth:`Correlator.close` decides what is still pending at the end of
a finite input; the live worker never calls it.

**Retention (bounded state).** A scope holds the messages of the last ``CorrelationConfig.retention``
(:data:`DEFAULT_RETENTION`, 90 days) of event time behind its watermark and the commits of the last
``commit_retention`` (:data:`DEFAULT_COMMIT_RETENTION`, 365 days), and drops the older ones
(:attr:`Correlator.expired` names them, so the worker deletes their table items); an event older than that
when it arrives (a backfill: a year of commits imported before the year's chat) is counted
(:attr:`Correlator.too_old`), still draws its reference links with what is held (a stream-table join), and
is not kept (no embedding or discussion link). Commits are kept longer because a
message may name an old commit: on the Racket 2018 year the reference links are 12.9 days apart at p90
(``backbone eval links --json``, ``lags_reference_links``), but one message of October names a commit of
July, 102 days before. So a reference pair closer than the retention of the earlier one's kind (less the
sources' lateness) is always linked, one further apart only if the later one arrives before the earlier one
is dropped, and what is held grows with the
messages of ``retention`` and the commits of ``commit_retention``, not with the whole history. Messages
are most of the events (9,709 of 10,954 on that year). An embedding vector that arrives for an entity the
scope no longer holds (an inference slower than the retention) waits as any early vector does.

Slack exports carry local time of an unknown offset (see :func:`connectors.chat_code.parse_slack_export`),
so the default window (:data:`DEFAULT_WINDOW`, 48 hours) is wider than the ±14 h that offset can add,
and ``lag_seconds`` of a link includes that unknown offset.
"""

from __future__ import annotations

import base64
import bisect
import heapq
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np

from processors.correlation.masked import DiscussionLinker, MaskedConfig, Prediction, pr_number_of
from processors.correlation.watermark import SourceWatermark
from processors.errors import UnprocessableEventError
from streams.envelope import Event, deterministic_id

__all__ = [
    "COMMIT_KIND",
    "DEFAULT_COMMIT_RETENTION",
    "DEFAULT_MIN_COSINE",
    "DEFAULT_RETENTION",
    "DEFAULT_WINDOW",
    "EXTERNAL_SCHEMA",
    "INSIGHT_KIND",
    "INSIGHT_SCHEMA",
    "INSIGHT_SOURCE",
    "MESSAGE_KIND",
    "REQUEST_PREFIX",
    "CorrelationConfig",
    "Correlator",
    "Link",
    "Observation",
    "decode_vector_b64",
    "encode_vector_b64",
    "link_id",
    "observe",
    "parse_request_id",
    "pr_number_of",
    "request_id_for",
    "scope_of",
]

EXTERNAL_SCHEMA = "sophia.external.ExternalEvent"
INSIGHT_SCHEMA = "sophia.insight.Insight"
INSIGHT_KIND = "correlation.link"
INSIGHT_SOURCE = "/processors/correlation"
MESSAGE_KIND = "slack.message"
COMMIT_KIND = "git.commit"
REQUEST_PREFIX = "corr:"
DEFAULT_WINDOW = timedelta(hours=48)
"""Largest event-time distance of an embedding link: a day or two of discussion around a commit,
plus the ±14 h an unknown Slack offset can add."""
DEFAULT_RETENTION = timedelta(days=90)
"""How much event time of messages a scope holds behind its watermark (see *Retention*)."""
DEFAULT_COMMIT_RETENTION = timedelta(days=365)
"""How much event time of commits a scope holds behind its watermark (see *Retention*)."""
DEFAULT_MIN_COSINE = 0.6
"""Smallest cosine of an embedding link (all-MiniLM-L6-v2; see ``bench/bench_correlation.py``)."""

_PREFIX = 7
_COMMIT_ENTITY = re.compile(r"git:(?P<repo>[\w.-]+/[\w.-]+)@(?P<sha>[0-9a-f]{40})")
_SHA_REF = re.compile(r"github:(?P<repo>[\w.-]+/[\w.-]+)@(?P<sha>[0-9a-f]{7,40})")
_NUM_REF = re.compile(r"github:(?P<repo>[\w.-]+/[\w.-]+)#(?P<num>\d+)")
_SCOPE_OF = re.compile(r"(?:slack|git):(?P<scope>[^/:@|]+)[/@]")

Method = Literal["reference", "embedding", "discussion"]


@dataclass(frozen=True, slots=True, kw_only=True)
class CorrelationConfig:
    """Tuning of the correlation.

    Attributes:
        window: largest event-time distance between a message and a commit for an embedding link.
        min_cosine: smallest cosine similarity for an embedding link, in ``[-1, 1]``.
        scopes: entity prefix → scope, overriding :func:`scope_of`'s default (the longest matching
            prefix wins), e.g. ``{"slack:lisp/racket-": "racket"}``.
        discussion: the masked linker's settings for ``discussion`` links
            (:class:`~processors.correlation.masked.DiscussionLinker`); None draws none.
        retention: event time of messages held behind the scope's watermark (see *Retention* in the
            module docstring); None holds every event forever (``commit_retention`` is then ignored).
        commit_retention: the same for commits (at least ``retention``).

    Raises:
        ValueError: a negative ``window``, ``min_cosine`` outside ``[-1, 1]``, a bad scope (empty, or with
            ``:`` or ``|``), or a
            ``retention`` shorter than ``window`` or than a discussion decision reads back
            (``window_before + window_after + allowed_lateness``), or a ``commit_retention`` shorter than
            ``retention``.
    """

    window: timedelta = DEFAULT_WINDOW
    min_cosine: float = DEFAULT_MIN_COSINE
    scopes: Mapping[str, str] = field(default_factory=dict)
    discussion: MaskedConfig | None = None
    retention: timedelta | None = DEFAULT_RETENTION
    commit_retention: timedelta = DEFAULT_COMMIT_RETENTION

    @property
    def keeps_watermark(self) -> bool:
        """Whether a scope keeps an event-time watermark: it decides discussion links and moves the
        retention (with neither, ``discussion=None`` and ``retention=None``, there is none)."""
        return self.discussion is not None or self.retention is not None

    @property
    def linker_config(self) -> MaskedConfig | None:
        """The masked linker's settings as the correlator runs them: ``discussion`` with its
        ``df_horizon`` at most ``commit_retention - allowed_lateness`` and its ``affinity_horizon`` at most
        ``retention - window_after - allowed_lateness`` when a retention is set. A restarted worker
        rebuilds its linker from what the retention held at the last checkpoint (commits from
        ``watermark - commit_retention`` on, messages and their explicit links from ``watermark -
        retention`` on), and every decision left to make is of a message at or after ``watermark -
        window_after - allowed_lateness``, whose document frequencies start ``df_horizon`` before ``time +
        window_after`` and whose author affinity starts ``affinity_horizon`` before ``time``: with these
        caps every commit and link they count is still held, so a restart gives the same decisions, scores
        included, as a worker that never stopped. None: no ``discussion``."""
        d = self.discussion
        if d is None or self.retention is None:
            return d
        df_cap = self.commit_retention - d.allowed_lateness
        affinity_cap = self.retention - d.window_after - d.allowed_lateness
        if d.df_horizon is None or d.df_horizon > df_cap:
            d = replace(d, df_horizon=df_cap)
        if d.affinity_horizon is None or d.affinity_horizon > affinity_cap:
            d = replace(d, affinity_horizon=affinity_cap)
        return d

    def __post_init__(self) -> None:
        if self.window < timedelta(0):
            raise ValueError(f"window must not be negative, got {self.window}")
        if not -1.0 <= self.min_cosine <= 1.0:
            raise ValueError(f"min_cosine must lie in [-1, 1], got {self.min_cosine}")
        for scope in self.scopes.values():
            if not scope or ":" in scope or "|" in scope:
                raise ValueError(f"a scope must be non-empty and without ':' or '|', got {scope!r}")
        if self.retention is not None:
            d = self.discussion
            needed = max(
                self.window,
                d.window_before + d.window_after + d.allowed_lateness if d is not None else timedelta(0),
            )
            if self.retention < needed:
                raise ValueError(
                    f"retention {self.retention} is shorter than the {needed} a link reads back "
                    "(the embedding window, or a discussion decision's windows and lateness)"
                )
            if self.commit_retention < self.retention:
                raise ValueError(
                    f"commit_retention {self.commit_retention} is shorter than retention {self.retention}"
                )


def scope_of(entity: str, scopes: Mapping[str, str] | None = None) -> str:
    """The correlation scope of an entity: where its partners can be.

    Default: the Slack workspace of a message (``slack:racket/general/...`` → ``racket``) and the owner of
    a commit's repository (``git:racket/racket@...`` → ``racket``), so a workspace meets the organisation
    of the same name. ``scopes`` overrides it by entity prefix. A scope holds no ``:`` and no ``|`` (the
    separator of the worker's table keys, ``<scope>|<entity>``; no Slack workspace or GitHub owner name has
    one).

    Raises:
        UnprocessableEventError: an entity that is neither ``slack:<workspace>/...`` nor ``git:<owner>/...``
            (a workspace or owner with ``|`` included).
    """
    if scopes:
        best = max((p for p in scopes if entity.startswith(p)), key=len, default=None)
        if best is not None:
            return scopes[best]
    m = _SCOPE_OF.match(entity)
    if m is None:
        raise UnprocessableEventError(
            f"entity {entity!r} has no correlation scope (slack:<ws>/... or git:<owner>/...)"
        )
    return m.group("scope")


def request_id_for(scope: str, entity: str) -> str:
    """Deterministic id of the embedding request of an entity's text: ``corr:<scope>:<entity>``."""
    return f"{REQUEST_PREFIX}{scope}:{entity}"


def parse_request_id(request_id: str) -> tuple[str, str] | None:
    """``(scope, entity)`` of a request id made by :func:`request_id_for`; ``None`` for anyone else's."""
    if not request_id.startswith(REQUEST_PREFIX):
        return None
    scope, sep, entity = request_id[len(REQUEST_PREFIX) :].partition(":")
    return (scope, entity) if sep and scope and entity else None


def encode_vector_b64(vector: np.ndarray) -> str:
    """Base64 of the little-endian float32 bytes of a 1-D vector (for JSON state)."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")


def decode_vector_b64(text: str) -> np.ndarray:
    """The float32 vector of :func:`encode_vector_b64`.

    Raises:
        ValueError: not base64 of a whole number of float32 values.
    """
    raw = base64.b64decode(text.encode("ascii"), validate=True)
    if len(raw) % 4:
        raise ValueError(f"vector of {len(raw)} bytes is not float32")
    return np.frombuffer(raw, dtype="<f4").astype(np.float32)


def _ms(t: datetime) -> int:
    return int(t.timestamp() * 1000)


def _drop_empty(index: dict[Any, list[str]]) -> None:
    for key in [k for k, v in index.items() if not v]:
        del index[key]


def _clock_ms(t: datetime) -> int:
    """Epoch ms as the discussion linker rounds them (its deadlines compare with the shared clock)."""
    return round(t.timestamp() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Observation:
    """What the correlation needs of one external event.

    Attributes:
        entity: the event's entity, e.g. ``slack:racket/general/<ts>`` or ``git:racket/racket@<sha>``.
        kind: ``message`` or ``commit``.
        event_time: aware UTC event time (``occurred_at``).
        event_id: CloudEvents id of the event (the causation of the links it completes).
        text: the message excerpt or the commit subject (may be empty).
        repo: the commit's ``owner/name`` (commits only).
        sha: the commit's full SHA (commits only).
        pr_number: ``N`` when the commit subject ends with ``(#N)``.
        refs: the message's references (``github:owner/repo@sha``, ``github:owner/repo#N``), in order.
        actor: the message's user or the commit's git author (None: unknown); ``discussion`` links read it.
        thread: the message's thread (``ExternalEvent.thread``; None: none); a ``discussion`` link reads the
            thread's other messages as context.
    """

    entity: str
    kind: Literal["message", "commit"]
    event_time: datetime
    event_id: str
    text: str = ""
    repo: str | None = None
    sha: str | None = None
    pr_number: int | None = None
    refs: tuple[str, ...] = ()
    actor: str | None = None
    thread: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``event_time`` in epoch milliseconds)."""
        return {
            "entity": self.entity, "kind": self.kind, "event_time_ms": _ms(self.event_time),
            "event_id": self.event_id, "text": self.text, "repo": self.repo, "sha": self.sha,
            "pr_number": self.pr_number, "refs": list(self.refs), "actor": self.actor,
            "thread": self.thread,
        }  # fmt: skip

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Observation:
        """Inverse of :meth:`to_dict`.

        Raises:
            KeyError, TypeError, ValueError: a malformed dict.
        """
        kind = d["kind"]
        if kind not in ("message", "commit"):
            raise ValueError(f"unknown observation kind {kind!r}")
        return cls(
            entity=str(d["entity"]), kind=kind,
            event_time=datetime.fromtimestamp(int(d["event_time_ms"]) / 1000, UTC),
            event_id=str(d["event_id"]), text=str(d.get("text") or ""), repo=d.get("repo"), sha=d.get("sha"),
            pr_number=d.get("pr_number"), refs=tuple(d.get("refs") or ()), actor=d.get("actor"),
            thread=d.get("thread"),
        )  # fmt: skip


def observe(data: Mapping[str, Any], event_id: str) -> Observation | None:
    """The :class:`Observation` of a decoded ``sophia.external.ExternalEvent``; ``None`` for a kind the
    correlation does not use (anything but ``slack.message`` and ``git.commit``).

    Args:
        data: the Avro datum (``occurred_at`` an aware datetime).
        event_id: its CloudEvents id.

    Raises:
        UnprocessableEventError: a ``git.commit`` whose entity is not ``git:<owner>/<repo>@<40-hex sha>``,
            or an event without an aware ``occurred_at``.
    """
    kind = data.get("kind")
    if kind not in (MESSAGE_KIND, COMMIT_KIND):
        return None
    entity = str(data.get("entity") or "")
    occurred_at = data.get("occurred_at")
    if not isinstance(occurred_at, datetime) or occurred_at.tzinfo is None:
        raise UnprocessableEventError(f"{entity!r} has no aware occurred_at", event_id=event_id)
    if kind == MESSAGE_KIND:
        return Observation(
            entity=entity, kind="message", event_time=occurred_at.astimezone(UTC), event_id=event_id,
            text=str(data.get("body_excerpt") or ""), refs=tuple(data.get("refs") or ()), actor=data.get("actor"),
            thread=data.get("thread"),
        )  # fmt: skip
    m = _COMMIT_ENTITY.fullmatch(entity)
    if m is None:
        raise UnprocessableEventError(
            f"git.commit entity {entity!r} is not git:<owner>/<repo>@<sha>", event_id=event_id
        )
    title = str(data.get("title") or "")
    return Observation(
        entity=entity, kind="commit", event_time=occurred_at.astimezone(UTC), event_id=event_id, text=title,
        repo=m.group("repo"), sha=m.group("sha"), pr_number=pr_number_of(title), actor=data.get("actor"),
    )  # fmt: skip


def link_id(method: str, message_entity: str, commit_entity: str) -> str:
    """Deterministic insight id of a link: the same pair and method always give the same id."""
    return deterministic_id(INSIGHT_KIND, method, message_entity, commit_entity)


def _matching_ref(message: Observation, commit: Observation) -> str | None:
    """The first of the message's refs that names the commit, or ``None``."""
    for ref in message.refs:
        m = _SHA_REF.fullmatch(ref)
        if m is not None:
            if m.group("repo") == commit.repo and commit.sha and commit.sha.startswith(m.group("sha")):
                return ref
            continue
        m = _NUM_REF.fullmatch(ref)
        if m is not None and m.group("repo") == commit.repo and commit.pr_number == int(m.group("num")):
            return ref
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class Link:
    """A message and a commit that belong together.

    Attributes:
        method: ``reference``, ``embedding`` or ``discussion``.
        message: the Slack message.
        commit: the commit.
        reference: the message's ref that names the commit (``reference`` links), else ``None``.
        cosine: the cosine of the two embeddings (``embedding`` links), else ``None``.
        score: the masked linker's score of the commit (``discussion`` links), else ``None``.
        margin: how far that score beats the runner-up's (``discussion`` links), else ``None``.
    """

    method: Method
    message: Observation
    commit: Observation
    reference: str | None = None
    cosine: float | None = None
    score: float | None = None
    margin: float | None = None

    @property
    def insight_id(self) -> str:
        """See :func:`link_id`."""
        return link_id(self.method, self.message.entity, self.commit.entity)

    @property
    def event_time(self) -> datetime:
        """The later of the two event times (the link cannot be known before both happened)."""
        return max(self.message.event_time, self.commit.event_time)

    @property
    def lag_seconds(self) -> float:
        """Message event time minus commit event time, in seconds (positive: the message came after)."""
        return (self.message.event_time - self.commit.event_time).total_seconds()

    def to_insight(self) -> Event:
        """The ``sophia.insight.Insight`` event (key and entity: the commit; id: :attr:`insight_id`;
        causation: the id of the later event, the message on a tie)."""
        later = self.commit if self.commit.event_time > self.message.event_time else self.message
        metrics = {"lag_seconds": self.lag_seconds}
        labels = {
            "method": self.method, "commit_sha": self.commit.sha or "", "commit_entity": self.commit.entity,
            "repo": self.commit.repo or "", "slack_entity": self.message.entity,
        }  # fmt: skip
        if self.reference is not None:
            labels["reference"] = self.reference
            why = f"references it as {self.reference}"
        else:
            why = "discusses it"
        if self.cosine is not None:
            metrics["cosine"] = self.cosine
            why = f"resembles it (cosine {self.cosine:.3f})"
        if self.score is not None and self.margin is not None:
            metrics["score"], metrics["margin"] = self.score, self.margin
            why = f"discusses it (score {self.score:.3f}, {self.margin:.3f} above the runner-up)"
        data = {
            "insight_id": self.insight_id,
            "kind": INSIGHT_KIND,
            "entity": self.commit.entity,
            "event_time": self.event_time,
            "summary": f"Slack message {self.message.entity} {why}: commit {(self.commit.sha or '')[:12]} "
            f"{self.commit.text[:120]!r}",
            "metrics": metrics,
            "labels": labels,
        }
        return Event.create(
            INSIGHT_SCHEMA, self.commit.entity, data, source=INSIGHT_SOURCE, time=self.event_time,
            id=self.insight_id, causation_id=later.event_id,
        )  # fmt: skip


class Correlator:
    """The state of one correlation scope: the messages and commits seen, their embeddings, and indexes.

    Feed it with :meth:`add` (an event's observation) and :meth:`add_vector` (an embedding); each returns
    the links that the new piece completes. Re-adding a known entity or vector returns nothing.

    Args:
        config: window, threshold, retention and scope overrides.
        sources: the inputs the scope's watermark waits for (the worker: ``<topic>/<partition>`` of every
            partition of its events topic); None: the sources seen so far. The watermark moves the
            discussion decisions and the retention.

    Attributes:
        clock: the scope's :class:`~processors.correlation.watermark.SourceWatermark` (shared with
            :attr:`discussion`).
        expired: the entities dropped by the retention since the caller last emptied the list (the worker
            deletes their table items).
        expired_count: entities dropped by the retention so far (orphan vectors included).
        too_old: events older than the retention when they arrived (their reference links with what is held
            were drawn; they were not kept).
        orphans_expired: vectors whose event never came (or came too old, or was dropped before its vector
            arrived) within the message retention of watermark after the vector; they are dropped and named
            in :attr:`expired` like the entities (before 2026-12-07 such a vector was held for good).
    """

    def __init__(
        self, config: CorrelationConfig | None = None, sources: Collection[str] | None = None
    ) -> None:
        self.config = config or CorrelationConfig()
        self.observations: dict[str, Observation] = {}
        self.vectors: dict[str, np.ndarray] = {}  # float64 copies of the float32 unit vectors
        self._commits_by_prefix: dict[tuple[str, str], list[str]] = {}
        self._commits_by_pr: dict[tuple[str, int], list[str]] = {}
        self._messages_by_prefix: dict[tuple[str, str], list[str]] = {}
        self._messages_by_pr: dict[tuple[str, int], list[str]] = {}
        self._embedded: dict[str, list[tuple[int, str]]] = {"message": [], "commit": []}
        # retention: held entities by event time, and the index buckets each was put in
        self._by_time: dict[str, list[tuple[int, str]]] = {"message": [], "commit": []}
        self._buckets: dict[str, list[list[str]]] = {}
        self.expired: list[str] = []
        self.expired_count = 0
        self.too_old = 0
        self._expired_since_sweep = 0
        retention = self.config.retention
        self._retention_ms = int(retention.total_seconds() * 1000) if retention is not None else None
        self._commit_retention_ms = int(self.config.commit_retention.total_seconds() * 1000)
        self._expired_at: int | None = None  # the watermark of the last expiry
        # vectors that came without their event: (watermark when they came, entity); those that came before
        # any watermark wait in _unclocked for the first expiry
        self._orphans: list[tuple[int, str]] = []
        self._unclocked: list[str] = []
        self.orphans_expired = 0
        self.clock = SourceWatermark(sources)
        linker = self.config.linker_config
        self.discussion = DiscussionLinker(linker, watermark=self.clock) if linker is not None else None
        self._restoring = False

    def __len__(self) -> int:
        return len(self.observations)

    def add(self, obs: Observation, source: str | None = None) -> list[Link]:
        """Record an event; return the links it completes (explicit ones, then embedding ones, then the
        discussion links of the messages whose deadline the watermark passed).

        An entity seen before (a replay, a duplicate delivery) is ignored and returns ``[]``. An event older
        than the retention returns its reference links with what is held and is not kept (:attr:`too_old`).

        Args:
            obs: the event.
            source: the input it was read from (the worker passes the ``external.events`` partition); the
                discussion watermark follows the slowest source (see ``DiscussionLinker.advance``).
        """
        if obs.entity in self.observations:
            return []
        seconds = obs.event_time.timestamp()
        t = int(seconds * 1000)  # as _ms
        if not self._restoring:
            self.clock.note(source, round(seconds * 1000))  # as _clock_ms
        cutoff = self._cutoff_ms(obs.kind)
        held = cutoff is None or t >= cutoff
        links: list[Link] = []
        slots: list[tuple[dict[Any, list[str]], Any]] = []  # the index keys it is held under
        if obs.kind == "commit":
            assert obs.repo is not None and obs.sha is not None
            slots.append((self._commits_by_prefix, (obs.repo, obs.sha[:_PREFIX])))
            candidates = list(self._messages_by_prefix.get((obs.repo, obs.sha[:_PREFIX]), ()))
            if obs.pr_number is not None:
                slots.append((self._commits_by_pr, (obs.repo, obs.pr_number)))
                candidates += self._messages_by_pr.get((obs.repo, obs.pr_number), ())
            for entity in dict.fromkeys(candidates):
                links += self._reference_link(self.observations[entity], obs)
        else:
            candidates = []
            for ref in obs.refs:
                if (m := _SHA_REF.fullmatch(ref)) is not None:
                    key = (m.group("repo"), m.group("sha")[:_PREFIX])
                    slots.append((self._messages_by_prefix, key))
                    candidates += self._commits_by_prefix.get(key, ())
                elif (m := _NUM_REF.fullmatch(ref)) is not None:
                    key_pr = (m.group("repo"), int(m.group("num")))
                    slots.append((self._messages_by_pr, key_pr))
                    candidates += self._commits_by_pr.get(key_pr, ())
            for entity in dict.fromkeys(candidates):
                links += self._reference_link(obs, self.observations[entity])
        if not held:  # older than the retention: it still meets what is held, and is not kept
            self.too_old += 1
            return links
        self.observations[obs.entity] = obs
        heapq.heappush(self._by_time[obs.kind], (t, obs.entity))
        buckets = self._buckets[obs.entity] = []
        for index, key in slots:
            bucket = index.setdefault(key, [])
            bucket.append(obs.entity)
            buckets.append(bucket)
        if obs.entity in self.vectors:
            links += self._embedding_links(obs)
        if self.discussion is not None:
            links += self._discussion_links(obs, links)
        self._expire()
        return links

    def _cutoff_ms(self, kind: str) -> int | None:
        """Events of ``kind`` before this time (epoch ms) are outside the retention; None: nothing is."""
        watermark = self.clock.watermark_ms
        if self._retention_ms is None or watermark is None:
            return None
        return watermark - (self._commit_retention_ms if kind == "commit" else self._retention_ms)

    def _expire(self) -> None:
        """Drop the events the retention has passed (see *Retention*), naming them in :attr:`expired`;
        nothing to do unless the watermark moved since the last call."""
        watermark = self.clock.watermark_ms
        if watermark is None or watermark == self._expired_at or self._retention_ms is None:
            return
        self._expired_at = watermark
        for kind, held in self._by_time.items():
            cutoff = watermark - (self._commit_retention_ms if kind == "commit" else self._retention_ms)
            while held and held[0][0] < cutoff:
                t, entity = heapq.heappop(held)
                self._drop(t, entity)
        for entity in self._unclocked:
            heapq.heappush(self._orphans, (watermark, entity))
        self._unclocked.clear()
        cutoff = watermark - self._retention_ms
        while self._orphans and self._orphans[0][0] < cutoff:
            _, entity = heapq.heappop(self._orphans)
            if entity not in self.observations and self.vectors.pop(entity, None) is not None:
                self.expired.append(entity)
                self.expired_count += 1
                self.orphans_expired += 1
        if self._expired_since_sweep > len(self.observations) + 64:  # emptied index keys, now and then
            _drop_empty(self._commits_by_prefix)
            _drop_empty(self._commits_by_pr)
            _drop_empty(self._messages_by_prefix)
            _drop_empty(self._messages_by_pr)
            self._expired_since_sweep = 0

    def _drop(self, t: int, entity: str) -> None:
        obs = self.observations.pop(entity)
        for bucket in self._buckets.pop(entity):
            bucket.remove(entity)
        if self.vectors.pop(entity, None) is not None:
            embedded = self._embedded[obs.kind]
            del embedded[bisect.bisect_left(embedded, (t, entity))]
        self.expired.append(entity)
        self.expired_count += 1
        self._expired_since_sweep += 1

    def _discussion_links(self, obs: Observation, links: list[Link]) -> list[Link]:
        """Record ``obs`` and its reference links in the masked linker, and return the
        ``discussion`` links of the messages whose deadline it passed (none while restoring)."""
        assert self.discussion is not None
        if obs.kind == "commit":
            self.discussion.add_commit(obs.entity, obs.event_time, obs.text, obs.actor)
        else:
            self.discussion.add_message(
                obs.entity, obs.event_time, obs.text, obs.actor, conversation=obs.thread
            )
        for link in links:
            if link.method == "reference":
                self.discussion.add_reference(link.message.entity, link.commit.entity, link.commit.actor)
        if self._restoring:
            return []
        return [self._discussion_link(p) for p in self.discussion.decide_pending()]  # add() noted the clock

    def _discussion_link(self, p: Prediction) -> Link:
        assert p.commit is not None
        message, commit = self.observations[p.message], self.observations[p.commit]
        return Link(method="discussion", message=message, commit=commit, score=p.score, margin=p.margin)

    def progress(self, sources: Mapping[str, datetime], drained: Iterable[str] = ()) -> list[Link]:
        """Note how far each source has been read (its largest event time over every scope, e.g. a batch of
        ``external.events`` partition 0 up to 12:00) and which sources were read to their end
        (``drained``: idle until their next event, see :class:`~processors.correlation.watermark.
        SourceWatermark`), move the scope's watermark (the retention follows it), and return the
        ``discussion`` links of the messages whose deadline it passed. A scope whose events sit on a few
        partitions, or that is quiet while others are busy, so still sees its watermark move."""
        if self._restoring:
            return []
        for source, time in sources.items():
            self.clock.note(source, _clock_ms(time))
        for source in drained:
            self.clock.mark_idle(source)
        links = (
            []
            if self.discussion is None
            else [self._discussion_link(p) for p in self.discussion.decide_pending()]
        )
        self._expire()
        return links

    def close(self) -> list[Link]:
        """Decide every message still waiting for its ``discussion`` deadline (the end of a finite input:
        an evaluation, or a bounded replay's ``--close-at-end``); returns their links. The watermark then
        moves to the latest deadline decided (at least), as if event time had reached it, and the
        retention follows: a correlator restored from the progress persisted after this takes those
        decisions as made, and an event that comes later, older than that watermark by more than the
        allowed lateness, is counted late. A live worker never calls it."""
        if self.discussion is None:
            return []
        deadline = self.discussion.last_deadline_ms
        links = [self._discussion_link(p) for p in self.discussion.close()]
        if deadline is not None:
            self.clock.restore(deadline)
            self._expire()
        return links

    def add_vector(self, entity: str, vector: np.ndarray) -> list[Link]:
        """Record the embedding of an entity's text; return the embedding links it completes.

        The vector is L2-normalised here (all-MiniLM-L6-v2's already are). A vector may come before its
        event: it waits, and the links are drawn when the event arrives. A second vector for the same
        entity is ignored.

        Raises:
            ValueError: not a 1-D vector, a zero vector, or a dimension other than the scope's vectors'.
        """
        if entity in self.vectors:
            return []
        v = np.asarray(vector, dtype=np.float32)
        if v.ndim != 1:
            raise ValueError(f"an embedding must be 1-D, got shape {v.shape}")
        if self.vectors:
            dim = next(iter(self.vectors.values())).shape[0]
            if v.shape[0] != dim:
                raise ValueError(f"embedding of dimension {v.shape[0]}, the scope's are {dim}")
        norm = float(np.linalg.norm(v))
        if not norm > 0.0:
            raise ValueError("zero embedding")
        unit = v if abs(norm - 1.0) < 1e-6 else (v / norm).astype(np.float32)
        self.vectors[entity] = unit.astype(np.float64)
        obs = self.observations.get(entity)
        if obs is None:  # its event may come later, or never (dropped, too old): see _expire
            if self._retention_ms is not None:
                at = self.clock.watermark_ms
                if at is None or self._restoring:
                    self._unclocked.append(entity)
                else:
                    heapq.heappush(self._orphans, (at, entity))
            return []
        return self._embedding_links(obs)

    def _reference_link(self, message: Observation, commit: Observation) -> list[Link]:
        ref = _matching_ref(message, commit)
        return (
            [] if ref is None else [Link(method="reference", message=message, commit=commit, reference=ref)]
        )

    def _embedding_links(self, obs: Observation) -> list[Link]:
        """``obs`` has just got both its event and its vector: pair it with the other kind in the window."""
        t = _ms(obs.event_time)
        bisect.insort(self._embedded[obs.kind], (t, obs.entity))
        others = self._embedded["commit" if obs.kind == "message" else "message"]
        window_ms = int(self.config.window.total_seconds() * 1000)
        lo = bisect.bisect_left(others, (t - window_ms, ""))
        hi = bisect.bisect_right(others, (t + window_ms, "\U0010ffff"))
        if lo >= hi:
            return []
        mine = self.vectors[obs.entity]
        links = []
        for _, name in others[lo:hi]:
            # float32 products are exact in float64 and the sum runs in index order either way round,
            # so the cosine of a pair does not depend on which of the two came last.
            cosine = round(float(np.dot(mine, self.vectors[name])), 6)
            if cosine >= self.config.min_cosine:
                other = self.observations[name]
                message, commit = (obs, other) if obs.kind == "message" else (other, obs)
                links.append(Link(method="embedding", message=message, commit=commit, cosine=cosine))
        return links

    def restore(
        self,
        items: Iterable[
            tuple[Observation | None, np.ndarray | None, str]
            | tuple[Observation | None, np.ndarray | None, str, str | None]
        ],
        progress: Mapping[str, datetime] | None = None,
        watermark: datetime | None = None,
        idle: Iterable[str] = (),
    ) -> None:
        """Rebuild the state from persisted items ``(observation, vector, entity[, source])`` (links are not
        redrawn: the ``discussion`` decisions the restored watermark has passed count as made, since the
        worker sent them before it wrote the item that moved the watermark; the watermark is rebuilt from
        each source's largest event time, and from ``progress``, the persisted read progress of
        :meth:`progress`, where that is later; the sources in ``idle`` are idle; and the watermark is at
        least ``watermark``, the persisted one, which idleness may have moved past the sources' maxima).

        Raises:
            ValueError: a vector that :meth:`add_vector` refuses.
        """
        self._restoring = True
        latest: dict[str | None, datetime] = {}
        try:
            for item in items:
                obs, vector, entity = item[0], item[1], item[2]
                source = item[3] if len(item) > 3 else None
                if obs is not None:
                    self.add(obs)
                    if source not in latest or obs.event_time > latest[source]:
                        latest[source] = obs.event_time
                if vector is not None:
                    self.add_vector(entity, vector)
        finally:
            self._restoring = False
        for source, time in (progress or {}).items():
            if source not in latest or time > latest[source]:
                latest[source] = time
        for source, time in latest.items():
            self.clock.note(source, _clock_ms(time))
        for source in idle:
            self.clock.mark_idle(source)
        if watermark is not None:
            self.clock.restore(_clock_ms(watermark))
        if self.discussion is not None:
            self.discussion.restore_watermark()
        self._expire()
