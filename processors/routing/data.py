"""Labelled outcomes of routing: which models answered each prompt right, read from RouteLLM's files.

* :class:`LabelledPrompts`: a strong/weak pair of outcomes (the two-model case the scorers fit on).
* :class:`ModelOutcomes`: N models, a bool matrix ``(n prompts, m models)``; :meth:`ModelOutcomes.pair`
  gives the :class:`LabelledPrompts` of two of them.
* Readers of the real sets of lm-sys/RouteLLM @ 0b64fda (Apache-2.0): :func:`read_mmlu` (the folder of
  ``mmlu_<subject>.csv``) and :func:`read_responses_csv` (one CSV with a ``prompt`` column, one
  True/False correctness column per model named by the model, and ``<model>_response`` columns: the
  layout of ``routellm/evals/gsm8k/gsm8k_responses.csv``). :func:`read_outcomes` picks by path.
* A fixed split (:func:`is_test_prompt`): a prompt is in the test split when the first 8 bytes of its
  SHA-256, as an integer, modulo 100 are below ``test_percent`` (20). No randomness; equal prompts
  always land on the same side.
"""

from __future__ import annotations

import csv
import hashlib
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from processors.routing.errors import RoutingDataError

__all__ = [
    "CONTAMINATED_FILE",
    "DEFAULT_TEST_PERCENT",
    "PROVIDERS",
    "STRONG_MODEL",
    "WEAK_MODEL",
    "LabelledPrompts",
    "ModelOutcomes",
    "is_test_prompt",
    "read_mmlu",
    "read_outcomes",
    "read_responses_csv",
    "split",
]

STRONG_MODEL = "gpt-4-1106-preview"
WEAK_MODEL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
PROVIDERS = {STRONG_MODEL: "openai", WEAK_MODEL: "mistralai"}
"""Provider of each model the MMLU outcomes name."""
DEFAULT_TEST_PERCENT = 20
CONTAMINATED_FILE = "mmlu_contaminated_prompts.jsonl"


@dataclass(frozen=True, slots=True)
class LabelledPrompts:
    """Prompts with which model answered each right.

    Attributes:
        prompts: the prompt texts, shape ``(n,)``.
        strong_correct: bool array ``(n,)``, the strong model was right.
        weak_correct: bool array ``(n,)``, the weak model was right.
        subjects: where each prompt came from (MMLU subject, or any label), ``(n,)``.
        excluded_count: prompts dropped while reading (contaminated), not in the arrays.
    """

    prompts: tuple[str, ...]
    strong_correct: np.ndarray
    weak_correct: np.ndarray
    subjects: tuple[str, ...] = ()
    excluded_count: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    @classmethod
    def from_rows(cls, rows: Iterable[tuple[str, bool, bool]], subject: str = "") -> LabelledPrompts:
        """Build from ``(prompt, strong right, weak right)`` rows (hand-written data, tests)."""
        rows = list(rows)
        return cls(
            prompts=tuple(r[0] for r in rows),
            strong_correct=np.array([bool(r[1]) for r in rows], dtype=bool),
            weak_correct=np.array([bool(r[2]) for r in rows], dtype=bool),
            subjects=tuple(subject for _ in rows),
        )

    def subset(self, mask: np.ndarray) -> LabelledPrompts:
        """The prompts where the bool array ``mask`` (shape ``(n,)``) is true, in order."""
        idx = np.flatnonzero(mask)
        return LabelledPrompts(
            prompts=tuple(self.prompts[i] for i in idx),
            strong_correct=self.strong_correct[idx],
            weak_correct=self.weak_correct[idx],
            subjects=tuple(self.subjects[i] for i in idx) if self.subjects else (),
            excluded_count=0,
        )

    @property
    def gain(self) -> np.ndarray:
        """Per prompt, strong right minus weak right: int8 in {-1, 0, 1}, shape ``(n,)``."""
        return self.strong_correct.astype(np.int8) - self.weak_correct.astype(np.int8)

    def summary(self) -> dict[str, float]:
        """Counts and shares: prompts, strong/weak accuracy, only-strong and only-weak right shares."""
        n = max(len(self), 1)
        s, w = self.strong_correct, self.weak_correct
        return {
            "prompts_count": float(len(self)),
            "strong_accuracy": float(s.sum() / n),
            "weak_accuracy": float(w.sum() / n),
            "only_strong_share": float((s & ~w).sum() / n),
            "only_weak_share": float((w & ~s).sum() / n),
            "excluded_count": float(self.excluded_count),
        }


def _bool_cell(value: str, where: str) -> bool:
    if value == "True":
        return True
    if value == "False":
        return False
    raise RoutingDataError(f"{where}: expected True or False, got {value!r}")


def _contaminated(directory: Path) -> set[str] | None:
    """The ``eval_prompt`` texts of ``mmlu_contaminated_prompts.jsonl`` in ``directory`` or its parent."""
    for candidate in (directory / CONTAMINATED_FILE, directory.parent / CONTAMINATED_FILE):
        if candidate.is_file():
            out = set()
            for lineno, line in enumerate(candidate.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    item = json.loads(line)
                    out.add(item["eval_prompt"] if isinstance(item, dict) else str(item))
                except (ValueError, KeyError) as exc:
                    raise RoutingDataError(
                        f"{candidate}:{lineno}: not a contaminated-prompt record: {exc}"
                    ) from exc
            return out
    return None


def read_mmlu(
    directory: Path | str,
    *,
    subjects: Sequence[str] | None = None,
    exclude_contaminated: bool = True,
    strong_model: str = STRONG_MODEL,
    weak_model: str = WEAK_MODEL,
) -> LabelledPrompts:
    """Read RouteLLM's MMLU outcomes: ``mmlu_<subject>.csv`` with columns ``prompt,<weak>,<strong>``.

    Source: lm-sys/RouteLLM @ 0b64fda ``routellm/evals/mmlu/`` (Apache-2.0), copied under
    ``../shared/data/routing/mmlu``. Prompts are multi-line quoted CSV fields; the model columns hold
    ``True``/``False``. ``mmlu_contaminated_prompts.jsonl`` (in ``directory`` or its parent; each line a
    JSON object whose ``eval_prompt`` is a prompt to exclude) may be absent: then nothing is excluded.

    Args:
        directory: the folder of the CSV files.
        subjects: read only these subjects (``abstract_algebra``, ...); default all, sorted by file name.
        exclude_contaminated: drop the prompts listed as contaminated (when the file exists).
        strong_model, weak_model: the column names of the two models.

    Returns:
        The outcomes in file then row order (the real set: 14,042 prompts with nothing excluded; GPT-4
        right on 80.6 %, Mixtral on 68.1 %, only Mixtral on 5.3 %).

    Raises:
        RoutingDataError: no CSV file, a missing model column, or a cell other than True/False.
    """
    directory = Path(directory)
    files = sorted(directory.glob("mmlu_*.csv"))
    if subjects is not None:
        wanted = {f"mmlu_{s}.csv" for s in subjects}
        missing = wanted - {f.name for f in files}
        if missing:
            raise RoutingDataError(f"{directory}: no file {', '.join(sorted(missing))}")
        files = [f for f in files if f.name in wanted]
    if not files:
        raise RoutingDataError(f"{directory}: no mmlu_*.csv file")
    excluded = _contaminated(directory) if exclude_contaminated else None
    prompts: list[str] = []
    strong: list[bool] = []
    weak: list[bool] = []
    subject_of: list[str] = []
    excluded_count = 0
    for path in files:
        subject = path.stem.removeprefix("mmlu_")
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None) or []
            try:
                pi, si, wi = header.index("prompt"), header.index(strong_model), header.index(weak_model)
            except ValueError:
                raise RoutingDataError(
                    f"{path}: header {header!r} lacks prompt, {strong_model!r} or {weak_model!r}"
                ) from None
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if len(row) != len(header):
                    raise RoutingDataError(f"{where}: {len(row)} cells, expected {len(header)}")
                if excluded is not None and row[pi] in excluded:
                    excluded_count += 1
                    continue
                prompts.append(row[pi])
                strong.append(_bool_cell(row[si], where))
                weak.append(_bool_cell(row[wi], where))
                subject_of.append(subject)
    return LabelledPrompts(
        prompts=tuple(prompts),
        strong_correct=np.array(strong, dtype=bool),
        weak_correct=np.array(weak, dtype=bool),
        subjects=tuple(subject_of),
        excluded_count=excluded_count,
    )


def is_test_prompt(prompt: str, test_percent: int = DEFAULT_TEST_PERCENT) -> bool:
    """Whether ``prompt`` is in the test split: ``int(sha256(prompt)[:8]) % 100 < test_percent``."""
    return int.from_bytes(hashlib.sha256(prompt.encode("utf-8")).digest()[:8], "big") % 100 < test_percent


def split(data: Any, test_percent: int = DEFAULT_TEST_PERCENT, *, by: str = "prompt") -> tuple[Any, Any]:
    """The fixed (train, test) split of ``data`` (:class:`LabelledPrompts` or :class:`ModelOutcomes`).

    ``by="prompt"``: each prompt by :func:`is_test_prompt`. ``by="subject"``: whole subjects (MMLU
    subject, file stem) by the same hash rule applied to the subject name, so no test subject is seen
    in training (a harder, transfer-like protocol).

    Raises:
        ValueError: ``by`` is neither ``prompt`` nor ``subject``.
    """
    if by == "prompt":
        test = np.array([is_test_prompt(p, test_percent) for p in data.prompts], dtype=bool)
    elif by == "subject":
        test = np.array([is_test_prompt("subject:" + s, test_percent) for s in data.subjects], dtype=bool)
    else:
        raise ValueError(f"split by prompt or subject, not {by!r}")
    return data.subset(~test), data.subset(test)


@dataclass(frozen=True, slots=True)
class ModelOutcomes:
    """Prompts with, for each of N models, whether it answered right.

    Attributes:
        prompts: the prompt texts, ``(n,)``.
        models: the model names, ``(m,)``, in column order.
        correct: bool matrix ``(n, m)``: ``correct[i, j]`` = model ``j`` was right on prompt ``i``.
        subjects: a label per prompt (MMLU subject, file stem), ``(n,)``.
        excluded_count: prompts dropped while reading (contaminated).
    """

    prompts: tuple[str, ...]
    models: tuple[str, ...]
    correct: np.ndarray
    subjects: tuple[str, ...] = ()
    excluded_count: int = 0

    def __len__(self) -> int:
        return len(self.prompts)

    def column(self, model: str) -> np.ndarray:
        """The bool outcomes of ``model``, ``(n,)``.

        Raises:
            RoutingDataError: ``model`` is not one of :attr:`models`.
        """
        if model not in self.models:
            raise RoutingDataError(f"no outcomes of model {model!r}; known: {', '.join(self.models)}")
        return self.correct[:, self.models.index(model)]

    def accuracies(self) -> dict[str, float]:
        """Accuracy of each model (share of prompts it got right)."""
        n = max(len(self), 1)
        return {m: float(self.correct[:, j].sum() / n) for j, m in enumerate(self.models)}

    def subset(self, mask: np.ndarray) -> ModelOutcomes:
        """The prompts where bool ``mask`` ``(n,)`` is true, in order."""
        idx = np.flatnonzero(mask)
        return ModelOutcomes(
            prompts=tuple(self.prompts[i] for i in idx),
            models=self.models,
            correct=self.correct[idx],
            subjects=tuple(self.subjects[i] for i in idx) if self.subjects else (),
        )

    def pair(self, strong: str | None = None, weak: str | None = None) -> LabelledPrompts:
        """The strong/weak outcomes of two models (default: the most and least accurate, first on ties).

        Raises:
            RoutingDataError: fewer than two models, an unknown name, or the same model twice.
        """
        if len(self.models) < 2:
            raise RoutingDataError(f"need outcomes of two models, got {list(self.models)}")
        acc = self.accuracies()
        ranked = sorted(self.models, key=lambda m: (-acc[m], self.models.index(m)))
        strong = strong or (
            STRONG_MODEL if STRONG_MODEL in self.models and weak != STRONG_MODEL else ranked[0]
        )
        weak = weak or (WEAK_MODEL if WEAK_MODEL in self.models and strong != WEAK_MODEL else ranked[-1])
        if strong == weak:
            raise RoutingDataError(f"strong and weak model are both {strong!r}")
        return LabelledPrompts(
            prompts=self.prompts,
            strong_correct=self.column(strong).copy(),
            weak_correct=self.column(weak).copy(),
            subjects=self.subjects,
            excluded_count=self.excluded_count,
        )

    @classmethod
    def from_pair(
        cls, data: LabelledPrompts, strong: str = STRONG_MODEL, weak: str = WEAK_MODEL
    ) -> ModelOutcomes:
        """The two-model outcomes of ``data`` (columns ``strong``, ``weak``)."""
        return cls(
            prompts=data.prompts,
            models=(strong, weak),
            correct=np.stack([data.strong_correct, data.weak_correct], axis=1).astype(bool),
            subjects=data.subjects,
            excluded_count=data.excluded_count,
        )


def _bool_or_none(value: str) -> bool | None:
    v = value.strip()
    if v in ("True", "true", "1", "1.0"):
        return True
    if v in ("False", "false", "0", "0.0"):
        return False
    return None


def read_responses_csv(
    path: Path | str, *, models: Sequence[str] | None = None, exclude_contaminated: bool = True
) -> ModelOutcomes:
    """Read a RouteLLM responses CSV (the layout of ``routellm/evals/gsm8k/gsm8k_responses.csv``).

    Columns: ``prompt``; per model a correctness column named by the model (``True``/``False``) and
    usually ``<model>_response`` (the answer text, ignored here); other columns are ignored. A model
    column is one whose ``<name>_response`` twin exists, or, without any ``_response`` column, every
    column other than ``prompt`` whose cells are all True/False. Rows with an empty correctness cell
    are skipped (counted in ``excluded_count``). ``mmlu_contaminated_prompts.jsonl`` beside the file or
    in its parent, when present, excludes the prompts it lists.

    Args:
        path: the CSV file.
        models: read only these model columns (default: every one found).
        exclude_contaminated: drop listed prompts when the list file exists.

    Returns:
        :class:`ModelOutcomes` in row order.

    Raises:
        RoutingDataError: no ``prompt`` column, fewer than one model column, a named model missing, or a
            correctness cell other than True/False/empty.
    """
    path = Path(path)
    if not path.is_file():
        raise RoutingDataError(f"{path}: no such responses CSV")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    excluded = _contaminated(path.parent) if exclude_contaminated else None
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None) or []
        rows = list(reader)
    if "prompt" not in header:
        raise RoutingDataError(f"{path}: header {header[:8]!r} has no 'prompt' column")
    pi = header.index("prompt")
    found = [h for h in header if f"{h}_response" in header]
    if not found:
        found = [
            h for j, h in enumerate(header)
            if h != "prompt" and rows and all(_bool_or_none(r[j]) is not None for r in rows if len(r) == len(header))
        ]  # fmt: skip
    if models is not None:
        missing = [m for m in models if m not in header]
        if missing:
            raise RoutingDataError(f"{path}: no column {', '.join(missing)}")
        found = list(models)
    if not found:
        raise RoutingDataError(f"{path}: no model correctness column (a column named by a model, True/False)")
    cols = [header.index(m) for m in found]
    prompts: list[str] = []
    correct: list[list[bool]] = []
    skipped = 0
    for lineno, row in enumerate(rows, 2):
        if len(row) != len(header):
            raise RoutingDataError(f"{path}: row {lineno}: {len(row)} cells, expected {len(header)}")
        if excluded is not None and row[pi] in excluded:
            skipped += 1
            continue
        cells = [row[j].strip() for j in cols]
        if any(c == "" for c in cells):
            skipped += 1
            continue
        values = [_bool_or_none(c) for c in cells]
        if any(v is None for v in values):
            bad = next(c for c, v in zip(cells, values, strict=True) if v is None)
            raise RoutingDataError(f"{path}: row {lineno}: expected True or False, got {bad!r}")
        prompts.append(row[pi])
        correct.append([bool(v) for v in values])
    return ModelOutcomes(
        prompts=tuple(prompts),
        models=tuple(found),
        correct=np.array(correct, dtype=bool).reshape(len(prompts), len(found)),
        subjects=tuple(path.stem for _ in prompts),
        excluded_count=skipped,
    )


def read_outcomes(path: Path | str, *, exclude_contaminated: bool = True) -> ModelOutcomes:
    """Outcomes from a folder of ``mmlu_<subject>.csv`` (:func:`read_mmlu`) or one responses CSV.

    Raises:
        RoutingDataError: see the two readers.
    """
    path = Path(path)
    if path.is_dir():
        return ModelOutcomes.from_pair(read_mmlu(path, exclude_contaminated=exclude_contaminated))
    return read_responses_csv(path, exclude_contaminated=exclude_contaminated)
