"""Ingest benchmark: HTTP ``POST /events/{type}`` (one event per request, and batches of 100) against the
SDK producer (:class:`streams.producer.EventProducer`) producing the same events, and against a bare
FastAPI endpoint that only parses the same body (``json.loads``) and answers 202, served the same way
(uvicorn, one process, same client, same concurrency), in one run. Latency per request (p50/p95/p99) is
recorded for both HTTP paths at one event per request. Issue 16's target: the ingest at 0.5 or more of the
bare endpoint's rate, with p95 under 100 ms, at 50 concurrent clients.

Run: ``python bench/bench_ingest.py [--single N] [--batches N] [--concurrency N] [--ab]``.

The client of the single-event rows is an ``httpx`` asyncio client in this process, which on a 2-core machine
competes with the server for the cores and limits both paths alike. ``--ab`` adds the same single-event load
driven by ApacheBench (``ab -k -c N -n M -p body``, Debian's ``apache2-utils``, installed by ``make
bench-tools``; one C process, keep-alive, the same body every request), the usual HTTP load generator, so
the servers get the cores; its rows are named ``(ab)`` and its percentiles come from ab's own table
(whole ms); each server's CPU milliseconds per request over ab's run (user + system, all threads, from
``/proc``) are printed below them, with the bare endpoint's over the ingest's. The ab rows are run once per
event loop of ``--loops`` (default ``uvloop,asyncio``: uvloop with httptools, the API's default, and
asyncio with h11, ``BACKBONE_EVENT_LOOP=asyncio``), both servers fresh on that loop and HTTP parser, in
alternating order over ``--ab-rounds`` rounds; each row's ratio is to the bare endpoint on the same loop
(served the same way), and ``vs bare asyncio`` to the bare endpoint on asyncio + h11. The other rows
serve the API on the loop of ``BACKBONE_EVENT_LOOP``. It starts the embedded
dev stack in a temporary directory (servers named by ``BACKBONE_*`` are used instead), serves the API with
uvicorn in a child process (so the client does not share the server's interpreter), authenticates with
a real token (looked up in PostgreSQL, then cached as the API does; its Redis rate limit leased at the API's
``BACKBONE_API_RATE_LEASE_SECONDS``, which the environment may set to 0), and waits for the broker's
acknowledgement of every event (``acks=all``) as the API does. Prints a table with ratios to the SDK.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka.admin import AdminClient, NewTopic
from psycopg_pool import ConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script: bench.common importable

__all__ = ["main"]

_BARE = (
    "import json, uvicorn; from fastapi import FastAPI, Request; from fastapi.responses import JSONResponse; "
    "app = FastAPI()\n"
    "@app.post('/events/{{type}}')\n"
    "async def ingest(type: str, request: Request):\n"
    "    json.loads(await request.body())\n"
    "    return JSONResponse({{'count': 1}}, status_code=202)\n"
    "uvicorn.run(app, host='127.0.0.1', port={port}, log_level='warning', loop='{loop}', http='{http}')"
)

TYPE = "sophia.agent.LlmCall"
_SERVE = (
    "import uvicorn; from backbone.http.app import ApiSettings, create_app; from core.stack import load_settings; "
    "from core.observability import configure_logging; configure_logging('WARNING'); "
    "uvicorn.run(create_app(load_settings(), ApiSettings()), host='127.0.0.1', port={port}, log_level='warning', "
    "loop='{loop}', http='{http}')"
)
LOOPS = {"uvloop": {"loop": "uvloop", "http": "httptools"}, "asyncio": {"loop": "asyncio", "http": "h11"}}
"""``--loops`` choices: uvicorn's ``loop`` and ``http`` (:func:`core.eventloop.uvicorn_options`)."""


def _llm_call(i: int) -> dict[str, Any]:
    t = datetime(2025, 3, 1, tzinfo=UTC) + timedelta(milliseconds=i)
    return {
        "run_id": f"run-{i % 64}", "step": i, "event_time": t.isoformat(), "model": "gpt-4o-mini",
        "prompt_tokens": 1200, "completion_tokens": 180, "latency_ms": 850, "cost_usd": 0.0003,
    }  # fmt: skip


def _fill(schema: dict[str, Any], datum: dict[str, Any]) -> dict[str, Any]:
    """Keep the fields the schema has; give required fields this sample lacks a neutral value."""
    out: dict[str, Any] = {}
    defaults = {"string": "x", "int": 1, "long": 1, "double": 1.0, "float": 1.0, "boolean": False}
    for f in schema["fields"]:
        if f["name"] in datum:
            out[f["name"]] = datum[f["name"]]
        elif "default" not in f:
            t = f["type"]
            out[f["name"]] = defaults.get(t if isinstance(t, str) else "string", "x")
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _http(
    base: str,
    token: str,
    topic: str,
    bodies: list[Any],
    concurrency: int,
    latencies: list[float] | None = None,
) -> float:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits,
                                 headers={"Authorization": f"Bearer {token}"}) as c:  # fmt: skip
        queue: asyncio.Queue[Any] = asyncio.Queue()
        for b in bodies:
            queue.put_nowait(b)

        async def worker() -> None:
            while not queue.empty():
                body = queue.get_nowait()
                t = time.perf_counter()
                r = await c.post(f"/events/{TYPE}", params={"topic": topic}, json=body)
                if latencies is not None:
                    latencies.append(time.perf_counter() - t)
                if r.status_code != 202:
                    raise RuntimeError(f"ingest answered {r.status_code}: {r.text[:200]}")

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - start


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url, timeout=2).status_code in (200, 404, 405):
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.3)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (``/proc/<pid>/stat``; Linux)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ab_cpu(
    pid: int, url: str, token: str | None, body: bytes, requests: int, concurrency: int
) -> dict[str, float]:
    """:func:`_ab` plus ``cpu_ms``: the server's (``pid``) CPU milliseconds per request over ab's run, a
    figure that other load on the machine changes less than the rate does."""
    start = _cpu_seconds(pid)
    result = _ab(url, token, body, requests, concurrency)
    return {**result, "cpu_ms": (_cpu_seconds(pid) - start) / requests * 1000}


def _ab(url: str, token: str | None, body: bytes, requests: int, concurrency: int) -> dict[str, float]:
    """Drive ``url`` with ApacheBench: ``requests`` POSTs of ``body``, ``concurrency`` in flight, keep-alive.

    Returns:
        ``{"rps", "p50_ms", "p95_ms", "p99_ms", "failed"}`` from ab's report (percentiles in whole ms).

    Raises:
        FileNotFoundError: ``ab`` is not on PATH (``make bench-tools``).
        RuntimeError: ab failed, or a request was not answered 202 (ab counts other answers as non-2xx).
    """
    import re
    import shutil

    if shutil.which("ab") is None:
        raise FileNotFoundError("ab (ApacheBench) is not installed: make bench-tools")
    with tempfile.NamedTemporaryFile("wb", suffix=".json", delete=False) as f:
        f.write(body)
    cmd = [
        "ab",
        "-q",
        "-k",
        "-c",
        str(concurrency),
        "-n",
        str(requests),
        "-p",
        f.name,
        "-T",
        "application/json",
    ]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    try:
        done = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=600, check=False)
    finally:
        os.unlink(f.name)
    out = done.stdout
    if done.returncode != 0:
        raise RuntimeError(f"ab failed ({done.returncode}): {done.stderr[-500:]}")
    non2xx = re.search(r"Non-2xx responses:\s+(\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} of {requests} requests were not answered 2xx by {url}")
    pct = {int(a): float(b) for a, b in re.findall(r"^\s+(\d+)%\s+(\d+)", out, re.M)}
    rps = re.search(r"Requests per second:\s+([\d.]+)", out)
    failed = re.search(r"Failed requests:\s+(\d+)", out)
    if rps is None or not {50, 95, 99} <= set(pct):
        raise RuntimeError(f"unexpected ab report: {out[-800:]}")
    return {"rps": float(rps.group(1)), "p50_ms": pct[50], "p95_ms": pct[95], "p99_ms": pct[99],
            "failed": float(failed.group(1)) if failed else 0.0}  # fmt: skip


def _ab_server(
    kind: str,
    loop: dict[str, str],
    env: dict[str, str],
    token: str,
    topic: str,
    body: bytes,
    requests: int,
    concurrency: int,
) -> dict[str, float]:
    """Serve ``kind`` (``"ingest"``: the backbone's API; ``"bare"``: the bare endpoint) in a fresh uvicorn
    process on ``loop`` (uvicorn's ``loop`` and ``http``), warm it up (300 requests, 10 in flight), drive it
    with :func:`_ab_cpu`, stop it; return that result.

    Raises:
        RuntimeError: the server did not start, or ab failed (see :func:`_ab`).
    """
    port = _free_port()
    src = (_SERVE if kind == "ingest" else _BARE).format(port=port, **loop)
    proc = subprocess.Popen([sys.executable, "-c", src], env=env, cwd=Path(__file__).parents[1])
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_healthy(f"{base}/healthz" if kind == "ingest" else f"{base}/docs", proc, f"{kind} ({loop})")
        url, auth = f"{base}/events/{TYPE}?topic={topic}", token if kind == "ingest" else None
        _ab(url, auth, body, min(300, requests), 10)  # warm-up
        return _ab_cpu(proc.pid, url, auth, body, requests, concurrency)
    finally:
        proc.terminate()
        proc.wait(15)


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark and print the table."""

    from backbone.devstack import DevStack
    from backbone.http.auth import TokenStore
    from bench.common import stack_settings
    from core.settings import Settings
    from streams.envelope import Event
    from streams.producer import EventProducer
    from streams.serde import serde_from_settings

    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--single", type=int, default=2000, help="requests of one event")
    parser.add_argument("--batches", type=int, default=200, help="requests of 100 events")
    parser.add_argument("--concurrency", type=int, default=50, help="requests in flight")
    parser.add_argument("--ab", action="store_true", help="also drive the single-event load with ApacheBench")
    parser.add_argument(
        "--loops",
        default="uvloop,asyncio",
        help="event loops of the ab rows, comma-separated: uvloop (+ httptools), asyncio (+ h11)",
    )
    parser.add_argument(
        "--ab-rounds", type=int, default=1, help="rounds of the ab rows (loop order alternates)"
    )
    args = parser.parse_args(argv)
    loops = [x for x in args.loops.split(",") if x]
    if unknown := set(loops) - set(LOOPS):
        parser.error(f"unknown --loops {sorted(unknown)}; choose from {sorted(LOOPS)}")
    # (round, loop, server) -> ab's result
    ab: dict[tuple[int, str, str], dict[str, float]] = {}
    state_dir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    with DevStack(Settings(state_dir=state_dir), state_dir=state_dir, durable=False) as info:
        settings, pg_url = stack_settings(info, state_dir, "bench_ingest")
        topic = f"bench-ingest-{uuid.uuid4().hex[:8]}"
        admin = AdminClient(settings.kafka.librdkafka())
        admin.create_topics([NewTopic(topic, num_partitions=6, replication_factor=1)])[topic].result(30)
        serde = serde_from_settings(settings)
        schema = serde.registry.schema_for(serde.registry.id_for(TYPE))
        port = _free_port()
        from core.eventloop import uvicorn_options

        serve_on = uvicorn_options(settings.event_loop)  # as `backbone api` serves it
        env = {**os.environ, "BACKBONE_KAFKA__BOOTSTRAP_SERVERS": info.kafka_bootstrap, "BACKBONE_POSTGRES__URL": pg_url,
               "BACKBONE_REDIS__URL": info.redis_url, "BACKBONE_API_RATE_PER_SECOND": "1000000",
               "BACKBONE_API_BURST": "1000000", "BACKBONE_LOG_LEVEL": "WARNING", "BACKBONE_STATE_DIR": str(state_dir)}  # fmt: skip
        server = subprocess.Popen(
            [sys.executable, "-c", _SERVE.format(port=port, **serve_on)],
            env=env,
            cwd=Path(__file__).parents[1],
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("the API server did not start")
                time.sleep(0.3)
            pool = ConnectionPool(pg_url, min_size=1, max_size=1, open=True)
            token = TokenStore(pool).create("bench", [f"produce:{topic}"])[0]
            pool.close()
            data = [_fill(schema, _llm_call(i)) for i in range(max(args.single, args.batches * 100))]
            asyncio.run(_http(base, token, topic, data[:50], 4))  # warm-up
            single_lat: list[float] = []
            single_s = asyncio.run(
                _http(base, token, topic, data[: args.single], args.concurrency, single_lat)
            )
            batches = [data[i * 100 : (i + 1) * 100] for i in range(args.batches)]
            batch_s = asyncio.run(_http(base, token, topic, batches, max(1, args.concurrency // 4)))
        finally:
            server.terminate()
            server.wait(15)
        bare_port = _free_port()
        bare = subprocess.Popen([sys.executable, "-c", _BARE.format(port=bare_port, **serve_on)], env=env)
        try:
            bare_base = f"http://127.0.0.1:{bare_port}"
            _wait_healthy(f"{bare_base}/docs", bare, "the bare FastAPI endpoint")
            asyncio.run(_http(bare_base, "none", topic, data[:50], 4))  # warm-up
            bare_lat: list[float] = []
            bare_s = asyncio.run(
                _http(bare_base, "none", topic, data[: args.single], args.concurrency, bare_lat)
            )
        finally:
            bare.terminate()
            bare.wait(15)
        if args.ab:  # each server fresh on each loop; loop and server order alternate by round
            body = json.dumps(data[0]).encode()
            for r in range(args.ab_rounds):
                for name in loops if r % 2 == 0 else loops[::-1]:
                    for kind in ("ingest", "bare") if r % 2 == 0 else ("bare", "ingest"):
                        ab[r, name, kind] = _ab_server(kind, LOOPS[name], env, token, topic, body, args.single,
                                                       args.concurrency)  # fmt: skip
        from streams.serde import coerce_json_datum

        n_sdk = args.batches * 100
        events = [Event.create(TYPE, d["run_id"], coerce_json_datum(schema, d), source="/bench", time=datetime.now(UTC))
                  for d in data[:n_sdk]]  # fmt: skip
        producer = EventProducer(settings.kafka, serde)
        start = time.perf_counter()
        producer.produce_many(topic, events)
        sdk_s = time.perf_counter() - start
    sdk_eps = n_sdk / sdk_s
    rows = [
        ("HTTP, 1 event/request", args.single, args.single, single_s),
        ("HTTP, 100 events/request", args.batches, args.batches * 100, batch_s),
        ("SDK EventProducer", 1, n_sdk, sdk_s),
    ]
    bare_rps = args.single / bare_s
    print(f"\none event per request, {args.concurrency} concurrent clients, uvicorn ({serve_on['loop']} + "
          f"{serve_on['http']}), one process each")  # fmt: skip
    print(f"{'path':<34}{'requests/s':>12}{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'vs bare':>9}")
    for name, secs, lat in (("bare FastAPI (json.loads, 202)", bare_s, bare_lat),
                            ("backbone ingest (validate, acks=all)", single_s, single_lat)):  # fmt: skip
        print(f"{name:<34}{args.single / secs:>12,.0f}{_pct(lat, 0.5):>9.1f}{_pct(lat, 0.95):>9.1f}"
              f"{_pct(lat, 0.99):>9.1f}{args.single / secs / bare_rps:>9.2f}")  # fmt: skip
    if ab:
        # per round and loop: rate ratios to the bare endpoint on the same loop and on asyncio + h11; the server's
        # CPU per request (all its threads) under ab, and the bare endpoint's over the ingest's: the rate ratio the
        # ingest would reach if the server's CPU were the only limit, less moved by other load
        print(
            f"\nApacheBench (ab -k -c {args.concurrency}, {args.single:,} requests), each server fresh on the loop named"
        )
        print(f"{'round':<6}{'loop':<20}{'server':<8}{'requests/s':>11}{'p50 ms':>8}{'p95 ms':>8}{'p99 ms':>8}"
              f"{'vs bare':>9}{'vs bare asyncio':>16}{'CPU ms/req':>11}{'bare/ingest CPU':>16}")  # fmt: skip
        for (r, name, kind), res in ab.items():
            bare, base = ab.get((r, name, "bare")), ab.get((r, "asyncio", "bare"))
            cpu_ratio = bare["cpu_ms"] / res["cpu_ms"] if bare and kind == "ingest" else float("nan")
            print(f"{r:<6}{name + ' + ' + LOOPS[name]['http']:<20}{kind:<8}{res['rps']:>11,.0f}{res['p50_ms']:>8.0f}"
                  f"{res['p95_ms']:>8.0f}{res['p99_ms']:>8.0f}{res['rps'] / bare['rps'] if bare else float('nan'):>9.2f}"
                  f"{res['rps'] / base['rps'] if base else float('nan'):>16.2f}{res['cpu_ms']:>11.3f}"
                  f"{cpu_ratio:>16.2f}")  # fmt: skip
    print(f"\ningest benchmark ({os.cpu_count()} cores, concurrency {args.concurrency}, acks=all, Tansu)")
    print(
        f"{'path':<26}{'requests':>10}{'events':>9}{'seconds':>9}{'requests/s':>12}{'events/s':>11}{'vs SDK':>8}"
    )
    for name, reqs, evs, secs in rows:
        print(
            f"{name:<26}{reqs:>10,}{evs:>9,}{secs:>9.2f}{reqs / secs:>12,.0f}{evs / secs:>11,.0f}{evs / secs / sdk_eps:>8.2f}"
        )


if __name__ == "__main__":
    main()
