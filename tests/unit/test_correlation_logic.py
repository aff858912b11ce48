"""Unit tests of the correlation logic (processors.correlation.logic) and the chat/commit parsers, on
small hand-written examples (nothing copied from the Slack set)."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from connectors.chat_code import (
    commit_event,
    parse_git_commits_tsv,
    parse_slack_export,
    render_slack_text,
    slack_event,
)
from processors.correlation.logic import (
    CorrelationConfig,
    Correlator,
    Observation,
    link_id,
    observe,
    parse_request_id,
    pr_number_of,
    request_id_for,
    scope_of,
)
from processors.errors import UnprocessableEventError

T0 = datetime(2030, 5, 4, 12, 0, tzinfo=UTC)
SHA_A = "0123456789abcdef0123456789abcdef01234567"
SHA_B = "fedcba9876543210fedcba9876543210fedcba98"


def _commit(sha: str, subject: str, at: datetime, repo: str = "acme/widget") -> Observation:
    obs = observe(commit_event(repo=repo, sha=sha, commit_time=at.isoformat(), author="Ann", subject=subject).data,
                  f"id-{sha[:7]}")  # fmt: skip
    assert obs is not None
    return obs


def _message(ts: datetime, text: str, repo: str = "acme/widget") -> Observation:
    event = slack_event(workspace="acme", channel="dev", ts=ts.replace(tzinfo=None).isoformat(), user="Bo",
                        text=text, repo=repo)  # fmt: skip
    obs = observe(event.data, event.attributes.id)
    assert obs is not None
    return obs


def _unit(*values: float) -> np.ndarray:
    v = np.array(values, dtype=np.float32)
    return v / np.linalg.norm(v)


def test_slack_markup_is_rendered_and_references_extracted() -> None:
    """A hypothetical message with a Slack link, a mention, a short SHA and #N gets readable text and refs in order."""
    text = ("<@Cy> see <https://github.com/acme/widget/commit/0123456789ab|this fix> and #42, "
            "also 0123abc; a &lt;b&gt;")  # fmt: skip
    event = slack_event(workspace="acme", channel="dev", ts="2030-05-04T12:00:00.000001", user="Bo", text=text,
                        repo="acme/widget")  # fmt: skip
    assert render_slack_text(text) == "@Cy see this fix and #42, also 0123abc; a <b>"
    assert event.data["body_excerpt"] == "@Cy see this fix and #42, also 0123abc; a <b>"
    assert event.data["refs"] == [
        "github:acme/widget@0123456789ab",
        "github:acme/widget#42",
        "github:acme/widget@0123abc",
    ]
    assert event.key == event.data["entity"] == "slack:acme/dev/2030-05-04T12:00:00.000001"
    assert event.data["occurred_at"] == datetime(
        2030, 5, 4, 12, 0, 0, 1, tzinfo=UTC
    )  # local time taken as UTC
    again = slack_event(workspace="acme", channel="dev", ts="2030-05-04T12:00:00.000001", user="Bo", text=text,
                        repo="acme/widget")  # fmt: skip
    assert again.attributes.id == event.attributes.id  # deterministic: a re-import has the same ids


def test_commit_time_offset_is_converted_to_utc_and_pr_number_read() -> None:
    """commit_time with its offset becomes UTC event time; a subject ending with (#N) names pull request N."""
    event = commit_event(repo="acme/widget", sha=SHA_A.upper(), commit_time="2030-05-04T09:30:00-07:00",
                         author="Ann", subject="fix the frobnicator (#42)")  # fmt: skip
    assert event.data["occurred_at"] == datetime(2030, 5, 4, 16, 30, tzinfo=UTC)
    assert event.key == f"git:acme/widget@{SHA_A}"
    assert pr_number_of(event.data["title"]) == 42
    assert pr_number_of("close #7 while fixing (#9) later") is None
    with pytest.raises(ValueError, match="UTC offset"):
        commit_event(
            repo="acme/widget", sha=SHA_A, commit_time="2030-05-04T09:30:00", author="A", subject="s"
        )


def test_parsers_read_small_files_and_refuse_bad_headers(tmp_path: Path) -> None:
    """The XML and TSV parsers read hand-written files; a repeated ts gets a suffix; a wrong header is refused."""
    xml = tmp_path / "chat.xml"
    xml.write_text(
        "<slack><team_domain>acme</team_domain><channel_name>dev</channel_name>"
        "<message conversation_id='1'><ts>2030-01-01T10:00:00.000001</ts><user>A</user><text>&lt;@B&gt; hi</text></message>"
        "<message conversation_id='1'><ts>2030-01-01T10:00:00.000001</ts><user>B</user><text>re (#3)</text></message>"
        "</slack>"
    )  # fmt: skip
    events = list(parse_slack_export(xml, repo="acme/widget"))
    assert [e.data["entity"] for e in events] == ["slack:acme/dev/2030-01-01T10:00:00.000001",
                                                   "slack:acme/dev/2030-01-01T10:00:00.000001#2"]  # fmt: skip
    assert events[0].data["body_excerpt"] == "@B hi"
    # the disentangled conversation is the thread, numbered per export file (hence its start date)
    assert {e.data["thread"] for e in events} == {"slack:acme/dev/conversation/1"}
    tsv = tmp_path / "commits.tsv"
    tsv.write_text("sha\tauthor_time\tcommit_time\tauthor\tsubject\n"
                   f"{SHA_A}\t2030-01-01T10:00:00+02:00\t2030-01-01T11:00:00+02:00\tAnn\tdo it (#3)\n"
                   "not-a-sha\t2030-01-01T10:00:00+02:00\t2030-01-01T11:00:00+02:00\tAnn\tskipped\n")  # fmt: skip
    commits = list(parse_git_commits_tsv(tsv, repo="acme/widget"))
    assert len(commits) == 1 and commits[0].data["occurred_at"] == datetime(2030, 1, 1, 9, tzinfo=UTC)
    bad = tmp_path / "bad.tsv"
    bad.write_text("a\tb\n")
    with pytest.raises(ValueError, match="expected the header"):
        list(parse_git_commits_tsv(bad))


def test_scope_and_request_ids() -> None:
    """A workspace meets the organisation of the same name; overrides win; request ids round-trip; others' are None."""
    assert scope_of("slack:acme/dev/2030-01-01T10:00:00") == "acme" == scope_of(f"git:acme/widget@{SHA_A}")
    assert scope_of("slack:other/dev/x", {"slack:other/": "acme"}) == "acme"
    with pytest.raises(UnprocessableEventError):
        scope_of("linear:ENG-1")
    with pytest.raises(UnprocessableEventError):  # "|" separates scope and entity in the worker's table keys
        scope_of("slack:ac|me/dev/x")
    with pytest.raises(ValueError, match="'\\|'"):
        CorrelationConfig(scopes={"slack:other/": "a|b"})
    rid = request_id_for("acme", f"git:acme/widget@{SHA_A}")
    assert parse_request_id(rid) == ("acme", f"git:acme/widget@{SHA_A}")
    assert parse_request_id("some-uuid") is None


def test_reference_links_by_sha_prefix_and_pull_request_number_in_either_order() -> None:
    """A message naming a commit by 12-digit SHA prefix and another by #N link to their commits, whichever comes first."""
    c_a = _commit(SHA_A, "teach the frobnicator to count", T0)
    c_b = _commit(SHA_B, "speed up widget rendering (#42)", T0 + timedelta(days=40))
    m_sha = _message(
        T0 + timedelta(hours=3), "this broke my build: https://github.com/acme/widget/commit/0123456789ab"
    )
    m_pr = _message(T0 - timedelta(days=2), "could someone review #42 please?")
    m_other = _message(T0, "unrelated: acme/gadget#42 and deadbeef")  # another repo; a word, not a SHA
    for order in itertools.permutations([c_a, c_b, m_sha, m_pr, m_other]):
        corr = Correlator()
        links = [link for obs in order for link in corr.add(obs)]
        got = {(link.message.entity, link.commit.entity, link.reference) for link in links}
        assert got == {
            (m_sha.entity, c_a.entity, "github:acme/widget@0123456789ab"),
            (m_pr.entity, c_b.entity, "github:acme/widget#42"),
        }
    corr = Correlator()
    corr.add(m_pr)
    [link] = corr.add(c_b)
    insight = link.to_insight()
    assert insight.data["event_time"] == c_b.event_time  # the later of the two, never wall-clock
    assert insight.data["metrics"]["lag_seconds"] == -(42 * 86400)
    assert insight.data["labels"]["method"] == "reference" and insight.data["labels"]["commit_sha"] == SHA_B
    assert (
        insight.attributes.id == insight.data["insight_id"] == link_id("reference", m_pr.entity, c_b.entity)
    )
    assert insight.attributes.causation_id == c_b.event_id
    assert corr.add(c_b) == [] and corr.add(m_pr) == []  # duplicates change nothing


def test_embedding_links_respect_window_and_threshold_in_any_order() -> None:
    """Pairs within the window whose cosine reaches min_cosine are linked, the same set for 200 random orders of events and vectors."""
    config = CorrelationConfig(window=timedelta(hours=20), min_cosine=0.8)
    c1 = _commit(SHA_A, "make the parser faster", T0)
    c2 = _commit(SHA_B, "rewrite docs for widgets", T0 + timedelta(hours=30))
    m1 = _message(T0 + timedelta(hours=10), "the parser is much faster now")  # near c1 in time and meaning
    m2 = _message(T0 + timedelta(hours=5), "the widget docs read well")  # like c2 but 25 h away: outside
    m3 = _message(T0 + timedelta(hours=28), "lunch?")  # near c2 in time, unlike it
    vectors = {c1.entity: _unit(1, 0.1, 0), m1.entity: _unit(1, 0.2, 0), c2.entity: _unit(0, 1, 0),
               m2.entity: _unit(0, 1, 0.1), m3.entity: _unit(0, 0, 1)}  # fmt: skip
    pieces = [("obs", o) for o in (c1, c2, m1, m2, m3)] + [("vec", e) for e in vectors]
    rng = random.Random(7)
    seen = set()
    for _ in range(200):
        rng.shuffle(pieces)
        corr = Correlator(config)
        links = []
        for what, item in pieces:
            links += corr.add(item) if what == "obs" else corr.add_vector(item, vectors[item])
        seen.add(
            frozenset(
                (lk.method, lk.message.entity, lk.commit.entity, lk.cosine, lk.event_time) for lk in links
            )
        )
    assert len(seen) == 1
    [links] = [list(s) for s in seen]
    assert [(m, msg, com) for m, msg, com, _, _ in links] == [("embedding", m1.entity, c1.entity)]
    expected = round(
        float(np.dot(vectors[c1.entity].astype(np.float64), vectors[m1.entity].astype(np.float64))), 6
    )
    assert links[0][3] == expected >= 0.8


def test_restore_rebuilds_state_without_redrawing_links() -> None:
    """A correlator restored from persisted items draws only the links new pieces complete."""
    c1 = _commit(SHA_A, "fix (#5)", T0)
    m1 = _message(T0, "is #5 in?")
    m2 = _message(T0 + timedelta(hours=1), "#5 works for me")
    corr = Correlator()
    corr.restore([(c1, None, c1.entity), (m1, None, m1.entity)])
    assert [lk.message.entity for lk in corr.add(m2)] == [m2.entity]
    corr.add_vector(m1.entity, _unit(1, 0, 0))
    with pytest.raises(ValueError, match="dimension"):
        corr.add_vector(m2.entity, _unit(1, 0))


def test_retention_drops_what_the_watermark_left_behind() -> None:
    """Messages older than ``retention`` and commits older than ``commit_retention`` behind the watermark are
    dropped (named in ``expired``, vectors and indexes too); a reference to a dropped commit links nothing;
    an event older than the retention when it arrives is counted, meets what is held, and is not kept."""
    config = CorrelationConfig(retention=timedelta(days=10), commit_retention=timedelta(days=30))
    corr = Correlator(config)
    c_old = _commit(SHA_A, "teach the frobnicator to count", T0)
    m_old = _message(T0, "hello")
    corr.add(c_old)
    corr.add(m_old)
    corr.add_vector(c_old.entity, _unit(1, 0))
    corr.add_vector(m_old.entity, _unit(0, 1))
    m_mid = _message(T0 + timedelta(days=20), "0123456789ab broke my build")
    assert [lk.commit.entity for lk in corr.add(m_mid)] == [c_old.entity]  # the commit is held 30 days
    assert corr.expired == [m_old.entity]  # the message only 10
    corr.add(_message(T0 + timedelta(days=31), "later"))
    assert corr.expired == [m_old.entity, m_mid.entity, c_old.entity] and corr.expired_count == 3
    assert c_old.entity not in corr.vectors and m_old.entity not in corr.vectors
    assert corr.add(_message(T0 + timedelta(days=32), "0123456789ab again")) == []  # its commit is gone
    assert len(corr) == 2
    assert corr.add(_message(T0 + timedelta(days=5), "0123456789ab late")) == [] and corr.too_old == 1
    assert len(corr) == 2  # not kept
    c_new = _commit(SHA_B, "speed up widget rendering", T0 + timedelta(days=31, hours=1))
    corr.add(c_new)
    backfill = _message(T0 + timedelta(days=6), "fedcba987654 is the one")  # a backfilled old message
    assert [lk.commit.entity for lk in corr.add(backfill)] == [c_new.entity]  # still meets what is held
    assert corr.too_old == 2 and backfill.entity not in corr.observations


def test_retention_follows_the_slowest_source_and_a_restore() -> None:
    """The retention reads the scope's watermark: nothing is dropped while a source lags; a restored
    correlator drops what its restored watermark left behind."""
    config = CorrelationConfig(retention=timedelta(days=10), commit_retention=timedelta(days=30))
    c_old = _commit(SHA_A, "fix", T0)
    m_new = _message(T0 + timedelta(days=40), "news")
    corr = Correlator(config, sources=["events/0", "events/1"])
    corr.add(c_old, "events/0")
    corr.add(m_new, "events/0")
    assert corr.expired == [] and corr.clock.watermark_ms is None  # events/1 not heard from yet
    corr.add(_message(T0 + timedelta(days=40, minutes=1), "also"), "events/1")
    assert corr.expired == [c_old.entity]

    restored = Correlator(config)
    restored.restore([(c_old, None, c_old.entity, "events/0"), (m_new, None, m_new.entity, "events/0")])
    assert restored.expired == [c_old.entity] and len(restored) == 1


def test_retention_must_cover_what_a_link_reads_back() -> None:
    """A retention shorter than the embedding window or a discussion decision's reach is refused."""
    from processors.correlation.masked import MaskedConfig

    with pytest.raises(ValueError, match="retention"):
        CorrelationConfig(retention=timedelta(hours=1))
    with pytest.raises(ValueError, match="retention"):
        CorrelationConfig(retention=timedelta(days=20), discussion=MaskedConfig())
    with pytest.raises(ValueError, match="commit_retention"):
        CorrelationConfig(retention=timedelta(days=40), commit_retention=timedelta(days=30))
    assert CorrelationConfig(retention=None).retention is None  # holds everything


def test_observe_skips_other_kinds_and_refuses_bad_commit_entities() -> None:
    """Events of other kinds are not observed; a git.commit without a SHA in its entity is unprocessable."""
    data = dict(
        commit_event(repo="acme/widget", sha=SHA_A, commit_time=T0.isoformat(), author="A", subject="s").data
    )
    assert observe({**data, "kind": "github.push"}, "x") is None
    with pytest.raises(UnprocessableEventError, match="git:<owner>/<repo>@<sha>"):
        observe({**data, "entity": "git:acme/widget"}, "x")


def test_source_watermark_waits_for_every_source_and_never_moves_back() -> None:
    """The smallest of the sources' largest event times: none until each expected source has spoken, an
    earlier time of a source changes nothing, and the correlator and its discussion linker share it."""
    from processors.correlation.masked import MaskedConfig
    from processors.correlation.watermark import SourceWatermark

    clock = SourceWatermark(["p0", "p1"])
    clock.note("p0", 5_000)
    assert clock.watermark_ms is None  # p1 not heard from
    clock.note("p1", 3_000)
    assert clock.watermark_ms == 3_000
    clock.note("p1", 2_000)  # a source's earlier time: its largest stays
    assert clock.watermark_ms == 3_000 and clock.source_max_ms == {"p0": 5_000, "p1": 3_000}
    clock.note("p1", 9_000)
    assert clock.watermark_ms == 5_000
    implicit = SourceWatermark()
    implicit.note(None, 7)
    assert implicit.watermark_ms == 7 and implicit.source_max_ms == {"-": 7}
    corr = Correlator(CorrelationConfig(discussion=MaskedConfig()), sources=["p0"])
    assert corr.discussion is not None and corr.discussion.clock is corr.clock


def test_an_idle_source_stops_holding_the_watermark_until_it_speaks_again() -> None:
    """A source read to its end (marked idle) is left out of the minimum, and an expected source that is idle
    is not waited for; its next event makes it active again, the watermark never moving back; when every
    source heard from is idle the watermark is the largest of their times; a restored watermark is a floor."""
    from processors.correlation.watermark import SourceWatermark

    clock = SourceWatermark(["p0", "p1", "p2"])
    clock.mark_idle("p2")  # empty at start: never waited for
    clock.note("p0", 5_000)
    assert clock.watermark_ms is None  # p1 is neither heard from nor idle
    clock.note("p1", 3_000)
    assert clock.watermark_ms == 3_000
    clock.mark_idle("p1")  # p1 read to its end: p0 alone holds the watermark
    assert clock.watermark_ms == 5_000
    clock.note("p1", 4_000)  # p1 speaks again, behind the watermark: active, the watermark stays
    assert clock.watermark_ms == 5_000 and "p1" not in clock.idle
    clock.note("p0", 9_000)
    assert clock.watermark_ms == 5_000  # p1 (4,000) holds it again
    clock.note("p1", 7_000)
    assert clock.watermark_ms == 7_000
    clock.mark_idle("p0")
    clock.mark_idle("p1")  # all read: the largest time
    assert clock.watermark_ms == 9_000
    clock.restore(8_000)
    assert clock.watermark_ms == 9_000
    clock.restore(12_000)
    assert clock.watermark_ms == 12_000


def test_discussion_decisions_follow_a_drained_source() -> None:
    """The correlator's ``progress(sources, drained)``: a message waits while a silent source holds the
    watermark, and is decided once that source is reported drained; a restore takes the persisted watermark
    and idle sources back, so the decision is not made again."""
    from processors.correlation.masked import MaskedConfig

    config = CorrelationConfig(discussion=MaskedConfig(min_history=1))
    sources = ["events/0", "events/1"]
    corr = Correlator(config, sources=sources)
    commit = _commit(SHA_A, "teach the frobnicator to count sheep", T0)
    message = _message(T0 + timedelta(minutes=5), "the frobnicator cannot count sheep")
    corr.add(commit, "events/0")
    corr.add(message, "events/0")
    corr.progress({"events/1": T0 - timedelta(days=1)})  # events/1 spoke once, long ago, then fell silent
    later = T0 + timedelta(days=30)
    assert corr.progress({"events/0": later}) == []  # events/1 holds the watermark
    links = corr.progress({}, drained=["events/1"])
    assert [(lk.method, lk.message.entity, lk.commit.entity) for lk in links] == [
        ("discussion", message.entity, commit.entity)
    ]
    items = [(commit, None, commit.entity, "events/0"), (message, None, message.entity, "events/0")]
    progress = {"events/0": later, "events/1": T0 - timedelta(days=1)}
    restored = Correlator(config, sources=sources)
    restored.restore(items, progress, watermark=later, idle=["events/1"])
    assert restored.clock.watermark_ms == corr.clock.watermark_ms and restored.clock.idle == {"events/1"}
    assert restored.progress({"events/0": later + timedelta(days=1)}, drained=["events/1"]) == []  # not again
    forgetful = Correlator(config, sources=sources)  # the sources' maxima alone: events/1 holds it back
    forgetful.restore(items, progress)
    assert len(forgetful.progress({}, drained=["events/1"])) == 1  # the same decision made a second time


def test_a_vector_whose_event_never_comes_is_dropped_after_the_retention() -> None:
    """A vector without its event waits for it (the event may come later: then it is governed by the event's
    retention), but not for good: once the watermark has moved a message retention past the vector's
    arrival, it is dropped and named in ``expired`` (the worker deletes its table item)."""
    config = CorrelationConfig(retention=timedelta(days=10), commit_retention=timedelta(days=30))
    corr = Correlator(config)
    corr.add(_message(T0, "hello"))
    corr.add_vector("slack:acme/dev/never", _unit(1, 0))  # its event never comes
    late = _commit(SHA_A, "teach the frobnicator to count", T0 + timedelta(days=2))
    corr.add_vector(late.entity, _unit(0, 1))  # its event comes after it
    corr.add(late)
    corr.add(_message(T0 + timedelta(days=9), "still waiting"))
    assert "slack:acme/dev/never" in corr.vectors and corr.orphans_expired == 0
    corr.add(_message(T0 + timedelta(days=11), "later"))
    assert "slack:acme/dev/never" not in corr.vectors and "slack:acme/dev/never" in corr.expired
    assert corr.orphans_expired == 1 and late.entity in corr.vectors  # the commit is held 30 days
    restored = Correlator(config)
    restored.restore([(None, _unit(1, 0), "slack:acme/dev/orphan", "events/0")])
    restored.add(_message(T0, "a"), "events/0")
    restored.add(_message(T0 + timedelta(days=11), "b"), "events/0")
    assert restored.orphans_expired == 1 and restored.expired == [
        _message(T0, "a").entity,
        "slack:acme/dev/orphan",
    ]
