"""The outbox relay through a broker outage and a PostgreSQL outage: it resumes without gaps.

Checked by comparing the config topic with the notification log (every stored event once, in
version order per key). Runs on a private stack so the shared one is never taken down.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from pydantic import SecretStr

from backbone.devstack import DevStack
from backbone.processes import pg_ctl_stop as _pg_ctl_stop
from configuration.store import ConfigStore
from core.settings import KafkaSettings, PostgresSettings, Settings
from tests.integration.test_configuration_relay import _expected_ids, _read_topic
from tests.support import start_postgres, start_tansu

pytestmark = [pytest.mark.integration, pytest.mark.slow]
ROOT = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _position(pg_url: str) -> int | None:
    try:
        with psycopg.connect(pg_url, connect_timeout=2) as conn:
            row = conn.execute(
                "select notification_id from config_relay_position where relay_name = 'outage'"
            ).fetchone()
        return row[0] if row else None
    except psycopg.Error:
        return None


def _wait_position(pg_url: str, target: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while _position(pg_url) != target:
        assert time.monotonic() < deadline, f"relay stuck at {_position(pg_url)} of {target}"
        time.sleep(0.2)


def test_relay_resumes_without_gaps_after_broker_and_postgres_outages(tmp_path: Path) -> None:
    """A relay started while PostgreSQL is down waits for it (it exited with a traceback before); changes
    stored while the broker is down are published once it is up; a PostgreSQL stop and start under the
    relay loses nothing and publishes nothing twice."""
    kafka_port = _free_port()
    stack = DevStack(Settings(state_dir=tmp_path), state_dir=tmp_path, durable=False)
    info = stack.start()
    tansu = None
    relay = None
    try:
        pg_url = info.postgres_url
        settings = Settings(postgres=PostgresSettings(url=SecretStr(pg_url)),
                            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{kafka_port}"))  # fmt: skip
        ConfigStore(settings).close()  # the store's tables exist
        pg_port = int(pg_url.rsplit(":", 1)[1].split("/")[0])
        _pg_ctl_stop(tmp_path / "postgres", 10)  # 0. PostgreSQL is down when the relay starts
        keys = [f"misc.outage{i}" for i in range(3)]
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{kafka_port}",
               "BACKBONE_POSTGRES__URL": pg_url, "BACKBONE_STATE_DIR": str(tmp_path / "relay"),
               "BACKBONE_LOG_FORMAT": "json"}  # fmt: skip
        log = (tmp_path / "relay.log").open("ab")
        relay = subprocess.Popen([sys.executable, "-m", "configuration.relay", "--topic", "config.outage", "--name",
                                  "outage", "--batch-size", "7"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip

        time.sleep(3)
        assert relay.poll() is None, "the relay gave up while PostgreSQL was down at its start"
        assert b"config_relay.postgres_error" in (tmp_path / "relay.log").read_bytes()
        pg0 = start_postgres(tmp_path / "postgres", pg_port)
        store = ConfigStore(settings)

        # 1. the broker is down: changes are stored, nothing can be published
        for i in range(30):
            store.set(keys[i % 3], {"i": i}, author="t", reason=f"while the broker is down {i}")
        time.sleep(3)
        assert relay.poll() is None, "the relay gave up while the broker was down"
        assert _position(pg_url) in (None, 0)
        tansu = start_tansu(kafka_port)
        _wait_position(pg_url, store.app.recorder.max_notification_id())

        # 2. PostgreSQL stops under the relay, then comes back; more changes follow
        store.close()
        _pg_ctl_stop(tmp_path / "postgres", 10)
        pg0.wait(30)
        time.sleep(3)
        assert relay.poll() is None, "the relay gave up while PostgreSQL was down"
        pg = start_postgres(tmp_path / "postgres", pg_port)
        store = ConfigStore(settings)
        for i in range(30, 60):
            store.set(keys[i % 3], {"i": i}, author="t", reason=f"after the outage {i}")
        _wait_position(pg_url, store.app.recorder.max_notification_id())

        want = _expected_ids(store, keys)
        got = _read_topic(settings, "config.outage", "outage-check", want)
        ids = [e.attributes.id for e in got]
        assert set(ids) == want and len(want) == 60  # every stored event, none missing
        for key in keys:  # in version order per key, after de-duplication
            versions = [e.data["version"] for e in got if e.key == key]
            deduped = list(dict.fromkeys(versions))
            assert deduped == sorted(deduped) == list(range(1, 21))
        store.close()
        pg.send_signal(signal.SIGINT)  # PostgreSQL's fast shutdown
        pg.wait(30)
    finally:
        if relay is not None and relay.poll() is None:
            relay.kill()
        if tansu is not None:
            tansu.kill()
        stack.stop()
