"""A bounded schemathesis run against the API's OpenAPI document: no generated request gets a 5xx."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import hypothesis
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given
from psycopg import sql
from psycopg_pool import ConnectionPool
from pydantic import SecretStr

from backbone.http.app import ApiSettings, ServerThread, create_app
from backbone.http.auth import TokenStore
from backbone.devstack import StackInfo
from core.settings import PostgresSettings, Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 30
BUDGET_SECONDS = 60.0


@pytest.fixture(scope="module")
def fuzz_server(stack: StackInfo, settings: Settings) -> Iterator[tuple[str, str]]:
    name = f"test_fuzz_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
        conn.execute(sql.SQL("create database {}").format(sql.Identifier(name)))
    url = urlunsplit(urlsplit(stack.postgres_url)._replace(path=f"/{name}"))
    api = ApiSettings(github_secret=SecretStr("fuzz"), slack_secret=SecretStr("fuzz"), linear_secret=SecretStr("fuzz"),
                      rate_per_second=10_000, burst=10_000, webhook_rate_per_second=10_000, webhook_burst=10_000,
                      ack_timeout_seconds=5, external_topic=f"fuzz-ext-{uuid.uuid4().hex[:6]}")  # fmt: skip
    app = create_app(settings.model_copy(update={"postgres": PostgresSettings(url=SecretStr(url))}), api)
    try:
        with ServerThread(app) as srv:
            pool = ConnectionPool(url, min_size=1, max_size=1, open=True)
            token = TokenStore(pool).create("fuzz", ["admin"])[0]
            pool.close()
            yield srv.url, token
    finally:
        with psycopg.connect(stack.postgres_url, autocommit=True) as conn:
            conn.execute(sql.SQL("drop database if exists {} with (force)").format(sql.Identifier(name)))


def test_no_generated_request_gets_a_5xx(fuzz_server: tuple[str, str], settings: Settings) -> None:
    """Every operation but the endless SSE stream, fuzzed from the OpenAPI document with an admin token, answers below 500."""
    base_url, token = fuzz_server
    schema = schemathesis.openapi.from_dict(create_app(settings).openapi())
    failures: list[str] = []
    calls = [0]
    started = time.monotonic()
    operations = [op.ok() for op in schema.get_all_operations() if "/subscribe/" not in op.ok().path]
    assert len(operations) >= 5
    for op in operations:

        @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, derandomize=True,
                             suppress_health_check=list(HealthCheck), phases=[hypothesis.Phase.generate])  # fmt: skip
        @given(case=op.as_strategy())
        def run(case: Any) -> None:
            if time.monotonic() - started > BUDGET_SECONDS:
                return
            headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
            response = case.call(base_url=base_url, headers=headers, timeout=30)
            calls[0] += 1
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: {response.text[:200]}")

        run()
    assert failures == []
    assert calls[0] >= len(operations)  # at least one example per operation, even on a loaded machine
    assert time.monotonic() - started < BUDGET_SECONDS + 30
