"""Agent health: failing streaks, loops, stalls on event time and runaway tokens/cost versus peers."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from configuration.schemas import HealingThresholds
from processors.healing.agent_health import AgentHealth

T0 = datetime(2025, 11, 18, 23, 0, tzinfo=UTC)
TOOL, LLM, LIFE = "sophia.agent.ToolCall", "sophia.agent.LlmCall", "sophia.agent.RunLifecycle"


def tool(
    run: str, step: int, s: float, command: str, rc: int | None, timed_out: bool = False
) -> dict[str, Any]:
    return {"run_id": run, "step": step, "event_time": T0 + timedelta(seconds=s), "command": command,
            "return_code": rc, "timed_out": timed_out}  # fmt: skip


def llm(run: str, step: int, s: float, tokens: int, cost: float | None) -> dict[str, Any]:
    return {"run_id": run, "step": step, "event_time": T0 + timedelta(seconds=s), "prompt_tokens": tokens,
            "completion_tokens": 0, "cost_usd": cost}  # fmt: skip


def monitor(**kw: object) -> AgentHealth:
    base = dict(
        failing_streak=2,
        loop_repeats=3,
        loop_window=5,
        stall_seconds=100,
        runaway_factor=2,
        runaway_min_peers=2,
    )
    return AgentHealth(HealingThresholds(**{**base, **kw}), config_version=5)


def test_failing_streak_levels_and_reset() -> None:
    h = monitor()
    out = []
    for i in range(6):
        out += h.on_event(TOOL, tool("r", i + 1, i, f"cmd{i}", 1))
    assert [(d.details["signal"], d.details["level"], d.details["step"]) for d in out] == [
        ("failing_streak", "warn", 2), ("failing_streak", "recommend_restart", 4), ("failing_streak", "escalate", 6)
    ]  # fmt: skip
    assert all(d.config_version == 5 and d.subject == "run:r" for d in out)
    h2 = monitor()
    h2.on_event(TOOL, tool("r", 1, 0, "a", 1))
    h2.on_event(TOOL, tool("r", 2, 1, "b", 0))  # success resets
    assert h2.on_event(TOOL, tool("r", 3, 2, "c", 1)) == []
    assert h2.on_event(TOOL, tool("r", 4, 3, "submit", None)) == []  # a submit neither breaks nor extends
    assert (
        h2.on_event(TOOL, tool("r", 5, 4, "d", None, timed_out=True))[0].details["signal"] == "failing_streak"
    )


def test_loop_counts_whitespace_normalised_repeats_in_the_window() -> None:
    h = monitor(failing_streak=100)
    outs = [
        h.on_event(TOOL, tool("r", i + 1, i, "grep  -n x  f.py" if i % 2 else "grep -n x f.py", 0))
        for i in range(3)
    ]
    assert outs[0] == [] and outs[1] == []
    [d] = outs[2]
    assert (
        d.details["signal"] == "loop"
        and d.details["repeats"] == 3
        and d.details["command"] == "grep -n x f.py"
    )
    h2 = monitor(failing_streak=100)
    for i, c in enumerate(["a", "b", "c", "d", "e", "f", "a", "g", "h", "a"]):
        assert h2.on_event(TOOL, tool("r", i + 1, i, c, 0)) == []  # 'a' never 3 times within the last 5


def test_stall_is_event_time_and_stamped_at_the_threshold() -> None:
    h = monitor(failing_streak=100)
    h.on_event(TOOL, tool("r", 1, 0, "ls", 0))
    h.on_event(TOOL, tool("r", 2, 50, "ls", 0))  # repeated command: no progress
    assert h.advance(T0 + timedelta(seconds=99)) == []
    [d] = h.advance(T0 + timedelta(seconds=150))
    assert d.details["signal"] == "stall" and d.event_time == T0 + timedelta(seconds=100)
    out = h.advance(T0 + timedelta(seconds=400))
    assert [x.details["level"] for x in out] == ["recommend_restart", "escalate"]
    assert [x.event_time for x in out] == [T0 + timedelta(seconds=200), T0 + timedelta(seconds=300)]
    h.on_event(LIFE, {"run_id": "r", "event_time": T0 + timedelta(seconds=401), "phase": "FINISHED"})
    assert h.snapshot() == []


def finish(h: AgentHealth, peer: str, steps: int, tokens: int = 100, s: float = 0) -> None:
    h.on_event(LLM, llm(peer, steps, s, tokens, tokens / 1000))
    h.on_event(LIFE, {"run_id": peer, "event_time": T0 + timedelta(seconds=s + 1), "phase": "FINISHED"})


def test_runaway_versus_finished_peers() -> None:
    h = monitor()
    for peer, tokens in (("p1", 100), ("p2", 300)):
        finish(h, peer, 3, tokens)
    assert h.on_event(LLM, llm("r", 1, 2, 300, 0.3)) == []  # 1.5x the median of 200
    out = h.on_event(LLM, llm("r", 2, 3, 150, None))  # 450 tokens = 2.25x; cost unknown stays 0.3
    assert [(d.details["signal"], d.details["level"]) for d in out] == [("runaway_tokens", "warn")]
    assert out[0].details["peer_median"] == 200 and out[0].details["peers"] == 2


def test_runaway_steps_versus_the_peers_median_step_count() -> None:
    h = monitor()
    finish(h, "p1", 4)
    finish(h, "p2", 6)  # median 5 steps; factor 2: 10 warns, 15 recommends a restart
    outs = [h.on_event(LLM, llm("r", step, 2 + step, 1, None)) for step in range(1, 16)]
    raised = [(d.details["signal"], d.details["level"], d.details["step"]) for o in outs for d in o]
    assert raised == [("runaway_steps", "warn", 10), ("runaway_steps", "recommend_restart", 15)]
    assert outs[9][0].details["peer_median"] == 5


def test_the_trouble_gate_holds_a_warn_until_the_run_is_longer_than_its_peers() -> None:
    h = monitor(failing_streak=100)
    finish(h, "p1", 4)
    finish(h, "p2", 6)  # the median run took 5 steps
    out = []
    for step, command in enumerate(["pytest", "edit", "pytest", "edit", "pytest"], start=1):
        out += h.on_event(TOOL, tool("r", step, 10 + step, command, 0))
    assert out == [] and h.runs["r"].held["loop"][0] == 3  # 3 runs of pytest in 5 commands: held at step 5
    [d] = h.on_event(LLM, llm("r", 6, 16, 1, None))  # step 6 > 5: the held warning is raised now
    assert (d.details["signal"], d.details["level"], d.details["step"]) == ("loop", "warn", 6)
    assert d.details["seen_step"] == 5 and d.details["peer_median_steps"] == 5 and d.details["repeats"] == 3
    assert d.event_time == T0 + timedelta(seconds=16) and h.runs["r"].held == {}
    assert h.on_event(LLM, llm("r", 7, 17, 1, None)) == []  # raised once


def test_the_trouble_gate_lets_a_stronger_level_through_and_can_be_turned_off() -> None:
    h = monitor(failing_streak=100)
    finish(h, "p1", 40)
    finish(h, "p2", 60)
    out = []
    for step in range(1, 5):  # 4 runs of one command in a row: recommend_restart, not held
        out += h.on_event(TOOL, tool("r", step, 10 + step, "cat setup.py", 0))
    assert [(d.details["signal"], d.details["level"], d.details["step"]) for d in out] == [
        ("loop", "recommend_restart", 4)
    ]
    off = monitor(failing_streak=100, trouble_min_step_ratio=0)
    finish(off, "p1", 40)
    finish(off, "p2", 60)
    out = []
    for step in range(1, 4):
        out += off.on_event(TOOL, tool("r", step, 10 + step, "cat setup.py", 0))
    assert [(d.details["signal"], d.details["level"]) for d in out] == [("loop", "warn")]


def test_a_finished_run_drops_what_the_gate_held_and_the_state_round_trips() -> None:
    h = monitor(failing_streak=2)
    finish(h, "p1", 40)
    finish(h, "p2", 60)
    h.on_event(TOOL, tool("r", 1, 10, "a", 1))
    h.on_event(TOOL, tool("r", 2, 11, "b", 1))  # a streak of 2 failures: held (the run is short)
    state = h.dump_state()
    assert state["runs"]["r"]["held"]["failing_streak"][0] == 2 and state["final_steps"] == [40, 60]
    again = AgentHealth(h.thresholds)
    again.load_state(state)
    assert again.dump_state() == state
    old = {**state, "runs": {"r": {k: v for k, v in state["runs"]["r"].items() if k != "held"}}}
    del old["final_steps"]  # a state from before the gate: nothing held, no peer step counts
    older = AgentHealth(h.thresholds)
    older.load_state(old)
    assert older.runs["r"].held == {} and older.dump_state()["final_steps"] == []
    assert (
        h.on_event(LIFE, {"run_id": "r", "event_time": T0 + timedelta(seconds=12), "phase": "FINISHED"}) == []
    )
    assert h.runs["r"].held == {}
