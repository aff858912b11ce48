"""Masked links: reference masking, the text/time linker, and its precision/recall."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from processors.correlation.masked import (
    AuthorAffinity,
    ChatMessage,
    CommitText,
    MaskedConfig,
    MaskedLinker,
    MessageText,
    evaluate_masked,
    mask_references,
    pending_merge_prior,
    people_of,
)

T0 = datetime(2018, 5, 1, tzinfo=UTC)
COMMITS = [
    CommitText("git:o/r@" + "a" * 40, T0, "expander: fix syntax-local-bind-syntaxes for local-expand"),
    CommitText("git:o/r@" + "b" * 40, T0 + timedelta(hours=2), "docs: typo in the guide"),
    CommitText(
        "git:o/r@" + "c" * 40, T0 + timedelta(days=60), "expander: fix syntax-local-bind-syntaxes again"
    ),
]


def test_mask_references_removes_everything_the_extractor_reads() -> None:
    """URLs (plain and Slack-wrapped), owner/repo#N, #N and SHAs go; words stay."""
    text = "see <https://github.com/racket/racket/pull/2172|PR> and racket/racket#12, #5 and 0de27b6ce9 ok"
    assert mask_references(text) == "see and , and ok"


def test_linker_prefers_text_and_respects_the_time_window() -> None:
    """The message about bind-syntaxes links the first commit; the identical subject 60 days later is out
    of the window; a message without shared words gets no link."""
    linker = MaskedLinker(COMMITS, MaskedConfig(min_history=0))
    hit = linker.predict(
        MessageText("m1", T0 + timedelta(hours=5), "I think syntax-local-bind-syntaxes broke local-expand")
    )
    assert hit.commit == COMMITS[0].entity
    miss = linker.predict(MessageText("m2", T0 + timedelta(hours=5), "anyone at the conference tomorrow?"))
    assert miss.commit is None


def test_evaluate_masked_counts_and_uses_threads() -> None:
    """A message whose own text is only a URL is linked through the words of its thread."""
    msgs = [
        ChatMessage("m1", T0 + timedelta(hours=1), "https://github.com/o/r/commit/" + "a" * 40, "c1"),
        ChatMessage(
            "m0", T0 + timedelta(minutes=30), "local-expand and syntax-local-bind-syntaxes are broken", "c1"
        ),
        ChatMessage("m2", T0 + timedelta(hours=3), "<https://github.com/o/r/commit/" + "b" * 40 + ">", None),
    ]
    truth = {"m1": COMMITS[0].entity, "m2": COMMITS[1].entity}
    out = evaluate_masked(msgs, COMMITS, truth, config=MaskedConfig(min_history=0))
    assert (out["masked"], out["correct"]) == (2, 1)
    assert out["precision"] == 1.0 and out["recall"] == 0.5
    assert out["ranked_first"] == 2  # m2 has no words left, but its commit is the closest in time


def test_pending_merge_prior_favours_the_next_merge_after_the_message() -> None:
    """Merge commits after t get 1, 1/2, 1/3, … in time order; earlier ones and direct pushes get 0."""
    times = np.array([0.0, 10.0, 20.0, 30.0, 40.0])
    is_merge = np.array([True, False, True, True, False])
    assert pending_merge_prior(times, is_merge, 5.0).tolist() == [0.0, 0.0, 1.0, 0.5, 0.0]
    assert pending_merge_prior(times, is_merge, 50.0).tolist() == [0.0] * 5


def test_linker_prefers_the_next_merged_pull_request_when_text_ties() -> None:
    """Two commits share the message's words equally; the squash merge landing after the message wins (and
    is linked), the same subject as a direct push does not get the boost; a merge that shares no word
    with the message gains nothing."""
    commits = [
        CommitText("git:o/r@" + "d" * 40, T0 - timedelta(hours=1), "serialize: relative paths readable"),
        CommitText("git:o/r@" + "e" * 40, T0 + timedelta(hours=8), "serialize: relative paths readable (#7)"),
        CommitText("git:o/r@" + "f" * 40, T0 + timedelta(hours=2), "unrelated change to the GC (#8)"),
    ]
    linker = MaskedLinker(commits, MaskedConfig(time_weight=0.0, min_history=0))
    hit = linker.predict(MessageText("m", T0, "this PR makes relative serialize paths readable"))
    assert hit.commit == commits[1].entity
    plain = MaskedLinker(commits, MaskedConfig(time_weight=0.0, merge_boost=0.0, min_history=0))
    ranked = plain.scores(MessageText("m", T0, "this PR makes relative serialize paths readable"))
    assert ranked[0][0] == ranked[1][0]  # without the prior the two subjects tie
    scored = {e: s for s, e in linker.scores(MessageText("m", T0, "relative paths"))}
    assert scored[commits[2].entity] == 0.0


def test_evaluate_masked_reads_the_same_users_earlier_messages() -> None:
    """A bare "okay to merge?" links through what its author said an hour before (another thread); with
    ``user_context`` 0, or from another user, that text is not read and the message stays unlinked."""
    ask = "okay to merge? https://github.com/o/r/pull/3"
    msgs = [
        ChatMessage(
            "m0", T0 + timedelta(hours=4), "syntax-local-bind-syntaxes broke local-expand", "c1", "ann"
        ),
        ChatMessage("m1", T0 + timedelta(hours=5), ask, "c2", "ann"),
        ChatMessage("m2", T0 + timedelta(hours=5), ask, "c3", "bob"),
    ]
    truth = {"m1": COMMITS[0].entity, "m2": COMMITS[0].entity}
    out = evaluate_masked(msgs, COMMITS, truth, config=MaskedConfig(min_history=0))
    assert (out["linked"], out["correct"]) == (1, 1)
    off = evaluate_masked(msgs, COMMITS, truth, config=MaskedConfig(user_context=timedelta(0), min_history=0))
    assert off["linked"] == 0


def test_author_affinity_counts_people_and_authors_of_links() -> None:
    """Each person of a linked message counts one link to the commit's author; the affinity is the best
    person's share with one pseudo-count; an unseen person or author has none; bad smoothing is refused."""
    aff = AuthorAffinity(smoothing=1.0)
    aff.observe(["odis", "lynna", "odis"], "Leif")  # a repeated person counts once
    aff.observe(["odis"], "Leif")
    aff.observe(["lynna"], "Matthew")
    assert aff.affinity(["odis"], "Leif") == 2 / 3
    assert aff.affinity(["carlyn", "lynna"], "Matthew") == 1 / 3
    assert aff.affinity(["carlyn"], "Leif") == 0.0
    assert aff.affinity(["odis"], None) == 0.0
    aff.forget(["odis", "lynna"], "Leif")  # the first link leaves the horizon
    assert aff.affinity(["odis"], "Leif") == 1 / 2 and aff.affinity(["lynna"], "Leif") == 0.0
    assert ("lynna", "Leif") not in aff.pairs and aff.totals == {"odis": 1, "lynna": 1}
    with pytest.raises(ValueError, match="smoothing"):
        AuthorAffinity(smoothing=-1.0)


def test_masked_config_refuses_a_short_df_horizon_or_a_negative_affinity_horizon() -> None:
    """A df_horizon shorter than a message's window would leave a commit of the window uncounted; a
    negative affinity horizon means nothing; None (no horizon) and the window's length are taken."""
    with pytest.raises(ValueError, match="df_horizon .* shorter"):
        MaskedConfig(df_horizon=timedelta(days=1))
    with pytest.raises(ValueError, match="affinity_horizon .* negative"):
        MaskedConfig(affinity_horizon=timedelta(days=-1))
    config = MaskedConfig(df_horizon=None, affinity_horizon=timedelta(0))
    assert config.df_horizon is None and config.affinity_horizon == timedelta(0)
    span = config.window_before + config.window_after
    assert MaskedConfig(df_horizon=span).df_horizon == span


def test_people_of_reads_the_author_and_mentions() -> None:
    """The author first, then @-mentions in order, no repeats; an e-mail address is not a mention."""
    m = ChatMessage("m", T0, "@Lynna and @Odis: see ann@example.org, thanks @Lynna.", None, "Carlyn")
    assert people_of(m) == ("Carlyn", "Lynna", "Odis")
    assert people_of(ChatMessage("m", T0, "no one", None, None)) == ()


def test_affinity_links_a_message_without_words_to_its_people_s_author_test_then_train() -> None:
    """Two commits at the same distance in time and without shared words tie, so the bare message is not
    linked; once an earlier link (revealed after its own guess) taught that ann talks about Leif's
    commits (1/2 - Leif's share 2/7), her next bare message links Leif's commit; each author's share of the
    commits is discounted, so the same lesson about Matthew (6 of 7 commits) changes nothing."""
    leif = CommitText("git:o/r@" + "1" * 40, T0 + timedelta(hours=30), "relative paths readable (#9)", "Leif")
    other = CommitText("git:o/r@" + "2" * 40, T0 + timedelta(hours=30), "repair gui metadata", "Matthew")
    first = CommitText(
        "git:o/r@" + "3" * 40, T0 - timedelta(days=2), "add relative paths to serialize", "Leif"
    )
    older = [
        CommitText(f"git:o/r@{i}" + "4" * 39, T0 - timedelta(days=15), f"gc tweak {i}", "Matthew")
        for i in range(4)
    ]
    commits = [leif, other, first, *older]  # Leif wrote 2 of the 7
    msgs = [
        ChatMessage("m0", T0 - timedelta(days=2), "relative paths for serialize? https://github.com/o/r/pull/4", None, "ann"),
        ChatMessage("m1", T0 + timedelta(hours=29), "https://github.com/o/r/pull/9", None, "ann"),
    ]  # fmt: skip
    truth = {"m0": first.entity, "m1": leif.entity}
    cfg = MaskedConfig(merge_boost=0.0, affinity_weight=0.5, min_score=0.15, min_history=0)
    plain = evaluate_masked(msgs, commits, truth, config=cfg, learn_affinity=False)
    assert (plain["linked"], plain["correct"]) == (1, 1)  # m0 by its words only
    learned = evaluate_masked(msgs, commits, truth, config=cfg)
    assert (learned["linked"], learned["correct"]) == (2, 2)
    # m0's link is 3 days older than m1: outside a 2-day affinity horizon it teaches m1 nothing
    short = evaluate_masked(msgs, commits, truth, config=replace(cfg, affinity_horizon=timedelta(days=2)))
    assert (short["linked"], short["correct"]) == (1, 1)
    linker = MaskedLinker(
        [leif, other, CommitText(first.entity, first.time, first.subject, "Matthew"), *older], cfg
    )
    aff = AuthorAffinity()
    aff.observe(["ann"], "Matthew")
    ranked = linker.scores(MessageText("m1", T0 + timedelta(hours=29), "", ("ann",)), aff)
    assert ranked[0][0] == ranked[1][0]  # 1/2 - 6/7 < 0: no lift for the author of most commits


def test_a_direct_push_well_after_the_message_is_not_what_it_cites() -> None:
    """A message can cite a pushed commit only once it exists: a direct push later than the message by more
    than the clock tolerance has its text evidence scaled by ``later_push_factor``, so an earlier push with
    fewer shared words wins; within the tolerance (clocks of unknown offset) and for a squash merge (a pull
    request discussed before it lands) nothing changes. Without the prior the later push wins."""
    message = MessageText("m", T0, "thanks, the guide section on instantiations and visits is great")
    earlier = CommitText(
        "git:o/r@" + "1" * 40, T0 - timedelta(hours=3), "guide: add section on instantiations"
    )
    later = CommitText("git:o/r@" + "2" * 40, T0 + timedelta(days=2), "guide: proofread section on instantiations and visits")  # fmt: skip
    base = MaskedConfig(time_weight=0.0, min_history=0, min_margin=0.0, min_score=0.0)
    without = MaskedLinker([earlier, later], replace(base, later_push_factor=1.0)).predict(message)
    assert without.commit == later.entity
    assert MaskedLinker([earlier, later], base).predict(message).commit == earlier.entity
    soon = replace(later, time=T0 + timedelta(hours=13))  # within the 14-h clock tolerance
    assert MaskedLinker([earlier, soon], base).predict(message).commit == soon.entity
    merged = replace(later, subject=f"{later.subject} (#9)")  # a pull request merged two days later
    assert MaskedLinker([earlier, merged], base).predict(message).commit == merged.entity
    with pytest.raises(ValueError, match="later_push_factor"):
        MaskedConfig(later_push_factor=1.5)
    with pytest.raises(ValueError, match="clock_tolerance"):
        MaskedConfig(clock_tolerance=timedelta(hours=-1))
