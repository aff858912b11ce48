"""A fake Confluent Schema Registry: the documented REST API, in memory, served by uvicorn in a thread.

No Schema Registry (a JVM service) runs on the development machines, so the HTTP registry client is
tested against this. It follows Confluent's "Schema Registry API Reference":

* ``POST /subjects/{subject}/versions`` ``{"schema", "schemaType"?, "references"?}`` → ``{"id"}``;
  the same schema again returns the existing id; 409 ``{"error_code": 409}`` when incompatible with the
  latest version (every version for a ``_TRANSITIVE`` level) under the compatibility level; 422
  ``{"error_code": 42201}`` for an invalid schema
* ``POST /compatibility/subjects/{subject}/versions/{version}`` → ``{"is_compatible": bool}``;
  404 ``{"error_code": 40401}`` for an unknown subject, ``{"error_code": 40402}`` for an unknown version
* ``GET /subjects/{subject}/versions/latest`` and ``/versions/{n}`` → ``{"subject", "id", "version", "schema"}``
* ``GET /schemas/ids/{id}`` → ``{"schema"}``; 404 ``{"error_code": 40403, "message": "Schema not found"}``
* ``GET /subjects`` → ``[subject, ...]``; ``GET /config`` → ``{"compatibilityLevel"}``

Media type ``application/vnd.schemaregistry.v1+json``.

Compatibility is not computed here (least of all with this project's own ``streams.compat``, which is
what it should be checked against): a new version that differs from the one it is checked against is
looked up in :data:`tests.fakes.compat_verdicts.DOCUMENTED_PAIRS`, schema pairs with the verdict
Confluent's documentation and the Avro specification give for them. A pair not in that table is answered
422 ``{"error_code": 422}`` saying the fake has no documented verdict, rather than guessed. Without a
lookup: the first version of a subject, a schema identical to the version it is checked against, and
any change under ``NONE`` ("all changes are accepted"). A registration is checked against every
earlier version at a ``_TRANSITIVE`` level and against the latest otherwise, a compatibility test against
the version in its path; ``?verbose=true`` adds ``"messages"`` (the documented rules broken) to the
compatibility answer.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from typing import Any, Self

import fastavro
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.fakes.compat_verdicts import canonical, documented_verdict

__all__ = ["FakeSchemaRegistry"]

_MEDIA = "application/vnd.schemaregistry.v1+json"


def _json(body: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(body, status_code=status, media_type=_MEDIA)


def _error(status: int, code: int, message: str) -> JSONResponse:
    return _json({"error_code": code, "message": message}, status)


class FakeSchemaRegistry:
    """Start with ``with FakeSchemaRegistry() as sr: ...`` (``sr.url``); ``compatibility`` is the global level."""

    def __init__(self, compatibility: str = "BACKWARD") -> None:
        self.compatibility = compatibility
        self.subjects: dict[str, list[int]] = {}
        self.schemas: dict[int, str] = {}
        self.requests: list[tuple[str, str]] = []
        routes = [
            Route("/subjects", self._list_subjects, methods=["GET"]),
            Route("/subjects/{subject}/versions", self._register, methods=["POST"]),
            Route("/subjects/{subject}/versions/{version}", self._get_version, methods=["GET"]),
            Route(
                "/compatibility/subjects/{subject}/versions/{version}", self._compatibility, methods=["POST"]
            ),
            Route("/schemas/ids/{id:int}", self._get_schema, methods=["GET"]),
            Route("/config", self._config, methods=["GET"]),
        ]
        self.app = Starlette(routes=routes)
        self._server: uvicorn.Server | None = None
        self.url = ""

    async def _list_subjects(self, request: Request) -> JSONResponse:
        self.requests.append(("GET", request.url.path))
        return _json(sorted(self.subjects))

    async def _config(self, request: Request) -> JSONResponse:
        return _json({"compatibilityLevel": self.compatibility})

    async def _parse(self, request: Request) -> tuple[dict[str, Any] | None, JSONResponse | None]:
        try:
            body = await request.json()
            schema = json.loads(body["schema"])
            if body.get("schemaType", "AVRO") != "AVRO":
                return None, _error(422, 42201, f"schema type {body['schemaType']} is not supported here")
            fastavro.parse_schema(schema)
        except Exception as exc:  # noqa: BLE001 - everything invalid is a 422 in the real API too
            return None, _error(422, 42201, f"Invalid schema: {exc}")
        return schema, None

    def _verdict(self, old_id: int, schema: dict[str, Any]) -> tuple[bool, str] | None:
        """(compatible, why) for ``schema`` after the schema ``old_id``; None when nothing documents it."""
        old = json.loads(self.schemas[old_id])
        if self.compatibility.upper() == "NONE":
            return True, "NONE accepts all changes"
        if canonical(old) == canonical(schema):
            return True, "identical schemas"
        pair = documented_verdict(old, schema, self.compatibility)
        return None if pair is None else (pair.compatible, f"{pair.rule} ({pair.source})")

    def _check(self, subject: str, against: list[int], schema: dict[str, Any]) -> JSONResponse | list[str]:
        """The documented rules that make ``schema`` incompatible with the versions ``against``, or a 422."""
        problems: list[str] = []
        for old_id in against:
            verdict = self._verdict(old_id, schema)
            if verdict is None:
                return _error(
                    422,
                    422,
                    f"the fake schema registry has no documented verdict for this change of subject "
                    f'"{subject}" at {self.compatibility} (old schema id {old_id}); add the pair to '
                    f"tests/fakes/compat_verdicts.py with the verdict its source documents",
                )
            if not verdict[0]:
                problems.append(verdict[1])
        return problems

    async def _register(self, request: Request) -> JSONResponse:
        subject = request.path_params["subject"]
        self.requests.append(("POST", request.url.path))
        schema, err = await self._parse(request)
        if err is not None:
            return err
        text = canonical(schema)
        for sid in self.subjects.get(subject, []):
            if canonical(json.loads(self.schemas[sid])) == text:
                return _json({"id": sid})
        versions = self.subjects.get(subject, [])
        transitive = self.compatibility.upper().endswith("_TRANSITIVE")
        checked = self._check(subject, versions if transitive else versions[-1:], schema)
        if isinstance(checked, JSONResponse):
            return checked
        if checked:
            return _error(
                409,
                409,
                f'Schema being registered is incompatible with an earlier schema for subject "{subject}", '
                f"details: {checked}",
            )
        sid = next((i for i, s in self.schemas.items() if canonical(json.loads(s)) == text), None)
        if sid is None:
            sid = len(self.schemas) + 1
            self.schemas[sid] = json.dumps(schema)
        self.subjects.setdefault(subject, []).append(sid)
        return _json({"id": sid})

    async def _get_version(self, request: Request) -> JSONResponse:
        subject, version = request.path_params["subject"], request.path_params["version"]
        self.requests.append(("GET", request.url.path))
        versions = self.subjects.get(subject)
        if not versions:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        idx = len(versions) if version == "latest" else int(version)
        if not 1 <= idx <= len(versions):
            return _error(404, 40402, f"Version {version} not found.")
        sid = versions[idx - 1]
        return _json({"subject": subject, "id": sid, "version": idx, "schema": self.schemas[sid]})

    async def _compatibility(self, request: Request) -> JSONResponse:
        subject, version = request.path_params["subject"], request.path_params["version"]
        self.requests.append(("POST", request.url.path))
        schema, err = await self._parse(request)
        if err is not None:
            return err
        versions = self.subjects.get(subject)
        if not versions:
            return _error(404, 40401, f"Subject '{subject}' not found.")
        idx = len(versions) if version == "latest" else int(version)
        if not 1 <= idx <= len(versions):
            return _error(404, 40402, f"Version {version} not found.")
        checked = self._check(subject, [versions[idx - 1]], schema)
        if isinstance(checked, JSONResponse):
            return checked
        body: dict[str, Any] = {"is_compatible": not checked}
        if request.query_params.get("verbose", "").lower() == "true":
            body["messages"] = checked
        return _json(body)

    async def _get_schema(self, request: Request) -> JSONResponse:
        sid = request.path_params["id"]
        self.requests.append(("GET", request.url.path))
        if sid not in self.schemas:
            return _error(404, 40403, "Schema not found")
        return _json({"schema": self.schemas[sid]})

    def __enter__(self) -> Self:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self._server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning")
        )
        threading.Thread(target=self._server.run, daemon=True).start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake schema registry did not start")
            time.sleep(0.02)
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
