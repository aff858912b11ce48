"""The mini-swe-agent trajectory importer, on the real runs and on the project's copy of 25 of them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import fastavro
import fastavro.validation
import pytest

from core.errors import BackboneError
from connectors import agent_runs, errors
from connectors.agent_runs import (
    LLM_CALL,
    RUN_LIFECYCLE,
    SOURCE,
    TOOL_CALL,
    ImportProblem,
    ParsedRun,
    iter_runs,
    load_results,
    parse_trajectory,
    summarize,
)
from connectors.errors import ConnectorError, ResultsFileError, TrajectoryError
from schemas import AVRO_DIR
from streams.envelope import deterministic_id

REPO = Path(__file__).resolve().parents[2]
SHARED_RUNS = REPO.parent / "shared" / "data" / "agent_runs"
COPY = REPO / "datasets" / "agent_runs"

needs_shared = pytest.mark.skipif(
    not SHARED_RUNS.is_dir(),
    reason=f"real data not present at {SHARED_RUNS} (../shared/data relative to the repo root)",
)


@pytest.fixture(scope="module")
def full_runs() -> list[ParsedRun | ImportProblem]:
    if not SHARED_RUNS.is_dir():
        pytest.skip(f"real data not present at {SHARED_RUNS} (../shared/data relative to the repo root)")
    return list(iter_runs(SHARED_RUNS))


@pytest.fixture(scope="module")
def copy_runs() -> list[ParsedRun | ImportProblem]:
    return list(iter_runs(COPY))


@pytest.fixture(scope="module")
def parsed_schemas() -> dict[str, object]:
    out = {}
    for name in (LLM_CALL, TOOL_CALL, RUN_LIFECYCLE):
        out[name] = fastavro.parse_schema(json.loads((AVRO_DIR / f"{name}.avsc").read_text()))
    return out


def _by_id(runs: list[ParsedRun | ImportProblem]) -> dict[str, ParsedRun]:
    return {r.run_id: r for r in runs if isinstance(r, ParsedRun)}


def _assert_valid_avro(runs: list[ParsedRun | ImportProblem], parsed_schemas: dict[str, object]) -> int:
    n = 0
    for run in runs:
        assert isinstance(run, ParsedRun), run
        for ev in run.events:
            fastavro.validation.validate(dict(ev.data), parsed_schemas[ev.schema], raise_errors=True)
            n += 1
    return n


# --- the facts of the real data --------------------------------------------------------------------


def test_full_data_counts_runs_resolved_and_llm_calls(full_runs: list[ParsedRun | ImportProblem]) -> None:
    """The 120 real runs import with no problem file, 89 resolved, and 4,623 LLM calls."""
    totals = summarize(full_runs)
    assert totals["runs"] == 120
    assert totals["import_problems"] == 0
    assert totals["resolved"] == 89
    assert totals["unresolved"] == 31
    assert totals["unknown_outcome"] == 0
    assert totals["llm_calls"] == 4623


def test_full_data_costs_match_the_published_sums(full_runs: list[ParsedRun | ImportProblem]) -> None:
    """The responses' own costs sum to 51.433 USD and the agent-reported costs to 52.636 USD."""
    totals = summarize(full_runs)
    assert round(totals["cost_usd"], 3) == 51.433
    assert round(totals["reported_cost_usd"], 3) == 52.636
    assert totals["llm_calls_without_cost"] == 146


def test_full_data_calls_are_dated_on_the_night_of_the_run(
    full_runs: list[ParsedRun | ImportProblem],
) -> None:
    """Every event lies between 2025-11-18 22:55 and 2025-11-19 00:45 UTC, inclusive of those minutes."""
    totals = summarize(full_runs)
    assert totals["first_event_time"].startswith("2025-11-18T22:55")
    assert totals["last_event_time"].startswith("2025-11-19T00:45")


def test_full_data_events_validate_against_their_avro_schemas(
    full_runs: list[ParsedRun | ImportProblem], parsed_schemas: dict[str, object]
) -> None:
    """Every data dict of the 120 runs is a valid datum of its .avsc (two lifecycle events per run)."""
    totals = summarize(full_runs)
    n = _assert_valid_avro(full_runs, parsed_schemas)
    assert n == totals["llm_calls"] + totals["tool_calls"] + 2 * totals["runs"]


def test_full_data_import_is_deterministic(full_runs: list[ParsedRun | ImportProblem]) -> None:
    """A second import of the real data gives the same event ids and data, in the same order."""
    again = list(iter_runs(SHARED_RUNS))
    assert [[e.attributes.id for e in r.events] for r in again] == [
        [e.attributes.id for e in r.events] for r in full_runs
    ]
    assert [[dict(e.data) for e in r.events] for r in again] == [
        [dict(e.data) for e in r.events] for r in full_runs
    ]


# --- the project's copy -----------------------------------------------------------------------------


def test_copy_totals_are_those_the_readme_states(copy_runs: list[ParsedRun | ImportProblem]) -> None:
    """The 25-run copy gives the totals written in datasets/README.md."""
    totals = summarize(copy_runs)
    assert totals["runs"] == 25
    assert totals["import_problems"] == 0
    assert (totals["resolved"], totals["unresolved"], totals["unknown_outcome"]) == (13, 12, 0)
    assert totals["llm_calls"] == 856
    assert totals["llm_calls_without_cost"] == 146
    assert round(totals["cost_usd"], 3) == 7.799
    assert round(totals["reported_cost_usd"], 3) == 9.002
    assert totals["tool_calls"] == 824
    assert totals["failed_tool_calls"] == 45
    assert totals["timed_out_tool_calls"] == 1
    assert totals["first_event_time"] == "2025-11-18T22:55:07.000Z"
    assert totals["last_event_time"] == "2025-11-19T00:43:06.000Z"


def test_copy_events_validate_against_their_avro_schemas(
    copy_runs: list[ParsedRun | ImportProblem], parsed_schemas: dict[str, object]
) -> None:
    """Every data dict of the copy is a valid datum of its .avsc."""
    assert _assert_valid_avro(copy_runs, parsed_schemas) == 856 + 824 + 2 * 25


def test_copy_import_is_deterministic(copy_runs: list[ParsedRun | ImportProblem]) -> None:
    """Parsing a copied file twice gives equal event ids, and they are the documented UUIDv5s."""
    run = _by_id(copy_runs)["astropy__astropy-14096"]
    again = parse_trajectory(COPY / "trajs" / "astropy__astropy-14096.traj.json", "RESOLVED")
    assert [e.attributes.id for e in again.events] == [e.attributes.id for e in run.events]
    assert again.events[0].attributes.id == deterministic_id(run.run_id, "started")
    assert again.events[1].attributes.id == deterministic_id(run.run_id, 1, "llm")
    assert again.events[2].attributes.id == deterministic_id(run.run_id, 1, "tool")
    assert again.events[-1].attributes.id == deterministic_id(run.run_id, "finished")


@needs_shared
def test_copy_is_an_unchanged_subset_of_the_source() -> None:
    """Every copied trajectory, the LICENSE and the results rows are byte-for-byte those of the source."""
    assert (COPY / "LICENSE").read_bytes() == (SHARED_RUNS / "LICENSE").read_bytes()
    for path in (COPY / "trajs").glob("*.traj.json"):
        assert path.read_bytes() == (SHARED_RUNS / "trajs" / path.name).read_bytes(), path.name
    source_lines = (SHARED_RUNS / "results.csv").read_text().splitlines()
    copy_lines = (COPY / "results.csv").read_text().splitlines()
    assert copy_lines[0] == source_lines[0]
    assert set(copy_lines[1:]) <= set(source_lines[1:])
    assert len(copy_lines) == 26


# --- shape of a run -------------------------------------------------------------------------------


def test_run_events_are_ordered_and_linked(copy_runs: list[ParsedRun | ImportProblem]) -> None:
    """A run opens with STARTED, closes with FINISHED, keeps event time order, and links causes and correlation."""
    for run in _by_id(copy_runs).values():
        events = run.events
        assert events[0].data["phase"] == "STARTED" and events[-1].data["phase"] == "FINISHED"
        assert events[-1].attributes.causation_id == events[-2].attributes.id
        assert len({e.attributes.id for e in events}) == len(events)
        times = [e.data["event_time"] for e in events]
        assert times == sorted(times)
        assert events[0].data["event_time"] == events[1].data["event_time"]
        llm_ids = {e.data["step"]: e.attributes.id for e in events if e.schema == LLM_CALL}
        for e in events:
            assert e.key == run.run_id == e.data["run_id"] == e.attributes.subject
            assert e.attributes.source == SOURCE
            assert e.attributes.type == e.schema
            assert e.attributes.correlation_id == deterministic_id(run.run_id)
            assert e.data["event_time"].tzinfo is not None
            if e.schema == TOOL_CALL:
                assert e.attributes.causation_id == llm_ids[e.data["step"]]
        finished = events[-1].data
        assert finished["reported_api_calls"] == len(llm_ids)
        assert finished["exit_status"] == "Submitted"
        assert finished["agent"] == "mini-swe-agent 1.15.0"


def test_the_final_submit_has_no_return_code_and_counts_the_submitted_diff(
    copy_runs: list[ParsedRun | ImportProblem],
) -> None:
    """The last ToolCall of a run is the submit, with a null return code and the diff's size as output."""
    doc = json.loads((COPY / "trajs" / "sympy__sympy-23534.traj.json").read_text())
    last = [e for e in _by_id(copy_runs)["sympy__sympy-23534"].events if e.schema == TOOL_CALL][-1].data
    assert "COMPLETE_TASK_AND_SUBMIT_FINAL_OUTPUT" in last["command"]
    assert last["return_code"] is None
    assert last["output_bytes"] == len(doc["info"]["submission"].encode()) > 0


def test_a_plain_observation_gives_return_code_and_output_size(
    copy_runs: list[ParsedRun | ImportProblem],
) -> None:
    """Step 1 of astropy__astropy-14096 ran `find` with return code 0 and 40 bytes of output."""
    tool = _by_id(copy_runs)["astropy__astropy-14096"].events[2].data
    assert tool["command"] == "find . -name sky_coordinate.py"
    assert (tool["return_code"], tool["output_bytes"], tool["timed_out"]) == (0, 40, False)


# --- odd records, handled and reported ---------------------------------------------------------------


def test_responses_without_cost_have_null_cost_and_are_reported(
    copy_runs: list[ParsedRun | ImportProblem],
) -> None:
    """The 33 responses of django__django-14672 that carry no usage.cost get cost_usd None, each reported."""
    run = _by_id(copy_runs)["django__django-14672"]
    calls = [e.data for e in run.events if e.schema == LLM_CALL]
    assert len(calls) == 33
    assert all(c["cost_usd"] is None for c in calls)
    assert all(c["prompt_tokens"] > 0 for c in calls)
    assert sum("usage.cost absent" in p for p in run.problems) == 33


def test_a_message_without_exactly_one_bash_block_has_no_tool_call(
    copy_runs: list[ParsedRun | ImportProblem],
) -> None:
    """An assistant message with 0 or several bash blocks yields an LlmCall and no ToolCall, and is reported."""
    run = _by_id(copy_runs)["django__django-12663"]
    llm_steps = {e.data["step"] for e in run.events if e.schema == LLM_CALL}
    tool_steps = {e.data["step"] for e in run.events if e.schema == TOOL_CALL}
    rejected = llm_steps - tool_steps
    assert len(rejected) == 5
    assert all(
        any(p.startswith(f"step {s}: ") and "bash blocks" in p for p in run.problems) for s in rejected
    )
    assert any("0 bash blocks" in p for p in run.problems)
    assert any("provider error inside the response" in p for p in run.problems)


def test_a_timed_out_command_has_no_return_code(copy_runs: list[ParsedRun | ImportProblem]) -> None:
    """The command of pydata__xarray-6744 that timed out is a ToolCall with timed_out and a null return code."""
    run = _by_id(copy_runs)["pydata__xarray-6744"]
    timed_out = [e.data for e in run.events if e.schema == TOOL_CALL and e.data["timed_out"]]
    assert len(timed_out) == 1
    assert timed_out[0]["return_code"] is None
    assert timed_out[0]["command"] == "pytest xarray/tests/test_rolling.py"
    assert timed_out[0]["output_bytes"] > 0
    assert any("timed out" in p for p in run.problems)


def test_a_truncated_observation_keeps_its_return_code(copy_runs: list[ParsedRun | ImportProblem]) -> None:
    """An observation with elided output still gives its return code, and the truncation is reported."""
    run = _by_id(copy_runs)["pylint-dev__pylint-7277"]
    truncated = [p for p in run.problems if "output truncated in the record" in p]
    assert len(truncated) == 6
    step = int(truncated[0].split(":")[0].removeprefix("step "))
    tool = next(e.data for e in run.events if e.schema == TOOL_CALL and e.data["step"] == step)
    assert tool["return_code"] is not None
    assert tool["output_bytes"] >= 10000  # head and tail of 5,000 characters each


# --- files that are not trajectories ----------------------------------------------------------------


def test_bad_files_become_import_problems_and_the_rest_imports(tmp_path: Path) -> None:
    """A file that is not JSON and a JSON file that is not a trajectory are skipped as ImportProblems."""
    trajs = tmp_path / "trajs"
    trajs.mkdir()
    for name in ("astropy__astropy-14096", "sympy__sympy-23534"):
        shutil.copy(COPY / "trajs" / f"{name}.traj.json", trajs)
    (trajs / "broken.traj.json").write_text('{"info": {"exit_status": ')
    (trajs / "other.traj.json").write_text(json.dumps({"hello": "world"}))
    (tmp_path / "results.csv").write_text(
        "instance_id,resolved,patch_applied\nastropy__astropy-14096,True,True\n"
    )

    results = list(iter_runs(tmp_path))

    problems = {r.path.name: r.reason for r in results if isinstance(r, ImportProblem)}
    assert set(problems) == {"broken.traj.json", "other.traj.json"}
    assert problems["broken.traj.json"].startswith("not JSON")
    assert "trajectory_format" in problems["other.traj.json"]
    outcomes = {r.run_id: r.events[-1].data["outcome"] for r in results if isinstance(r, ParsedRun)}
    assert outcomes == {"astropy__astropy-14096": "RESOLVED", "sympy__sympy-23534": "UNKNOWN"}
    totals = summarize(results)
    assert (totals["runs"], totals["import_problems"], totals["unknown_outcome"]) == (2, 2, 1)


def test_parse_trajectory_raises_trajectory_error_for_a_non_trajectory(tmp_path: Path) -> None:
    """parse_trajectory raises TrajectoryError (a ConnectorError and ValueError) naming the file."""
    path = tmp_path / "x.traj.json"
    path.write_text("[1, 2, 3]")
    with pytest.raises(TrajectoryError) as info:
        parse_trajectory(path)
    assert info.value.path == path
    assert isinstance(info.value, ConnectorError) and isinstance(info.value, ValueError)
    assert isinstance(info.value, BackboneError)


def test_parse_trajectory_refuses_an_unknown_outcome() -> None:
    """An outcome outside the RunOutcome symbols is refused with ValueError."""
    with pytest.raises(ValueError, match="outcome"):
        parse_trajectory(COPY / "trajs" / "sympy__sympy-23534.traj.json", "PASSED")


def test_load_results_reads_the_copy_and_refuses_a_bad_file(tmp_path: Path) -> None:
    """load_results maps instance ids to booleans and raises ResultsFileError on a value that is not True/False."""
    results = load_results(COPY / "results.csv")
    assert len(results) == 25 and sum(results.values()) == 13
    bad = tmp_path / "results.csv"
    bad.write_text("instance_id,resolved\nx,maybe\n")
    with pytest.raises(ResultsFileError, match="line 2"):
        load_results(bad)


def test_public_names_exist() -> None:
    """Every name in the modules' __all__ is defined."""
    for module in (agent_runs, errors):
        for name in module.__all__:
            assert hasattr(module, name), (module.__name__, name)
