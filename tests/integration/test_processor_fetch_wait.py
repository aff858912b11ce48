"""The processors' Faust consumer waits at most ``FETCH_MAX_WAIT_MS`` (20 ms) per fetch, as the code and
README's latency section say, and not faust-streaming's hard-coded 1,500 ms (issue 16: on Tansu that wait
is latency, ``bench/bench_latency.py``)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from core.settings import Settings
from processors.shell import FETCH_MAX_WAIT_MS, make_faust_app

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_fetcher_of_a_processor_consumer_waits_the_documented_20_ms(
    settings: Settings, tmp_path: Path
) -> None:
    async def fetch_wait_ms() -> int:
        app = make_faust_app(settings.model_copy(update={"state_dir": tmp_path}), "fetch-wait-probe",
                             partitions=1, web_port=0)  # fmt: skip
        consumer = app.consumer._thread._create_worker_consumer(app.transport)  # what the worker starts
        await consumer.start()
        try:
            return int(consumer._fetcher._fetch_max_wait_ms)
        finally:
            await consumer.stop()

    assert FETCH_MAX_WAIT_MS == 20
    assert asyncio.run(fetch_wait_ms()) == FETCH_MAX_WAIT_MS
    documented = re.search(r"fetch_max_wait_ms[^\n]*?(\d[\d,]*) ms", README.read_text())
    assert documented is not None and int(documented.group(1).replace(",", "")) == FETCH_MAX_WAIT_MS
