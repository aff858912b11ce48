"""Avro schema changes with the compatibility verdict a Confluent Schema Registry documents for them.

The fake registry (:mod:`tests.fakes.schema_registry`) answers compatibility questions from this table
only, so that the HTTP client is not tested against this project's own checker (``streams.compat``).
Every verdict below was written by hand from one of two sources, never computed:

* ``CONFLUENT``: Confluent's "Schema Evolution and Compatibility" page, whose summary table says which
  changes each compatibility type allows: BACKWARD "delete fields, add optional fields", FORWARD "add
  fields, delete optional fields", FULL "add optional fields, delete optional fields", NONE "all changes
  are accepted".
* ``AVRO_SPEC``: the Avro specification's "Schema Resolution" section, which Schema Registry's Avro
  compatibility check implements (BACKWARD: the new schema is the reader and the latest registered one
  the writer; FORWARD: the other way round; FULL: both). Its rules used here: records, enums and fixed
  must have the same unqualified name (or the reader an alias naming the writer) and fixed the same size;
  a reader field missing from the writer takes its default, and without a default is an error; a writer
  field missing from the reader is ignored; int promotes to long, float and double, long to float and
  double, float to double, string to bytes and bytes to string; an enum symbol of the writer missing from
  the reader is an error unless the reader's enum has a default; a writer union needs every branch
  readable, a reader union needs one branch that reads the writer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

__all__ = ["AVRO_SPEC", "CONFLUENT", "DOCUMENTED_PAIRS", "DocumentedPair", "canonical", "documented_verdict"]

CONFLUENT = "https://docs.confluent.io/platform/current/schema-registry/fundamentals/schema-evolution.html"
AVRO_SPEC = "https://avro.apache.org/docs/1.11.1/specification/#schema-resolution"


@dataclass(frozen=True)
class DocumentedPair:
    """An old (latest registered) and a new schema, the level, and the documented verdict."""

    case: str
    level: str
    old: dict[str, Any]
    new: dict[str, Any]
    compatible: bool
    rule: str
    source: str


def canonical(schema: Any) -> str:
    """The text a schema is compared by: its JSON with sorted keys and no spacing."""
    return json.dumps(schema, sort_keys=True, separators=(",", ":"))


def _user(*fields: dict[str, Any], name: str = "User", namespace: str = "example.avro", **extra: Any) -> dict:
    return {"type": "record", "name": name, "namespace": namespace, "fields": list(fields), **extra}


def _f(name: str, type_: Any, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": type_, **extra}


def _enum(*symbols: str, name: str = "Suit", **extra: Any) -> dict[str, Any]:
    return _user(_f("suit", {"type": "enum", "name": name, "symbols": list(symbols), **extra}))


def _fixed(size: int, name: str = "Md5") -> dict[str, Any]:
    return _user(_f("hash", {"type": "fixed", "name": name, "size": size}))


NAME = _f("name", "string")
NUMBER = _f("favorite_number", "int")
NUMBER_LONG = _f("favorite_number", "long")
COLOR = _f("favorite_color", "string")
COLOR_DEFAULT = _f("favorite_color", "string", default="green")
USER_V1 = _user(NAME, NUMBER)

DOCUMENTED_PAIRS: tuple[DocumentedPair, ...] = (
    # BACKWARD: the new schema reads data written with the latest registered one
    DocumentedPair("backward-add-field-with-default", "BACKWARD", USER_V1, _user(NAME, NUMBER, COLOR_DEFAULT),
                   True, "BACKWARD allows adding optional fields; the reader fills in the default", CONFLUENT),
    DocumentedPair("backward-add-field-without-default", "BACKWARD", USER_V1, _user(NAME, NUMBER, COLOR),
                   False, "a reader field absent from the writer and without a default is an error", AVRO_SPEC),
    DocumentedPair("backward-delete-field", "BACKWARD", USER_V1, _user(NAME),
                   True, "BACKWARD allows deleting fields; the reader ignores the writer's extra field", CONFLUENT),
    DocumentedPair("backward-rename-field-with-alias", "BACKWARD", USER_V1,
                   _user(NAME, _f("fav_number", "int", aliases=["favorite_number"])),
                   True, "a reader field's alias matches the writer's field name", AVRO_SPEC),
    DocumentedPair("backward-rename-field-without-alias", "BACKWARD", USER_V1, _user(NAME, _f("fav_number", "int")),
                   False, "the renamed field is a new reader field without a default", AVRO_SPEC),
    DocumentedPair("backward-promote-int-to-long", "BACKWARD", USER_V1, _user(NAME, NUMBER_LONG),
                   True, "int is promoted to long", AVRO_SPEC),
    DocumentedPair("backward-narrow-long-to-int", "BACKWARD", _user(NAME, NUMBER_LONG), USER_V1,
                   False, "long is not promoted to int", AVRO_SPEC),
    DocumentedPair("backward-promote-float-to-double", "BACKWARD", _user(_f("score", "float")),
                   _user(_f("score", "double")), True, "float is promoted to double", AVRO_SPEC),
    DocumentedPair("backward-narrow-double-to-float", "BACKWARD", _user(_f("score", "double")),
                   _user(_f("score", "float")), False, "double is not promoted to float", AVRO_SPEC),
    DocumentedPair("backward-string-to-bytes", "BACKWARD", USER_V1, _user(_f("name", "bytes"), NUMBER),
                   True, "string is promoted to bytes", AVRO_SPEC),
    DocumentedPair("backward-string-to-int", "BACKWARD", USER_V1, _user(_f("name", "int"), NUMBER),
                   False, "string is not promoted to int", AVRO_SPEC),
    DocumentedPair("backward-field-into-union", "BACKWARD", USER_V1,
                   _user(_f("name", ["null", "string"], default=None), NUMBER),
                   True, "a reader union reads the writer through its matching branch", AVRO_SPEC),
    DocumentedPair("backward-union-into-field", "BACKWARD", _user(_f("name", ["null", "string"]), NUMBER), USER_V1,
                   False, "the writer union's null branch cannot be read as string", AVRO_SPEC),
    DocumentedPair("backward-promote-in-union", "BACKWARD", _user(_f("n", ["null", "int"])),
                   _user(_f("n", ["null", "long"])), True, "each writer branch has a reader branch: int as long",
                   AVRO_SPEC),
    DocumentedPair("backward-promote-array-items", "BACKWARD", _user(_f("xs", {"type": "array", "items": "int"})),
                   _user(_f("xs", {"type": "array", "items": "long"})),
                   True, "arrays resolve by their items: int as long", AVRO_SPEC),
    DocumentedPair("backward-narrow-map-values", "BACKWARD", _user(_f("m", {"type": "map", "values": "long"})),
                   _user(_f("m", {"type": "map", "values": "int"})),
                   False, "maps resolve by their values: long is not promoted to int", AVRO_SPEC),
    DocumentedPair("backward-enum-add-symbol", "BACKWARD", _enum("SPADES", "HEARTS"),
                   _enum("SPADES", "HEARTS", "CLUBS"), True, "every writer symbol is in the reader's enum",
                   AVRO_SPEC),
    DocumentedPair("backward-enum-remove-symbol", "BACKWARD", _enum("SPADES", "HEARTS", "CLUBS"),
                   _enum("SPADES", "HEARTS"), False, "a writer symbol missing from a reader enum without default",
                   AVRO_SPEC),
    DocumentedPair("backward-enum-remove-symbol-with-default", "BACKWARD", _enum("SPADES", "HEARTS", "CLUBS"),
                   _enum("SPADES", "HEARTS", default="SPADES"),
                   True, "a writer symbol missing from the reader takes the reader enum's default", AVRO_SPEC),
    DocumentedPair("backward-enum-renamed", "BACKWARD", _enum("SPADES", "HEARTS"),
                   _enum("SPADES", "HEARTS", name="Card"), False, "enums must have the same name", AVRO_SPEC),
    DocumentedPair("backward-fixed-resized", "BACKWARD", _fixed(16), _fixed(32),
                   False, "fixed must have the same size", AVRO_SPEC),
    DocumentedPair("backward-fixed-renamed", "BACKWARD", _fixed(16), _fixed(16, name="Digest"),
                   False, "fixed must have the same name", AVRO_SPEC),
    DocumentedPair("backward-record-renamed", "BACKWARD", USER_V1, _user(NAME, NUMBER, name="Person"),
                   False, "records must have the same name", AVRO_SPEC),
    DocumentedPair("backward-record-renamed-with-alias", "BACKWARD", USER_V1,
                   _user(NAME, NUMBER, name="Person", aliases=["example.avro.User"]),
                   True, "the reader record's alias names the writer record", AVRO_SPEC),
    DocumentedPair("backward-record-namespace-changed", "BACKWARD", USER_V1,
                   _user(NAME, NUMBER, namespace="example.people"),
                   True, "records are matched by their unqualified name", AVRO_SPEC),
    # FORWARD: the latest registered schema reads data written with the new one
    DocumentedPair("forward-add-field-without-default", "FORWARD", USER_V1, _user(NAME, NUMBER, COLOR),
                   True, "FORWARD allows adding fields; the old reader ignores them", CONFLUENT),
    DocumentedPair("forward-delete-field-without-default", "FORWARD", USER_V1, _user(NAME),
                   False, "the old reader's field has no default and the new writer lacks it", AVRO_SPEC),
    DocumentedPair("forward-delete-field-with-default", "FORWARD", _user(NAME, NUMBER, COLOR_DEFAULT), USER_V1,
                   True, "FORWARD allows deleting optional fields; the old reader fills in the default",
                   CONFLUENT),
    DocumentedPair("forward-enum-add-symbol", "FORWARD", _enum("SPADES", "HEARTS"),
                   _enum("SPADES", "HEARTS", "CLUBS"), False, "the old reader's enum lacks the new symbol",
                   AVRO_SPEC),
    DocumentedPair("forward-enum-add-symbol-old-default", "FORWARD", _enum("SPADES", "HEARTS", default="SPADES"),
                   _enum("SPADES", "HEARTS", "CLUBS", default="SPADES"),
                   True, "the old reader's enum default stands in for the new symbol", AVRO_SPEC),
    DocumentedPair("forward-promote-int-to-long", "FORWARD", USER_V1, _user(NAME, NUMBER_LONG),
                   False, "the old reader's int cannot read the new writer's long", AVRO_SPEC),
    DocumentedPair("forward-narrow-long-to-int", "FORWARD", _user(NAME, NUMBER_LONG), USER_V1,
                   True, "the old reader's long reads the new writer's int", AVRO_SPEC),
    # FULL: both
    DocumentedPair("full-add-field-with-default", "FULL", USER_V1, _user(NAME, NUMBER, COLOR_DEFAULT),
                   True, "FULL allows adding optional fields", CONFLUENT),
    DocumentedPair("full-add-field-without-default", "FULL", USER_V1, _user(NAME, NUMBER, COLOR),
                   False, "FULL allows adding optional fields only", CONFLUENT),
    DocumentedPair("full-delete-field-with-default", "FULL", _user(NAME, NUMBER, COLOR_DEFAULT), USER_V1,
                   True, "FULL allows deleting optional fields", CONFLUENT),
    DocumentedPair("full-delete-field-without-default", "FULL", USER_V1, _user(NAME),
                   False, "FULL allows deleting optional fields only", CONFLUENT),
    DocumentedPair("full-promote-int-to-long", "FULL", USER_V1, _user(NAME, NUMBER_LONG),
                   False, "int reads as long but long does not read as int", AVRO_SPEC),
    # NONE
    DocumentedPair("none-string-to-int", "NONE", USER_V1, _user(_f("name", "int"), NUMBER),
                   True, "NONE accepts all changes", CONFLUENT),
)  # fmt: skip


def _base_level(level: str) -> str:
    return level.upper().removesuffix("_TRANSITIVE")


_BY_KEY = {(p.level, canonical(p.old), canonical(p.new)): p for p in DOCUMENTED_PAIRS}
assert len(_BY_KEY) == len(DOCUMENTED_PAIRS), "two documented pairs have the same schemas and level"


def documented_verdict(old: Any, new: Any, level: str) -> DocumentedPair | None:
    """The documented pair for registering ``new`` after ``old`` at ``level``; None when not documented.

    A ``_TRANSITIVE`` level asks the same question of each earlier version, so it looks up its base level.
    """
    return _BY_KEY.get((_base_level(level), canonical(old), canonical(new)))
