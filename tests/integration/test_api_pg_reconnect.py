"""The API's PostgreSQL pool hands out live connections only: after PostgreSQL dropped them (a restart,
``pg_terminate_backend``, an idle timeout), the next request is answered, not refused with a 503."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from urllib.parse import urlsplit, urlunsplit

import httpx
import psycopg
import pytest
from psycopg import sql
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from backbone.devstack import StackInfo
from backbone.http.app import ApiSettings, ServerThread, create_app
from backbone.http.auth import TokenStore
from core.settings import PostgresSettings, Settings

pytestmark = [pytest.mark.integration]


@pytest.fixture
def api_db(stack: StackInfo) -> Iterator[str]:
    name = f"test_reconnect_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    try:
        yield urlunsplit(urlsplit(stack.postgres_url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def _terminate_backends(admin_url: str, database: str) -> int:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        rows = conn.execute(
            "select pg_terminate_backend(pid) from pg_stat_activity where datname = %s and pid <> pg_backend_pid()",
            (database,),
        ).fetchall()
    return len(rows)


def test_requests_after_postgres_dropped_every_connection_are_answered(
    stack: StackInfo, settings: Settings, api_db: str
) -> None:
    api = ApiSettings(
        external_topic=f"reconnect-ext-{uuid.uuid4().hex[:6]}", rate_per_second=1_000, burst=1_000
    )
    app = create_app(settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(api_db))}), api)
    with ServerThread(app) as srv:
        pool = ConnectionPool(api_db, min_size=1, max_size=1, open=True)
        token = TokenStore(pool).create("reconnect", ["admin"])[0]
        pool.close()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(base_url=srv.url, headers=headers, timeout=30) as http:
            for _ in range(4):  # every connection of the pool is opened and used
                assert http.get("/projections").status_code == 200
            database = urlsplit(api_db).path.lstrip("/")
            assert _terminate_backends(stack.postgres_url, database) >= 1
            statuses = [http.get("/projections").status_code for _ in range(8)]
            assert statuses == [200] * 8, f"after the backends were terminated: {statuses}"
            assert http.get("/healthz").status_code == 200
