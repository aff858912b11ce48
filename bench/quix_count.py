"""The counting job of ``bench/bench_processors.py`` in Quix Streams, run by ``.venv-quix/bin/python`` only.

Quix Streams pins confluent-kafka < 2.13 and the backbone runs 2.16, so this script lives in a virtualenv of
its own (``make bench-quix-venv``) and is started as a subprocess; nothing in the project imports it (mypy
and lint-imports do not look at ``bench/``).

Usage: ``quix_count.py BOOTSTRAP TOPIC N GROUP MODE STATE_DIR [DEADLINE_SECONDS]`` with MODE ``state`` (count per
key in Quix's state: ``sdf.apply(fn, stateful=True)``, a RocksDB store with a changelog topic, the peer of a
changelogged Faust table) or ``plain`` (count per key in a dict: ``sdf.apply(fn, metadata=True)``). Keys and
values are read as bytes (the records are Confluent-framed Avro; decoding is not part of the job).

How it stops: the processing function calls ``app.stop()`` once it has counted N records (Quix then leaves its
poll loop, commits its checkpoint and closes); a watchdog thread calls ``app.stop()`` after DEADLINE_SECONDS
(default 300) if N is never reached. Prints one JSON line ``{"records", "first", "last", "done"}``: how many
records were counted, and the ``time.monotonic()`` of the first record, of the N-th (or last) one, and of
``app.run()``'s return. Quix writes its state to RocksDB and its changelog topic at each checkpoint (every 5 s
by default, so maybe never within a short run) and at the stop; ``done`` includes that final checkpoint and
the consumer's close (2 ms without state, 40-180 ms with it here), which the bench counts, as a Faust table
pays its changelog sends inside the run.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import Any

from quixstreams import Application, State


def main(argv: list[str]) -> int:
    boot, topic_name, n, group, mode, state_dir = argv[0], argv[1], int(argv[2]), argv[3], argv[4], argv[5]
    deadline_s = float(argv[6]) if len(argv) > 6 else 300.0
    app = Application(
        broker_address=boot,
        consumer_group=group,
        auto_offset_reset="earliest",
        state_dir=state_dir,
        loglevel="WARNING",
        # Tansu gives a new group its first assignment after about half of session.timeout.ms
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000},
    )
    topic = app.topic(topic_name, key_deserializer="bytes", value_deserializer="bytes")
    sdf = app.dataframe(topic)
    seen = [0]
    first: list[float | None] = [None]
    last = [0.0]

    def tick() -> None:
        now = time.monotonic()
        if first[0] is None:
            first[0] = now
        seen[0] += 1
        last[0] = now
        if seen[0] == n:
            app.stop()

    if mode == "state":

        def count_in_state(value: bytes, state: State) -> None:
            state.set("count", state.get("count", 0) + 1)  # the state is scoped to the record's key
            tick()

        sdf.apply(count_in_state, stateful=True)
    elif mode == "plain":
        counts: dict[Any, int] = {}

        def count_in_dict(value: bytes, key: Any, timestamp: int, headers: Any) -> None:
            counts[key] = counts.get(key, 0) + 1
            tick()

        sdf.apply(count_in_dict, metadata=True)
    else:
        raise SystemExit(f"unknown mode {mode!r} (state or plain)")

    watchdog = threading.Timer(deadline_s, app.stop)
    watchdog.daemon = True
    watchdog.start()
    app.run()
    done = time.monotonic()
    watchdog.cancel()
    print(json.dumps({"records": seen[0], "first": first[0], "last": last[0], "done": done}), flush=True)
    return 0 if seen[0] >= n else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
