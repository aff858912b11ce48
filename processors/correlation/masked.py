"""Find the commit a Slack message talks about when the message does not reference it (masked links).

Plain Python, no Kafka. The explicit method of :mod:`processors.correlation.logic` needs a reference (a SHA,
a commit URL, ``#N`` of a squash-merged pull request). This module links without one, from these
signals of a (message, commit) pair:

* **text**: TF-IDF cosine (scikit-learn, word unigrams and bigrams, English stop words removed, sublinear tf) between the message's
  *conversation* (the message, the other messages of its disentangled thread, and the same user's
  messages of the ``user_context`` before it, every reference masked) and the commit subject; the vocabulary and IDF come from the commit subjects only;
* **embedding** (optional): cosine of all-MiniLM-L6-v2 vectors of the same two texts, when an embedding
  function is given;
* **timing**: the commit must lie within ``window_before`` before / ``window_after`` after the message, and
  closer commits score higher (``exp(-|lag| / time_scale)``);
* **pending merge**: a commit whose subject ends with ``(#N)`` (a squash-merged pull request, the same
  convention :func:`processors.correlation.logic.pr_number_of` reads) and that lands *after* the message
  has prior ``pending = 1 / (1 + k)``, where ``k`` is the number of such merge commits between the message
  and it; other commits have 0. People talk about a pull request before it is merged, so the next merge
  after a message is the likeliest one it talks about. The prior multiplies the text score only, so a merge
  commit that shares no word with the conversation gains nothing; direct pushes (most Racket commits) are
  unaffected, and the prior fades where merges are frequent;
* **author affinity** (:class:`AuthorAffinity`): who talks about whose commits, learned from the links
  already made. A message's people are its author and the users it @-mentions; a candidate commit gains
  ``max(0, affinity(people, commit author) - author's share of all commits)``. On Racket 2018 one user
  posts the pull requests of one contributor (5 of the 17 links), and "this commit of yours" names its
  author; Slack names are pseudonyms, so only co-occurrence in links can pair them with git authors.
  The share is subtracted because one author wrote 60 % of the commits: without it, a mention of him
  lifted most candidates and pushed a right link from first to 15th.

``score = text_weight * tfidf * (1 + merge_boost * pending) + embedding_weight * embedding
+ time_weight * proximity + affinity_weight * affinity``; a message is linked to its best commit when that score is at least ``min_score`` and beats the runner-up by
``min_margin`` (an ambiguous message gets no link, which keeps precision).

Measured (``backbone eval links`` on Racket Slack 2018 × racket/racket commits, 17 masked links,
2026-12-06; the affinity learned test-then-train, see :func:`evaluate_masked`): text + timing + priors +
affinity 8 linked, 7 right (precision 0.88, recall 0.41, true commit ranked first for 10); with
embeddings 10 linked, 8 right (0.80 / 0.47, ranked first 9). ``--no-affinity``: 6 of 6 (1.00 / 0.35,
ranked first 8) and 7 of 9 (0.78 / 0.41, ranked first 9). ``affinity_weight`` 0.2 and 0.3 gave the same
7 of 8, 0.4 and 0.5 fewer right links; the affinity without the share subtracted gave 7 of 7 (ranked
first 9). Over all 9,709 messages the affinity adds 46 links (1,306 against 1,260). The live correlator
(:mod:`processors.correlation.logic`) does not run this linker: it draws reference and embedding links
only, so these figures are the offline linker's. Before the two priors (2026-12-04):
4 of 4 (1.00 / 0.24, ranked first 6) and 6 of 9 (0.67 / 0.35, ranked first 7). Tried and worse or equal:
BM25 over subjects, a score for shared code identifiers or rare terms, Snowball stemming, weighting the
thread below the message, z-scoring scores per window, and (2026-12-06) TF-IDF fitted on the window's
commits only (8 right of 12: rare words of a small window score high). Three right links sit at
``min_score`` (0.200, 0.201, 0.201), so the figures are fragile. The misses mostly keep no signal once masked (nightly version
banners such as ``version 7.0.0.6--2018-07-08``, "just in case you missed it: <PR>", a commit named days
later in an unrelated thread). The goal (recall 0.6 at precision 0.8) is not met. Over all 9,709
messages (no labels) the linker links 1,260 against 1,038 before the priors; how many are right there is
unmeasured. ``embedding_weight`` 0.25 gave 7 of 8 with embeddings, not adopted (fitted to 17 messages).

:func:`mask_references` removes what the reference extractor reads (GitHub URLs, ``owner/repo#N``,
``#N``, 7-40 hex-digit SHAs) so the evaluation measures the other signals only.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from processors.correlation.logic import pr_number_of

__all__ = [
    "AuthorAffinity",
    "ChatMessage",
    "CommitText",
    "MaskedConfig",
    "MaskedLinker",
    "MessageText",
    "Prediction",
    "evaluate_masked",
    "mask_references",
    "pending_merge_prior",
    "people_of",
    "precision_recall",
]

_MASKS = (
    re.compile(r"<?https?://(?:www\.)?github\.com/[^\s>|]+(?:\|[^>]*)?>?", re.IGNORECASE),
    re.compile(r"\b[\w.-]+/[\w.-]+#\d+\b"),
    re.compile(r"(?<![\w&])#\d+\b"),
    re.compile(r"\b[0-9a-f]{7,40}\b"),
)

Embed = Callable[[Sequence[str]], np.ndarray]


def mask_references(text: str) -> str:
    """``text`` without GitHub URLs, ``owner/repo#N``, ``#N`` and 7-40 hex-digit SHAs (each replaced by a space)."""
    for pattern in _MASKS:
        text = pattern.sub(" ", text)
    return " ".join(text.split())


@dataclass(frozen=True, slots=True)
class CommitText:
    """A commit: ``entity`` (``git:owner/repo@sha``), aware UTC ``time`` (commit time), ``subject`` and
    ``author`` (the git author's name; None: unknown, no author affinity)."""

    entity: str
    time: datetime
    subject: str
    author: str | None = None


@dataclass(frozen=True, slots=True)
class MessageText:
    """A message: ``entity``, aware UTC ``time``, ``context`` (its masked text plus its thread's) and
    ``people`` (its author and the users it @-mentions; empty: no author affinity)."""

    entity: str
    time: datetime
    context: str
    people: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class MaskedConfig:
    """Weights and limits of the masked linker (see the module docstring)."""

    window_before: timedelta = timedelta(days=21)
    window_after: timedelta = timedelta(days=7)
    time_scale: timedelta = timedelta(days=3)
    text_weight: float = 1.0
    embedding_weight: float = 0.5
    time_weight: float = 0.1
    merge_boost: float = 1.0
    user_context: timedelta = timedelta(hours=6)
    min_score: float = 0.2
    min_margin: float = 0.04
    affinity_weight: float = 0.2
    affinity_smoothing: float = 1.0
    """Defaults chosen by looking at the 17 masked Racket 2018 links (see the issue-12 report), so the
    figures on that set are optimistic. ``merge_boost`` 1 (the next merge's text evidence counts
    double) was not tuned: an additive prior ``+ 0.1 * pending`` gave more on these 17 (6 of 6 without
    embeddings, 8 of 11 with) but linked 54 % more of all 9,709 messages (1,602 against 1,038, most of them
    chat that is about no commit), the multiplicative one 16 % more (1,202), 2026-12-04. ``user_context``
    (the same user's earlier messages; a short "Okay to merge?" refers to what its author said before):
    2 h changed nothing on the 17, 6 h and 12 h gave one more right link (6 of 6) and 5 % more links on all
    messages (1,260), 24 h one wrong link more; 0 turns it off. ``affinity_weight`` (0 turns the author
    affinity off) and ``affinity_smoothing`` (pseudo-count of :class:`AuthorAffinity`): see the module
    docstring, 2026-12-06."""


@dataclass(frozen=True, slots=True)
class Prediction:
    """The linker's answer for one message: the linked ``commit`` (None: below ``min_score`` or
    ``min_margin``), the ``score`` and ``margin`` of the ``best`` candidate (None: no commit in the window),
    linked or not."""

    message: str
    commit: str | None
    score: float
    margin: float
    best: str | None = None


class AuthorAffinity:
    """Who talks about whose commits, learned from links already made (test-then-train).

    Each observed link adds the pair (person, commit author) for every person of the message (its author and
    the users it @-mentions). The affinity of a message's people to an author is
    ``max over people p of n(p, author) / (n(p) + smoothing)``: 0 for a person never seen, and near 1 for
    one whose every link so far went to that author's commits. Slack names and git author names need not
    match (the Racket export is pseudonymised); only their co-occurrence in links counts.

    Args:
        smoothing: pseudo-count added to each person's total (>= 0); 1 makes a single link worth 0.5.
    """

    def __init__(self, smoothing: float = 1.0) -> None:
        if smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}")
        self.smoothing = smoothing
        self.pairs: dict[tuple[str, str], int] = {}
        self.totals: dict[str, int] = {}

    def observe(self, people: Sequence[str], author: str) -> None:
        """Count one link from a message of ``people`` to a commit of ``author``."""
        for person in dict.fromkeys(people):
            self.pairs[(person, author)] = self.pairs.get((person, author), 0) + 1
            self.totals[person] = self.totals.get(person, 0) + 1

    def affinity(self, people: Sequence[str], author: str | None) -> float:
        """In [0, 1): how strongly ``people`` have been linked to ``author``'s commits (0: unknown author)."""
        if author is None:
            return 0.0
        best = 0.0
        for person in people:
            n = self.pairs.get((person, author), 0)
            if n:
                best = max(best, n / (self.totals[person] + self.smoothing))
        return best


class MaskedLinker:
    """Score messages against commits by text, embedding and timing.

    Args:
        commits: the commits (the TF-IDF vocabulary is fitted on their subjects).
        config: weights and limits.
        embed: texts → unit vectors (``(n, d)`` float32), e.g. all-MiniLM-L6-v2; None skips embeddings.
    """

    def __init__(
        self, commits: Sequence[CommitText], config: MaskedConfig | None = None, embed: Embed | None = None
    ):
        from sklearn.feature_extraction.text import TfidfVectorizer

        self.config = config or MaskedConfig()
        self.commits = sorted(commits, key=lambda c: (c.time, c.entity))
        self.times = np.array([c.time.timestamp() for c in self.commits])
        authors = [c.author for c in self.commits if c.author is not None]
        self.author_share = {a: n / len(authors) for a, n in Counter(authors).items()}
        self.is_merge = np.array([pr_number_of(c.subject) is not None for c in self.commits], dtype=bool)
        self.vectorizer = TfidfVectorizer(
            ngram_range=(1, 2), sublinear_tf=True, stop_words="english", token_pattern=r"(?u)\b[\w-]{2,}\b"
        )
        self.commit_tfidf = self.vectorizer.fit_transform([c.subject for c in self.commits])
        self.embed = embed
        self.commit_vectors = embed([c.subject for c in self.commits]) if embed is not None else None

    def scores(self, message: MessageText, affinity: AuthorAffinity | None = None) -> list[tuple[float, str]]:
        """``(score, commit entity)`` of every commit in the time window, best first (ties by entity).

        ``affinity``: links learned so far; None (or a message without ``people``) leaves that term out."""
        t = message.time.timestamp()
        lo = np.searchsorted(self.times, t - self.config.window_before.total_seconds(), side="left")
        hi = np.searchsorted(self.times, t + self.config.window_after.total_seconds(), side="right")
        if lo >= hi:
            return []
        q = self.vectorizer.transform([message.context])
        text = (self.commit_tfidf[lo:hi] @ q.T).toarray().ravel()
        emb = np.zeros(hi - lo)
        if self.embed is not None and self.commit_vectors is not None:
            v = self.embed([message.context])[0]
            emb = self.commit_vectors[lo:hi] @ v
        lag = np.abs(self.times[lo:hi] - t)
        prox = np.exp(-lag / self.config.time_scale.total_seconds())
        c = self.config
        if c.merge_boost:
            pending = pending_merge_prior(self.times[lo:hi], self.is_merge[lo:hi], t)
            text = text * (1.0 + c.merge_boost * pending)
        total = c.text_weight * text + c.embedding_weight * emb + c.time_weight * prox
        if affinity is not None and message.people and c.affinity_weight:
            lift = {
                a: max(0.0, affinity.affinity(message.people, a) - share)
                for a, share in self.author_share.items()
            }
            aff = np.array([lift.get(self.commits[i].author or "", 0.0) for i in range(lo, hi)])
            total = total + c.affinity_weight * aff
        out = [(round(float(s), 6), self.commits[lo + i].entity) for i, s in enumerate(total)]
        return sorted(out, key=lambda p: (-p[0], p[1]))

    def predict(self, message: MessageText, affinity: AuthorAffinity | None = None) -> Prediction:
        """The best commit when it clears ``min_score`` and ``min_margin``; else ``commit=None``."""
        ranked = self.scores(message, affinity)
        if not ranked:
            return Prediction(message.entity, None, 0.0, 0.0)
        best, entity = ranked[0]
        margin = best - ranked[1][0] if len(ranked) > 1 else best
        ok = best >= self.config.min_score and margin >= self.config.min_margin
        return Prediction(message.entity, entity if ok else None, best, round(margin, 6), entity)


def pending_merge_prior(times: np.ndarray, is_merge: np.ndarray, t: float) -> np.ndarray:
    """``1 / (1 + k)`` for the merge commits at or after ``t`` (``k``: merge commits between ``t`` and it),
    0 for the others.

    Args:
        times: commit times (unix seconds), ascending.
        is_merge: same length, True where the subject ends with ``(#N)``.
        t: the message time (unix seconds).
    """
    after = is_merge & (times >= t)
    k = np.cumsum(after) - 1
    return np.where(after, 1.0 / (1.0 + np.maximum(k, 0)), 0.0)


def precision_recall(predictions: Sequence[Prediction], truth: dict[str, str]) -> dict[str, Any]:
    """Precision (right links / links made) and recall (right links / messages with a true link), and
    ``ranked_first``: messages whose true commit is the best candidate, linked or not (what a perfect
    threshold could reach).

    Args:
        predictions: one per masked message.
        truth: message entity → the commit entity it referenced.
    """
    made = [p for p in predictions if p.commit is not None]
    right = sum(1 for p in made if truth.get(p.message) == p.commit)
    return {
        "masked": len(truth),
        "linked": len(made),
        "correct": right,
        "precision": round(right / len(made), 4) if made else 0.0,
        "recall": round(right / len(truth), 4) if truth else 0.0,
        "ranked_first": sum(1 for p in predictions if p.best is not None and truth.get(p.message) == p.best),
    }


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """A message for :func:`evaluate_masked`: ``entity``, aware UTC ``time``, readable ``text`` (references
    still in it), ``conversation`` id of its disentangled thread (None: a thread of its own), ``user`` (its
    author's name or id; None: unknown, no user context)."""

    entity: str
    time: datetime
    text: str
    conversation: str | None
    user: str | None = None


_MENTION = re.compile(r"(?<![\w@])@([A-Za-z][\w-]*(?:\.[\w-]+)*)")


def people_of(message: ChatMessage) -> tuple[str, ...]:
    """The message's author (when known) and the users it @-mentions, in order, without repeats."""
    mentioned = _MENTION.findall(message.text)
    return tuple(dict.fromkeys([*([message.user] if message.user else []), *mentioned]))


def evaluate_masked(
    messages: Sequence[ChatMessage],
    commits: Sequence[CommitText],
    truth: dict[str, str],
    *,
    config: MaskedConfig | None = None,
    embed: Embed | None = None,
    learn_affinity: bool = True,
) -> dict[str, Any]:
    """Mask the references of every message, then link each message of ``truth`` by text, embedding and time.

    Args:
        messages: every message of the channel (threads give context).
        commits: the candidate commits.
        truth: message entity → commit entity its (unmasked) reference names; the masked set.
        config: the linker's weights and limits.
        embed: optional embedding function (unit vectors).
        learn_affinity: learn :class:`AuthorAffinity` test-then-train: the messages of ``truth`` are taken in
            time order, each is linked with what the links of the earlier ones taught, and then its true
            link is revealed (as the live correlator learns from the explicit links it has made). False
            leaves that term out.

    Returns:
        ``{"masked", "linked", "correct", "precision", "recall", "ranked_first", "seconds_per_message"}``.
    """
    import bisect
    import time as _time

    cfg = config or MaskedConfig()
    by_conv: dict[str, list[str]] = {}
    by_user: dict[str, list[tuple[float, str]]] = {}
    masked_text: dict[str, str] = {}
    for m in messages:
        masked_text[m.entity] = mask_references(m.text)
        if m.conversation is not None:
            by_conv.setdefault(m.conversation, []).append(m.entity)
        if m.user is not None:
            by_user.setdefault(m.user, []).append((m.time.timestamp(), m.entity))
    for earlier in by_user.values():
        earlier.sort()
    span = cfg.user_context.total_seconds()
    linker = MaskedLinker(commits, cfg, embed)
    author_of = {c.entity: c.author for c in commits}
    affinity = AuthorAffinity(cfg.affinity_smoothing) if learn_affinity else None
    start = _time.perf_counter()
    preds = []
    for m in sorted(messages, key=lambda m: (m.time, m.entity)):
        if m.entity not in truth:
            continue
        thread = by_conv.get(m.conversation, [m.entity]) if m.conversation is not None else [m.entity]
        own: list[str] = []
        if m.user is not None and span > 0:
            mine, t = by_user[m.user], m.time.timestamp()
            lo = bisect.bisect_left(mine, (t - span, ""))
            hi = bisect.bisect_right(mine, (t, "\uffff"))
            own = [e for _, e in mine[lo:hi]]
        context = " ".join(masked_text[e] for e in dict.fromkeys([m.entity, *thread, *own]))
        people = people_of(m)
        preds.append(linker.predict(MessageText(m.entity, m.time, context, people), affinity))
        author = author_of.get(truth[m.entity])
        if affinity is not None and author is not None:
            affinity.observe(people, author)  # test, then train: the reference is revealed after the guess
    out = precision_recall(preds, truth)
    out["seconds_per_message"] = round((_time.perf_counter() - start) / max(len(preds), 1), 4)
    return out
