"""The correlation worker on a real broker: the Racket year through ``backbone processors correlate``, against
a plain Faust agent that only counts the same records.

Produces the Racket Slack #general of 2018 and racket/racket's 2018 commits, merged in event-time order (as
``backbone import slack FILE --commits TSV`` does), to ``external.events`` on the embedded Tansu (3
partitions), then runs one process at a time, alternating:

* ``plain Faust agent``: ``faust.App`` with its defaults (raw serializers), one agent over
  ``external.events`` counting per key (:data:`bench.bench_processors.FAUST_COUNT`);
* ``correlation worker, references only``: ``backbone processors correlate --no-embeddings
  --no-discussion``;
* ``correlation worker, references + discussion links``: ``--no-embeddings`` (the streaming masked
  linker, its watermark following the slowest partition of ``external.events``).

Each worker reads ``external.events``, forwards messages and commits by correlation scope through its
repartition topic, and correlates there, so a record is handled twice; the rate is the year's events over
the time from the first record either stage handled to the last. Each run has its own consumer group and
``--stop-after-idle``. Printed beside the table: the links each worker sent, its late events, and the links
:class:`processors.correlation.logic.Correlator` draws in this process over the same events in event-time
order (the windows still open at the end left undecided, as in a live run): the worker must draw the same.

Measured 2026-12-06 on the 2-core machine, nothing else running, one run each: with Faust agents for both
stages, references only 1,348 and 1,412 events/s (0.29 and 0.23 of the plain agent), with discussion links
570, then 775 after scikit-learn was imported at build time (0.12); with both stages on
:class:`processors.shell.BatchDelivery` references only 7,050 and 8,074 events/s (1.16 and 1.45), with
discussion links 1,849 and 1,357 (0.31 and 0.24; the logic alone 1,556 and 1,433 events/s in process).
The same 17 reference and 1,453 discussion links in every run, 0 events late. Since the linker's author
affinity learns from the links of the last 82 days only (2026-12-07 10:00, one run): 17 and **1,430** links,
the same as the logic in process; references only 15,137 events/s (0.88 of the plain agent), with
discussion links 3,754 (0.22).

Reads ``../shared/data/chat_and_code/racket`` (override with ``--data``); that Slack set may not be
copied into the project. Usage::

    python -m bench.bench_correlation_worker [--idle 5] [--data DIR]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import ROOT, bench_stack
from bench.worker_runs import Row, faust_row, json_after, print_rows, print_verdicts, run_child, worker_env

__all__ = ["DATA", "TARGET", "main"]

DATA = ROOT.parent / "shared" / "data" / "chat_and_code" / "racket"
"""The default ``--data``: the Racket files next to the project."""
TARGET = 0.8
"""Issue 12's bar for its workers: 0.8 of a plain Faust agent counting the same records."""
TOPIC = "external.events"


def _events(data: Path) -> list[Any]:
    from connectors.chat_code import parse_git_commits_tsv, parse_slack_export

    merged = [
        *parse_slack_export(data / "slack_racket_general_2018.xml"),
        *parse_git_commits_tsv(data / "racket_commits_2018.tsv"),
    ]
    return sorted(merged, key=lambda e: (e.data["occurred_at"], e.key))


def _logic_links(events: list[Any]) -> dict[str, int]:
    """Links per method of the plain-Python correlator (discussion links on) over ``events`` in order."""
    from processors.correlation.logic import CorrelationConfig, Correlator, observe
    from processors.correlation.masked import MaskedConfig

    corr = Correlator(CorrelationConfig(discussion=MaskedConfig()))
    counts: dict[str, int] = {}
    for e in events:
        obs = observe(e.data, e.attributes.id)
        for link in corr.add(obs) if obs is not None else []:
            counts[link.method] = counts.get(link.method, 0) + 1
    return counts


def _worker(
    name: str, n: int, env: dict[str, str], idle: float, baseline: str, discussion: bool
) -> tuple[Row, dict[str, Any]]:
    """``backbone processors correlate --no-embeddings`` until idle; its row and counters.

    Raises:
        RuntimeError: it did not exit cleanly, dead-lettered a record or did not forward all ``n`` events.
    """
    c = run_child(
        [sys.executable, "-m", "backbone", "processors", "correlate", "--no-embeddings",
         "--discussion" if discussion else "--no-discussion", "--app-id", f"bench-correlate-{uuid.uuid4().hex[:8]}",
         "--stop-after-idle", str(idle), "--json"],
        env, 1800,
    )  # fmt: skip
    s = json_after(c.stdout, '{"records_count"')
    if c.returncode != 0 or s is None:
        raise RuntimeError(f"the correlation worker did not finish (exit {c.returncode}): {c.stderr[-2000:]}")
    if s["events_count"] < n or s["dead_letters_count"]:
        raise RuntimeError(f"the correlation worker forwarded {s['events_count']} of {n} events, "
                           f"{s['dead_letters_count']} dead-lettered")  # fmt: skip
    first, last = s["first_record_monotonic"], s["last_record_monotonic"]
    links = s["reference_links_count"] + s["discussion_links_count"]
    row = Row(name, n, (n - 1) / (last - first), last - c.started, c.exited - c.started, c.peak_rss_kib,
              c.last_rss_kib, c.cpu_seconds, links, baseline)  # fmt: skip
    return row, s


def main(argv: list[str] | None = None) -> list[Row]:
    """Produce the year, run the four processes, print the table; return the rows (empty when skipped).

    Raises:
        RuntimeError: a process did not handle the whole year.
    """
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA, help=f"the Racket folder ({DATA})")
    ap.add_argument("--idle", type=float, default=5.0, help="--stop-after-idle of the workers, seconds")
    args = ap.parse_args(argv)
    if not (args.data / "slack_racket_general_2018.xml").is_file():
        print(f"skipped: no Racket Slack export under {args.data}; pass --data DIR")
        return []

    from confluent_kafka.admin import AdminClient

    from connectors.chat_code import import_events
    from core.eventloop import resolve
    from streams.catalogue import ensure_topics
    from streams.serde import serde_from_settings

    events = _events(args.data)
    t0 = time.perf_counter()
    expected = _logic_links(events)
    logic_seconds = time.perf_counter() - t0

    with bench_stack() as settings, tempfile.TemporaryDirectory(prefix="bench-correlation-") as state:
        ensure_topics(AdminClient(settings.kafka.librdkafka()), [TOPIC])
        report = import_events(settings, serde_from_settings(settings), events, topic=TOPIC)
        n = report.events
        env = worker_env(settings, Path(state))
        boot = settings.kafka.bootstrap_servers
        loop = resolve(settings.event_loop)  # the workers' loop: the baseline runs on it too
        faust = f"plain Faust agent, {TOPIC}, count per key ({loop})"
        rows = [faust_row(f"{faust} (first reader)", boot, (TOPIC,), n, env, loop)]
        refs, refs_stats = _worker("correlation worker, references only", n, env, args.idle, faust, False)
        rows += [refs, faust_row(faust, boot, (TOPIC,), n, env, loop)]
        both, both_stats = _worker("correlation worker, references + discussion links", n, env, args.idle,
                                   faust, True)  # fmt: skip
        rows.append(both)

    print(f"import: {n:,} events to {TOPIC} in {report.seconds} s")
    print_rows(f"Racket 2018 (Slack #general and racket/racket commits): one process at a time, first to last "
               f"record; idle stop after {args.idle:g} s; 'insights' = links sent", rows, TARGET)  # fmt: skip
    print(
        f"links sent: references only {refs_stats['reference_links_count']:,} by reference; with discussion "
        f"{both_stats['reference_links_count']:,} by reference and {both_stats['discussion_links_count']:,} by "
        f"discussion ({both_stats['discussion_late_count']:,} events late). The logic in this process over "
        f"the same events in event-time order: {expected.get('reference', 0):,} by reference, "
        f"{expected.get('discussion', 0):,} by discussion ({len(events) / logic_seconds:,.0f} events/s)"
    )
    same = both_stats["discussion_links_count"] == expected.get("discussion", 0)
    print(f"discussion links as the logic draws them: {'yes' if same else 'NO'}")
    refs_same = (
        refs_stats["reference_links_count"]
        == both_stats["reference_links_count"]
        == expected.get("reference", 0)
    )
    print(f"reference links as the logic draws them, in both workers: {'yes' if refs_same else 'NO'}")
    print_verdicts(rows, TARGET)
    return rows


if __name__ == "__main__":
    main()
