"""The processors' Faust consumer (:class:`processors.faust_support.SeekingConsumer`) against real Tansu:
a worker whose group has committed nothing loses no record when Faust pauses its partitions, Faust's
"seek to committed offsets" takes such partitions back to the start of the log, and no record is handed
to a stream between that seek and the flow's resumption (which would clear it).

The worker is ``faust_seek_probe.py`` (a subprocess: a Faust worker owns its process's event loop and
signals); see its docstring for the steps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from confluent_kafka import Producer

from core.settings import Settings

PROBE = Path(__file__).with_name("faust_seek_probe.py")
FIRST, SECOND = 6, 4  # records before the probe starts, records it produces while paused


def test_no_record_is_skipped_when_partitions_without_a_committed_offset_are_paused_and_sought(
    settings: Settings, unique_name: Callable[[str], str], create_topic: Callable[..., str], tmp_path: Path
) -> None:
    topic = create_topic(unique_name("faust-seek"), partitions=2)
    producer = Producer(settings.kafka.librdkafka())
    for i in range(FIRST):
        producer.produce(topic, key=f"k{i}".encode(), value=b"first", partition=i % 2)
    assert producer.flush(10) == 0
    result_path = tmp_path / "result.json"
    env = {
        **os.environ,
        "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "BACKBONE_KAFKA__SESSION_TIMEOUT_MS": str(settings.kafka.session_timeout_ms),
        "BACKBONE_STATE_DIR": str(tmp_path),
    }
    proc = subprocess.run(
        [sys.executable, str(PROBE), topic, unique_name("faust-seek-app"), str(result_path), str(FIRST), str(SECOND)],
        env=env, check=False, capture_output=True, text=True, timeout=150,
    )  # fmt: skip
    assert result_path.exists(), proc.stderr[-3000:]
    result = json.loads(result_path.read_text())
    assert "error" not in result, result
    offsets = [tuple(pair) for pair in result["offsets"]]
    every = {(p, o) for p in (0, 1) for o in range(FIRST // 2 + SECOND // 2)}

    assert result["first_seen"] and result["empty_set_records"] == 0 and result["seen_while_paused"] == 0
    # the second records, prefetched while the partitions were paused, reach the agent once resumed
    assert result["second_seen"] and set(offsets[: FIRST + SECOND]) == every, result
    # "seek to committed" with nothing committed: back to the start, held until the flow resumes, then
    # every record once more
    assert result["held_after_seek"] == 0 and result["seen_again"], result
    assert Counter(offsets) == dict.fromkeys(every, 2), offsets
