"""The environment the deployments set (docker-compose.yml, deploy/k8s) gives a processor its /metrics on the
port Prometheus and the probes use: ``BACKBONE_PROCESSORS_WEB_PORT=0`` (Faust's own web server off, from
before the worker shell) must not move ``/healthz`` off ``BACKBONE_METRICS_PORT``."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from core.settings import Settings

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_the_deployments_web_port_zero_keeps_metrics_on_the_metrics_port(
    settings: Settings, tmp_path: Path
) -> None:
    command, legacy = ["processors", "worker"], "BACKBONE_PROCESSORS_WEB_PORT"
    port = _free_port()
    env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
           "BACKBONE_STATE_DIR": str(tmp_path), "BACKBONE_METRICS_PORT": str(port), legacy: "0",
           "BACKBONE_METRICS_HOST": "127.0.0.1"}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "backbone", *command], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()[-3000:] if proc.stdout else ""
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.monotonic() < deadline, f"/healthz never answered on {port}"
                time.sleep(0.5)
    finally:
        proc.terminate()
        proc.wait(30)
