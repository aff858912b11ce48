"""A configured server that is unreachable is one clear line naming it, not a stack trace."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _backbone(*args: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("BACKBONE_")}
    base.update(BACKBONE_STATE_DIR=str(tmp_path), **env)
    return subprocess.run([sys.executable, "-m", "backbone", *args], cwd=ROOT, env=base, capture_output=True,
                          text=True, timeout=60)  # fmt: skip


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (
            ("import", "agent-runs", "datasets/agent_runs"),
            {"BACKBONE_KAFKA__BOOTSTRAP_SERVERS": "127.0.0.1:1"},
            "127.0.0.1:1",
        ),
        (
            ("query", "models"),
            {"BACKBONE_POSTGRES__URL": "postgresql://postgres@127.0.0.1:1/nowhere"},
            "127.0.0.1",
        ),
        (("subscribe", "agent.events"), {}, "backbone dev up"),
    ],
)
def test_unreachable_or_missing_server_is_a_clear_error(
    args: tuple, env: dict, named: str, tmp_path: Path
) -> None:
    """Exit code 2 and an error line naming the server (or how to get one); no traceback."""
    r = _backbone(*args, tmp_path=tmp_path, **env)
    assert r.returncode == 2, r.stdout + r.stderr
    assert "error:" in r.stderr and named in r.stderr
    assert "Traceback" not in r.stderr + r.stdout
