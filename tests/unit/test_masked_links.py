"""Masked links: reference masking, the text/time linker, and its precision/recall."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from processors.correlation.masked import (
    ChatMessage,
    CommitText,
    MaskedConfig,
    MaskedLinker,
    MessageText,
    evaluate_masked,
    mask_references,
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
