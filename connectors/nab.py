"""Import the Numenta Anomaly Benchmark (NAB) as ``sophia.telemetry.SeriesSample`` events.

Source: numenta/NAB @ ea702d7 (``data/<category>/<series>.csv`` and ``labels/combined_windows.json``),
copied as ``anomaly/nab/`` in the shared data folder. A NAB folder holds category folders of CSV files::

    timestamp,value
    2014-07-01 00:00:00,10844

(timestamps without offset, taken as UTC as NAB does; values are numbers) and ``combined_windows.json``
maps ``<category>/<file>.csv`` to a list of ``[start, end]`` anomaly windows
(``"2014-10-30 15:30:00.000000"``). **The windows are ground truth**: :func:`read_nab` returns them for
scoring, but they never become events, so no processor can read them.

One event per row: key and ``series`` ``nab:<category>/<name>`` (file name without ``.csv``), metric
``value``, id deterministic in the series and the row time (:func:`streams.envelope.deterministic_id`), so
a second import puts the same ids on the log. A value that is not a finite number is counted and
reported (:attr:`NabSeries.rejected`), never imported, and the import goes on.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from connectors.errors import ConnectorError
from core.settings import Settings
from streams.catalogue import TopicSpec
from streams.envelope import Event, deterministic_id
from streams.producer import EventProducer
from streams.serde import AvroSerde

__all__ = [
    "METRIC_SCHEMA",
    "METRIC_TOPIC",
    "METRIC_TOPIC_SPEC",
    "NAB_SOURCE",
    "NabImportError",
    "NabImportReport",
    "NabSeries",
    "import_nab",
    "metric_event",
    "read_nab",
    "series_events",
]

METRIC_SCHEMA = "sophia.telemetry.SeriesSample"
METRIC_TOPIC = "telemetry.metrics"
NAB_SOURCE = "/connectors/nab"
METRIC_TOPIC_SPEC = TopicSpec(
    name=METRIC_TOPIC,
    partitions=6,
    key="series",
    schemas=(METRIC_SCHEMA,),
    retention_ms=30 * 86_400_000,
    doc="Metric samples (one series per key, in event-time order per series): NAB series, pod metrics.",
)
"""The metrics topic, until the catalogue (and the deploy manifests that mirror it) lists it."""
WINDOWS_FILE = "combined_windows.json"


class NabImportError(ConnectorError, ValueError):
    """A NAB folder that cannot be read (missing folder or label file, a CSV without ``timestamp,value``).

    Attributes:
        path: the file or folder.
    """

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


def _parse_time(text: str) -> datetime:
    """NAB time ``YYYY-MM-DD HH:MM:SS[.ffffff]`` (no offset) as aware UTC."""
    t = datetime.fromisoformat(text.strip())
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


@dataclass(slots=True)
class NabSeries:
    """One NAB series with its ground truth.

    Attributes:
        name: ``<category>/<file stem>``, e.g. ``realKnownCause/nyc_taxi``.
        timestamps: aware UTC times of the accepted rows, ascending as in the file.
        values: their values.
        windows: labelled anomaly windows ``(start, end)`` (inclusive), ground truth only.
        rejected: ``(line, reason)`` of rows that were not imported (a value that is not a finite number,
            a time that does not parse).
    """

    name: str
    timestamps: list[datetime] = field(default_factory=list)
    values: list[float] = field(default_factory=list)
    windows: list[tuple[datetime, datetime]] = field(default_factory=list)
    rejected: list[tuple[int, str]] = field(default_factory=list)

    @property
    def series(self) -> str:
        """The event key and ``series`` field: ``nab:<name>``."""
        return f"nab:{self.name}"


def read_nab(root: Path, *, categories: Iterable[str] | None = None) -> list[NabSeries]:
    """Read every ``<category>/*.csv`` under ``root`` with its windows from ``combined_windows.json``.

    Args:
        root: the NAB folder: category folders and ``combined_windows.json`` side by side (as in
            ``../shared/data/anomaly/nab``), or a checkout of numenta/NAB (``data/<category>/`` and
            ``labels/combined_windows.json``).
        categories: only these category folders (default: all).

    Returns:
        The series, sorted by name.

    Raises:
        NabImportError: ``root`` or its label file is missing or unreadable, or a CSV has no
            ``timestamp,value`` header.
    """
    if not root.is_dir():
        raise NabImportError(root, "no such folder")
    labels_path = root / WINDOWS_FILE
    if not labels_path.is_file() and (root / "labels" / WINDOWS_FILE).is_file() and (root / "data").is_dir():
        labels_path, root = root / "labels" / WINDOWS_FILE, root / "data"  # a numenta/NAB checkout
    if not labels_path.is_file():
        raise NabImportError(labels_path, "no label file (combined_windows.json)")
    try:
        labels: dict[str, list[list[str]]] = json.loads(labels_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NabImportError(labels_path, f"not JSON: {exc}") from exc
    wanted = set(categories) if categories is not None else None
    out: list[NabSeries] = []
    for path in sorted(root.glob("*/*.csv")):
        category = path.parent.name
        if wanted is not None and category not in wanted:
            continue
        s = NabSeries(name=f"{category}/{path.stem}")
        try:
            s.windows = [
                (_parse_time(a), _parse_time(b)) for a, b in labels.get(f"{category}/{path.name}", [])
            ]
        except (ValueError, TypeError) as exc:
            raise NabImportError(labels_path, f"bad window of {category}/{path.name}: {exc}") from exc
        with path.open(encoding="utf-8", newline="") as f:
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None or [h.strip() for h in header[:2]] != ["timestamp", "value"]:
                raise NabImportError(path, f"expected the header 'timestamp,value', got {header!r}")
            for line, row in enumerate(rows, start=2):
                try:
                    t = _parse_time(row[0])
                    v = float(row[1])
                except (ValueError, IndexError) as exc:
                    s.rejected.append((line, f"unparseable row {row!r}: {exc}"))
                    continue
                if not math.isfinite(v):
                    s.rejected.append((line, f"value {row[1]!r} is not a finite number"))
                    continue
                s.timestamps.append(t)
                s.values.append(v)
        out.append(s)
    return out


def metric_event(
    *, series: str, observed_at: datetime, value: float, labels: dict[str, str], source_id: str
) -> Event:
    """The ``sophia.telemetry.SeriesSample`` event of one sample (metric ``value``).

    Args:
        series: the series name (event key), e.g. ``nab:realKnownCause/nyc_taxi``.
        observed_at: aware UTC time of the sample.
        value: the value (finite).
        labels: dimensions (``source``, ``category``).
        source_id: ``<file>:<line>``.

    Returns:
        The event; its id is deterministic in ``series`` and ``observed_at``.

    Raises:
        ValueError: a value that is not finite.
    """
    if not math.isfinite(value):
        raise ValueError(f"value {value!r} is not a finite number")
    data: dict[str, Any] = {
        "series": series, "metric": "value", "observed_at": observed_at, "value": float(value),
        "labels": dict(labels), "source_id": source_id,
    }  # fmt: skip
    return Event.create(
        METRIC_SCHEMA, series, data, source=NAB_SOURCE, time=observed_at,
        id=deterministic_id("nab", series, int(observed_at.timestamp() * 1000)),
    )  # fmt: skip


def series_events(s: NabSeries) -> Iterator[Event]:
    """The metric events of one series, in row order (windows are not included)."""
    category = s.name.split("/", 1)[0]
    labels = {"source": "nab", "category": category}
    for i, (t, v) in enumerate(zip(s.timestamps, s.values, strict=True)):
        yield metric_event(
            series=s.series, observed_at=t, value=v, labels=labels, source_id=f"{s.name}.csv:{i}"
        )


@dataclass(slots=True)
class NabImportReport:
    """What :func:`import_nab` did: ``topic``, ``series``, ``events`` produced, ``rejected`` rows (with the
    first reasons), ``windows`` read (ground truth, not produced) and ``seconds`` of wall time."""

    topic: str
    series: int = 0
    events: int = 0
    rejected: int = 0
    rejected_examples: list[str] = field(default_factory=list)
    windows: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {
            "topic": self.topic, "series": self.series, "events": self.events, "rejected": self.rejected,
            "rejected_examples": list(self.rejected_examples), "windows": self.windows, "seconds": self.seconds,
        }  # fmt: skip


def import_nab(
    settings: Settings,
    serde: AvroSerde,
    series: Iterable[NabSeries],
    *,
    topic: str = METRIC_TOPIC,
    on_event: Callable[[Event], None] | None = None,
) -> NabImportReport:
    """Produce every sample of ``series`` to ``topic`` (acks=all) and wait for them.

    Raises:
        streams.errors.DeliveryError: a record was not acknowledged.
        streams.errors.BrokerUnavailableError: no broker answered.
    """
    report = NabImportReport(topic=topic)
    start = time.perf_counter()
    producer = EventProducer(settings.kafka, serde, linger_ms=20)
    for s in series:
        report.series += 1
        report.windows += len(s.windows)
        report.rejected += len(s.rejected)
        report.rejected_examples += [f"{s.name}.csv:{line}: {why}" for line, why in s.rejected][
            : max(0, 5 - len(report.rejected_examples))
        ]
        for event in series_events(s):
            producer.produce(topic, event)
            report.events += 1
            if on_event is not None:
                on_event(event)
    producer.flush()
    report.seconds = round(time.perf_counter() - start, 3)
    return report
