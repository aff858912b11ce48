"""Schema registries behind one interface: an embedded one and a Confluent-compatible HTTP client.

Subjects follow Confluent's ``RecordNameStrategy`` (the subject is the record's full name, e.g.
``sophia.agent.LlmCall``), because one topic carries several event types in order per key.

* :class:`EmbeddedRegistry` needs no server: schema ids and every registered version are pinned in
  ``schemas/registry.json`` (committed), so ids are stable across machines and the wire bytes are the
  same everywhere. :meth:`EmbeddedRegistry.pin` registers a changed ``.avsc`` after the
  compatibility gate.
* :class:`HttpRegistry` talks to a Confluent Schema Registry (or Redpanda, Karapace, Apicurio's
  Confluent API) with confluent-kafka's ``SchemaRegistryClient``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, Protocol

import fastavro

from schemas import AVRO_DIR, PINNED_IDS_FILE
from streams.compat import check_compatibility
from streams.errors import SchemaError, SchemaIncompatibleError, SchemaNotFoundError

__all__ = [
    "EmbeddedRegistry",
    "HttpRegistry",
    "SchemaRegistry",
    "canonical",
    "full_name",
    "load_avsc_dir",
    "make_registry",
]


def canonical(schema: Any) -> str:
    """A stable JSON text of a schema (sorted keys, no whitespace) for comparing versions."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def full_name(schema: dict[str, Any]) -> str:
    """The full name ``namespace.name`` of a named schema."""
    name = schema["name"]
    ns = schema.get("namespace")
    return name if "." in name or not ns else f"{ns}.{name}"


def load_avsc_dir(directory: Path = AVRO_DIR) -> dict[str, dict[str, Any]]:
    """Read and parse every ``*.avsc`` under ``directory``, keyed by full name.

    Raises:
        SchemaError: a file that is not JSON or not a valid Avro schema, naming the file.
    """
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(directory.glob("*.avsc")):
        try:
            schema = json.loads(path.read_text())
            fastavro.parse_schema(schema, _write_hint=False)
        except Exception as exc:  # fastavro raises several types
            raise SchemaError(f"{path.name}: not a valid Avro schema: {exc}") from exc
        out[full_name(schema)] = schema
    return out


class SchemaRegistry(Protocol):
    """What the serde needs from a registry."""

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register ``schema`` under ``subject`` (after the compatibility gate); return its id."""
        ...

    def id_for(self, subject: str) -> int:
        """Return the id of the latest version of ``subject``."""
        ...

    def schema_for(self, schema_id: int) -> dict[str, Any]:
        """Return the schema (parsed JSON) with ``schema_id``."""
        ...


class EmbeddedRegistry:
    """A registry kept in a JSON file: ``{"subjects": {subject: [{"version", "id", "schema"}]}}``.

    On load, every ``.avsc`` under ``avro_dir`` must equal the latest pinned version of its subject; a
    changed or new schema is refused until :meth:`pin` has checked and registered it, so a schema
    change can never reach the wire unnoticed.

    Args:
        path: the pinned ids file (default ``schemas/registry.json``).
        avro_dir: the ``.avsc`` folder (default ``schemas/avro``).
        compatibility: level enforced by :meth:`pin`.
        strict: when True (default) the constructor raises on an unpinned ``.avsc``.

    Raises:
        SchemaError: an ``.avsc`` differs from its pinned version (message names it and the command).
    """

    def __init__(
        self,
        path: Path = PINNED_IDS_FILE,
        avro_dir: Path = AVRO_DIR,
        *,
        compatibility: str = "BACKWARD",
        strict: bool = True,
    ) -> None:
        self.path = path
        self.avro_dir = avro_dir
        self.compatibility = compatibility
        self._lock = threading.Lock()
        self._subjects: dict[str, list[dict[str, Any]]] = {}
        if path.exists():
            self._subjects = json.loads(path.read_text()).get("subjects", {})
        self._by_id: dict[int, dict[str, Any]] = {
            v["id"]: v["schema"] for vs in self._subjects.values() for v in vs
        }
        if strict:
            stale = self.unpinned()
            if stale:
                raise SchemaError(
                    f"schema(s) changed or new since pinned in {path.name}: {', '.join(stale)}; "
                    "run `backbone schemas pin` to check compatibility and register them"
                )

    def unpinned(self) -> list[str]:
        """Full names of the ``.avsc`` files whose text differs from their latest pinned version."""
        out = []
        for name, schema in load_avsc_dir(self.avro_dir).items():
            versions = self._subjects.get(name)
            if not versions or canonical(versions[-1]["schema"]) != canonical(schema):
                out.append(name)
        return out

    def pin(self, names: Iterable[str] | None = None) -> dict[str, int]:
        """Register the current ``.avsc`` of ``names`` (default: all unpinned) and save the file.

        Returns:
            subject -> id of each newly registered version.

        Raises:
            SchemaIncompatibleError: a change breaks the compatibility level; nothing is saved.
        """
        current = load_avsc_dir(self.avro_dir)
        todo = list(names) if names is not None else self.unpinned()
        new: dict[str, int] = {}
        with self._lock:
            for name in todo:
                new[name] = self._register_locked(name, current[name])
            self._save()
        return new

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Register ``schema`` under ``subject`` in memory and in the file; idempotent.

        Raises:
            SchemaIncompatibleError: the change fails the compatibility gate.
        """
        with self._lock:
            sid = self._register_locked(subject, schema)
            self._save()
            return sid

    def _register_locked(self, subject: str, schema: dict[str, Any]) -> int:
        fastavro.parse_schema(schema, _write_hint=False)
        versions = self._subjects.setdefault(subject, [])
        for v in versions:
            if canonical(v["schema"]) == canonical(schema):
                return int(v["id"])
        if versions:
            problems = check_compatibility(schema, versions[-1]["schema"], self.compatibility)
            if problems:
                raise SchemaIncompatibleError(subject, problems)
        sid = max(self._by_id, default=0) + 1
        versions.append({"version": len(versions) + 1, "id": sid, "schema": schema})
        self._by_id[sid] = schema
        return sid

    def _save(self) -> None:
        body = {"subjects": self._subjects}
        self.path.write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")

    def id_for(self, subject: str) -> int:
        """Id of the latest version of ``subject``.

        Raises:
            SchemaNotFoundError: the subject was never pinned.
        """
        versions = self._subjects.get(subject)
        if not versions:
            raise SchemaNotFoundError(f"subject {subject!r} is not registered")
        return int(versions[-1]["id"])

    def schema_for(self, schema_id: int) -> dict[str, Any]:
        """Schema with ``schema_id``.

        Raises:
            SchemaNotFoundError: unknown id.
        """
        try:
            return self._by_id[schema_id]
        except KeyError:
            raise SchemaNotFoundError(f"schema id {schema_id} is not registered") from None

    def subjects(self) -> dict[str, list[dict[str, Any]]]:
        """Every subject with its versions (read-only view)."""
        return self._subjects


class _Unreachable:
    """Context manager: a transport failure talking to the registry becomes a SchemaError naming it."""

    def __init__(self, url: str) -> None:
        self.url = url

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object
    ) -> Literal[False]:
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        if (
            exc is None
            or isinstance(exc, (SchemaError, SchemaRegistryError))
            or not isinstance(exc, Exception)
        ):
            return False
        raise SchemaError(f"schema registry at {self.url} is unreachable: {exc}") from exc


class HttpRegistry:
    """A Confluent-compatible Schema Registry reached over HTTP.

    Args:
        url: registry base URL, e.g. ``http://127.0.0.1:8081``.
        basic_auth_user_info: ``user:password`` when the registry wants basic auth.
        compatibility: level checked (``/compatibility/subjects/.../versions/latest``) before register.
    """

    def __init__(self, url: str, *, basic_auth_user_info: str | None = None, compatibility: str = "BACKWARD"):
        from confluent_kafka.schema_registry import SchemaRegistryClient

        conf: dict[str, Any] = {"url": url}
        if basic_auth_user_info:
            conf["basic.auth.user.info"] = basic_auth_user_info
        self._client = SchemaRegistryClient(conf)
        self.url = url
        self.compatibility = compatibility
        self._ids: dict[str, int] = {}
        self._schemas: dict[int, dict[str, Any]] = {}

    def register(self, subject: str, schema: dict[str, Any]) -> int:
        """Check compatibility with the latest version, then register; return the id.

        Raises:
            SchemaIncompatibleError: the registry says the change is incompatible.
            SchemaError: the registry answered an error (its status and message kept), or cannot be
                reached (the message names its URL).
        """
        from confluent_kafka.schema_registry import Schema
        from confluent_kafka.schema_registry.error import SchemaRegistryError

        s = Schema(json.dumps(schema), "AVRO")
        try:
            try:
                with _Unreachable(self.url):
                    ok = self._client.test_compatibility(subject, s)
            except SchemaRegistryError as exc:
                if exc.http_status_code != 404:  # 404: first version of the subject
                    raise
                ok = True
            if not ok:
                raise SchemaIncompatibleError(
                    subject, [f"registry refused the change ({self.compatibility})"]
                )
            with _Unreachable(self.url):
                sid = self._client.register_schema(subject, s)
        except SchemaRegistryError as exc:
            raise SchemaError(f"schema registry error {exc.http_status_code}: {exc.error_message}") from exc
        self._ids[subject] = sid
        self._schemas[sid] = schema
        return sid

    def id_for(self, subject: str) -> int:
        """Id of the latest version of ``subject`` (cached).

        Raises:
            SchemaNotFoundError: the registry does not know the subject.
            SchemaError: the registry cannot be reached (the message names its URL).
        """
        if subject not in self._ids:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                with _Unreachable(self.url):
                    schema_id = self._client.get_latest_version(subject).schema_id
                if schema_id is None:
                    raise SchemaNotFoundError(f"subject {subject!r}: the registry returned no id")
                self._ids[subject] = schema_id
            except SchemaRegistryError as exc:
                raise SchemaNotFoundError(f"subject {subject!r}: {exc.error_message}") from exc
        return self._ids[subject]

    def schema_for(self, schema_id: int) -> dict[str, Any]:
        """Schema with ``schema_id`` (cached).

        Raises:
            SchemaNotFoundError: unknown id.
            SchemaError: the registry cannot be reached (the message names its URL).
        """
        if schema_id not in self._schemas:
            from confluent_kafka.schema_registry.error import SchemaRegistryError

            try:
                with _Unreachable(self.url):
                    text = self._client.get_schema(schema_id).schema_str
                if text is None:
                    raise SchemaNotFoundError(f"schema id {schema_id}: the registry returned no schema")
                self._schemas[schema_id] = json.loads(text)
            except SchemaRegistryError as exc:
                raise SchemaNotFoundError(f"schema id {schema_id}: {exc.error_message}") from exc
        return self._schemas[schema_id]


def make_registry(url: str = "", *, compatibility: str = "BACKWARD", **kwargs: Any) -> SchemaRegistry:
    """The HTTP registry when ``url`` is given, else the embedded one.

    With the HTTP registry every local ``.avsc`` is registered on first use (after the gate).
    """
    if url:
        reg = HttpRegistry(url, compatibility=compatibility, **kwargs)
        for name, schema in load_avsc_dir().items():
            reg.register(name, schema)
        return reg
    return EmbeddedRegistry(compatibility=compatibility)
