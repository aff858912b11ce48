"""The API's PostgreSQL pool hands out live connections only: after PostgreSQL dropped them (a restart,
``pg_terminate_backend``, an idle timeout), the next request is answered, not refused with a 503."""

from __future__ import annotations

import uuid
from urllib.parse import urlsplit

import httpx
import psycopg
import pytest
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from backbone.devstack import StackInfo
from backbone.http.app import ApiSettings, ServerThread, create_app
from backbone.http.auth import TokenStore
from core.settings import PostgresSettings, Settings

pytestmark = [pytest.mark.integration]


def _terminate_backends(admin_url: str, database: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


def test_requests_after_postgres_dropped_every_connection_are_answered(
    stack: StackInfo, settings: Settings, pg_url: str
) -> None:
    api = ApiSettings(
        external_topic=f"reconnect-ext-{uuid.uuid4().hex[:6]}", rate_per_second=1_000, burst=1_000
    )
    app = create_app(settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(pg_url))}), api)
    with ServerThread(app) as srv:
        pool = ConnectionPool(pg_url, min_size=1, max_size=1, open=True)
        token = TokenStore(pool).create("reconnect", ["admin"])[0]
        pool.close()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as http:
            for _ in range(4):  # every connection of the pool is opened and used
                assert http.get("/projections").status_code == 200
            database = urlsplit(pg_url).path.lstrip("/")
            assert _terminate_backends(stack.postgres_url, database) >= 1
            statuses = [http.get("/projections").status_code for _ in range(8)]
            assert statuses == [200] * 8, f"after the backends were terminated: {statuses}"
            assert http.get("/healthz").status_code == 200
