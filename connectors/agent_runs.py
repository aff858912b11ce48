"""Import mini-swe-agent trajectories as agent events (pure parsing: no Kafka here).

Source: trajectory files of the mini-swe-agent coding agent (``*.traj.json``, ``trajectory_format``
``"mini-swe-agent-1"``, mini-swe-agent 1.15), as published in gruckion/mini-swe-agent @ d12a71a :
``swebench_results/20251118_gemini-3-pro-74pct/trajs/``, and the evaluation's ``results.csv``
(``instance_id,resolved,patch_applied``).

A trajectory is ``{"instance_id", "trajectory_format", "info", "messages"}``. ``messages`` is a chat:
a system prompt, the task (user), then pairs of an assistant message (``extra.response`` is the raw
OpenAI-style provider response: ``created`` in unix seconds, ``model``, ``provider``, ``usage``) and a
user message holding the observation of the bash command the assistant wrote. Each run becomes, in
order (key = run id = ``instance_id``; source ``/connectors/mini-swe-agent``):

1. ``sophia.agent.RunLifecycle`` STARTED, at the created time of the first response;
2. per assistant message (``step`` = its 1-based index among assistant messages): an
   ``sophia.agent.LlmCall`` when it carries a response, then a ``sophia.agent.ToolCall`` for its bash
   action when it has exactly one, with the return code and output size of the observation after it;
3. ``sophia.agent.RunLifecycle`` FINISHED, at the created time of the last response, with the outcome
   from ``results.csv`` and the agent's own ``info.exit_status`` and ``info.model_stats``.

Event ids are deterministic (:func:`streams.envelope.deterministic_id`): ``(run_id, step, "llm")``,
``(run_id, step, "tool")``, ``(run_id, "started")``, ``(run_id, "finished")``, so a second import
gives the same ids. Every event of a run has ``correlation_id = deterministic_id(run_id)``; a ToolCall's
``causation_id`` is the id of the LlmCall that issued it, FINISHED's is the id of the event before it;
STARTED and LlmCall carry none.

Odd records are handled, never fixed, and each is reported in :attr:`ParsedRun.problems` (one line,
naming the step). Seen in the 120 runs of the source above:

* **No cost** (146 responses, 4 runs): ``usage.cost`` is absent (these responses came straight from
  Google, ``provider`` ``"google"``, ``model`` without the ``google/`` prefix, ``finish_reason``
  ``"STOP"``); ``cost_usd`` is then null, not zero. The agent's own estimate in ``extra.cost`` is not
  the provider's figure and is not used (it is why ``info.model_stats.instance_cost`` sums higher).
* **Not exactly one bash block** (146 messages: 1 with none, 145 with 2 to 7): the agent rejected the
  message as a format error and ran nothing, so there is an LlmCall but no ToolCall.
* **Provider error inside a response** (1): ``choices[0].error`` is set and the content is cut short;
  the LlmCall is kept as recorded (it was billed).
* **Truncated observation** (129): ``<warning>``, ``<output_head>``, ``<elided_chars>``,
  ``<output_tail>`` instead of ``<output>``; ``output_bytes`` counts the recorded head and tail only.
* **Timeout** (5): "The last command ... timed out and has been killed"; ``return_code`` null,
  ``timed_out`` true, ``output_bytes`` the partial output recorded.
* **Final submit** (every run): the last observation is the submitted diff, not ``<returncode>``;
  ``return_code`` is null and ``output_bytes`` is the size of the submission.

Handled although not seen there (each noted as a problem): a response without ``usage`` (token counts
0, cost null), without ``created`` (the time of the nearest earlier response, else the nearest later
one), without ``model`` (``info.config.model.model_name``, else ``"unknown"``), an assistant message
without a response (a ToolCall with no causation), an observation in no known form (``return_code``
null, ``output_bytes`` of the whole message), a missing observation, and a missing ``instance_id``
(the file name stands in).
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import structlog

from connectors.errors import ResultsFileError, TrajectoryError
from connectors.problems import ImportProblem
from streams.envelope import Event, deterministic_id, format_time

__all__ = [
    "LLM_CALL",
    "OUTCOMES",
    "RUN_LIFECYCLE",
    "SOURCE",
    "TOOL_CALL",
    "TRAJECTORY_FORMAT",
    "ImportProblem",
    "ParsedRun",
    "iter_runs",
    "load_results",
    "parse_trajectory",
    "parse_trajectory_document",
    "summarize",
]

log = structlog.get_logger(__name__)

SOURCE = "/connectors/mini-swe-agent"
TRAJECTORY_FORMAT = "mini-swe-agent-1"
LLM_CALL = "sophia.agent.LlmCall"
TOOL_CALL = "sophia.agent.ToolCall"
RUN_LIFECYCLE = "sophia.agent.RunLifecycle"
OUTCOMES = ("UNKNOWN", "RESOLVED", "UNRESOLVED")
"""The symbols of the Avro enum ``sophia.agent.RunOutcome``."""

_TRAJ_SUFFIX = ".traj.json"
_RESULTS_FILE = "results.csv"
# mini-swe-agent's own action rule: a fenced ```bash block; exactly one is accepted.
_BASH_BLOCK = re.compile(r"```bash\s*\n(.*?)\n```", re.DOTALL)
_RETURNCODE = re.compile(r"\A<returncode>(-?\d+)</returncode>\n")
_TIMEOUT = re.compile(r"\AThe last command <command>.*?</command> timed out and has been killed\.", re.DOTALL)
_ELIDED = re.compile(r"<elided_chars>\n(\d+) characters elided\n</elided_chars>")


@dataclass(frozen=True, slots=True, kw_only=True)
class ParsedRun:
    """One trajectory read into events.

    Attributes:
        run_id: the run (the SWE-bench ``instance_id``); the key of every event.
        path: the trajectory file, or ``None`` when the document did not come from a file.
        events: STARTED, then per step LlmCall and ToolCall, then FINISHED, in event-time order.
        problems: one line per odd record that was handled (see the module docstring), in step order.
    """

    run_id: str
    path: Path | None
    events: tuple[Event, ...]
    problems: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class _Observation:
    return_code: int | None
    output_bytes: int
    timed_out: bool
    problem: str | None


def load_results(csv_path: Path) -> dict[str, bool]:
    """Read an evaluation results file: which runs resolved their task.

    Args:
        csv_path: a CSV with a header holding at least ``instance_id`` and ``resolved``
            (``True``/``False``, any case); other columns (``patch_applied``) are ignored.

    Returns:
        ``{instance_id: resolved}``.

    Raises:
        ResultsFileError: the file cannot be read, lacks a column, has a ``resolved`` value that is not
            true/false, or lists an instance twice with different values (names the line).
    """
    try:
        with csv_path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = {"instance_id", "resolved"} - set(reader.fieldnames or ())
            if missing:
                raise ResultsFileError(csv_path, f"missing column(s): {', '.join(sorted(missing))}")
            out: dict[str, bool] = {}
            for row in reader:
                line = reader.line_num
                run_id = (row["instance_id"] or "").strip()
                text = (row["resolved"] or "").strip().lower()
                if not run_id or text not in ("true", "false"):
                    raise ResultsFileError(
                        csv_path, f"line {line}: expected an instance id and True/False, got {row!r}"
                    )
                resolved = text == "true"
                if out.get(run_id, resolved) != resolved:
                    raise ResultsFileError(
                        csv_path, f"line {line}: {run_id} listed twice with different results"
                    )
                out[run_id] = resolved
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise ResultsFileError(csv_path, f"cannot read: {exc}") from exc
    return out


def parse_trajectory(path: Path, outcome: str | None = None) -> ParsedRun:
    """Read one ``*.traj.json`` file into the events of its run.

    Args:
        path: a mini-swe-agent trajectory (format ``mini-swe-agent-1``).
        outcome: the evaluated outcome, one of :data:`OUTCOMES`; ``None`` means ``"UNKNOWN"``.

    Returns:
        The run's events and the odd records met (see the module docstring).

    Raises:
        TrajectoryError: the file cannot be read, is not JSON, or is not a trajectory.
        ValueError: ``outcome`` is not one of :data:`OUTCOMES`.
    """
    return parse_trajectory_document(_read_document(path), path=path, outcome=outcome)


def parse_trajectory_document(
    document: Any, *, path: Path | None = None, outcome: str | None = None
) -> ParsedRun:
    """Turn an already-decoded trajectory (the JSON object) into the events of its run.

    Args:
        document: the decoded JSON of a ``*.traj.json`` file.
        path: where it came from, for messages and :attr:`ParsedRun.path`; ``None`` if not a file.
        outcome: the evaluated outcome, one of :data:`OUTCOMES`; ``None`` means ``"UNKNOWN"``.

    Returns:
        The run's events and the odd records met (see the module docstring).

    Raises:
        TrajectoryError: the document is not a ``mini-swe-agent-1`` trajectory, or has no LLM response
            with a ``created`` time (a run with no time cannot be placed in the log).
        ValueError: ``outcome`` is not one of :data:`OUTCOMES`.
    """
    outcome = "UNKNOWN" if outcome is None else outcome
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {OUTCOMES}, got {outcome!r}")
    info, messages = _check_document(document, path)
    problems: list[str] = []
    run_id = _run_id(document, path, problems)
    steps = _steps(messages, path)
    times = _step_times(steps, path, problems)

    correlation_id = deterministic_id(run_id)

    def event(schema: str, data: dict[str, Any], event_id: str, causation_id: str | None = None) -> Event:
        return Event.create(
            schema,
            run_id,
            data,
            source=SOURCE,
            time=data["event_time"],
            id=event_id,
            correlation_id=correlation_id,
            causation_id=causation_id,
        )

    events: list[Event] = []
    agent = f"mini-swe-agent {info['mini_version']}" if info.get("mini_version") else "mini-swe-agent"
    started = {
        "run_id": run_id,
        "phase": "STARTED",
        "event_time": times[0],
        "agent": agent,
        "task": run_id,
        "outcome": "UNKNOWN",
        "exit_status": None,
        "reported_cost_usd": None,
        "reported_api_calls": None,
    }
    events.append(event(RUN_LIFECYCLE, started, deterministic_id(run_id, "started")))
    default_model = _default_model(info)
    for number, (message, observation_message, is_last) in enumerate(steps, start=1):
        at = times[number - 1]
        response = (message.get("extra") or {}).get("response")
        llm_id: str | None = None
        if isinstance(response, dict):
            llm_id = deterministic_id(run_id, number, "llm")
            data = _llm_call(run_id, number, at, response, message, default_model, problems)
            events.append(event(LLM_CALL, data, llm_id))
        else:
            problems.append(f"step {number}: assistant message carries no LLM response; no LlmCall")
        commands = _BASH_BLOCK.findall(message["content"])
        if len(commands) != 1:
            problems.append(
                f"step {number}: {len(commands)} bash blocks; the agent rejected it as a format error, "
                "no ToolCall"
            )
            continue
        obs = _observation(observation_message, is_last, info)
        if obs.problem:
            problems.append(f"step {number}: {obs.problem}")
        tool = {
            "run_id": run_id,
            "step": number,
            "event_time": at,
            "tool": "bash",
            "command": commands[0],
            "return_code": obs.return_code,
            "output_bytes": obs.output_bytes,
            "timed_out": obs.timed_out,
        }
        events.append(event(TOOL_CALL, tool, deterministic_id(run_id, number, "tool"), llm_id))
    stats = info.get("model_stats") if isinstance(info.get("model_stats"), dict) else {}
    finished = {
        **started,
        "phase": "FINISHED",
        "event_time": times[-1],
        "outcome": outcome,
        "exit_status": _str_or_none(info.get("exit_status")),
        "reported_cost_usd": _float_or_none(stats.get("instance_cost")),
        "reported_api_calls": _int_or_none(stats.get("api_calls")),
    }
    events.append(
        event(RUN_LIFECYCLE, finished, deterministic_id(run_id, "finished"), events[-1].attributes.id)
    )
    return ParsedRun(run_id=run_id, path=path, events=tuple(events), problems=tuple(problems))


def iter_runs(directory: Path) -> Iterator[ParsedRun | ImportProblem]:
    """Import every trajectory of a results folder, in file-name order.

    Looks for ``*.traj.json`` in ``directory/trajs`` when that folder exists, else in ``directory``,
    and for ``results.csv`` in ``directory`` (else beside the trajectories). Without a results file
    every outcome is ``UNKNOWN``; a run the file does not list is ``UNKNOWN`` too.

    Args:
        directory: the results folder (e.g. ``datasets/agent_runs``).

    Yields:
        A :class:`ParsedRun` per trajectory, or an :class:`ImportProblem` for a file that cannot be
        read, is not JSON or is not a trajectory; the import goes on after it.

    Raises:
        FileNotFoundError: ``directory`` does not exist.
        ResultsFileError: the results file exists but does not parse.
    """
    if not directory.is_dir():
        raise FileNotFoundError(f"no such directory: {directory}")
    trajs = directory / "trajs" if (directory / "trajs").is_dir() else directory
    results_path = next((p for p in (directory / _RESULTS_FILE, trajs / _RESULTS_FILE) if p.is_file()), None)
    results = load_results(results_path) if results_path is not None else {}
    for path in sorted(trajs.glob(f"*{_TRAJ_SUFFIX}")):
        try:
            document = _read_document(path)
            run_id = _run_id(document, path, []) if isinstance(document, dict) else None
            resolved = results.get(run_id) if run_id is not None else None
            outcome = None if resolved is None else ("RESOLVED" if resolved else "UNRESOLVED")
            yield parse_trajectory_document(document, path=path, outcome=outcome)
        except TrajectoryError as exc:
            log.warning("trajectory_skipped", path=str(path), reason=exc.reason)
            yield ImportProblem(path=path, reason=exc.reason)


def summarize(runs: Iterable[ParsedRun | ImportProblem]) -> dict[str, Any]:
    """Totals of an import, for reports (JSON-ready).

    Args:
        runs: what :func:`iter_runs` yields (consumed once).

    Returns:
        ``runs``, ``import_problems`` (files skipped), ``resolved``, ``unresolved``, ``unknown_outcome``,
        ``llm_calls``, ``llm_calls_without_cost``, ``cost_usd`` (sum of the responses' own costs),
        ``reported_cost_usd`` (sum of ``info.model_stats.instance_cost``), ``prompt_tokens``,
        ``completion_tokens``, ``tool_calls``, ``failed_tool_calls`` (non-zero return code),
        ``timed_out_tool_calls``, ``runs_with_problems``, ``problems`` (odd records handled), and
        ``first_event_time`` / ``last_event_time`` (RFC 3339, UTC; ``None`` with no run). USD sums are
        rounded to 6 decimals.
    """
    totals: dict[str, Any] = dict.fromkeys(
        (
            "runs", "import_problems", "resolved", "unresolved", "unknown_outcome", "llm_calls",
            "llm_calls_without_cost", "prompt_tokens", "completion_tokens", "tool_calls",
            "failed_tool_calls", "timed_out_tool_calls", "runs_with_problems", "problems",
        ),
        0,
    )  # fmt: skip
    cost_usd = reported_cost_usd = 0.0
    first: datetime | None = None
    last: datetime | None = None
    for run in runs:
        if isinstance(run, ImportProblem):
            totals["import_problems"] += 1
            continue
        totals["runs"] += 1
        totals["problems"] += len(run.problems)
        totals["runs_with_problems"] += bool(run.problems)
        for ev in run.events:
            d = ev.data
            t = d["event_time"]
            first = t if first is None or t < first else first
            last = t if last is None or t > last else last
            if ev.schema == LLM_CALL:
                totals["llm_calls"] += 1
                totals["prompt_tokens"] += d["prompt_tokens"]
                totals["completion_tokens"] += d["completion_tokens"]
                if d["cost_usd"] is None:
                    totals["llm_calls_without_cost"] += 1
                else:
                    cost_usd += d["cost_usd"]
            elif ev.schema == TOOL_CALL:
                totals["tool_calls"] += 1
                totals["failed_tool_calls"] += d["return_code"] not in (None, 0)
                totals["timed_out_tool_calls"] += d["timed_out"]
            elif d["phase"] == "FINISHED":
                key = {"RESOLVED": "resolved", "UNRESOLVED": "unresolved"}.get(
                    d["outcome"], "unknown_outcome"
                )
                totals[key] += 1
                reported_cost_usd += d["reported_cost_usd"] or 0.0
    totals["cost_usd"] = round(cost_usd, 6)
    totals["reported_cost_usd"] = round(reported_cost_usd, 6)
    totals["first_event_time"] = format_time(first) if first else None
    totals["last_event_time"] = format_time(last) if last else None
    return totals


# --- reading -------------------------------------------------------------------------------------


def _read_document(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes())
    except OSError as exc:
        raise TrajectoryError(path, f"cannot read: {exc.strerror or exc}") from exc
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise TrajectoryError(path, f"not JSON: {exc}") from exc


def _check_document(document: Any, path: Path | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if not isinstance(document, dict):
        raise TrajectoryError(path, f"not a trajectory: a JSON {type(document).__name__}, not an object")
    fmt = document.get("trajectory_format")
    if fmt != TRAJECTORY_FORMAT:
        raise TrajectoryError(path, f"not a {TRAJECTORY_FORMAT} trajectory (trajectory_format={fmt!r})")
    info, messages = document.get("info"), document.get("messages")
    if not isinstance(info, dict) or not isinstance(messages, list):
        raise TrajectoryError(path, "not a trajectory: 'info' must be an object and 'messages' a list")
    for i, m in enumerate(messages):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise TrajectoryError(path, f"messages[{i}] is not a chat message with a role and text content")
    return info, messages


def _run_id(document: dict[str, Any], path: Path | None, problems: list[str]) -> str:
    run_id = document.get("instance_id")
    if isinstance(run_id, str) and run_id:
        return run_id
    if path is not None and path.name.endswith(_TRAJ_SUFFIX) and len(path.name) > len(_TRAJ_SUFFIX):
        problems.append("no instance_id; the run id is taken from the file name")
        return path.name[: -len(_TRAJ_SUFFIX)]
    raise TrajectoryError(path, "no instance_id to identify the run")


def _steps(
    messages: list[dict[str, Any]], path: Path | None
) -> list[tuple[dict[str, Any], dict[str, Any] | None, bool]]:
    """Per assistant message: (message, the user message right after it or None, is it the last one)."""
    steps = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        nxt = messages[i + 1] if i + 1 < len(messages) and messages[i + 1]["role"] == "user" else None
        steps.append((m, nxt, i + 1 == len(messages) - 1))
    if not steps:
        raise TrajectoryError(path, "no assistant message: nothing happened in this run")
    return steps


def _step_times(
    steps: list[tuple[dict[str, Any], dict[str, Any] | None, bool]], path: Path | None, problems: list[str]
) -> list[datetime]:
    """The response ``created`` time of each step; a step without one borrows a neighbour's."""
    raw: list[datetime | None] = []
    for message, _, _ in steps:
        response = (message.get("extra") or {}).get("response")
        created = response.get("created") if isinstance(response, dict) else None
        ok = isinstance(created, int | float) and not isinstance(created, bool)
        raw.append(datetime.fromtimestamp(created, tz=UTC) if ok else None)
    known = [t for t in raw if t is not None]
    if not known:
        raise TrajectoryError(path, "no LLM response with a created time: the run cannot be dated")
    times: list[datetime] = []
    for number, t in enumerate(raw, start=1):
        if t is None:
            earlier = times[-1] if times else None
            t = earlier or next(x for x in raw[number:] if x is not None)
            which = "earlier" if earlier else "later"
            problems.append(f"step {number}: no response.created; using the nearest {which} step's time")
        times.append(t)
    return times


def _default_model(info: dict[str, Any]) -> str:
    config = info.get("config")
    model = config.get("model") if isinstance(config, dict) else None
    name = model.get("model_name") if isinstance(model, dict) else None
    return name if isinstance(name, str) and name else "unknown"


def _llm_call(
    run_id: str,
    step: int,
    at: datetime,
    response: dict[str, Any],
    message: dict[str, Any],
    default_model: str,
    problems: list[str],
) -> dict[str, Any]:
    usage = response.get("usage")
    if not isinstance(usage, dict):
        problems.append(f"step {step}: response has no usage; token counts 0, cost unknown")
        usage = {}
    cost = _float_or_none(usage.get("cost"))
    if cost is None and usage:
        estimate = (message.get("extra") or {}).get("cost")
        note = (
            f" (the agent's own estimate extra.cost={estimate!r} is not used)" if estimate is not None else ""
        )
        problems.append(f"step {step}: usage.cost absent; cost_usd null{note}")
    model = response.get("model")
    if not isinstance(model, str) or not model:
        problems.append(f"step {step}: response names no model; using {default_model!r}")
        model = default_model
    choices = response.get("choices")
    first = choices[0] if isinstance(choices, list) and choices and isinstance(choices[0], dict) else {}
    if first.get("error"):
        error = first["error"]
        text = error.get("message") if isinstance(error, dict) else error
        problems.append(f"step {step}: provider error inside the response: {text!s:.120}")
    prompt_details = usage.get("prompt_tokens_details")
    completion_details = usage.get("completion_tokens_details")
    return {
        "run_id": run_id,
        "step": step,
        "event_time": at,
        "model": model,
        "provider": _str_or_none(response.get("provider")),
        "response_id": _str_or_none(response.get("id")),
        "prompt_tokens": _int_or_none(usage.get("prompt_tokens")) or 0,
        "completion_tokens": _int_or_none(usage.get("completion_tokens")) or 0,
        "cached_tokens": _int_or_none(_get(prompt_details, "cached_tokens")) or 0,
        "reasoning_tokens": _int_or_none(_get(completion_details, "reasoning_tokens")) or 0,
        "cost_usd": cost,
        "finish_reason": _str_or_none(first.get("finish_reason")),
        "latency_ms": None,
    }


def _observation(message: dict[str, Any] | None, is_last: bool, info: dict[str, Any]) -> _Observation:
    """Read the user message that follows a bash action (templates of mini-swe-agent 1.x)."""
    if message is None:
        return _Observation(None, 0, False, "no observation recorded after the action")
    text: str = message["content"]
    rc = _RETURNCODE.match(text)
    if rc:
        body = text[rc.end() :]
        if body.startswith("<output>\n") and body.endswith("</output>"):
            return _Observation(
                int(rc.group(1)), _utf8_len(body[len("<output>\n") : -len("</output>")]), False, None
            )
        output = _head_and_tail(body)
        if output is not None:
            size, elided = output
            note = f"output truncated in the record ({elided} characters elided); output_bytes counts head and tail"
            return _Observation(int(rc.group(1)), size, False, note)
    elif _TIMEOUT.match(text):
        start = text.find("<output>\n")
        end = text.rfind("\n</output>")
        if start >= 0 and end >= start:
            size = _utf8_len(text[start + len("<output>\n") : end])
        else:
            size = (_head_and_tail(text) or (0, 0))[0]
        return _Observation(None, size, True, "command timed out and was killed")
    elif is_last or text == info.get("submission"):
        return _Observation(None, _utf8_len(text), False, None)
    return _Observation(
        None, _utf8_len(text), False, "observation in no known form; output_bytes is the whole message"
    )


def _head_and_tail(body: str) -> tuple[int, int] | None:
    """(UTF-8 bytes of head + tail, characters elided) of a truncated observation, or None."""
    h0, h1 = body.find("<output_head>\n"), body.find("\n</output_head>")
    t0, t1 = body.find("<output_tail>\n"), body.rfind("\n</output_tail>")
    elided = _ELIDED.search(body)
    if min(h0, h1, t0, t1) < 0 or elided is None or not (h0 < h1 < t0 <= t1):
        return None
    head = body[h0 + len("<output_head>\n") : h1]
    tail = body[t0 + len("<output_tail>\n") : t1]
    return _utf8_len(head) + _utf8_len(tail), int(elided.group(1))


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", errors="surrogatepass"))


def _get(mapping: Any, key: str) -> Any:
    return mapping.get(key) if isinstance(mapping, dict) else None


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _float_or_none(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None
