"""CDC normalisation on the log: raw Debezium records in, typed ``sophia.cdc.RowChanged`` events out.

Two halves:

* **The importer** (:func:`connect_records`, :func:`import_debezium_file`) replays a file of recorded
  Debezium change events (one JSON value per line, with or without the Connect JSON schema wrapper,
  e.g. ``../shared/data/cdc/debezium/postgres_inventory_products.jsonl``) onto the raw CDC topics as
  Kafka Connect's ``JsonConverter`` writes them: topic ``<topic.prefix>.<schema>.<table>``, value =
  the line's JSON bytes unchanged, key = the primary-key struct as JSON (``{"id":101}``, wrapped in
  ``{"schema", "payload"}`` when the value is), a tombstone (same key, ``null`` value) after each
  delete (``tombstones.on.delete=true``), keyed records partitioned with murmur2 as the Java
  producer does.
* **The normaliser** (:class:`CdcNormaliser`) consumes raw CDC topics (a regex subscription,
  :data:`RAW_TOPIC_PATTERN`, or a list), parses each value with :func:`connectors.debezium.parse_change_event`
  and produces a ``sophia.cdc.RowChanged`` event to ``cdc.changes`` with CloudEvents headers. Its id is
  derived from (connector, lsn, table, key, op), so replaying the same history yields the same ids and
  the projections de-duplicate. Records that are not change events go to the dead-letter topic with
  their raw bytes and the reason; processing goes on. Offsets are committed only after the batch's
  outputs and dead letters are acknowledged (at least once; duplicates carry the same id).
"""

from connectors.cdc.importer import (
    ConnectRecord,
    ImportReport,
    connect_records,
    ensure_changes_topic,
    import_debezium_file,
)
from connectors.cdc.mapping import (
    CDC_TOPICS,
    CHANGES_TOPIC,
    DEFAULT_TOPIC_PREFIX,
    RAW_TOPIC_PATTERN,
    ROW_CHANGED,
    change_event_id,
    from_avro,
    normalise_record,
    raw_topic_pattern,
    row_key,
    to_avro,
)
from connectors.cdc.normaliser import CdcNormaliser, NormaliserStats
from connectors.problems import ImportProblem

__all__ = [
    "CDC_TOPICS",
    "CHANGES_TOPIC",
    "DEFAULT_TOPIC_PREFIX",
    "RAW_TOPIC_PATTERN",
    "ROW_CHANGED",
    "CdcNormaliser",
    "ConnectRecord",
    "ImportProblem",
    "ImportReport",
    "NormaliserStats",
    "change_event_id",
    "connect_records",
    "ensure_changes_topic",
    "from_avro",
    "import_debezium_file",
    "normalise_record",
    "raw_topic_pattern",
    "row_key",
    "to_avro",
]
