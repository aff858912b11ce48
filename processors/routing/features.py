"""Prompt features computed from the text alone (no model): what the features scorer of the router sees.

Every feature is a float, computed by :func:`prompt_features` in the fixed order of
:data:`FEATURE_NAMES`. The list (units in the names; a "share" is a fraction of characters in [0, 1]):

=========================  ===============================================================================
``log_chars``              ``log1p`` of the prompt length in characters
``log_words``              ``log1p`` of the number of whitespace-separated words
``lines_count``            number of lines (``\\n``-separated), capped at 50
``digit_share``            share of characters that are digits 0-9
``upper_share``            share of characters that are upper-case letters
``math_symbol_share``      share of characters among ``= + * / ^ < > % | ( ) [ ] √ ∫ ∑ π ≤ ≥ ×`` and ``$``
``latex_count``            number of LaTeX commands (``\\frac``, ``\\sqrt``, ...), capped at 20
``code_cue_count``         number of code cues (``def``, ``return``, ``;``, ``{``, ``==``, ``print(``, ...), capped at 20
``numbers_count``          number of numbers (``3``, ``2.5``, ``10^6``) in the text, capped at 50
``options_count``          number of multiple-choice options (lines starting ``A.`` ... ``J.``)
``numeric_options_share``  share of those options whose text is a number or a formula (0 without options)
``mean_option_words``      mean words per option (0 without options)
``question_marks_count``   number of ``?`` characters, capped at 10
``cue_compute``            1 when the question asks to compute (calculate, compute, find, solve, evaluate, how many, what is the value)
``cue_statement_pair``     1 for the "Statement 1 | ... Statement 2 | ..." true/false format
``cue_negation``           1 for NOT / EXCEPT / LEAST questions (upper-case in the text)
``cue_passage``            1 when the prompt quotes a passage ("refers to the following", "this question refers")
``cue_which_following``    1 for "which of the following"
``cue_definition``         1 for "is called" / "refers to" / "is defined as" / "term for" questions
=========================  ===============================================================================

The features are deliberately cheap (a few regular expressions, written for the regex engine's speed: see
the comment above them; about 0.035 ms for a 470-character MMLU prompt on one CPU core, 0.09 ms before) and
language-agnostic enough for MMLU-style prompts (lm-sys/RouteLLM ``routellm/evals/mmlu``: a
question, then options ``A.`` to ``D.`` on their own lines). They are a pure function of the text.
"""

from __future__ import annotations

import math
import re

import numpy as np

__all__ = ["FEATURE_NAMES", "feature_matrix", "feature_vector", "prompt_features"]

FEATURE_NAMES: tuple[str, ...] = (
    "log_chars",
    "log_words",
    "lines_count",
    "digit_share",
    "upper_share",
    "math_symbol_share",
    "latex_count",
    "code_cue_count",
    "numbers_count",
    "options_count",
    "numeric_options_share",
    "mean_option_words",
    "question_marks_count",
    "cue_compute",
    "cue_statement_pair",
    "cue_negation",
    "cue_passage",
    "cue_which_following",
    "cue_definition",
)
"""The feature names, in the order of :func:`feature_vector`."""

# The patterns are written for the speed of Python's regex engine (``sre``), matching exactly what their
# plain forms match (tests/unit/test_routing_policy_golden.py checks both on MMLU-like and fuzzed text):
#
# * a pattern whose every branch starts with a literal character lets ``search``/``findall`` jump from one
#   occurrence of those characters to the next instead of trying every branch at every position. So
#   ``\bdef`` is written ``d(?<!\w.)ef``: after the ``d``, the character before it is not a word character,
#   which is what ``\b`` means in front of a word character (none at all: the string starts there);
#   ``(?<![A-Za-z])\d+`` is written ``\d(?<![A-Za-z]\d)\d*`` the same way.
# * a case-insensitive pattern cannot start with a literal; a lookahead on the first characters of its
#   branches, ``(?=[cf...])`` (same flags, so the same case folding), rejects most positions in one test.
_MATH_CHARS = re.compile(r"[=+*/^<>%|()\[\]√∫∑π≤≥×$]")
_DIGIT = re.compile(r"[0-9]")
_LATEX = re.compile(r"\\[a-zA-Z]+")
_CODE = re.compile(  # plain: \bdef\b|\breturn\b|;|\{|\}|==|!=|\bprint\s*\(|\bint\s+\w+\s*=|#include|\bfor\s*\(|->|\+\+
    r"d(?<!\w.)ef\b|r(?<!\w.)eturn\b|;|\{|\}|==|!=|p(?<!\w.)rint\s*\(|i(?<!\w.)nt\s+\w+\s*=|#include"
    r"|f(?<!\w.)or\s*\(|->|\+\+"
)
_NUMBER = re.compile(  # plain: (?<![A-Za-z])\d+(?:[.,]\d+)*(?:\s*\^\s*-?\d+)?
    r"\d(?<![A-Za-z]\d)\d*(?:[.,]\d+)*(?:\s*\^\s*-?\d+)?"
)
_OPTION = re.compile(r"^\s*\(?([A-J])[.)]\s*(.*)$")
_NUMERIC_OPTION = re.compile(r"^[\s$\-+−]*[\d.,/^*×√πe\s()\-+−%]+[a-zA-Zµ°%/\s]{0,12}$")
_NEGATION = re.compile(r"N(?<!\w.)OT\b|E(?<!\w.)XCEPT\b|L(?<!\w.)EAST\b")  # plain: \b(NOT|EXCEPT|LEAST)\b
# The case-insensitive cues, each compiled twice from one source: with IGNORECASE for any text, and
# case-sensitive for lower-cased ASCII text (the same matches there; sre scans it about twice as fast).
_COMPUTE_SOURCE = (
    r"(?=[cfsehwd])\b(?:calculate|compute|find|solve|evaluate|simplify|how many|how much|what is the value"
    r"|determine the)\b"
)
_STATEMENT_SOURCE = r"statement\s*1\s*\|"
_DEFINITION_SOURCE = r"(?=[itr])\b(?:is called|is known as|is defined as|term for|refers to)\b"
_PASSAGE_PHRASES = (
    "refers to the following",
    "this question refers",
    "read the following",
    "following passage",
)
_WHICH_PHRASE = "which of the following"
_COMPUTE = re.compile(_COMPUTE_SOURCE, re.IGNORECASE)
_STATEMENT = re.compile(_STATEMENT_SOURCE, re.IGNORECASE)
_DEFINITION = re.compile(_DEFINITION_SOURCE, re.IGNORECASE)
_PASSAGE = re.compile(f"(?=[rtf])(?:{'|'.join(map(re.escape, _PASSAGE_PHRASES))})", re.IGNORECASE)
_WHICH = re.compile(_WHICH_PHRASE, re.IGNORECASE)
_COMPUTE_LOWER = re.compile(_COMPUTE_SOURCE)
_STATEMENT_LOWER = re.compile(_STATEMENT_SOURCE)
_DEFINITION_LOWER = re.compile(_DEFINITION_SOURCE)
_ASCII_UPPER = bytes(range(ord("A"), ord("Z") + 1))
_ASCII_DIGITS = b"0123456789"


def _counts_and_cues(prompt: str) -> tuple[int, int, bool, bool, bool, bool, bool]:
    """Digits (0-9) and upper-case letters counted, and the case-insensitive cues (compute, statement pair,
    passage, which of the following, definition) found.

    An ASCII prompt (about 90% of MMLU's) takes cheaper operations with the same results: ``bytes.translate``
    deletes the upper-case letters (for ASCII, what ``str.isupper`` counts) or the digits and the length
    difference counts them; the cues are searched case-sensitively in the lower-cased text (substring
    tests for the plain phrases). Any other prompt: the regular expressions, with IGNORECASE.
    """
    if prompt.isascii():
        raw = prompt.encode("ascii")
        lower = prompt.lower()
        return (
            len(raw) - len(raw.translate(None, _ASCII_DIGITS)),
            len(raw) - len(raw.translate(None, _ASCII_UPPER)),
            _COMPUTE_LOWER.search(lower) is not None,
            _STATEMENT_LOWER.search(lower) is not None,
            any(phrase in lower for phrase in _PASSAGE_PHRASES),
            _WHICH_PHRASE in lower,
            _DEFINITION_LOWER.search(lower) is not None,
        )
    return (
        len(_DIGIT.findall(prompt)),
        sum(map(str.isupper, prompt)),
        _COMPUTE.search(prompt) is not None,
        _STATEMENT.search(prompt) is not None,
        _PASSAGE.search(prompt) is not None,
        _WHICH.search(prompt) is not None,
        _DEFINITION.search(prompt) is not None,
    )


def prompt_features(prompt: str) -> dict[str, float]:
    """The features of one prompt (see the module docstring for each one's meaning and unit).

    Args:
        prompt: the prompt text (any length; an empty prompt gives all zeros but ``log_chars`` = 0).

    Returns:
        ``{name: value}`` for every name of :data:`FEATURE_NAMES`, in that order.
    """
    chars = len(prompt)
    denominator = max(chars, 1)
    words = prompt.split()
    lines = prompt.split("\n")
    options = [m.group(2).strip() for m in (_OPTION.match(line) for line in lines) if m is not None]
    numeric_options = sum(1 for o in options if o and _NUMERIC_OPTION.match(o))
    digits, upper, compute, statement, passage, which, definition = _counts_and_cues(prompt)
    values = (
        math.log1p(chars),
        math.log1p(len(words)),
        float(min(len(lines), 50)),
        digits / denominator,
        upper / denominator,
        len(_MATH_CHARS.findall(prompt)) / denominator,
        float(min(len(_LATEX.findall(prompt)), 20)),
        float(min(len(_CODE.findall(prompt)), 20)),
        float(min(len(_NUMBER.findall(prompt)), 50)),
        float(len(options)),
        numeric_options / len(options) if options else 0.0,
        sum(len(o.split()) for o in options) / len(options) if options else 0.0,
        float(min(prompt.count("?"), 10)),
        float(compute),
        float(statement),
        float(bool(_NEGATION.search(prompt))),
        float(passage),
        float(which),
        float(definition),
    )
    return dict(zip(FEATURE_NAMES, values, strict=True))


def feature_vector(prompt: str) -> np.ndarray:
    """The features of ``prompt`` as a float64 array of shape ``(len(FEATURE_NAMES),)``."""
    return np.fromiter(prompt_features(prompt).values(), dtype=np.float64, count=len(FEATURE_NAMES))


def feature_matrix(prompts: list[str] | tuple[str, ...]) -> np.ndarray:
    """The features of many prompts: float64 of shape ``(len(prompts), len(FEATURE_NAMES))``."""
    out = np.zeros((len(prompts), len(FEATURE_NAMES)), dtype=np.float64)
    for i, p in enumerate(prompts):
        out[i] = feature_vector(p)
    return out
