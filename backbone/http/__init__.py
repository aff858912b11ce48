"""The HTTP app (``backbone api``): ingest and webhooks (:mod:`backbone.http.ingest`), Server-Sent Events
(:mod:`backbone.http.sse`), the projections' read API (:mod:`backbone.http.read`), tokens, scopes and rate
limits (:mod:`backbone.http.auth`), assembled by :func:`backbone.http.app.create_app`."""

from backbone.http.app import ApiSettings, ServerThread, create_app

__all__ = ["ApiSettings", "ServerThread", "create_app"]
