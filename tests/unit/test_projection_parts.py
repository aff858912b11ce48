"""Pure parts of the projection operations: entity forms of the audit, the archive's header encoding,
schema names, the registry and the status documents (no network)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from projections.archive import _headers_json, headers_from_json
from projections.audit import entity_candidates
from projections.registry import PROJECTIONS, PartitionStatus, ProjectionStatus, get_projection
from projections.runner import schema_name


def test_entity_forms_name_the_key_subject_and_source_to_match() -> None:
    """run:/config: match the entity and its bare value; agent:/service: also a source; a bare text matches itself."""
    assert entity_candidates("run:django-1") == (["run:django-1", "django-1"], [])
    assert entity_candidates("agent:swe") == (["agent:swe", "swe"], ["/agents/swe"])
    assert entity_candidates("service:api")[1] == ["/services/api"]
    assert entity_candidates("plain-key") == (["plain-key"], [])
    with pytest.raises(ValueError, match="missing"):
        entity_candidates("run:")
    with pytest.raises(ValueError):
        entity_candidates("  ")


def test_archived_headers_round_trip_with_order_repeats_and_nulls() -> None:
    """Headers survive the archive's JSON column byte for byte, in order, with repeats and null values."""
    headers = (("ce_id", b"1"), ("x", None), ("x", b"\x00\xff"), ("ce_type", b"t"))
    assert headers_from_json(_headers_json(headers)) == headers


def test_schema_names_are_checked_identifiers() -> None:
    """A projection's schema is proj_<name>[_suffix]; a name that is no lower-case identifier is refused."""
    assert schema_name("agent_runs", "rebuild") == "proj_agent_runs_rebuild"
    with pytest.raises(ValueError):
        schema_name("Bad-Name")


def test_registry_knows_the_views_the_insight_feed_and_the_archive() -> None:
    """The registry builds each known projection by name and names the known ones for an unknown name."""
    assert {"agent_runs", "insights", "archive"} <= set(PROJECTIONS)
    assert get_projection("insights").topics == ("insights.runs",)
    assert "backbone.dlq" in get_projection("archive").topics
    with pytest.raises(KeyError, match="known: "):
        get_projection("nope")


def test_status_json_flags_a_due_rebuild_and_formats_times() -> None:
    """A status whose stored version differs from the code's says a rebuild is due; times are RFC 3339."""
    t = datetime(2025, 11, 18, 22, 55, 1, tzinfo=UTC)
    p = PartitionStatus(topic="a", partition=0, checkpoint=5, log_end=8, lag_events=3, advanced_at=t)
    doc = ProjectionStatus(name="x", version=2, stored_version=1, schema="proj_x", topics=("a",), partitions=(p,),
                           lag_events=3, last_advanced_at=t).as_json()  # fmt: skip
    assert doc["rebuild_due"] is True and doc["partitions"][0]["advanced_at"] == "2025-11-18T22:55:01.000Z"


def test_ids_travel_as_one_string_unless_an_id_holds_the_separator_or_is_empty() -> None:
    """The seen-id parameter: one U+001F-joined string normally, an array when splitting would be wrong."""
    from projections.runner import _ids_param

    assert _ids_param(["a", "b-1"]) == ("string_to_array(%s, chr(31))", "a\x1fb-1")
    assert _ids_param(["a", "x\x1fy"]) == ("%s::text[]", ["a", "x\x1fy"])
    assert _ids_param(["a", ""]) == ("%s::text[]", ["a", ""])
    assert _ids_param([""]) == ("%s::text[]", [""])


def test_runners_raise_the_collector_threshold_only_while_the_last_of_them_runs() -> None:
    """The first-generation threshold is raised (never lowered) while any runner runs, and the saved
    thresholds come back when the last one returns, whatever order they return in."""
    import gc

    from projections.runner import _collector_threshold

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)
        outer = _collector_threshold(10_000)
        outer.__enter__()
        assert gc.get_threshold() == (10_000, 10, 10)
        with _collector_threshold(5_000):  # lower than the raised one: left as it is
            assert gc.get_threshold() == (10_000, 10, 10)
        assert gc.get_threshold() == (10_000, 10, 10)  # the outer one still runs
        with _collector_threshold(None):
            assert gc.get_threshold() == (10_000, 10, 10)
        outer.__exit__(None, None, None)
        assert gc.get_threshold() == (700, 10, 10)
        gc.set_threshold(50_000, 5, 5)
        with _collector_threshold(10_000):
            assert gc.get_threshold() == (50_000, 5, 5)
        assert gc.get_threshold() == (50_000, 5, 5)
    finally:
        gc.set_threshold(*saved)


def test_every_entry_point_uses_the_runners_default_batch_size() -> None:
    """The runner, the rebuild, ``backbone projections run|rebuild`` and ``backbone project`` default to
    one batch size (the one ``make bench`` reports as the default)."""
    import inspect

    from backbone.cli.core import project
    from backbone.cli.projections import make_runners, rebuild_cmd, run_cmd
    from projections.rebuild import rebuild
    from projections.runner import DEFAULT_BATCH_SIZE, ProjectionRunner

    for fn in (ProjectionRunner.__init__, rebuild, make_runners, rebuild_cmd, run_cmd, project):
        assert inspect.signature(fn).parameters["batch_size"].default == DEFAULT_BATCH_SIZE, fn.__qualname__
