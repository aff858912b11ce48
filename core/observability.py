"""Logging (structlog, configured once) and metrics (prometheus-client, explicit registry) with a
``/metrics`` and ``/healthz`` endpoint for every long-running process."""

from __future__ import annotations

import json
import logging
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

__all__ = ["REGISTRY", "configure_logging", "serve_metrics"]

REGISTRY = CollectorRegistry(auto_describe=True)
"""The backbone's metrics registry (never the global default one)."""

_configured = False


def configure_logging(level: str = "INFO", fmt: str = "auto", *, force: bool = False) -> None:
    """Configure structlog once: console renderer on a TTY, JSON (with dict tracebacks) otherwise.

    Args:
        level: log level name.
        fmt: ``auto``, ``console`` or ``json``.
        force: configure again even if already configured (e.g. a quieter level for a report).
    """
    global _configured
    if _configured and not force:
        return
    _configured = True
    as_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if as_json:
        processors += [structlog.processors.dict_tracebacks, structlog.processors.JSONRenderer()]
    else:
        processors += [structlog.dev.ConsoleRenderer()]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )


def _stderr_logger(*_args: Any) -> structlog.PrintLogger:
    """A logger on the ``sys.stderr`` of the moment, not the one of :func:`configure_logging`'s call: a
    caller that swaps it for a while (typer's ``CliRunner``, ``contextlib.redirect_stderr``) and closes the
    stand-in leaves logging working after it instead of raising "I/O operation on closed file"."""
    return structlog.PrintLogger(sys.stderr)


def serve_metrics(
    port: int = 0,
    *,
    host: str = "127.0.0.1",
    health: Callable[[], dict[str, Any]] | None = None,
    ready: Callable[[], dict[str, Any]] | None = None,
    registry: CollectorRegistry | None = None,
) -> ThreadingHTTPServer:
    """Serve ``/metrics`` (Prometheus text format), ``/healthz`` (liveness) and ``/readyz`` (readiness), JSON,
    on a daemon thread.

    Args:
        port: TCP port; 0 picks a free one (read it from ``server.server_address[1]``).
        host: bind address (``Settings.metrics_host``: ``0.0.0.0`` in a container).
        health: returns the liveness document; a falsy ``"ok"`` in it answers 503. A check that raises
            answers 503 with the error.
        ready: returns the readiness document (broker reachable, partitions assigned, database reachable,
            lag known: whatever the process depends on); a falsy ``"ok"`` answers 503. Default: ``health``.
        registry: the registry to expose (default :data:`REGISTRY`).

    Returns:
        the running server (call ``shutdown()`` to stop it).
    """

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.startswith("/metrics"):
                body, ctype, status = generate_latest(registry or REGISTRY), CONTENT_TYPE_LATEST, 200
            elif self.path.startswith(("/healthz", "/readyz")):
                check = (ready or health) if self.path.startswith("/readyz") else health
                try:
                    doc = check() if check else {"ok": True}
                except Exception as exc:  # noqa: BLE001 - a failing check is the answer, not a crash
                    doc = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
                body, ctype = json.dumps(doc, default=str).encode(), "application/json"
                status = 200 if doc.get("ok", True) else 503
            else:
                body, ctype, status = b"not found\n", "text/plain", 404
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
