"""Masked links: reference masking, the text/time linker, and its precision/recall."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np

from processors.correlation.masked import (
    ChatMessage,
    CommitText,
    MaskedConfig,
    MaskedLinker,
    MessageText,
    evaluate_masked,
    mask_references,
    pending_merge_prior,
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
    linker = MaskedLinker(COMMITS)
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
    out = evaluate_masked(msgs, COMMITS, truth, config=MaskedConfig())
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
    linker = MaskedLinker(commits, MaskedConfig(time_weight=0.0))
    hit = linker.predict(MessageText("m", T0, "this PR makes relative serialize paths readable"))
    assert hit.commit == commits[1].entity
    plain = MaskedLinker(commits, MaskedConfig(time_weight=0.0, merge_boost=0.0))
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
    out = evaluate_masked(msgs, COMMITS, truth, config=MaskedConfig())
    assert (out["linked"], out["correct"]) == (1, 1)
    off = evaluate_masked(msgs, COMMITS, truth, config=MaskedConfig(user_context=timedelta(0)))
    assert off["linked"] == 0
