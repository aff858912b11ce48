"""A Kafka Connect REST API client (httpx) with plan/apply of connector specs.

Endpoints used (Apache Kafka "Connect REST Interface"): ``GET /connectors``,
``GET/PUT /connectors/{name}/config``, ``GET /connectors/{name}/status``,
``POST /connectors/{name}/restart?includeTasks=&onlyFailed=``, ``PUT /connectors/{name}/pause``,
``PUT /connectors/{name}/resume``, ``DELETE /connectors/{name}``,
``PUT /connector-plugins/{plugin}/config/validate``.

Connect answers an error with ``{"error_code": N, "message": "..."}``; it becomes a
:class:`KafkaConnectHTTPError` (:class:`ConnectorNotFoundError` for 404) carrying the status and message.
A 409 (a worker rebalance or a concurrent config change in progress), a 5xx and a connection failure are
retried with bounded exponential backoff (:class:`RetryPolicy`); after the last attempt the error is raised.

:func:`plan` diffs spec files against the live connectors (pure); :meth:`KafkaConnectClient.apply`
validates each new or changed connector with the validate endpoint and then ``PUT``\\ s its config, which
creates or updates it, so applying twice changes nothing the second time.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Self
from urllib.parse import quote

import httpx
import structlog

from connectors.errors import ConnectorError
from connectors.lint import ConnectorSpec

__all__ = [
    "DEFAULT_CONNECT_URL",
    "ApplyOutcome",
    "ConfigValidationError",
    "ConnectorConfigInvalidError",
    "ConnectorDiff",
    "ConnectorNotFoundError",
    "ConnectorStatus",
    "KafkaConnectClient",
    "KafkaConnectError",
    "KafkaConnectHTTPError",
    "KafkaConnectUnavailableError",
    "KeyChange",
    "PlanAction",
    "RetryPolicy",
    "TaskStatus",
    "plan",
]

DEFAULT_CONNECT_URL = "http://127.0.0.1:8083"

_log = structlog.get_logger(__name__)


# ------------------------------------------------------------------------------------------------ errors


class KafkaConnectError(ConnectorError):
    """Root of the errors of the Kafka Connect client.

    Attributes:
        url: the request URL (or the Connect base URL).
    """

    def __init__(self, message: str, *, url: str) -> None:
        self.url = url
        super().__init__(message)


class KafkaConnectUnavailableError(KafkaConnectError, ConnectionError):
    """Kafka Connect could not be reached (connection refused, DNS, timeout) after every retry."""


class KafkaConnectHTTPError(KafkaConnectError):
    """Kafka Connect answered with an error status.

    Attributes:
        status_code: the HTTP status.
        error_code: ``error_code`` of Connect's error body (usually the status), or ``None``.
        connect_message: ``message`` of Connect's error body, or the raw body when it is not JSON.
        method: the request method.
    """

    def __init__(
        self, *, method: str, url: str, status_code: int, error_code: int | None, connect_message: str
    ) -> None:
        self.method = method
        self.status_code = status_code
        self.error_code = error_code
        self.connect_message = connect_message
        super().__init__(f"Kafka Connect {method} {url} -> {status_code}: {connect_message}", url=url)


class ConnectorNotFoundError(KafkaConnectHTTPError, LookupError):
    """Connect does not know the connector (404)."""


@dataclass(frozen=True, slots=True, kw_only=True)
class ConfigValidationError:
    """One problem reported by ``PUT /connector-plugins/{plugin}/config/validate``.

    Attributes:
        key: the property (``configs[].value.name``).
        message: Connect's error text for it.
    """

    key: str
    message: str


class ConnectorConfigInvalidError(KafkaConnectError, ValueError):
    """Connect's validate endpoint reported errors for a connector config; nothing was applied for it.

    Attributes:
        connector: the connector name.
        errors: every reported problem, one per key and message.
    """

    def __init__(self, connector: str, errors: Sequence[ConfigValidationError], *, url: str) -> None:
        self.connector = connector
        self.errors = tuple(errors)
        lines = "; ".join(f"{e.key}: {e.message}" for e in self.errors)
        super().__init__(
            f"connector {connector!r} config is invalid ({len(self.errors)} errors): {lines}", url=url
        )


# ------------------------------------------------------------------------------------------------ records


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """Bounded exponential backoff for 409, 5xx and connection errors.

    Attributes:
        max_attempts: attempts in all, the first included (1 disables retries).
        initial_backoff_seconds: wait after the first failure.
        max_backoff_seconds: cap of one wait.
        multiplier: growth of the wait per failure.
    """

    max_attempts: int = 5
    initial_backoff_seconds: float = 0.25
    max_backoff_seconds: float = 5.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.initial_backoff_seconds < 0 or self.max_backoff_seconds < 0 or self.multiplier < 1:
            raise ValueError("backoff seconds must be >= 0 and multiplier >= 1")

    def backoff_seconds(self, failures: int) -> float:
        """The wait after ``failures`` consecutive failures (1-based)."""
        return min(self.max_backoff_seconds, self.initial_backoff_seconds * self.multiplier ** (failures - 1))


@dataclass(frozen=True, slots=True, kw_only=True)
class TaskStatus:
    """One task of a connector (``GET /connectors/{name}/status`` ``tasks[]``).

    Attributes:
        id: task number.
        state: ``RUNNING``, ``PAUSED``, ``FAILED``, ``UNASSIGNED``, ``RESTARTING``, ``STOPPED``.
        worker_id: ``host:port`` of the worker running it.
        trace: the stack trace of a failed task, else ``None``.
    """

    id: int
    state: str
    worker_id: str | None
    trace: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorStatus:
    """A connector's status (``GET /connectors/{name}/status``).

    Attributes:
        name: connector name.
        state: the connector's own state (same values as a task's).
        worker_id: ``host:port`` of its worker.
        tasks: its tasks.
        type: ``source`` or ``sink`` (``None`` when Connect does not say).
        trace: the stack trace when the connector itself failed.
    """

    name: str
    state: str
    worker_id: str | None
    tasks: tuple[TaskStatus, ...]
    type: str | None = None
    trace: str | None = None

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> ConnectorStatus:
        """Build from Connect's status JSON (``{"name", "connector": {"state", "worker_id"}, "tasks"}``)."""
        connector = body.get("connector") or {}
        return cls(
            name=str(body.get("name")),
            state=str(connector.get("state")),
            worker_id=connector.get("worker_id"),
            trace=connector.get("trace"),
            type=body.get("type"),
            tasks=tuple(
                TaskStatus(
                    id=int(t["id"]), state=str(t["state"]), worker_id=t.get("worker_id"), trace=t.get("trace")
                )
                for t in body.get("tasks") or []
            ),
        )

    @property
    def healthy(self) -> bool:
        """Whether the connector and all its tasks are ``RUNNING``."""
        return self.state == "RUNNING" and all(t.state == "RUNNING" for t in self.tasks)


class PlanAction(StrEnum):
    """What :meth:`KafkaConnectClient.apply` would do to a connector."""

    CREATE = "create"
    UPDATE = "update"
    UNCHANGED = "unchanged"
    DELETE_CANDIDATE = "delete-candidate"


@dataclass(frozen=True, slots=True, kw_only=True)
class KeyChange:
    """One property that differs between the live connector and its spec.

    Attributes:
        key: the property.
        live: the live value, ``None`` when the live config lacks it.
        desired: the spec's value, ``None`` when the spec drops it.
    """

    key: str
    live: str | None
    desired: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ConnectorDiff:
    """The plan for one connector.

    Attributes:
        name: connector name.
        action: create, update, unchanged, or delete-candidate (live but in no spec file; only deleted
            when asked).
        changes: the differing properties for an update (sorted by key); every property for a create.
        spec: the spec, ``None`` for a delete candidate.
    """

    name: str
    action: PlanAction
    changes: tuple[KeyChange, ...] = ()
    spec: ConnectorSpec | None = None

    @property
    def changed_keys(self) -> tuple[str, ...]:
        """The keys in :attr:`changes`."""
        return tuple(c.key for c in self.changes)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApplyOutcome:
    """What :meth:`KafkaConnectClient.apply` did to one connector.

    Attributes:
        name: connector name.
        action: the planned action.
        done: ``"created"``, ``"updated"``, ``"unchanged"``, ``"deleted"``, ``"kept"`` (a delete
            candidate left alone) or ``"invalid"``.
        errors: validation errors when ``done == "invalid"``.
    """

    name: str
    action: PlanAction
    done: str
    errors: tuple[ConfigValidationError, ...] = field(default_factory=tuple)


def _as_text(config: Mapping[str, Any]) -> dict[str, str]:
    return {str(k): ("true" if v is True else "false" if v is False else str(v)) for k, v in config.items()}


def plan(specs: Iterable[ConnectorSpec], live: Mapping[str, Mapping[str, Any]]) -> list[ConnectorDiff]:
    """Diff spec files against live connector configs (pure).

    Args:
        specs: the desired connectors.
        live: connector name → live config, as ``GET /connectors/{name}/config`` returns it.

    Returns:
        One diff per spec (in spec order), then one delete candidate per live connector that no spec
        declares (sorted by name). The ``name`` property is compared like any other.
    """
    diffs: list[ConnectorDiff] = []
    declared: set[str] = set()
    for spec in specs:
        declared.add(spec.name)
        desired = _as_text({**spec.config, "name": spec.name})
        if spec.name not in live:
            changes = tuple(KeyChange(key=k, live=None, desired=v) for k, v in sorted(desired.items()))
            diffs.append(ConnectorDiff(name=spec.name, action=PlanAction.CREATE, changes=changes, spec=spec))
            continue
        current = _as_text(live[spec.name])
        changes = tuple(
            KeyChange(key=k, live=current.get(k), desired=desired.get(k))
            for k in sorted(set(desired) | set(current))
            if current.get(k) != desired.get(k)
        )
        action = PlanAction.UPDATE if changes else PlanAction.UNCHANGED
        diffs.append(ConnectorDiff(name=spec.name, action=action, changes=changes, spec=spec))
    for name in sorted(set(live) - declared):
        diffs.append(ConnectorDiff(name=name, action=PlanAction.DELETE_CANDIDATE))
    return diffs


# ------------------------------------------------------------------------------------------------ client


def _retryable_status(status: int) -> bool:
    return status == 409 or status >= 500


class KafkaConnectClient:
    """A synchronous client of one Kafka Connect cluster.

    Args:
        base_url: the Connect REST URL, e.g. ``http://127.0.0.1:8083``.
        timeout_seconds: per-request timeout.
        retry: backoff policy for 409, 5xx and connection errors.
        auth: optional httpx auth (basic auth on the Connect REST listener).
        sleep: the wait function (tests pass one that records instead of sleeping).
        transport: optional httpx transport.
        logger: a structlog logger for retries and apply results (default: this module's logger).

    Use as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_CONNECT_URL,
        *,
        timeout_seconds: float = 10.0,
        retry: RetryPolicy | None = None,
        auth: httpx.Auth | tuple[str, str] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        transport: httpx.BaseTransport | None = None,
        logger: Any = None,
    ) -> None:
        self._log = logger if logger is not None else _log
        self.base_url = base_url.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.base_url,
            timeout=timeout_seconds,
            auth=auth,
            transport=transport,
            headers={"Accept": "application/json"},
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the HTTP connection pool."""
        self._http.close()

    # -- transport ------------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: Mapping[str, str] | None = None,
        not_found_ok: bool = False,
    ) -> httpx.Response:
        url = f"{self.base_url}{path}"
        failures = 0
        while True:
            try:
                response = self._http.request(method, path, json=json, params=params)
            except httpx.TransportError as exc:
                failures += 1
                if failures >= self.retry.max_attempts:
                    raise KafkaConnectUnavailableError(
                        f"Kafka Connect at {self.base_url} is unreachable ({method} {url}: "
                        f"{type(exc).__name__}: {exc}) after {failures} attempts",
                        url=url,
                    ) from exc
                wait = self.retry.backoff_seconds(failures)
                self._log.warning(
                    "kafka_connect.retry", method=method, url=url, error=str(exc), wait_seconds=wait
                )
                self._sleep(wait)
                continue
            if response.is_success or (not_found_ok and response.status_code == 404):
                return response
            if _retryable_status(response.status_code):
                failures += 1
                if failures < self.retry.max_attempts:
                    wait = self.retry.backoff_seconds(failures)
                    self._log.warning(
                        "kafka_connect.retry",
                        method=method,
                        url=url,
                        status=response.status_code,
                        wait_seconds=wait,
                    )
                    self._sleep(wait)
                    continue
            raise self._http_error(method, url, response)

    @staticmethod
    def _http_error(method: str, url: str, response: httpx.Response) -> KafkaConnectHTTPError:
        error_code: int | None = None
        message = response.text.strip() or response.reason_phrase
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, Mapping):
            raw_code = body.get("error_code")
            error_code = raw_code if isinstance(raw_code, int) else None
            message = str(body.get("message") or message)
        cls = ConnectorNotFoundError if response.status_code == 404 else KafkaConnectHTTPError
        return cls(
            method=method,
            url=url,
            status_code=response.status_code,
            error_code=error_code,
            connect_message=message,
        )

    @staticmethod
    def _name(name: str) -> str:
        return quote(name, safe="")

    # -- endpoints ------------------------------------------------------------------------------------

    def list_connectors(self) -> list[str]:
        """``GET /connectors``: the connector names, sorted.

        Raises:
            KafkaConnectUnavailableError: Connect cannot be reached.
            KafkaConnectHTTPError: Connect answered an error after retries.
        """
        return sorted(self._request("GET", "/connectors").json())

    def get_config(self, name: str) -> dict[str, str]:
        """``GET /connectors/{name}/config``: the connector's config as stored (references unresolved).

        Raises:
            ConnectorNotFoundError: no such connector.
        """
        return dict(self._request("GET", f"/connectors/{self._name(name)}/config").json())

    def put_config(self, name: str, config: Mapping[str, Any]) -> bool:
        """``PUT /connectors/{name}/config``: create the connector or replace its config.

        Args:
            name: connector name.
            config: the full config (string values).

        Returns:
            ``True`` when Connect created the connector (201), ``False`` when it updated it (200).

        Raises:
            KafkaConnectHTTPError: Connect refused the config (400, e.g. a name mismatch) or failed.
        """
        response = self._request("PUT", f"/connectors/{self._name(name)}/config", json=_as_text(config))
        return response.status_code == 201

    def get_status(self, name: str) -> ConnectorStatus:
        """``GET /connectors/{name}/status``.

        Raises:
            ConnectorNotFoundError: no such connector.
        """
        return ConnectorStatus.from_json(
            self._request("GET", f"/connectors/{self._name(name)}/status").json()
        )

    def restart(
        self, name: str, *, include_tasks: bool = True, only_failed: bool = False
    ) -> ConnectorStatus | None:
        """``POST /connectors/{name}/restart?includeTasks=&onlyFailed=``.

        Args:
            name: connector name.
            include_tasks: restart the tasks too.
            only_failed: restart only the connector/tasks that are ``FAILED``.

        Returns:
            The status Connect returns with 202 (instances marked ``RESTARTING``), or ``None`` for 204/200.

        Raises:
            ConnectorNotFoundError: no such connector.
        """
        params = {"includeTasks": str(include_tasks).lower(), "onlyFailed": str(only_failed).lower()}
        response = self._request("POST", f"/connectors/{self._name(name)}/restart", params=params)
        if response.status_code == 202 and response.content:
            return ConnectorStatus.from_json(response.json())
        return None

    def pause(self, name: str) -> None:
        """``PUT /connectors/{name}/pause`` (asynchronous: Connect answers 202).

        Raises:
            ConnectorNotFoundError: no such connector.
        """
        self._request("PUT", f"/connectors/{self._name(name)}/pause")

    def resume(self, name: str) -> None:
        """``PUT /connectors/{name}/resume`` (asynchronous: Connect answers 202).

        Raises:
            ConnectorNotFoundError: no such connector.
        """
        self._request("PUT", f"/connectors/{self._name(name)}/resume")

    def delete(self, name: str) -> None:
        """``DELETE /connectors/{name}``.

        Raises:
            ConnectorNotFoundError: no such connector.
        """
        self._request("DELETE", f"/connectors/{self._name(name)}")

    def validate(self, config: Mapping[str, Any]) -> list[ConfigValidationError]:
        """``PUT /connector-plugins/{connector.class}/config/validate``: Connect's own config check.

        Args:
            config: a full connector config with ``connector.class``.

        Returns:
            Every error Connect reports (``configs[].value.errors``); empty when ``error_count`` is 0.

        Raises:
            ValueError: ``config`` has no ``connector.class``.
            KafkaConnectHTTPError: Connect does not know the plugin (400/404) or failed.
        """
        plugin = config.get("connector.class")
        if not plugin:
            raise ValueError("config has no connector.class to validate against")
        body = self._request(
            "PUT", f"/connector-plugins/{self._name(str(plugin))}/config/validate", json=_as_text(config)
        ).json()
        errors: list[ConfigValidationError] = []
        for item in body.get("configs") or []:
            value = item.get("value") or {}
            for message in value.get("errors") or []:
                errors.append(ConfigValidationError(key=str(value.get("name")), message=str(message)))
        if body.get("error_count") and not errors:
            errors.append(ConfigValidationError(key="?", message=f"{body['error_count']} errors reported"))
        return errors

    def validate_spec(self, spec: ConnectorSpec) -> None:
        """Validate a spec's config with Connect and raise when it reports errors.

        Raises:
            ConnectorConfigInvalidError: with every error Connect reported.
        """
        errors = self.validate(spec.config)
        if errors:
            raise ConnectorConfigInvalidError(spec.name, errors, url=self.base_url)

    # -- plan / apply ---------------------------------------------------------------------------------

    def live_configs(self) -> dict[str, dict[str, str]]:
        """The config of every live connector (one ``GET`` each; one deleted meanwhile is skipped)."""
        configs: dict[str, dict[str, str]] = {}
        for name in self.list_connectors():
            try:
                configs[name] = self.get_config(name)
            except ConnectorNotFoundError:
                continue
        return configs

    def plan(self, specs: Iterable[ConnectorSpec]) -> list[ConnectorDiff]:
        """Diff ``specs`` against this cluster (see :func:`plan`)."""
        return plan(specs, self.live_configs())

    def apply(self, specs: Iterable[ConnectorSpec], *, delete_missing: bool = False) -> list[ApplyOutcome]:
        """Make the cluster match ``specs``; idempotent.

        Each new or changed connector is validated first; an invalid one is reported (``done="invalid"``
        with its errors) and not applied, while the others still are. Unchanged connectors get no
        request. Live connectors absent from ``specs`` are deleted only with ``delete_missing``.

        Args:
            specs: the desired connectors.
            delete_missing: delete live connectors that no spec declares.

        Returns:
            One outcome per planned connector, in plan order.

        Raises:
            KafkaConnectUnavailableError: Connect cannot be reached.
            KafkaConnectHTTPError: Connect answered an error (after retries where they apply).
        """
        outcomes: list[ApplyOutcome] = []
        for diff in self.plan(specs):
            if diff.action is PlanAction.UNCHANGED:
                outcomes.append(ApplyOutcome(name=diff.name, action=diff.action, done="unchanged"))
            elif diff.action is PlanAction.DELETE_CANDIDATE:
                if delete_missing:
                    self.delete(diff.name)
                    self._log.info("kafka_connect.deleted", connector=diff.name)
                    outcomes.append(ApplyOutcome(name=diff.name, action=diff.action, done="deleted"))
                else:
                    outcomes.append(ApplyOutcome(name=diff.name, action=diff.action, done="kept"))
            else:
                assert diff.spec is not None
                errors = self.validate(diff.spec.config)
                if errors:
                    self._log.warning("kafka_connect.invalid", connector=diff.name, errors=len(errors))
                    outcomes.append(
                        ApplyOutcome(name=diff.name, action=diff.action, done="invalid", errors=tuple(errors))
                    )
                    continue
                created = self.put_config(diff.name, diff.spec.config)
                done = "created" if created else "updated"
                self._log.info(f"kafka_connect.{done}", connector=diff.name, keys=list(diff.changed_keys))
                outcomes.append(ApplyOutcome(name=diff.name, action=diff.action, done=done))
        return outcomes
