"""Avro serde in the Confluent wire format: magic byte ``0``, 4-byte big-endian schema id, Avro body.

Any Confluent-compatible tool reads the topics this writes. Encoding validates against the schema and
names the offending field; decoding resolves the writer's schema by id.
"""

from __future__ import annotations

import contextlib
import io
import struct
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import fastavro
from fastavro.validation import validate

from core.settings import SchemaRegistrySettings, Settings
from streams.envelope import parse_time
from streams.errors import DeserializationError, SchemaNotFoundError, SchemaValidationError
from streams.registry import SchemaRegistry, make_registry

__all__ = ["MAGIC_BYTE", "AvroSerde", "coerce_json_datum", "serde_from_settings", "timestamp_fields"]

MAGIC_BYTE = 0
_HEADER = struct.Struct(">bI")


class AvroSerde:
    """Encode and decode Avro records framed for the Confluent wire format.

    Args:
        registry: where schema ids come from.
        validate_on_encode: run the full field-by-field check before every write. Off by default:
            the encoder refuses unknown fields itself, fastavro's writer refuses wrong types and
            missing required fields, and when it does the full check runs to name the field. On, it
            also catches what the writer would coerce silently (an ``int`` out of 32-bit range).
    """

    def __init__(self, registry: SchemaRegistry, *, validate_on_encode: bool = False) -> None:
        self.registry = registry
        self.validate_on_encode = validate_on_encode
        self._writers: dict[str, tuple[int, Any]] = {}
        self._encoders: dict[str, tuple[bytes, Any, frozenset[str], frozenset[str]]] = {}
        self._readers: dict[int, tuple[str, Any]] = {}

    def _writer(self, schema_name: str) -> tuple[int, Any]:
        w = self._writers.get(schema_name)
        if w is None:
            sid = self.registry.id_for(schema_name)
            parsed = fastavro.parse_schema(self.registry.schema_for(sid))
            w = self._writers[schema_name] = (sid, parsed)
        return w

    def _encoder(self, schema_name: str) -> tuple[bytes, Any, frozenset[str], frozenset[str]]:
        """``(Confluent header, parsed schema, field names, names of fields without default)``."""
        e = self._encoders.get(schema_name)
        if e is None:
            sid, parsed = self._writer(schema_name)
            names = frozenset(f["name"] for f in parsed["fields"])
            required = frozenset(f["name"] for f in parsed["fields"] if "default" not in f)
            e = self._encoders[schema_name] = (_HEADER.pack(MAGIC_BYTE, sid), parsed, names, required)
        return e

    def _reader(self, schema_id: int) -> tuple[str, Any]:
        r = self._readers.get(schema_id)
        if r is None:
            schema = self.registry.schema_for(schema_id)
            parsed = fastavro.parse_schema(schema)
            name = parsed["name"] if isinstance(parsed, dict) else str(schema_id)
            r = self._readers[schema_id] = (name, parsed)
        return r

    def check(self, schema_name: str, datum: Mapping[str, Any]) -> None:
        """Validate ``datum`` against the latest ``schema_name``.

        Raises:
            SchemaValidationError: naming the first field that does not match.
            SchemaNotFoundError: unknown schema.
        """
        _, parsed, names, required = self._encoder(schema_name)
        # one call into fastavro's compiled validator for the whole record; field by field (a call each)
        # only to name what does not match
        if (
            names.issuperset(datum)
            and required.issubset(datum)
            and validate(datum, parsed, raise_errors=False)
        ):
            return
        for field in parsed["fields"]:
            name = field["name"]
            if name not in datum:
                if "default" not in field:
                    raise SchemaValidationError(schema_name, name, "required field is missing")
                continue
            try:
                # without raise_errors a union's unmatched branches cost no exception (fastavro builds each
                # ValidationError's JSON text); the raising call runs only to chain fastavro's reason
                if validate(datum[name], field["type"], raise_errors=False):
                    continue
                validate(datum[name], field["type"], raise_errors=True)
            except Exception as exc:  # fastavro ValidationError or TypeError on odd values
                raise SchemaValidationError(
                    schema_name, name, f"value {datum[name]!r:.80} does not match {_type_text(field['type'])}"
                ) from exc
            raise SchemaValidationError(  # not reached: the raising call refuses what the first refused
                schema_name, name, f"value {datum[name]!r:.80} does not match {_type_text(field['type'])}"
            )
        extra = set(datum) - names
        if extra:
            raise SchemaValidationError(schema_name, sorted(extra)[0], "field is not in the schema")

    def encode(self, schema_name: str, datum: Mapping[str, Any]) -> bytes:
        """Encode ``datum`` with the latest version of ``schema_name``.

        Returns:
            Confluent-framed bytes.

        Raises:
            SchemaValidationError: the datum does not match (field named).
            SchemaNotFoundError: unknown schema.
        """
        encoder = self._encoders.get(schema_name)
        header, parsed, names, _ = encoder if encoder is not None else self._encoder(schema_name)
        if self.validate_on_encode or not names.issuperset(datum):
            self.check(schema_name, datum)  # raises, naming the field, when the datum does not match
        buf = io.BytesIO()
        buf.write(header)
        try:
            fastavro.schemaless_writer(buf, parsed, datum)
        except Exception as exc:
            self.check(schema_name, datum)  # names the field when it can
            raise SchemaValidationError(schema_name, None, str(exc)) from exc
        return buf.getvalue()

    def decode(self, payload: bytes | None) -> tuple[str, dict[str, Any]]:
        """Decode Confluent-framed bytes.

        Returns:
            ``(schema full name, datum)``; ``timestamp-millis`` fields come back as aware datetimes.

        Raises:
            DeserializationError: empty payload, wrong magic byte, unknown schema id, or a corrupt body.
        """
        if not payload or len(payload) < 5:
            raise DeserializationError("payload too short for the Confluent wire format (needs 5+ bytes)")
        magic, sid = _HEADER.unpack_from(payload)
        if magic != MAGIC_BYTE:
            raise DeserializationError(f"unknown magic byte {magic} (expected 0: Confluent wire format)")
        try:
            name, parsed = self._reader(sid)
        except SchemaNotFoundError as exc:
            raise DeserializationError(f"unknown schema id {sid}") from exc
        buf = io.BytesIO(payload)
        buf.seek(5)
        try:
            datum = fastavro.schemaless_reader(buf, parsed, None)
        except Exception as exc:
            raise DeserializationError(f"corrupt Avro body for {name} (schema id {sid}): {exc}") from exc
        if buf.tell() != len(payload):
            raise DeserializationError(
                f"{len(payload) - buf.tell()} trailing byte(s) after the {name} record (schema id {sid})"
            )
        return name, datum  # type: ignore[return-value]


def _type_text(t: Any) -> str:
    if isinstance(t, list):
        return " | ".join(_type_text(x) for x in t)
    if isinstance(t, dict):
        return t.get("logicalType") or t.get("name") or str(t.get("type"))
    return str(t)


_TS_FIELDS: dict[int, tuple[Mapping[str, Any], tuple[str, ...]]] = {}  # id(schema) -> (schema, names)
_TS_FIELDS_MAX = 1024


def timestamp_fields(schema: Mapping[str, Any]) -> list[str]:
    """Names of the top-level fields whose type (or a union branch) is ``timestamp-millis``/``-micros``.

    Remembered per schema object (the registry hands out one object per schema, never changed), so the
    HTTP ingest's per-request calls do not walk the fields again."""
    hit = _TS_FIELDS.get(id(schema))
    if hit is not None and hit[0] is schema:
        return list(hit[1])
    names = _timestamp_fields(schema)
    if len(_TS_FIELDS) >= _TS_FIELDS_MAX:
        _TS_FIELDS.clear()
    _TS_FIELDS[id(schema)] = (schema, tuple(names))  # the schema is kept, so its id is not reused
    return names


def _timestamp_fields(schema: Mapping[str, Any]) -> list[str]:
    names = []
    for f in schema["fields"]:
        t = f["type"]
        for b in t if isinstance(t, list) else [t]:
            if isinstance(b, dict) and b.get("logicalType") in ("timestamp-millis", "timestamp-micros"):
                names.append(f["name"])
                break
    return names


def coerce_json_datum(schema: Mapping[str, Any], datum: Mapping[str, Any]) -> dict[str, Any]:
    """JSON object to Avro datum: ``timestamp-millis`` fields given as RFC 3339 strings or epoch
    milliseconds become aware UTC datetimes; anything else is left for validation to judge.

    Args:
        schema: the record's Avro schema (parsed JSON).
        datum: the decoded JSON object.

    Returns:
        A new dict (the input is not changed).
    """
    out = dict(datum)
    for name in timestamp_fields(schema):
        v = out.get(name)
        if isinstance(v, str):
            try:
                out[name] = parse_time(v)
            except ValueError:
                pass  # left as is: validation names the field
        elif isinstance(v, int) and not isinstance(v, bool):
            with contextlib.suppress(OverflowError, OSError, ValueError):
                out[name] = datetime.fromtimestamp(v / 1000, UTC)
    return out


_SERDES: dict[SchemaRegistrySettings, AvroSerde] = {}


def serde_from_settings(settings: Settings | SchemaRegistrySettings) -> AvroSerde:
    """The one serde of every producer and consumer: Avro over the configured schema registry.

    The HTTP registry (a Confluent-compatible Schema Registry) when ``schema_registry.url`` is set, the
    embedded one (ids pinned in ``schemas/registry.json``) otherwise, so that every process of a
    deployment, the processors and the inference workers included, agrees on schema ids. One serde
    per registry setting is kept for the life of the process (its schema caches are shared).

    Args:
        settings: the backbone's settings, or only their ``schema_registry`` part.

    Returns:
        the cached :class:`AvroSerde` for that registry.

    Raises:
        streams.errors.SchemaError: the HTTP registry is unreachable or refuses a local schema
            (raised while the local ``.avsc`` files are registered, on first use of a URL).
    """
    registry_settings = settings.schema_registry if isinstance(settings, Settings) else settings
    serde = _SERDES.get(registry_settings)
    if serde is None:
        auth = registry_settings.basic_auth_user_info
        extra = {"basic_auth_user_info": auth.get_secret_value()} if registry_settings.url and auth else {}
        registry = make_registry(
            registry_settings.url, compatibility=registry_settings.compatibility, **extra
        )
        serde = _SERDES[registry_settings] = AvroSerde(registry)
    return serde
