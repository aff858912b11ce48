"""``backbone api``: serve the HTTP API (uvicorn), and ``backbone api token create|list|revoke``.

Mount with ``app.add_typer(backbone.cli_api.app, name="api")``: ``backbone api [--host] [--port]``
serves; the ``token`` group manages API tokens (stored hashed in PostgreSQL).
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from backbone.cli.helpers import SHUTDOWN_TIMEOUT_SECONDS, JsonOpt, emit_json, err, out, stop_on_signals

__all__ = ["api", "app", "token_app"]


app = typer.Typer(
    help="The HTTP API: ingest, webhooks, Server-Sent Events, projection reads. Without a sub-command: serve it.",
    invoke_without_command=True,
)
token_app = typer.Typer(help="API tokens with scopes (stored hashed).", no_args_is_help=True)
app.add_typer(token_app, name="token")


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]error:[/red] {message}", highlight=False)
    return typer.Exit(2)


@app.callback()
def api(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help="Interface to bind.", envvar="BACKBONE_API_HOST")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port.", envvar="BACKBONE_API_PORT")] = None,
    log_level: Annotated[
        str, typer.Option(help="uvicorn log level.", envvar="BACKBONE_API_LOG_LEVEL")
    ] = "info",
) -> None:
    """Serve the API with uvicorn (OpenAPI at /openapi.json, docs at /docs) until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    import uvicorn

    from backbone.http.app import ApiSettings, create_app
    from core.eventloop import uvicorn_options
    from core.observability import configure_logging
    from core.stack import load_settings

    try:
        settings = load_settings()
        api_settings = ApiSettings()
        settings.postgres.dsn()
        settings.redis.dsn()
        settings.kafka.librdkafka()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    configure_logging(settings.log_level, settings.log_format)
    bind_host = host or api_settings.host
    bind_port = api_settings.port if port is None else port
    err.print(f"serving on http://{bind_host}:{bind_port} (docs at /docs)")
    # uvicorn stops gracefully on SIGTERM/SIGINT, then raises the signal again once its own handlers are
    # gone: with these it is a no-op, so a clean stop exits 0 (not -15, nor "Aborted!").
    stop_on_signals()
    uvicorn.run(
        create_app(settings, api_settings), host=bind_host, port=bind_port, log_level=log_level,
        timeout_graceful_shutdown=int(SHUTDOWN_TIMEOUT_SECONDS),
        **uvicorn_options(settings.event_loop),  # uvloop + httptools unless BACKBONE_EVENT_LOOP=asyncio
    )  # fmt: skip


def _store() -> Any:
    from psycopg_pool import ConnectionPool

    from backbone.http.auth import TokenStore
    from core.stack import load_settings

    try:
        dsn = load_settings().postgres.dsn()
    except ValueError as exc:
        raise _fail(str(exc)) from None
    pool = ConnectionPool(dsn, min_size=1, max_size=1, open=True, name="backbone-api-cli")
    store = TokenStore(pool)
    store.ensure_schema()
    return store


@token_app.command("create")
def token_create(
    name: Annotated[str, typer.Option(help="Who or what uses the token.")] = "default",
    scope: Annotated[
        list[str],
        typer.Option(
            "--scope", help="produce:<topic>, subscribe:<topic>, replay, admin; * wildcards. Repeatable."
        ),
    ] = [],  # noqa: B006 - typer reads the default
    rate_per_second: Annotated[
        float | None, typer.Option(help="This token's rate limit (requests/s).")
    ] = None,
    burst: Annotated[int | None, typer.Option(help="This token's burst (requests).")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token; it is printed once and only its SHA-256 is stored."""
    from backbone.http.auth import AuthError

    store = _store()
    try:
        token, info = store.create(name, scope, rate_per_second=rate_per_second, burst=burst)
    except AuthError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.pool.close()
    if as_json:
        emit_json({"token": token, **info.as_json()})
        return
    out.print(f"token {info.token_id} ({', '.join(info.scopes)}) - shown once, keep it secret:")
    out.print(token, highlight=False, soft_wrap=True)


@token_app.command("list")
def token_list(
    revoked: Annotated[bool, typer.Option("--revoked", help="Include revoked tokens.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The tokens (never their secrets)."""
    store = _store()
    try:
        rows = [t.as_json() for t in store.list(include_revoked=revoked)]
    finally:
        store.pool.close()
    if as_json:
        emit_json(rows)
        return
    table = Table(title="API tokens")
    for c in ("token_id", "name", "scopes", "created_at", "revoked_at"):
        table.add_column(c)
    for r in rows:
        table.add_row(
            r["token_id"], r["name"], ", ".join(r["scopes"]), r["created_at"], r["revoked_at"] or ""
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(token_id: Annotated[str, typer.Argument(help="The token id (from `token list`).")]) -> None:
    """Revoke a token; requests with it are refused (401) from now on."""
    from backbone.http.auth import AuthError

    store = _store()
    try:
        store.revoke(token_id)
    except AuthError as exc:
        raise _fail(str(exc)) from None
    finally:
        store.pool.close()
    out.print(f"revoked {token_id}")
