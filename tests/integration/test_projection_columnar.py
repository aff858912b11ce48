"""The runner's columnar path (streams.columnar + AgentRunsProjection.apply_columns) against the
per-record path, on the real runs, through real Tansu and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
from confluent_kafka import Consumer

from connectors.agent_runs import ParsedRun, iter_runs
from core.settings import PostgresSettings, Settings
from projections.agent_runs import AgentRunsProjection
from projections.runner import ProjectionRunner
from streams.columnar import decode_columnar
from streams.consumer import ConsumedEvent, decode_message, make_consumer
from streams.envelope import Event
from streams.producer import EventProducer
from streams.registry import EmbeddedRegistry
from streams.replay import read_range
from streams.serde import AvroSerde

pytestmark = pytest.mark.integration
DEMO = Path(__file__).resolve().parents[2] / "datasets" / "agent_runs"


@pytest.fixture(scope="module")
def serde() -> AvroSerde:
    return AvroSerde(EmbeddedRegistry())


@pytest.fixture(scope="module")
def demo_events() -> list[Event]:
    return [e for r in iter_runs(DEMO) if isinstance(r, ParsedRun) for e in r.events]


def _dump(url: str, schema: str) -> tuple[list, list]:
    with psycopg.connect(url) as c:
        runs = c.execute(f"SELECT * FROM {schema}.agent_runs ORDER BY run_id").fetchall()
        models = c.execute(
            f"SELECT * FROM {schema}.agent_run_models ORDER BY run_id, model, provider"
        ).fetchall()
    return runs, models


def _consume_all(settings: Settings, topic: str, n: int) -> list:
    c: Consumer = make_consumer(settings.kafka, f"read-{topic}")
    c.subscribe([topic])
    msgs: list = []
    try:
        while len(msgs) < n:
            msgs += [m for m in c.consume(500, 1.0) if m.error() is None]
    finally:
        c.close()
    return msgs


def test_columnar_and_per_record_paths_build_the_same_view(
    settings: Settings, serde: AvroSerde, pg_url: str, create_topic: Callable, unique_name: Callable,
    demo_events: list[Event],
) -> None:  # fmt: skip
    """The 25 real runs, a re-sent copy of 100 events and two bad records: the columnar runner (small
    batches) and the per-record runner (one big batch) end with equal tables, the same counts and the
    same two dead letters."""
    topic = create_topic(unique_name("col"), 6)
    dlq = create_topic(unique_name("dlq"), 1)
    s = settings.model_copy(update={"postgres": PostgresSettings(url=pg_url)})
    bad_key = demo_events[500]
    mismatched = Event(schema=bad_key.schema, key="not-the-run", data=bad_key.data,
                       attributes=replace(bad_key.attributes, id="mismatch-1"))  # fmt: skip
    with EventProducer(s.kafka, serde) as p:
        p.produce_many(topic, demo_events[:900])
        p.produce(topic, mismatched)
        p.produce_raw(topic, key=b"x", value=b"\x00garbage", headers=[("ce_id", b"g-1")])
        p.produce_many(topic, demo_events[900:] + demo_events[:100])  # the last 100 are duplicates
    results = {}
    for name, columnar, batch in (("col", True, 97), ("rec", False, 5000)):
        runner = ProjectionRunner(
            s, serde, AgentRunsProjection([topic]), group_id=f"g-{name}-{topic}", dlq_topic=dlq,
            schema=f"proj_agent_runs_{name}", batch_size=batch, columnar=columnar,
        )  # fmt: skip
        stats = runner.run(until_caught_up=True, max_wait_seconds=120)
        results[name] = stats
        assert (stats.applied, stats.duplicates, stats.dead_lettered) == (len(demo_events), 100, 2)
        assert (stats.columnar_batches > stats.batches // 2) if columnar else stats.columnar_batches == 0
    col, rec = _dump(pg_url, "proj_agent_runs_col"), _dump(pg_url, "proj_agent_runs_rec")
    assert col == rec
    assert len(col[0]) == 25 and sum(r[9] for r in col[0]) == 856  # runs, llm_calls
    letters = [r for r in read_range(s.kafka, serde, dlq) if isinstance(r, ConsumedEvent)]
    reasons = sorted(lt.data["reason"] for lt in letters)
    assert len(reasons) == 4 and reasons[0] == reasons[1] and reasons[2] == reasons[3]
    assert any("does not match key" in r for r in reasons) and any("CloudEvents" in r for r in reasons)


def test_decode_columnar_matches_the_per_record_decoder_and_refuses_what_it_refuses(
    settings: Settings,
    serde: AvroSerde,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list[Event],
) -> None:
    """Column values equal fastavro's per record; a batch with a bad record decodes to None."""
    topic = create_topic(unique_name("dec"), 1)
    sample = demo_events[:300]
    with EventProducer(settings.kafka, serde) as p:
        p.produce_many(topic, sample)
        p.produce_raw(topic, key=b"k", value=serde.encode(sample[0].schema, sample[0].data) + b"\x01",
                           headers=sample[0].attributes.to_headers())  # fmt: skip
        p.produce_raw(topic, key=b"k", value=serde.encode(sample[0].schema, sample[0].data),
                           headers=[("ce_id", b"only-an-id")])  # fmt: skip
    msgs = _consume_all(settings, topic, 302)
    batch = decode_columnar(serde, msgs[:300])
    assert batch is not None and len(batch) == 300
    assert batch.event_ids == [e.attributes.id for e in sample]
    llm = batch.frames["sophia.agent.LlmCall"]
    expected = [e for e in sample if e.schema == "sophia.agent.LlmCall"]
    assert llm["run_id"].to_list() == [e.data["run_id"] for e in expected]
    assert llm["prompt_tokens"].to_list() == [e.data["prompt_tokens"] for e in expected]
    assert llm["cost_usd"].to_list() == [e.data.get("cost_usd") for e in expected]
    assert [t.timestamp() for t in llm["event_time"].to_list()] == [
        e.data["event_time"].timestamp() for e in expected
    ]
    # a body with a stray byte in the middle of a block, or a record without CloudEvents attributes
    assert decode_columnar(serde, [msgs[300], *msgs[:10]]) is None
    assert decode_columnar(serde, [*msgs[:10], msgs[301]]) is None


def test_decode_columnar_checks_each_record_as_the_per_record_decoder_does(
    settings: Settings,
    serde: AvroSerde,
    create_topic: Callable,
    unique_name: Callable,
    demo_events: list[Event],
) -> None:
    """Each odd record, put behind 40 good ones: the batch decodes column-wise exactly when the
    per-record decoder accepts that record, with the same event id and key; and a batch of the ones it
    accepts has, in every column, the per-record decoder's values."""
    topic = create_topic(unique_name("odd"), 1)
    good = demo_events[:40]
    e = demo_events[0]
    body = serde.encode(e.schema, e.data)
    h = e.attributes.to_headers()

    def with_header(name: str, value: bytes | None, *, drop: bool = False) -> list[tuple[str, bytes | None]]:
        kept = [(k, v) for k, v in h if k != name] if drop else list(h)
        return kept if drop and value is None else [*kept, (name, value)]

    odd = {  # label -> (key, value, headers, accepted by the per-record decoder)
        "extra header without value": (b"k", body, with_header("x-note", None), True),
        "repeated ce_id, the last wins": (b"k", body, with_header("ce_id", b"second-id"), True),
        "repeated ce_id, the last without value": (b"k", body, with_header("ce_id", None), True),
        "null key": (None, body, h, True),
        "key not UTF-8": (b"\xff\xfe", body, h, True),
        "header value not UTF-8": (b"k", body, with_header("x-bin", b"\xff"), False),
        "ce_time not a time": (b"k", body, with_header("ce_time", b"yesterday"), False),
        "spec version 0.3": (b"k", body, with_header("ce_specversion", b"0.3"), False),
        "no ce_source": (b"k", body, with_header("ce_source", None, drop=True), False),
        "no headers": (b"k", body, [], False),
        "unknown schema id": (b"k", b"\x00\x00\x0f\x42\x3f" + body[5:], h, False),
        "no magic byte": (b"k", b"\x01" + body[1:], h, False),
        "shorter than the framing": (b"k", b"\x00\x00", h, False),
        "tombstone": (b"k", None, h, False),
    }
    with EventProducer(settings.kafka, serde) as p:
        p.produce_many(topic, good)
        for key, value, headers, _ in odd.values():
            p.produce_raw(topic, key=key, value=value, headers=headers or None)
    msgs = _consume_all(settings, topic, len(good) + len(odd))
    base, extra = msgs[: len(good)], msgs[len(good) :]
    for (label, (_, _, _, accepted)), m in zip(odd.items(), extra, strict=True):
        one = decode_message(serde, m)
        assert isinstance(one, ConsumedEvent) is accepted, label
        batch = decode_columnar(serde, [*base, m])
        assert (batch is not None) is accepted, label
        if batch is not None:
            assert isinstance(one, ConsumedEvent)
            assert batch.event_ids[-1] == one.attributes.id, label
            assert batch.keys[-1] == one.key, label
    # the odd records that decode, in one batch: every column equals the per-record decoder's value
    mixed = [extra[0], extra[1], *base, extra[2], extra[3], extra[4]]
    batch = decode_columnar(serde, mixed)
    assert batch is not None and len(batch.frames) == 3
    records = [decode_message(serde, m) for m in mixed]
    assert all(isinstance(r, ConsumedEvent) for r in records)
    assert batch.event_ids == [r.attributes.id for r in records] and batch.keys == [r.key for r in records]
    rows = 0
    for name, frame in batch.frames.items():
        for row in frame.iter_rows(named=True):
            one = records[row["_pos"]]
            assert one.schema == name
            assert {k: row[k] for k in one.data} == one.data, row["_pos"]
            assert (row["_event_id"], row["_key"], row["_offset"]) == (one.attributes.id, one.key, one.offset)
            rows += 1
    assert rows == len(mixed)
