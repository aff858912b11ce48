"""CLI of issue 12's anomaly and cross-source parts: ``import nab``, ``import github-events``,
``eval anomalies`` and ``eval links``.

Plain command functions (mount them in the ``import`` and ``eval`` groups) plus ``import_app`` and
``eval_app`` typer apps that hold them, for tests and for mounting as a whole.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from backbone.cli.helpers import JsonOpt, clear_errors, emit_json, err, out

__all__ = [
    "eval_anomalies", "eval_app", "eval_links", "import_app", "import_github_events", "import_nab",
    "processors_app", "run_anomalies",
]  # fmt: skip

import_app = typer.Typer(help="Import NAB series and GitHub Events API objects.", no_args_is_help=True)
eval_app = typer.Typer(
    help="Score anomaly detection (NAB) and masked cross-source links.", no_args_is_help=True
)


def _produce(events_iter: Any, topics: list[str], as_json: bool, what: str, run: Any) -> Any:
    from confluent_kafka.admin import AdminClient

    from backbone.cli.helpers import context
    from connectors.nab import METRIC_TOPIC_SPEC
    from streams.catalogue import CATALOGUE, create_missing_topics

    settings, serde = context()
    extra = {METRIC_TOPIC_SPEC.name: METRIC_TOPIC_SPEC}
    specs = [CATALOGUE.get(t) or extra.get(t) for t in topics]
    if any(specs):
        create_missing_topics(AdminClient(settings.kafka.librdkafka()), [s for s in specs if s is not None])
    with Progress(TextColumn(f"importing {what}"), BarColumn(), MofNCompleteColumn(), console=err,
                  disable=as_json or not err.is_terminal) as bar:  # fmt: skip
        task = bar.add_task("import", total=None)
        return run(settings, serde, events_iter, lambda _: bar.advance(task))


@import_app.command("nab")
@clear_errors
def import_nab(
    folder: Annotated[Path, typer.Argument(help="NAB folder: category folders and combined_windows.json.")],
    topic: Annotated[str, typer.Option(help="Topic to produce to.", envvar="BACKBONE_METRICS_TOPIC")] = "telemetry.metrics",
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Import every NAB series as sophia.telemetry.SeriesSample events (labels stay out of the log)."""
    from connectors.nab import import_nab as run_import
    from connectors.nab import read_nab

    series = read_nab(folder)
    report = _produce(series, [topic], as_json, "NAB samples",
                      lambda st, sd, it, cb: run_import(st, sd, it, topic=topic, on_event=cb))  # fmt: skip
    if as_json:
        emit_json(report.as_dict())
        return
    out.print(f"imported {report.events:,} samples of {report.series} series to {topic} "
              f"({report.rejected} rows rejected, {report.windows} windows kept as ground truth) in {report.seconds} s")  # fmt: skip


@import_app.command("github-events")
@clear_errors
def import_github_events(
    file: Annotated[Path, typer.Argument(help="JSON array of GitHub Events API objects (GH Archive schema).")],
    topic: Annotated[str, typer.Option(help="Topic to produce to.", envvar="BACKBONE_EXTERNAL_TOPIC")] = "external.events",
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Import GitHub events (pull requests, reviews, comments, issues, pushes and their commits)."""
    from connectors.chat_code import import_events
    from connectors.github_events import read_github_events

    events, rejected = read_github_events(file)
    report = _produce(events, [topic], as_json, "GitHub events",
                      lambda st, sd, it, cb: import_events(st, sd, it, topic=topic, on_event=cb))  # fmt: skip
    result = report.as_dict() | {"rejected": len(rejected), "rejected_examples": rejected[:5]}
    if as_json:
        emit_json(result)
        return
    kinds = ", ".join(f"{n:,} {k}" for k, n in sorted(report.by_kind.items())) or "nothing"
    out.print(f"imported {kinds} to {topic} ({len(rejected)} rejected) in {report.seconds} s")


AUTO_CATEGORY = "auto"
"""``eval anomalies --category`` default: ``realKnownCause`` (the issue's scored category) when the folder has
it, else every category folder it holds."""


def anomaly_figures(folder: Path, detector: str, category: str, baseline: bool,
                    loo: bool = False) -> dict[str, Any]:  # fmt: skip
    """The figures of ``eval anomalies`` (see :func:`eval_anomalies`)."""
    from connectors.nab import read_nab
    from processors.incidents.anomaly import DetectorConfig
    from processors.incidents.anomaly_eval import evaluate_alerts, evaluate_raw_scores, leave_one_out

    if category == AUTO_CATEGORY:
        category = "realKnownCause" if (folder / "realKnownCause").is_dir() else ""
    series = read_nab(folder, categories=[category] if category else None)
    if not series:
        raise typer.BadParameter(f"no series under {folder} (category {category or 'every folder'!r})")
    result = evaluate_alerts(series, DetectorConfig(detector=detector)).as_dict()
    result["categories"] = sorted({s.name.split("/", 1)[0] for s in series})
    if loo:
        if len(series) < 2:
            raise typer.BadParameter("--leave-one-out needs at least two series")
        result["leave_one_out"] = leave_one_out(series, detector).as_dict()
    if baseline:
        wg = evaluate_raw_scores(series, "windowed-gaussian").as_dict()
        result["baseline_windowed_gaussian_nab_optimised"] = {
            k: wg[k] for k in ("score_standard", "precision", "recall", "threshold")
        }
        gated = evaluate_alerts(series, DetectorConfig(detector="windowed-gaussian")).as_dict()
        result["baseline_windowed_gaussian_gated"] = {
            k: gated[k] for k in ("score_standard", "precision", "recall")
        }
    return result


@eval_app.command("anomalies")
@clear_errors
def eval_anomalies(
    data: Annotated[Path, typer.Option("--data", help="NAB folder (category folders, combined_windows.json).",
                                       envvar="BACKBONE_NAB_DATA")],
    category: Annotated[str, typer.Option(help="Category folder to score ('' = all; auto = realKnownCause when "
                                          "present, else all).", envvar="BACKBONE_NAB_CATEGORY")] = AUTO_CATEGORY,
    detector: Annotated[str, typer.Option(help="Detector name.", envvar="BACKBONE_ANOMALY_DETECTOR")] = "confirmed-likelihood",
    baseline: Annotated[bool, typer.Option(help="Also score NAB's windowed-Gaussian baseline (slower).",
                                           envvar="BACKBONE_NAB_BASELINE")] = False,
    loo: Annotated[bool, typer.Option("--leave-one-out", help="Also the leave-one-series-out score: threshold "
                                      "and suppression chosen on the other series (a few seconds more).")] = False,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """NAB score (standard profile, fixed threshold, no fitting) of the streaming detector, with window
    precision and recall: {"series", "score_standard", "precision", "recall", ...}; with --leave-one-out,
    "leave_one_out": {"score_standard", "chosen"} (threshold and suppression chosen on the other series)."""
    result = anomaly_figures(data, detector, category, baseline, loo)
    if as_json:
        emit_json(result)
        return
    print_anomaly_figures(result, published_scores(data))


def published_scores(folder: Path) -> dict[str, dict[str, float]]:
    """NAB's published scoreboard (``final_results.json`` next to the series, as in ``../shared/data/anomaly/
    nab``; ``results/final_results.json`` in a numenta/NAB checkout): detector -> {``standard``,
    ``reward_low_FP_rate``, ``reward_low_FN_rate``} over the whole NAB corpus; empty when absent or unreadable."""
    for path in (folder / "final_results.json", folder / "results" / "final_results.json"):
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(doc, dict):
            return {k: v for k, v in doc.items() if isinstance(v, dict) and "standard" in v}
    return {}


def print_anomaly_figures(result: dict[str, Any], published: dict[str, dict[str, float]]) -> None:
    """The text of ``eval anomalies``: this detector's NAB scores (and its leave-one-out score and the
    baselines when computed) beside the published scoreboard, then its window precision and recall."""
    from backbone.cli.helpers import print_cells

    def row(
        name: str, standard: float, low_fp: float | None = None, low_fn: float | None = None
    ) -> list[str]:
        return [name, f"{standard:.2f}", "" if low_fp is None else f"{low_fp:.2f}",
                "" if low_fn is None else f"{low_fn:.2f}"]  # fmt: skip

    rows = [row(f"{result['detector'].split()[0]}, this run", result["score_standard"],
                result["score_reward_low_FP_rate"], result["score_reward_low_FN_rate"])]  # fmt: skip
    if "leave_one_out" in result:
        rows.append(row("  leave one series out", result["leave_one_out"]["score_standard"]))
    for key, label in (("baseline_windowed_gaussian_gated", "windowed Gaussian, same gate"),
                       ("baseline_windowed_gaussian_nab_optimised", "windowed Gaussian, NAB threshold")):  # fmt: skip
        if key in result:
            rows.append(row(label, result[key]["score_standard"]))
    for name, s in sorted(published.items(), key=lambda kv: -kv[1]["standard"]):
        rows.append(row(f"{name} *", s["standard"], s.get("reward_low_FP_rate"), s.get("reward_low_FN_rate")))
    cols = ["detector", "standard", "low FP", "low FN"]
    print_cells(rows, cols, f"NAB scores on {', '.join(result.get('categories', []))} ({result['series']} series, "
                f"{result['windows']} windows)", right=set(cols[1:]))  # fmt: skip
    out.print(
        f"{result['detector']}; * published, whole NAB corpus (final_results.json); 0 is the null detector, "
        "100 the perfect one",
        highlight=False,
    )
    out.print(
        f"windows detected {result['detected_windows']} of {result['windows']} (recall {result['recall']:.3f}), "
        f"{result['detections']} detections (precision {result['precision']:.3f}); goal: above Numenta HTM's "
        "70.5 standard",
        highlight=False,
    )


def _slack_messages(files: list[Path], repo: str) -> list[Any]:
    """Slack messages of the exports, each as (its event, its :class:`ChatMessage` with the whole text and
    the event's ``thread``); read in place, never copied."""
    from connectors.chat_code import parse_slack_export, render_slack_text
    from processors.correlation.masked import ChatMessage

    out_: list[Any] = []
    for f in files:
        raw: list[str] = []
        for _, el in ET.iterparse(f, events=("end",)):
            if el.tag == "message":
                raw.append(el.findtext("text") or "")
                el.clear()
        events = list(parse_slack_export(f, repo=repo))
        if len(events) != len(raw):
            raise typer.BadParameter(
                f"{f}: {len(raw) - len(events)} messages without a usable ts; cannot align their texts"
            )
        for text, e in zip(raw, events, strict=True):
            out_.append((e, ChatMessage(e.data["entity"], e.data["occurred_at"], render_slack_text(text),
                                        e.data.get("thread"), e.data.get("actor"))))  # fmt: skip
    return out_


def link_figures(
    slack: list[Path],
    commits_file: Path,
    repo: str,
    embeddings: bool,
    affinity: bool = True,
    min_history: int | None = None,
) -> dict[str, Any]:
    """The figures of ``eval links`` (see :func:`eval_links`)."""
    from connectors.chat_code import parse_git_commits_tsv
    from processors.correlation.logic import CorrelationConfig, Correlator, observe
    from processors.correlation.masked import CommitText, MaskedConfig, evaluate_masked

    pairs = _slack_messages(slack, repo)
    config = MaskedConfig() if min_history is None else MaskedConfig(min_history=min_history)
    commits = list(parse_git_commits_tsv(commits_file, repo=repo))
    corr = Correlator(CorrelationConfig(retention=None))  # every reference pair of the files, in any order
    from processors.correlation.lag import LagStats

    truth: dict[str, str] = {}
    lags = LagStats()
    for e in [*commits, *(p[0] for p in pairs)]:
        o = observe(e.data, e.attributes.id)
        if o is not None:
            for link in corr.add(o):
                truth.setdefault(link.message.entity, link.commit.entity)
                lags.add(link.insight_id, "slack", "git", link.lag_seconds)
    referencing = sum(1 for e, _ in pairs if any(r.startswith(f"github:{repo}") for r in e.data["refs"]))
    embed = None
    if embeddings:
        from core.observability import configure_logging
        from inference.model import load_model

        configure_logging("INFO", "auto")  # log lines to stderr, so that --json stays one JSON document

        model = load_model("all-MiniLM-L6-v2")
        embed = model.embed
    result = evaluate_masked([p[1] for p in pairs], [CommitText(e.data["entity"], e.data["occurred_at"],
                             str(e.data["title"] or ""), e.data.get("actor")) for e in commits], truth,
                             config=config, embed=embed, learn_affinity=affinity)  # fmt: skip
    result["embeddings"] = embeddings
    result["author_affinity"] = affinity
    result["min_history"] = config.min_history
    result["processor"] = _processor_figures(commits, [p[0] for p in pairs], truth, config)
    result["lags_reference_links"] = [x.as_dict() for x in lags.summary()]
    masked_links, masked_right = _masked_reference_links(commits, pairs, truth, repo)
    result["reference_extraction"] = {
        "messages_with_repo_refs": referencing,
        "links_unmasked": len(truth),
        "recall_unmasked": 1.0 if truth else 0.0,  # the unmasked references are what defines ``truth``
        "links_masked": masked_links,
        "recall_masked": round(masked_right / len(truth), 4) if truth else 0.0,
    }
    return result


def _masked_reference_links(
    commits: list[Any], pairs: list[Any], truth: dict[str, str], repo: str
) -> tuple[int, int]:
    """Plain reference extraction on the masked texts: the references that
    :func:`connectors.webhooks.extract_github_refs` still reads in each masked message of ``truth`` (its
    text after :func:`processors.correlation.masked.mask_references`), resolved by a reference-only
    correlator over every event; returns (masked messages linked, linked to their true commit)."""
    from connectors.webhooks import extract_github_refs
    from processors.correlation.logic import CorrelationConfig, Correlator, observe
    from processors.correlation.masked import mask_references

    texts = {e.data["entity"]: m.text for e, m in pairs if e.data["entity"] in truth}
    corr = Correlator(CorrelationConfig(retention=None))
    found: dict[str, str] = {}
    for e in [*commits, *(p[0] for p in pairs)]:
        data = e.data
        if data["entity"] in texts:
            refs = extract_github_refs(mask_references(texts[data["entity"]]), repo)
            data = {**data, "refs": [r for r in refs if r != data["entity"]]}
        o = observe(data, e.attributes.id)
        if o is not None:
            for link in corr.add(o):
                found.setdefault(link.message.entity, link.commit.entity)
    linked = [m for m in truth if m in found]
    return len(linked), sum(1 for m in linked if found[m] == truth[m])


def _processor_figures(
    commits: list[Any], messages: list[Any], truth: dict[str, str], config: Any
) -> dict[str, Any]:
    """The live correlator (``discussion`` links on, default settings) on the same events, every masked
    message's references removed from its refs and text, in event-time order, pending windows closed at
    the end: its links of the masked messages, and how many discussion links it draws over all messages.
    It reads the events' threads (the export's conversations) and the 280-character excerpts, and reveals
    nothing, so no affinity is learned."""
    from processors.correlation.logic import CorrelationConfig, Correlator, observe
    from processors.correlation.masked import mask_references

    corr = Correlator(CorrelationConfig(discussion=config))
    links = []
    for e in sorted([*commits, *messages], key=lambda e: (e.data["occurred_at"], e.data["entity"])):
        data = e.data
        if data["entity"] in truth:
            data = {**data, "refs": [], "body_excerpt": mask_references(str(data.get("body_excerpt") or ""))}
        obs = observe(data, e.attributes.id)
        if obs is not None:
            links += corr.add(obs)
    links += corr.close()
    found = {link.message.entity: link.commit.entity for link in links if link.method == "discussion"}
    made = [m for m in truth if m in found]
    right = sum(1 for m in made if found[m] == truth[m])
    return {
        "linked": len(made), "correct": right,
        "precision": round(right / len(made), 4) if made else 0.0,
        "recall": round(right / len(truth), 4) if truth else 0.0,
        "discussion_links_all_messages": len(found), "messages": len(messages),
    }  # fmt: skip


@eval_app.command("links")
@clear_errors
def eval_links(
    slack: Annotated[list[Path], typer.Option("--slack", help="Slack export XML (repeatable).", envvar="BACKBONE_EVAL_SLACK")],
    commits: Annotated[Path, typer.Option("--commits", help="Commit TSV.", envvar="BACKBONE_EVAL_COMMITS")],
    repo: Annotated[str, typer.Option(help="owner/name of the repository.", envvar="BACKBONE_IMPORT_REPO")] = "racket/racket",
    embeddings: Annotated[bool, typer.Option(help="Add all-MiniLM-L6-v2 cosine (needs the inference extra).",
                                             envvar="BACKBONE_EVAL_EMBEDDINGS")] = False,
    affinity: Annotated[bool, typer.Option(help="Learn who talks about whose commits from the links already "
                                           "revealed (test, then train, in time order).")] = True,
    min_history: Annotated[int | None, typer.Option(help="Commits needed up to a message's window end before it "
                                                    "can be linked (default: the processor's, 200).")] = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Masked links: remove the references of messages that name a commit, and measure how many the
    correlator still finds by text, (optionally) embeddings and timing: {"masked", "precision", "recall", ...}."""
    if min_history is not None and min_history < 0:
        raise typer.BadParameter(f"must not be negative, got {min_history}", param_hint="--min-history")
    result = link_figures(slack, commits, repo, embeddings, affinity, min_history)
    if as_json:
        emit_json(result)
        return
    print_link_figures(result)


def print_link_figures(result: dict[str, Any]) -> None:
    """The text of ``eval links``: masked links found by each method beside plain reference extraction and
    the goal, then the reference links' lags."""
    from backbone.cli.helpers import print_cells

    masked, refs, live = result["masked"], result["reference_extraction"], result["processor"]
    signals = "text, time" + (", affinity" if result["author_affinity"] else "") + (
        ", emb." if result["embeddings"] else "")  # fmt: skip
    rows = [
        ["extraction, refs kept (labels)", str(refs["links_unmasked"]), "", "", ""],
        ["extraction, refs masked", str(refs["links_masked"]), str(round(refs["recall_masked"] * masked)), "",
         f"{refs['recall_masked']:.3f}"],
        [f"linker: {signals}", str(result["linked"]), str(result["correct"]), f"{result['precision']:.3f}",
         f"{result['recall']:.3f}"],
        ["live correlator", str(live["linked"]), str(live["correct"]), f"{live['precision']:.3f}",
         f"{live['recall']:.3f}"],
        ["goal", "", "", "0.800", "0.600"],
    ]  # fmt: skip
    cols = ["method", "linked", "right", "precision", "recall"]
    print_cells(
        rows, cols, f"masked links: {masked} messages whose reference names a commit", right=set(cols[1:])
    )
    out.print(
        f"true commit ranked first for {result['ranked_first']} of {masked}; the live correlator drew "
        f"{live['discussion_links_all_messages']:,} discussion links over all {live['messages']:,} messages",
        highlight=False,
    )
    for lag in result["lags_reference_links"]:
        out.print(
            f"lag {lag['source_a']} after {lag['source_b']} ({lag['count']} reference links): median "
            f"{lag['median_seconds'] / 3600:+.1f} h, p90 {lag['p90_seconds'] / 3600:+.1f} h",
            highlight=False,
        )


processors_app = typer.Typer(help="Run the anomaly processor.", no_args_is_help=True)


@processors_app.callback()
def _processors() -> None:
    """Run the anomaly processor (a group, so that ``anomalies`` stays a subcommand)."""


@processors_app.command("anomalies")
@clear_errors
def run_anomalies(
    app_id: Annotated[str, typer.Option(help="Faust app id (consumer group).", envvar="BACKBONE_ANOMALY_APP_ID")] = "backbone-anomalies",
    metrics_topic: Annotated[str, typer.Option(help="Input topic.", envvar="BACKBONE_METRICS_TOPIC")] = "telemetry.metrics",
    insights_topic: Annotated[str, typer.Option(help="Output topic.", envvar="BACKBONE_ANOMALY_INSIGHTS_TOPIC")] = "insights.anomalies",
    dlq_topic: Annotated[str, typer.Option(help="Dead-letter topic.", envvar="BACKBONE_DLQ_TOPIC")] = "backbone.dlq",
    stop_after_idle: Annotated[float | None, typer.Option(help="Stop after this many idle seconds.",
                                                          envvar="BACKBONE_STOP_AFTER_IDLE")] = None,
    as_json: JsonOpt = False,
) -> None:  # fmt: skip
    """Run the streaming anomaly detector (Faust worker) until stopped; print its counters (with ``--json``
    also ``first_record_monotonic`` / ``last_record_monotonic``, ``time.monotonic()`` of the first and last
    record handled, for a rate without the startup)."""
    import dataclasses

    from backbone.cli.helpers import settings_only
    from processors.incidents.anomaly_app import AnomalyTopics, run_anomaly_worker

    topics = AnomalyTopics(metrics=metrics_topic, insights=insights_topic, dead_letters=dlq_topic)
    stats = run_anomaly_worker(
        settings_only(), app_id=app_id, topics=topics, stop_after_idle_seconds=stop_after_idle
    )
    result = dataclasses.asdict(stats)
    if as_json:
        emit_json(result)
    else:
        out.print({k: v for k, v in result.items() if not k.endswith("_record_monotonic")})
