"""The masked linker on a stream (``discussion`` links): event-time deadlines, arrival-order independence,
explicit links first, late events counted, restart without re-sending; on hand-written examples."""

from __future__ import annotations

import dataclasses
import random
from datetime import UTC, datetime, timedelta

from connectors.chat_code import commit_event, slack_event
from processors.correlation.logic import CorrelationConfig, Correlator, Observation, link_id, observe
from processors.correlation.masked import DiscussionLinker, MaskedConfig, mask_references

T0 = datetime(2030, 5, 4, 12, 0, tzinfo=UTC)
CFG = MaskedConfig(min_history=0)


def _commit(n: int, subject: str, at: datetime, author: str = "Ann") -> Observation:
    sha = f"{n:040x}"
    obs = observe(commit_event(repo="acme/widget", sha=sha, commit_time=at.isoformat(), author=author,
                               subject=subject).data, f"id-{n}")  # fmt: skip
    assert obs is not None
    return obs


def _message(at: datetime, text: str, user: str = "Bo") -> Observation:
    event = slack_event(workspace="acme", channel="dev", ts=at.replace(tzinfo=None).isoformat(), user=user,
                        text=text, repo="acme/widget")  # fmt: skip
    obs = observe(event.data, event.attributes.id)
    assert obs is not None
    return obs


def _history() -> list[Observation]:
    """Twelve commits over three weeks and five messages: two talk about a commit, one references one, one
    is chat, and one is said a day before the last commit."""
    subjects = [
        "expander: fix syntax-local-bind-syntaxes for local-expand", "docs: typo in the guide",
        "gc: shrink the nursery on small heaps", "raco setup: check package dependencies again",
        "serialize: relative paths readable", "ffi: guard union functions with type checks",
        "cs: fix procedure-name problems", "io: fix printing of symbols", "tests: update expected errors",
        "contract: faster arity checks", "expander: avoid retaining syntax objects", "net: fix url parsing",
    ]  # fmt: skip
    commits = [_commit(i + 1, s, T0 + timedelta(days=2 * i)) for i, s in enumerate(subjects)]
    messages = [
        _message(T0 + timedelta(hours=5), "did the syntax-local-bind-syntaxes fix for local-expand land?"),
        _message(T0 + timedelta(days=8, hours=3), "raco setup now checks package dependencies, nice", "Cy"),
        _message(
            T0 + timedelta(days=6, hours=1), f"see https://github.com/acme/widget/commit/{5:040x}", "Cy"
        ),
        _message(T0 + timedelta(days=10), "anyone at the conference tomorrow?", "Di"),
        _message(T0 + timedelta(days=21), "url parsing is broken again", "Di"),
    ]
    return [*commits, *messages]


def _run(
    items: list[Observation], config: CorrelationConfig
) -> tuple[Correlator, list[tuple[str, str, str]]]:
    corr = Correlator(config)
    links = [link for obs in items for link in corr.add(obs)]
    return corr, [(link.method, link.message.entity, link.commit.entity) for link in links]


def test_discussion_links_wait_for_the_watermark_and_follow_the_text() -> None:
    """The two messages about a commit get ``discussion`` links once the watermark passes their window
    (window_after + allowed_lateness); the referencing one gets its ``reference`` link only; chat gets none;
    the last message waits for ``close`` (no later event moves the watermark past it)."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    corr, got = _run(items, CorrelationConfig(discussion=CFG))
    commits = {o.text: o.entity for o in items if o.kind == "commit"}
    msgs = [o for o in items if o.kind == "message"]
    by_text = {m.text[:10]: m.entity for m in msgs}
    assert ("reference", by_text["see https:"], commits["serialize: relative paths readable"]) in got
    assert [g for g in got if g[0] == "discussion"] == [
        (
            "discussion",
            by_text["did the sy"],
            commits["expander: fix syntax-local-bind-syntaxes for local-expand"],
        ),
        ("discussion", by_text["raco setup"], commits["raco setup: check package dependencies again"]),
    ]
    late = corr.close()
    assert [(link.message.entity, link.commit.entity) for link in late] == [
        (by_text["url parsin"], commits["net: fix url parsing"])
    ]
    link = late[0]
    assert link.insight_id == link_id("discussion", link.message.entity, link.commit.entity)
    insight = link.to_insight()
    assert insight.data["labels"]["method"] == "discussion" and insight.data["metrics"]["score"] == link.score
    assert "discusses it" in insight.data["summary"]


def test_discussion_links_do_not_depend_on_arrival_order_within_the_allowed_lateness() -> None:
    """Shuffled inputs, each at most a day later than in event-time order, give the same links."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    config = CorrelationConfig(discussion=CFG)
    corr, expected = _run(items, config)
    expected = sorted(
        [*expected, *((link.method, link.message.entity, link.commit.entity) for link in corr.close())]
    )
    rng = random.Random(7)
    for _ in range(20):
        # a random delay of up to 20 hours per item, then arrival in delayed-time order
        delayed = sorted(items, key=lambda o: o.event_time + timedelta(hours=rng.uniform(0, 20)))
        corr, got = _run(delayed, config)
        assert corr.discussion is not None and corr.discussion.late_events == 0
        assert (
            sorted([*got, *((link.method, link.message.entity, link.commit.entity) for link in corr.close())])
            == expected
        )


def test_an_event_later_than_the_allowed_lateness_is_counted() -> None:
    """A commit that arrives after the watermark passed its time by more than allowed_lateness is counted."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    first, rest = items[0], items[1:]
    corr, _ = _run([*rest, first], CorrelationConfig(discussion=CFG))
    assert corr.discussion is not None and corr.discussion.late_events == 1


def test_a_restarted_correlator_sends_only_what_was_not_decided() -> None:
    """Restored from its items after the first half, the correlator sends no discussion link already sent
    (their deadline lies behind the restored watermark), and the rest as an uninterrupted run does."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    config = CorrelationConfig(discussion=CFG)
    _, whole = _run(items, config)
    half = len(items) // 2 + 2
    _, before = _run(items[:half], config)
    restored = Correlator(config)
    restored.restore([(o, None, o.entity) for o in reversed(items[:half])])
    after = [(k.method, k.message.entity, k.commit.entity) for o in items[half:] for k in restored.add(o)]
    assert before + after == whole
    assert any(g[0] == "discussion" for g in before) and any(g[0] == "discussion" for g in after)


def test_no_discussion_link_without_enough_commit_history() -> None:
    """With fewer commits than min_history up to the message's window end, the message is decided unlinked."""
    linker = DiscussionLinker(MaskedConfig(min_history=50))
    linker.add_commit("git:a/b@" + "1" * 40, T0, "expander: fix local-expand", "Ann")
    linker.add_message("m", T0 + timedelta(hours=1), "the local-expand fix", "Bo")
    assert linker.close() == []
    assert linker.decided == {"m"}


def test_the_watermark_follows_the_slowest_source() -> None:
    """Two partitions, each in event-time order, one read to its end before the other starts: with both
    named as sources the links are those of the merged order and nothing is late; with the sources only
    as seen, the first partition's last event runs the watermark ahead and the other's events are late."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    config = CorrelationConfig(discussion=CFG)
    corr, expected = _run(items, config)
    expected += [(k.method, k.message.entity, k.commit.entity) for k in corr.close()]
    part = {o.entity: "ev/0" if i % 2 == 0 else "ev/1" for i, o in enumerate(items)}
    skewed = [o for o in items if part[o.entity] == "ev/0"] + [o for o in items if part[o.entity] == "ev/1"]

    def run(sources: list[str] | None) -> tuple[list[tuple[str, str, str]], int]:
        c = Correlator(config, sources)
        got: list[tuple[str, str, str]] = [
            (k.method, k.message.entity, k.commit.entity) for o in skewed for k in c.add(o, part[o.entity])
        ]
        got += [(k.method, k.message.entity, k.commit.entity) for k in c.close()]
        assert c.discussion is not None
        return got, c.discussion.late_events

    got, late = run(["ev/0", "ev/1"])
    assert sorted(got) == sorted(expected) and late == 0
    _, late_seen_only = run(None)
    assert late_seen_only > 0


def test_a_restart_rebuilds_the_watermark_from_each_source() -> None:
    """Restored from items with their sources, the watermark is the slowest source's, not the largest
    event time: the messages that source has not passed yet are still decided after the restart."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    config = CorrelationConfig(discussion=CFG)
    part = {o.entity: "ev/0" if i % 2 == 0 else "ev/1" for i, o in enumerate(items)}
    skewed = [o for o in items if part[o.entity] == "ev/0"] + [o for o in items if part[o.entity] == "ev/1"]
    whole = Correlator(config, ["ev/0", "ev/1"])
    expected = [k.insight_id for o in skewed for k in whole.add(o, part[o.entity])]
    cut = len(skewed) - 3
    first = Correlator(config, ["ev/0", "ev/1"])
    before = [k.insight_id for o in skewed[:cut] for k in first.add(o, part[o.entity])]
    restored = Correlator(config, ["ev/0", "ev/1"])
    restored.restore([(o, None, o.entity, part[o.entity]) for o in skewed[:cut]])
    after = [k.insight_id for o in skewed[cut:] for k in restored.add(o, part[o.entity])]
    assert before + after == expected and after


def _long_history(days: int) -> list[Observation]:
    """``days`` days of one commit and three messages a day (a fixed seed): a message quotes words of a
    recent commit's subject, replies in its thread, or chats; every tenth references a commit by URL."""
    rng = random.Random(3)
    words = [f"w{i}" for i in range(400)]
    items: list[Observation] = []
    for day in range(days):
        at = T0 + timedelta(days=day)
        items.append(_commit(day + 1, " ".join(rng.sample(words, 5)), at, rng.choice(["Ann", "Bo", "Cy"])))
        for k in range(3):
            when = at + timedelta(hours=3 + 5 * k)
            recent = items[rng.randrange(max(0, len(items) - 12), len(items))]
            if recent.kind == "commit" and k == 0:
                text = " ".join(recent.text.split()[:3]) + (
                    f" https://github.com/acme/widget/commit/{recent.sha}" if day % 10 == 0 else ""
                )
            else:
                text = " ".join(rng.sample(words, 4))
            obs = _message(when, text, rng.choice(["Di", "Ed", "Flo"]))
            items.append(dataclasses.replace(obs, thread=f"slack:acme/dev/conversation/{day // 2}"))
    return items


def test_bounded_state_gives_the_same_links_and_holds_about_a_month() -> None:
    """Over 200 days the linker that drops what no remaining decision reads draws the same links, scores
    included, as the one that keeps everything, and never holds more than the events of about a month
    (window_before 21 d + window_after 7 d + allowed_lateness 1 d, and the 7-day thread window)."""
    items = _long_history(200)
    config = CorrelationConfig(discussion=CFG)
    runs = {}
    for evict in (True, False):
        corr = Correlator(config)
        assert corr.discussion is not None
        corr.discussion.evict = evict
        links, peak = [], 0
        for obs in items:
            links += corr.add(obs)
            peak = max(peak, len(corr.discussion.messages) + len(corr.discussion.commits))
        links += corr.close()
        runs[evict] = (sorted((k.method, k.message.entity, k.commit.entity, k.score) for k in links), peak)
    (bounded, peak), (whole, everything) = runs[True], runs[False]
    assert bounded == whole
    assert {m for m, *_ in bounded} == {"reference", "discussion"}
    assert everything == len(items) == 800
    # a commit a day over window_before + window_after + allowed_lateness (+1 for the day in progress),
    # three messages a day over thread_window + window_after + allowed_lateness (+1)
    assert peak <= 1 * (21 + 7 + 1 + 1) + 3 * (7 + 7 + 1 + 1)


def test_an_event_behind_the_dropped_state_is_counted_late() -> None:
    """Once the watermark has dropped a month of history, a message from inside that month is counted late
    and ignored (its context is gone), and a commit from there only adds its document frequencies."""
    linker = DiscussionLinker(CFG)
    linker.add_commit("git:a/b@" + "1" * 40, T0, "expander: fix local-expand", "Ann")
    linker.add_message("m1", T0 + timedelta(hours=1), "the local-expand fix", "Bo")
    linker.advance(T0 + timedelta(days=60))
    assert linker.messages == {} and linker.commits == {} and linker.evicted == 2
    docs = linker._df_docs
    linker.add_message("m2", T0 + timedelta(days=2), "late words", "Bo")
    linker.add_commit("git:a/b@" + "2" * 40, T0 + timedelta(days=2), "late commit", "Ann")
    assert linker.late_events == 2 and linker.messages == {} and linker.commits == {}
    assert linker._df_docs == docs + 1


def test_a_thread_joins_the_context_within_the_thread_window() -> None:
    """The messages of a message's thread within thread_window of it join its context; older ones do not."""
    linker = DiscussionLinker(
        MaskedConfig(min_history=0, thread_window=timedelta(days=2), user_context=timedelta(0))
    )
    for entity, at, text in (("a", T0, "old words"), ("b", T0 + timedelta(days=3), "recent words"),
                             ("c", T0 + timedelta(days=4), "the question")):  # fmt: skip
        linker.add_message(entity, at, text, entity, conversation="t")
    assert linker.context_of("c") == "the question recent words"


def test_the_correlator_reads_a_message_thread_from_its_event() -> None:
    """A Slack reply that only says "fixed?" is linked through its thread's first message, whose words
    name the commit; the same reply without a thread is not linked."""
    subjects = ["docs: typo in the guide", "gc: shrink the nursery on small heaps", "net: fix url parsing",
                "expander: fix syntax-local-bind-syntaxes for local-expand"]  # fmt: skip
    commits = [_commit(i + 1, s, T0 + timedelta(days=i)) for i, s in enumerate(subjects)]
    parent = _message(T0 + timedelta(days=3, hours=2), "syntax-local-bind-syntaxes breaks local-expand", "Cy")
    reply = _message(T0 + timedelta(days=3, hours=3), "fixed?", "Di")
    thread = parent.entity  # a reply's thread is its parent's entity (thread_ts); the parent is its own

    def discussion(threaded: bool) -> dict[str, str]:
        items = [*commits, dataclasses.replace(parent, thread=thread if threaded else None),
                 dataclasses.replace(reply, thread=thread if threaded else None)]  # fmt: skip
        corr = Correlator(
            CorrelationConfig(discussion=MaskedConfig(min_history=0, user_context=timedelta(0)))
        )
        links = [k for o in items for k in corr.add(o)] + corr.close()
        return {k.message.entity: k.commit.entity for k in links if k.method == "discussion"}

    assert discussion(True).get(reply.entity) == commits[3].entity
    assert reply.entity not in discussion(False)


def test_the_document_frequencies_cover_a_horizon_and_the_vocabulary_stays_bounded() -> None:
    """With ``df_horizon`` 40 days over 400 days, the linker that drops what no decision reads draws the
    same links, scores included, as the one that keeps every event (the horizon is a function of each
    message's time, not of when state is dropped), and as in an arrival order up to 20 hours late. Its
    vocabulary stays within twice the terms of the events of the last df_horizon + allowed_lateness (+1
    day in progress), or 4,096, and a compaction leaves no more than those terms; with ``df_horizon``
    None and nothing dropped it keeps every term it ever saw."""
    items = _long_history(400)
    horizon = timedelta(days=40)
    config = CorrelationConfig(discussion=dataclasses.replace(CFG, df_horizon=horizon))
    analyze = DiscussionLinker(CFG)._analyze
    terms = {o.entity: set(analyze(mask_references(o.text))) for o in items}
    span = horizon + CFG.allowed_lateness + timedelta(days=1)

    def recent_terms(upto: int) -> int:
        last = items[upto].event_time
        return len(set().union(*(terms[o.entity] for o in items[: upto + 1] if o.event_time >= last - span)))

    runs, compactions = {}, 0
    for evict, order in ((True, "time"), (False, "time"), (True, "shuffled")):
        rng = random.Random(11)
        arrival = items if order == "time" else sorted(
            items, key=lambda o: o.event_time + timedelta(hours=rng.uniform(0, 20))
        )  # fmt: skip
        corr = Correlator(config)
        linker = corr.discussion
        assert linker is not None
        linker.evict = evict
        links, before = [], 0
        for i, obs in enumerate(arrival):
            links += corr.add(obs)
            if evict and order == "time":
                compactions += linker.vocabulary_terms < before
                before = linker.vocabulary_terms
                if i % 50 == 49:
                    assert linker.vocabulary_terms <= max(2 * recent_terms(i), 4096)
        if evict and order == "time":
            assert linker.compact_vocabulary() > 0 and linker.vocabulary_terms <= recent_terms(len(items) - 1)
        links += corr.close()
        runs[evict, order] = sorted((k.method, k.message.entity, k.commit.entity, k.score) for k in links)
    assert runs[True, "time"] == runs[False, "time"] == runs[True, "shuffled"]
    assert sum(m == "discussion" for m, *_ in runs[True, "time"]) > 20 and compactions >= 1
    everything = DiscussionLinker(dataclasses.replace(CFG, df_horizon=None), evict=False)
    for obs in items:
        if obs.kind == "commit":
            everything.add_commit(obs.entity, obs.event_time, obs.text, obs.actor)
        else:
            everything.add_message(obs.entity, obs.event_time, obs.text, obs.actor)
    assert everything.vocabulary_terms == len(set().union(*terms.values()))


def test_a_restart_after_the_commit_retention_decides_as_a_worker_that_never_stopped() -> None:
    """Messages held 30 days, commits 45: a correlator restored on day 150 from what its retention held
    (what the worker's table holds) draws the rest of the links, scores included, as the one that never
    stopped. Its linker's document frequencies reach back at most commit_retention - allowed_lateness (44
    days) and its author affinity at most retention - window_after - allowed_lateness (22 days), the caps
    of ``CorrelationConfig.linker_config``, so none of the commits and explicit links they count was
    dropped. With both horizons lifted (every commit and link ever, the linker before 2026-12-07), the
    restarted worker draws other links: 319 against the uninterrupted worker's 304 (312 and 298 before the
    later-push prior of 2026-12-08)."""
    items = _long_history(200)
    config = CorrelationConfig(
        discussion=dataclasses.replace(CFG, df_horizon=None, affinity_horizon=None),
        retention=timedelta(days=30),
        commit_retention=timedelta(days=45),
    )
    linker = config.linker_config
    assert linker is not None and linker.df_horizon == timedelta(days=44)
    assert linker.affinity_horizon == timedelta(days=22)

    def correlator(capped: bool) -> Correlator:
        corr = Correlator(config)
        assert corr.discussion is not None
        if not capped:  # the retention still drops what it drops; the linker counts all it has seen
            corr.discussion.config = dataclasses.replace(linker, df_horizon=None, affinity_horizon=None)
        return corr

    def run(capped: bool) -> tuple[list[tuple[str, float | None]], list[tuple[str, float | None]], int]:
        whole = correlator(capped)
        expected = [(k.insight_id, k.score) for o in items for k in whole.add(o)]
        cut = 4 * 150
        first = correlator(capped)
        before = [(k.insight_id, k.score) for o in items[:cut] for k in first.add(o)]
        restored = correlator(capped)
        restored.restore([(o, None, o.entity) for o in first.observations.values()])
        after = [(k.insight_id, k.score) for o in items[cut:] for k in restored.add(o)]
        assert first.expired_count > 0
        return before + after, expected, len(after)

    got, expected, after = run(capped=True)
    assert got == expected and after > 20
    got, expected, _ = run(capped=False)
    assert got != expected and (len(got), len(expected)) == (319, 304)


def test_close_moves_the_watermark_past_what_it_decided_so_a_restore_does_not_decide_again() -> None:
    """``Correlator.close`` (the end of a finished history) decides the pending messages and moves the
    watermark to their latest deadline; restored with that watermark, a correlator takes them as made."""
    items = sorted(_history(), key=lambda o: (o.event_time, o.entity))
    config = CorrelationConfig(discussion=CFG)
    corr, _ = _run(items, config)
    assert corr.discussion is not None and corr.discussion.pending_count > 0
    deadline = corr.discussion.last_deadline_ms
    closed = corr.close()
    assert closed and corr.clock.watermark_ms == deadline and corr.discussion.pending_count == 0
    restored = Correlator(config)
    watermark = datetime.fromtimestamp(deadline / 1000, UTC)
    restored.restore([(o, None, o.entity) for o in items], watermark=watermark)
    assert restored.close() == [] and restored.progress({}) == []
    forgetful = Correlator(config)  # without the moved watermark the same messages are decided again
    forgetful.restore([(o, None, o.entity) for o in items])
    assert [k.insight_id for k in forgetful.close()] == [k.insight_id for k in closed]
