"""A fake Kafka Connect worker: the documented REST API, in memory, served by uvicorn in a thread.

It follows the requests and responses of the Apache Kafka "Connect REST Interface" documentation:

* ``GET /`` → ``{"version", "commit", "kafka_cluster_id"}``
* ``GET /connectors`` → ``["name", ...]`` (``?expand=status`` / ``?expand=info`` → ``{name: {...}}``)
* ``POST /connectors`` ``{"name", "config"}`` → 201 info; 409 when it exists
* ``GET /connectors/{name}`` → ``{"name", "config", "tasks": [{"connector", "task"}], "type"}``
* ``GET /connectors/{name}/config`` → the config; ``PUT`` → 201 info when created, 200 when updated;
  400 when ``config.name`` differs from the path
* ``GET /connectors/{name}/status`` → ``{"name", "connector": {"state", "worker_id"}, "tasks": [...], "type"}``
* ``POST /connectors/{name}/restart`` → 204 (connector only), or with ``includeTasks``/``onlyFailed``
  202 and the status with the restarted instances ``RESTARTING``
* ``PUT /connectors/{name}/pause`` / ``resume`` → 202; ``DELETE /connectors/{name}`` → 204
* ``GET /connector-plugins`` → ``[{"class", "type", "version"}]``
* ``PUT /connector-plugins/{plugin}/config/validate`` → ``{"name", "error_count", "groups", "configs"}``;
  400 when the plugin is unknown or does not match ``connector.class``

Errors use Connect's body ``{"error_code": N, "message": "..."}`` (e.g. 404 ``Connector X not found``).
:meth:`FakeKafkaConnect.inject` makes the next N requests answer 409 (rebalance) or 503.
"""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Self

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

__all__ = ["POSTGRES_CONNECTOR_CLASS", "FakeKafkaConnect"]

POSTGRES_CONNECTOR_CLASS = "io.debezium.connector.postgresql.PostgresConnector"
_WORKER_ID = "h3-fake-connect:8083"

_PLUGINS: dict[str, dict[str, Any]] = {
    POSTGRES_CONNECTOR_CLASS: {
        "type": "source",
        "version": "2.7.3.Final",
        "required": ("topic.prefix", "database.hostname", "database.user", "database.dbname"),
    },
    "org.apache.kafka.connect.file.FileStreamSourceConnector": {
        "type": "source",
        "version": "3.9.0",
        "required": ("topic", "file"),
    },
}

_REBALANCE_MESSAGE = "Cannot complete request because of a conflicting operation (e.g. worker rebalance)"


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error_code": status, "message": message}, status_code=status)


@dataclass
class _Connector:
    config: dict[str, str]
    state: str = "RUNNING"
    task_states: list[str] = field(default_factory=lambda: ["RUNNING"])
    task_traces: dict[int, str] = field(default_factory=dict)


class FakeKafkaConnect:
    """An in-memory Kafka Connect worker served on ``127.0.0.1`` at a free port.

    Attributes:
        connectors: name → stored connector (config, states).
        requests: ``(method, path)`` of every request received, in order (for asserting retries and
            idempotence).
    """

    def __init__(self) -> None:
        self.connectors: dict[str, _Connector] = {}
        self.requests: list[tuple[str, str]] = []
        self._inject: list[int] = []
        self._lock = threading.Lock()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port: int | None = None
        self.app = Starlette(
            routes=[
                Route("/", self._root, methods=["GET"]),
                Route("/connectors", self._list, methods=["GET"]),
                Route("/connectors", self._create, methods=["POST"]),
                Route("/connectors/{name}", self._info, methods=["GET"]),
                Route("/connectors/{name}", self._delete, methods=["DELETE"]),
                Route("/connectors/{name}/config", self._get_config, methods=["GET"]),
                Route("/connectors/{name}/config", self._put_config, methods=["PUT"]),
                Route("/connectors/{name}/status", self._status, methods=["GET"]),
                Route("/connectors/{name}/restart", self._restart, methods=["POST"]),
                Route("/connectors/{name}/pause", self._pause, methods=["PUT"]),
                Route("/connectors/{name}/resume", self._resume, methods=["PUT"]),
                Route("/connector-plugins", self._plugins, methods=["GET"]),
                Route("/connector-plugins/{plugin}/config/validate", self._validate, methods=["PUT"]),
            ]
        )
        self.app.add_middleware(_InjectMiddleware, fake=self)

    # -- control ----------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        if self.port is None:
            raise RuntimeError("fake Kafka Connect is not started")
        return f"http://127.0.0.1:{self.port}"

    def inject(self, status: int, count: int = 1) -> None:
        """Answer the next ``count`` requests with ``status`` (409: rebalance body; 5xx: server error)."""
        with self._lock:
            self._inject.extend([status] * count)

    def _take_injected(self) -> int | None:
        with self._lock:
            return self._inject.pop(0) if self._inject else None

    def fail_task(self, name: str, task_id: int = 0, trace: str = "java.lang.RuntimeException: h3") -> None:
        """Mark a task ``FAILED`` with a trace, as a worker does when a task throws."""
        connector = self.connectors[name]
        connector.task_states[task_id] = "FAILED"
        connector.task_traces[task_id] = trace

    def start(self) -> Self:
        """Serve on a free port of 127.0.0.1 in a daemon thread; returns when it accepts requests."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_level="warning", lifespan="off", access_log=False)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name="h3-fake-connect", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake Kafka Connect did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        """Stop serving and join the thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- helpers ------------------------------------------------------------------------------------------

    def _info_body(self, name: str) -> dict[str, Any]:
        connector = self.connectors[name]
        plugin = _PLUGINS.get(connector.config.get("connector.class", ""), {})
        return {
            "name": name,
            "config": dict(connector.config),
            "tasks": [{"connector": name, "task": i} for i in range(len(connector.task_states))],
            "type": plugin.get("type", "unknown"),
        }

    def _status_body(self, name: str) -> dict[str, Any]:
        connector = self.connectors[name]
        plugin = _PLUGINS.get(connector.config.get("connector.class", ""), {})
        tasks = []
        for i, state in enumerate(connector.task_states):
            task: dict[str, Any] = {"id": i, "state": state, "worker_id": _WORKER_ID}
            if state == "FAILED":
                task["trace"] = connector.task_traces.get(i, "")
            tasks.append(task)
        return {
            "name": name,
            "connector": {"state": connector.state, "worker_id": _WORKER_ID},
            "tasks": tasks,
            "type": plugin.get("type", "unknown"),
        }

    def _lookup(self, request: Request) -> tuple[str, _Connector | None]:
        name = request.path_params["name"]
        return name, self.connectors.get(name)

    @staticmethod
    async def _json_object(request: Request) -> dict[str, Any] | JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "Unrecognized token: request body is not JSON")
        if not isinstance(body, dict):
            return _error(400, "Cannot deserialize request body: expected a JSON object")
        return body

    def _store(self, name: str, config: dict[str, Any]) -> bool:
        created = name not in self.connectors
        text = {str(k): str(v) for k, v in config.items()}
        text["name"] = name
        if created:
            self.connectors[name] = _Connector(
                config=text, task_states=["RUNNING"] * int(text.get("tasks.max", "1"))
            )
        else:
            self.connectors[name].config = text
        return created

    # -- routes -------------------------------------------------------------------------------------------

    async def _root(self, request: Request) -> Response:
        return JSONResponse({"version": "3.9.0", "commit": "h3fake", "kafka_cluster_id": "h3-cluster"})

    async def _list(self, request: Request) -> Response:
        expand = request.query_params.getlist("expand")
        if not expand:
            return JSONResponse(sorted(self.connectors))
        body: dict[str, Any] = {}
        for name in sorted(self.connectors):
            body[name] = {}
            if "status" in expand:
                body[name]["status"] = self._status_body(name)
            if "info" in expand:
                body[name]["info"] = self._info_body(name)
        return JSONResponse(body)

    async def _create(self, request: Request) -> Response:
        body = await self._json_object(request)
        if isinstance(body, JSONResponse):
            return body
        name = body.get("name")
        config = body.get("config") or {}
        if not isinstance(name, str) or not name:
            return _error(400, "Connector name must be specified")
        if name in self.connectors:
            return _error(409, f"Connector {name} already exists")
        self._store(name, config)
        return JSONResponse(self._info_body(name), status_code=201)

    async def _info(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"Connector {name} not found")
        return JSONResponse(self._info_body(name))

    async def _delete(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"Connector {name} not found")
        del self.connectors[name]
        return Response(status_code=204)

    async def _get_config(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"Connector {name} not found")
        return JSONResponse(dict(connector.config))

    async def _put_config(self, request: Request) -> Response:
        name = request.path_params["name"]
        body = await self._json_object(request)
        if isinstance(body, JSONResponse):
            return body
        if "name" in body and body["name"] != name:
            return _error(
                400,
                f"Connector name configuration ({body['name']}) doesn't match connector name in the URL ({name})",
            )
        if body.get("connector.class") not in _PLUGINS:
            return _error(
                500,
                f"Failed to find any class that implements Connector and which name matches "
                f"{body.get('connector.class')}",
            )
        created = self._store(name, body)
        return JSONResponse(self._info_body(name), status_code=201 if created else 200)

    async def _status(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"No status found for connector {name}")
        return JSONResponse(self._status_body(name))

    async def _restart(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"Unknown connector: {name}")
        include_tasks = request.query_params.get("includeTasks", "false") == "true"
        only_failed = request.query_params.get("onlyFailed", "false") == "true"
        if not include_tasks and not only_failed:
            connector.state = "RUNNING"
            return Response(status_code=204)
        body = self._status_body(name)
        if not only_failed or connector.state == "FAILED":
            body["connector"]["state"] = "RESTARTING"
            connector.state = "RUNNING"
        if include_tasks:
            for i, state in enumerate(connector.task_states):
                if not only_failed or state == "FAILED":
                    body["tasks"][i]["state"] = "RESTARTING"
                    body["tasks"][i].pop("trace", None)
                    connector.task_states[i] = "RUNNING"
                    connector.task_traces.pop(i, None)
        return JSONResponse(body, status_code=202)

    async def _pause(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"Connector {name} not found")
        connector.state = "PAUSED"
        connector.task_states = ["PAUSED"] * len(connector.task_states)
        return Response(status_code=202)

    async def _resume(self, request: Request) -> Response:
        name, connector = self._lookup(request)
        if connector is None:
            return _error(404, f"Connector {name} not found")
        connector.state = "RUNNING"
        connector.task_states = ["RUNNING"] * len(connector.task_states)
        return Response(status_code=202)

    async def _plugins(self, request: Request) -> Response:
        return JSONResponse(
            [
                {"class": cls, "type": p["type"], "version": p["version"]}
                for cls, p in sorted(_PLUGINS.items())
            ]
        )

    async def _validate(self, request: Request) -> Response:
        plugin = request.path_params["plugin"]
        body = await self._json_object(request)
        if isinstance(body, JSONResponse):
            return body
        matches = [cls for cls in _PLUGINS if cls == plugin or cls.endswith("." + plugin)]
        if not matches:
            return _error(
                400, f"Failed to find any class that implements Connector and which name matches {plugin}"
            )
        included = body.get("connector.class")
        if included is not None and not str(included).endswith(plugin.rsplit(".", 1)[-1]):
            return _error(400, f"Included connector type {included} does not match request type {plugin}")
        cls = matches[0]
        configs = []
        error_count = 0
        for key in ("name", "connector.class", *_PLUGINS[cls]["required"]):
            value = body.get(key)
            errors = (
                []
                if value not in (None, "")
                else [f'Missing required configuration "{key}" which has no default value.']
            )
            if key == "name" and value in (None, ""):
                errors = ['Missing required configuration "name" which has no default value.']
            error_count += len(errors)
            configs.append(
                {
                    "definition": {
                        "name": key,
                        "type": "STRING",
                        "required": True,
                        "default_value": None,
                        "importance": "HIGH",
                        "documentation": "",
                        "group": "Common",
                        "width": "MEDIUM",
                        "display_name": key,
                        "dependents": [],
                        "order": -1,
                    },
                    "value": {
                        "name": key,
                        "value": value,
                        "recommended_values": [],
                        "errors": errors,
                        "visible": True,
                    },
                }
            )
        return JSONResponse(
            {"name": cls, "error_count": error_count, "groups": ["Common"], "configs": configs}
        )


class _InjectMiddleware:
    """ASGI middleware: record every request; answer an injected 409/5xx before routing."""

    def __init__(self, app: Any, fake: FakeKafkaConnect) -> None:
        self.app = app
        self.fake = fake

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.fake.requests.append((scope["method"], scope["path"]))
        status = self.fake._take_injected()
        if status is None:
            await self.app(scope, receive, send)
            return
        message = (
            _REBALANCE_MESSAGE
            if status == 409
            else "Service Unavailable"
            if status == 503
            else "Internal Server Error"
        )
        await _error(status, message)(scope, receive, send)
