"""Correlation on real data: the Racket Slack #general of 2018 against racket/racket's 2018 commits.

Runs :class:`processors.correlation.logic.Correlator` (no Kafka) over both files in event-time order,
first with explicit references only, then with discussion links (the streaming masked linker, which
decides a message 8 days of event time after it; the windows still open at the end stay undecided), then
with all-MiniLM-L6-v2 embeddings of every message excerpt and
commit subject. The embeddings are computed once with the model called directly (in batches; producing
11,000 texts through the Ray actors takes minutes and measures inference, not correlation).

Prints: messages, commits, explicit links, embedding links (at ``--min-cosine``, and at a few other
thresholds), how many explicit-link pairs the embedding method also finds (its recall against the
explicit links), and the logic's events/s with and without embeddings.

Reads ``../shared/data/chat_and_code/racket`` (override with ``--data``); that Slack set may not be
copied into the project. Usage::

    python -m bench.bench_correlation [--min-cosine 0.6] [--window-hours 48] [--device cpu] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from bench.common import ROOT
from connectors.chat_code import parse_git_commits_tsv, parse_slack_export
from processors.correlation.logic import (
    DEFAULT_MIN_COSINE,
    DEFAULT_WINDOW,
    CorrelationConfig,
    Correlator,
    observe,
)
from processors.correlation.masked import MaskedConfig

__all__ = ["bounded_state", "main", "print_figures", "run_benchmark"]

DATA = ROOT.parent / "shared" / "data" / "chat_and_code" / "racket"


def _observations(data: Path) -> list[Any]:
    events = list(parse_slack_export(data / "slack_racket_general_2018.xml")) + list(
        parse_git_commits_tsv(data / "racket_commits_2018.tsv")
    )
    obs = [observe(e.data, e.attributes.id) for e in events]
    return sorted((o for o in obs if o is not None), key=lambda o: (o.event_time, o.entity))


def _run(
    observations: list[Any], config: CorrelationConfig, vectors: dict[str, np.ndarray] | None
) -> tuple[list[Any], float]:
    corr = Correlator(config)
    links = []
    start = time.perf_counter()
    for o in observations:
        links += corr.add(o)
        if vectors is not None and o.entity in vectors:
            links += corr.add_vector(o.entity, vectors[o.entity])
    return links, time.perf_counter() - start


def _pairs(links: list[Any]) -> list[tuple[str, str, str, float | None]]:
    return sorted((lk.method, lk.message.entity, lk.commit.entity, lk.score) for lk in links)


def bounded_state(observations: list[Any], config: CorrelationConfig, *, seed: int = 7) -> dict[str, Any]:
    """The discussion linker's state over the whole input, and the links' independence of it.

    Three passes of :class:`Correlator` with ``config`` (discussion links on): dropping what no later
    decision reads and what the retention passed (the default), keeping everything (``evict`` off, no
    retention), and dropping again with every event delivered late by a random 0-23 h (seeded; under the
    one-day allowed lateness), i.e. in another order.

    Returns:
        ``events``; ``held_peak`` / ``held_peak_keeping_all``: the most commits and messages the linker
        held at once in the first two passes; ``correlator_peak`` / ``correlator_peak_keeping_all``: the most
        events the correlator held at once (its items table); ``expired``: events the retention dropped in
        the first pass; ``vocabulary_terms`` / ``commit_terms``: analyzer terms with an id at the end
        (those of held messages and commits and of the commits within the document-frequency horizon) and
        those counted in the document frequencies; ``vocabulary_peak`` / ``vocabulary_peak_keeping_all``:
        the most terms with an id at once in the first two passes; ``links``: reference + discussion links of
        the first pass; ``same_links_keeping_all`` / ``same_links_delayed``: whether the other passes drew
        exactly those links (scores included); ``late_events``: counted in the delayed pass.
    """
    import random

    def run(arrival: list[Any], evict: bool) -> tuple[list[Any], int, int, int, Correlator]:
        corr = Correlator(config if evict else replace(config, retention=None))
        assert corr.discussion is not None
        corr.discussion.evict = evict
        links: list[Any] = []
        peak = held = terms = 0
        for o in arrival:
            links += corr.add(o)
            peak = max(peak, len(corr.discussion.commits) + len(corr.discussion.messages))
            held = max(held, len(corr))
            terms = max(terms, corr.discussion.vocabulary_terms)
        return links, peak, held, terms, corr

    links, peak, held, terms, corr = run(observations, True)
    kept_links, kept_peak, kept_held, kept_terms, _ = run(observations, False)
    rng = random.Random(seed)
    delays = {o.entity: rng.uniform(0, 23 * 3600) for o in observations}
    delayed = sorted(observations, key=lambda o: (o.event_time.timestamp() + delays[o.entity], o.entity))
    delayed_links, _, _, _, delayed_corr = run(delayed, True)
    assert corr.discussion is not None and delayed_corr.discussion is not None
    return {
        "events": len(observations),
        "held_peak": peak,
        "held_peak_keeping_all": kept_peak,
        "correlator_peak": held,
        "correlator_peak_keeping_all": kept_held,
        "expired": corr.expired_count,
        "vocabulary_terms": corr.discussion.vocabulary_terms,
        "commit_terms": corr.discussion.commit_terms,
        "vocabulary_peak": terms,
        "vocabulary_peak_keeping_all": kept_terms,
        "links": len(links),
        "same_links_keeping_all": _pairs(links) == _pairs(kept_links),
        "same_links_delayed": _pairs(links) == _pairs(delayed_links),
        "late_events": delayed_corr.discussion.late_events,
    }


def run_benchmark(
    data: Path = DATA, *, min_cosine: float = DEFAULT_MIN_COSINE, window: timedelta = DEFAULT_WINDOW,
    device: str = "cpu", batch_size: int = 128, rounds: int = 3,
) -> dict[str, Any]:  # fmt: skip
    """Run both passes and return the figures (see the module docstring). The references-only and the
    discussion passes run ``rounds`` times each, alternating; their rates are the best round's and the
    median's (``*_events_per_second``, ``*_events_per_second_median``).

    Raises:
        FileNotFoundError: the data folder is missing.
    """
    if not data.is_dir():
        raise FileNotFoundError(f"{data} is missing")
    from inference.model import load_model

    observations = _observations(data)
    config = CorrelationConfig(window=window, min_cosine=min_cosine)
    discussed = CorrelationConfig(window=window, min_cosine=min_cosine, discussion=MaskedConfig())
    explicit_times, discussion_times = [], []
    for _ in range(max(1, rounds)):
        explicit, seconds = _run(observations, config, None)
        explicit_times.append(seconds)
        with_discussion, seconds = _run(observations, discussed, None)
        discussion_times.append(seconds)
    explicit_seconds, discussion_seconds = min(explicit_times), min(discussion_times)
    discussion_links = sum(lk.method == "discussion" for lk in with_discussion)
    bounded = bounded_state(observations, discussed)

    texts = {o.entity: o.text for o in observations if o.text.strip()}
    model = load_model("all-MiniLM-L6-v2", device=device)
    names = list(texts)
    start = time.perf_counter()
    matrix = np.concatenate([model.embed([texts[n] for n in names[i : i + batch_size]])
                             for i in range(0, len(names), batch_size)])  # fmt: skip
    embed_seconds = time.perf_counter() - start
    vectors = dict(zip(names, matrix, strict=True))
    links, with_vectors_seconds = _run(observations, config, vectors)
    embedding = [lk for lk in links if lk.method == "embedding"]
    explicit_pairs = {(lk.message.entity, lk.commit.entity) for lk in explicit}
    embedding_pairs = {(lk.message.entity, lk.commit.entity) for lk in embedding}
    by_threshold = {}
    low = CorrelationConfig(window=window, min_cosine=min(0.4, min_cosine))
    all_pairs = [lk for lk in _run(observations, low, vectors)[0] if lk.method == "embedding"]
    for threshold in sorted({0.4, 0.5, 0.6, 0.7, 0.8, min_cosine}):
        kept = {(lk.message.entity, lk.commit.entity) for lk in all_pairs if lk.cosine >= threshold}
        by_threshold[threshold] = {"links": len(kept), "explicit_found": len(kept & explicit_pairs)}
    return {
        "messages": sum(o.kind == "message" for o in observations),
        "commits": sum(o.kind == "commit" for o in observations),
        "explicit_links": len(explicit_pairs),
        "embedding_links": len(embedding_pairs),
        "explicit_also_by_embedding": len(explicit_pairs & embedding_pairs),
        "explicit_within_window": sum(
            abs((lk.message.event_time - lk.commit.event_time).total_seconds()) <= window.total_seconds()
            for lk in explicit
        ),
        "min_cosine": min_cosine,
        "window_hours": window.total_seconds() / 3600,
        "by_threshold": by_threshold,
        "explicit_events_per_second": len(observations) / explicit_seconds,
        "explicit_events_per_second_median": len(observations) / statistics.median(explicit_times),
        "discussion_links": discussion_links,
        "discussion_events_per_second": len(observations) / discussion_seconds,
        "discussion_events_per_second_median": len(observations) / statistics.median(discussion_times),
        "rounds": len(explicit_times),
        "bounded": bounded,
        "embedding_events_per_second": (len(observations) + len(vectors)) / with_vectors_seconds,
        "embed_texts": len(names),
        "embed_seconds": embed_seconds,
        "device": device,
    }


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table (or JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--min-cosine", type=float, default=DEFAULT_MIN_COSINE)
    parser.add_argument("--window-hours", type=float, default=DEFAULT_WINDOW.total_seconds() / 3600)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of the two logic passes (best reported)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    r = run_benchmark(args.data, min_cosine=args.min_cosine, window=timedelta(hours=args.window_hours),
                      device=args.device, rounds=args.rounds)  # fmt: skip
    if args.json:
        print(json.dumps(r, indent=2, default=str))
        return
    print_figures(r)


def print_figures(r: dict[str, Any]) -> None:
    """Print the figures of :func:`run_benchmark` as a table."""
    t = Table(title=f"correlation on Racket Slack 2018 x racket/racket (window ±{r['window_hours']:g} h)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    for name, value in (
        ("messages", f"{r['messages']:,}"),
        ("commits", f"{r['commits']:,}"),
        ("explicit links (reference)", f"{r['explicit_links']:,}"),
        ("  of which within the window", f"{r['explicit_within_window']:,}"),
        (f"embedding links (cosine >= {r['min_cosine']:g})", f"{r['embedding_links']:,}"),
        (
            "explicit links also found by embedding",
            f"{r['explicit_also_by_embedding']:,} of {r['explicit_links']:,}",
        ),
        (
            f"logic, references only (best of {r['rounds']}; median)",
            f"{r['explicit_events_per_second']:,.0f}; {r['explicit_events_per_second_median']:,.0f} events/s",
        ),
        (
            f"logic, references + discussion ({r['discussion_links']:,} discussion links; best of "
            f"{r['rounds']}; median)",
            f"{r['discussion_events_per_second']:,.0f}; {r['discussion_events_per_second_median']:,.0f} "
            f"events/s ({r['discussion_events_per_second'] / r['explicit_events_per_second']:.3f}x)",
        ),
        (
            "discussion linker: most commits + messages held at once (keeping all)",
            f"{r['bounded']['held_peak']:,} of {r['bounded']['events']:,} events "
            f"({r['bounded']['held_peak_keeping_all']:,})",
        ),
        (
            "correlator: most events held at once, retention (keeping all)",
            f"{r['bounded']['correlator_peak']:,} ({r['bounded']['correlator_peak_keeping_all']:,}); "
            f"{r['bounded']['expired']:,} dropped",
        ),
        (
            "  same links keeping all / delivered 0-23 h late (late events)",
            f"{r['bounded']['same_links_keeping_all']} / {r['bounded']['same_links_delayed']} "
            f"({r['bounded']['late_events']})",
        ),
        (
            "  vocabulary terms at the end (counted in df); most at once (keeping all)",
            f"{r['bounded']['vocabulary_terms']:,} ({r['bounded']['commit_terms']:,}); "
            f"{r['bounded']['vocabulary_peak']:,} ({r['bounded']['vocabulary_peak_keeping_all']:,})",
        ),
        ("logic, with embeddings", f"{r['embedding_events_per_second']:,.0f} events+vectors/s"),
        (f"embedding {r['embed_texts']:,} texts ({r['device']}, direct)", f"{r['embed_seconds']:.1f} s"),
    ):
        t.add_row(name, value)
    for threshold, row in r["by_threshold"].items():
        t.add_row(
            f"  at cosine >= {threshold:g}", f"{row['links']:,} links, {row['explicit_found']} explicit found"
        )
    Console().print(t)


if __name__ == "__main__":
    main()
