"""API tokens with scopes, stored hashed in PostgreSQL; per-token rate limits and idempotency keys in Redis.

Tokens look like ``bb_<token id>_<secret>`` (the secret is 32 random bytes, URL-safe base64). Only the
SHA-256 of the whole token is stored: a token is high-entropy, so a fast hash is enough (a slow
password hash such as argon2 protects low-entropy secrets, which these are not), and the lookup is
an index probe on the hash.

Scopes: ``produce:<topic>``, ``subscribe:<topic>``, ``replay``, ``admin``; ``*`` is a wildcard
(``produce:*``, ``*``). ``admin`` grants every scope.

A running API keeps the principals of tokens it has seen in memory (:class:`TokenStore` with
``cache_seconds``), so a request costs no PostgreSQL query: a revocation is sent with ``NOTIFY
backbone_api_tokens`` in the revoking transaction, and every API process listens on a connection of its
own and drops the revoked token at once. While that listener is not connected the cache is not used
(every request queries PostgreSQL), and on each (re)connection the cache is emptied, since notifications
may have been missed; ``cache_seconds`` bounds how long an entry lives regardless.

Rate limits are token buckets kept in Redis and updated by one Lua script (atomic, clock from Redis
``TIME`` so that API replicas agree). Idempotency keys store the first response in Redis for a TTL.
Both have an asyncio path (``redis.asyncio``, given as ``aclient``) that the API's routes await on the
event loop, with no thread-pool hop per request; without ``aclient`` that path runs the blocking call in
the thread pool.
"""

from __future__ import annotations

import asyncio
import base64
import fnmatch
import hashlib
import json
import math
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
import redis
import redis.asyncio
import structlog
from fastapi import Depends, HTTPException, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from core.errors import BackboneError

__all__ = [
    "ANONYMOUS",
    "BEARER_SECURITY",
    "AuthError",
    "IdempotencyStore",
    "IdempotentResult",
    "Principal",
    "RateLimiter",
    "TokenInfo",
    "TokenStore",
    "authenticate",
    "authenticate_request",
    "enforce_rate_limit",
    "hash_token",
    "require_scope",
    "scope_allows",
    "validate_scope",
]

_log = structlog.get_logger(__name__)

SCHEMA_SQL = """
create schema if not exists backbone_api;
create table if not exists backbone_api.tokens (
    token_id text primary key,
    name text not null,
    token_sha256 bytea not null unique,
    scopes text[] not null,
    rate_per_second double precision,
    burst integer,
    created_at timestamptz not null default now(),
    revoked_at timestamptz
);
"""


class AuthError(BackboneError, LookupError):
    """A token operation that cannot be done: an unknown token id, or a malformed scope."""


def hash_token(token: str) -> bytes:
    """SHA-256 of the token's UTF-8 bytes (32 bytes): what the token table stores."""
    return hashlib.sha256(token.encode()).digest()


_SCOPE_VERBS = ("produce", "subscribe")
_SCOPE_WORDS = ("replay", "admin", "*")


def validate_scope(scope: str) -> str:
    """Return ``scope`` when it is well-formed.

    Raises:
        AuthError: not one of ``produce:<topic>``, ``subscribe:<topic>``, ``replay``, ``admin``, ``*``.
    """
    verb, _, arg = scope.partition(":")
    if (verb in _SCOPE_VERBS and arg) or (scope in _SCOPE_WORDS) or (verb == "*" and arg):
        return scope
    raise AuthError(
        f"malformed scope {scope!r}: expected produce:<topic>, subscribe:<topic>, replay, admin or *"
    )


def scope_allows(granted: Sequence[str], needed: str) -> bool:
    """Whether any of the ``granted`` scopes covers ``needed`` (``*`` wildcards; ``admin`` covers all).

    >>> scope_allows(["produce:agent.*"], "produce:agent.events")
    True
    """
    return any(g in ("admin", "*") or fnmatch.fnmatchcase(needed, g) for g in granted)


@dataclass(frozen=True, slots=True, kw_only=True)
class Principal:
    """Who made a request.

    Attributes:
        token_id: the token's public id (``"anonymous"`` when authentication is off, ``webhook:<platform>``
            for a signed webhook).
        name: the token's human name.
        scopes: granted scopes.
        rate_per_second: the token's own refill rate, or ``None`` for the server default.
        burst: the token's own bucket size, or ``None`` for the server default.
    """

    token_id: str
    name: str
    scopes: tuple[str, ...]
    rate_per_second: float | None = None
    burst: int | None = None

    def allows(self, scope: str) -> bool:
        """Whether this principal holds ``scope``."""
        return scope_allows(self.scopes, scope)


@dataclass(frozen=True, slots=True, kw_only=True)
class TokenInfo:
    """A stored token without its secret (what ``backbone api token list`` prints)."""

    token_id: str
    name: str
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None
    rate_per_second: float | None
    burst: int | None

    def as_json(self) -> dict[str, Any]:
        """JSON-ready dict (times as ISO 8601)."""
        return {
            "token_id": self.token_id,
            "name": self.name,
            "scopes": list(self.scopes),
            "created_at": self.created_at.isoformat(),
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
            "rate_per_second": self.rate_per_second,
            "burst": self.burst,
        }


REVOCATION_CHANNEL = "backbone_api_tokens"
"""The PostgreSQL ``NOTIFY`` channel of revocations; the payload is the token id."""


class TokenStore:
    """API tokens in PostgreSQL (table ``backbone_api.tokens``), hashed.

    Args:
        pool: a psycopg connection pool on the backbone's database.
        cache_seconds: how long :meth:`authenticate` keeps a live token's principal in memory (seconds);
            0 (the default) keeps none. The cache is used only while :meth:`start_listener` runs and is
            connected (see the module docstring).
        cache_max_entries: tokens kept at most; the cache is emptied when it is full.
    """

    def __init__(
        self, pool: ConnectionPool, *, cache_seconds: float = 0.0, cache_max_entries: int = 10_000
    ) -> None:
        self.pool = pool
        self.cache_seconds = cache_seconds
        self.cache_max_entries = cache_max_entries
        self._cache: dict[str, tuple[Principal, float]] = {}  # token hash -> (principal, expiry, monotonic s)
        self._lock = threading.Lock()
        self._listening = False
        self._stop = threading.Event()
        self._listener: threading.Thread | None = None

    def start_listener(self) -> None:
        """Listen for revocations on a connection of its own (a daemon thread), which turns the cache on.

        Reconnects after one second when PostgreSQL drops the connection; meanwhile the cache is off.
        """
        if self.cache_seconds <= 0 or self._listener is not None:
            return
        self._stop.clear()
        self._listener = threading.Thread(target=self._listen, name="token-revocations", daemon=True)
        self._listener.start()

    def stop_listener(self) -> None:
        """Stop listening (within about a second) and empty the cache."""
        self._stop.set()
        if self._listener is not None:
            self._listener.join(5)
            self._listener = None
        self._set_listening(False)

    @property
    def listening(self) -> bool:
        """Whether revocations are being received (the cache is in use)."""
        return self._listening

    def _set_listening(self, on: bool) -> None:
        with self._lock:
            self._cache.clear()  # notifications may have been missed while not listening
            self._listening = on

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                with psycopg.connect(self.pool.conninfo, autocommit=True, connect_timeout=5) as conn:
                    conn.execute(f"listen {REVOCATION_CHANNEL}")
                    self._set_listening(True)
                    _log.info("api.token_listener_connected")
                    while not self._stop.is_set():
                        for notify in conn.notifies(timeout=1.0):
                            self._evict(notify.payload)
            except psycopg.Error as exc:
                if self._listening:
                    _log.warning("api.token_listener_lost", error=str(exc))
                self._set_listening(False)
                self._stop.wait(1.0)
        self._set_listening(False)

    def _evict(self, token_id: str) -> None:
        with self._lock:
            for h in [h for h, (p, _) in self._cache.items() if p.token_id == token_id]:
                del self._cache[h]

    def ensure_schema(self) -> None:
        """Create the schema and table when missing (idempotent; safe when several API processes start
        together: ``create schema if not exists`` run concurrently can fail with a unique violation on
        ``pg_namespace``, so they take turns on a transaction-level advisory lock)."""
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext('backbone-api-ddl'))")
            conn.execute(SCHEMA_SQL)

    def create(
        self,
        name: str,
        scopes: Sequence[str],
        *,
        rate_per_second: float | None = None,
        burst: int | None = None,
    ) -> tuple[str, TokenInfo]:
        """Create a token.

        Args:
            name: a human name (who or what uses it).
            scopes: at least one scope (see :func:`validate_scope`).
            rate_per_second: this token's refill rate (requests/s), or ``None`` for the server default.
            burst: this token's bucket size (requests), or ``None`` for the server default.

        Returns:
            ``(token, info)``: the token is shown once and never stored.

        Raises:
            AuthError: no scope, or a malformed one.
        """
        if not scopes:
            raise AuthError("a token needs at least one scope")
        checked = tuple(validate_scope(s) for s in scopes)
        token_id = secrets.token_hex(6)
        secret = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
        token = f"bb_{token_id}_{secret}"
        with self.pool.connection() as conn:
            row = conn.execute(
                "insert into backbone_api.tokens (token_id, name, token_sha256, scopes, rate_per_second, burst)"
                " values (%s, %s, %s, %s, %s, %s) returning created_at",
                (token_id, name, hash_token(token), list(checked), rate_per_second, burst),
            ).fetchone()
        assert row is not None
        info = TokenInfo(
            token_id=token_id, name=name, scopes=checked, created_at=row[0], revoked_at=None,
            rate_per_second=rate_per_second, burst=burst,
        )  # fmt: skip
        return token, info

    def cached(self, token: str) -> Principal | None:
        """The principal of ``token`` when the cache holds it (fresh, listener connected), else ``None``:
        no I/O, so the event loop may call it; :meth:`authenticate` is the lookup that may query."""
        if not self._listening:
            return None
        hit = self._cache.get(hash_token(token))
        if hit is not None and hit[1] > time.monotonic():
            return hit[0]
        return None

    def authenticate(self, token: str) -> Principal | None:
        """The principal of a live (not revoked) token, or ``None`` for an unknown or revoked one.

        Raises:
            psycopg.Error: PostgreSQL cannot be reached (and the token is not cached).
        """
        digest = hash_token(token)
        if self._listening:
            hit = self._cache.get(digest)
            if hit is not None and hit[1] > time.monotonic():
                return hit[0]
        with self.pool.connection() as conn:
            row = conn.execute(
                "select token_id, name, scopes, rate_per_second, burst from backbone_api.tokens"
                " where token_sha256 = %s and revoked_at is null",
                (digest,),
            ).fetchone()
        if row is None:
            return None
        principal = Principal(
            token_id=row[0], name=row[1], scopes=tuple(row[2]), rate_per_second=row[3], burst=row[4]
        )
        if self._listening:
            with self._lock:
                if len(self._cache) >= self.cache_max_entries:
                    self._cache.clear()
                self._cache[digest] = (principal, time.monotonic() + self.cache_seconds)
        return principal

    def list(self, *, include_revoked: bool = False) -> list[TokenInfo]:
        """Every token (oldest first), without secrets."""
        with self.pool.connection() as conn:
            rows = conn.execute(
                "select token_id, name, scopes, created_at, revoked_at, rate_per_second, burst"
                " from backbone_api.tokens"
                + ("" if include_revoked else " where revoked_at is null")
                + " order by created_at, token_id"
            ).fetchall()
        return [
            TokenInfo(
                token_id=r[0],
                name=r[1],
                scopes=tuple(r[2]),
                created_at=r[3],
                revoked_at=r[4],
                rate_per_second=r[5],
                burst=r[6],
            )
            for r in rows
        ]

    def revoke(self, token_id: str) -> None:
        """Revoke a token (kept in the table, marked revoked; effective for the next request: the API
        processes that cached it are told by ``NOTIFY`` in the same transaction).

        Raises:
            AuthError: no live token has this id.
        """
        with self.pool.connection() as conn:
            cur = conn.execute(
                "update backbone_api.tokens set revoked_at = now() where token_id = %s and revoked_at is null",
                (token_id,),
            )
            if cur.rowcount != 1:
                raise AuthError(f"no live token with id {token_id!r}")
            conn.execute("select pg_notify(%s, %s)", (REVOCATION_CHANNEL, token_id))
        self._evict(token_id)


# Token bucket: KEYS[1] = bucket hash; ARGV = rate (tokens/s), burst (tokens), cost (tokens), and optionally
# want (tokens, >= cost): take as many as are there up to `want`, at least `cost` (a lease; default `cost`),
# and give back (tokens, default 0): an expired lease's unspent tokens, returned to the bucket first.
# Returns {tokens taken (0: refused), milliseconds until `cost` tokens are available (when refused)}.
_BUCKET_LUA = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cost = tonumber(ARGV[3])
local want = tonumber(ARGV[4] or ARGV[3])
local give_back = tonumber(ARGV[5] or 0)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(state[1])
local ts = tonumber(state[2])
if tokens == nil then tokens = burst; ts = now end
tokens = math.min(burst, tokens + give_back + (now - ts) * rate / 1000)
local taken = 0
local wait_ms = 0
if tokens >= cost then
  taken = math.max(cost, math.min(want, math.floor(tokens)))
  tokens = tokens - taken
else
  wait_ms = math.ceil((cost - tokens) * 1000 / rate)
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', now)
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {taken, wait_ms}
"""


class RateLimiter:
    """Per-key token buckets in Redis, updated atomically by a Lua script.

    :meth:`take_async` (the API's path) may *lease* tokens: when a bucket refills fast enough, one Redis
    call takes up to ``rate_per_second * lease_seconds`` tokens at once (at most a tenth of the burst,
    never more than the bucket holds), the request spends one and the process keeps the rest for
    ``lease_seconds``, spending them without asking Redis; concurrent requests of one key wait for one
    such call rather than each making one. An expired lease's unspent tokens go back to the bucket with
    the key's next Redis call. The limit still holds across API replicas (no token is spent that was
    not taken from the shared bucket); what a lease costs is precision: tokens held in one replica's
    lease are not available to the others until they are spent or given back, so a key close to its
    limit may be refused up to one lease early per replica. A slow bucket (``rate_per_second *
    lease_seconds`` under 2) is never leased: each request is one Redis call, as :meth:`take`.

    Args:
        client: a Redis client.
        prefix: key prefix of the buckets.
        aclient: an asyncio Redis client on the same server for :meth:`take_async` (else that method
            runs :meth:`take` in the thread pool, without leases).
        lease_seconds: how long a lease lives (seconds); 0 turns leases off.
        max_leases: keys with a lease kept at most; the leases are dropped when it is full.
    """

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = "backbone:api:rate:",
        *,
        aclient: redis.asyncio.Redis | None = None,
        lease_seconds: float = 0.0,
        max_leases: int = 10_000,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.lease_seconds = lease_seconds
        self.max_leases = max_leases
        self._script = client.register_script(_BUCKET_LUA)
        self._ascript = aclient.register_script(_BUCKET_LUA) if aclient is not None else None
        self._leases: dict[str, list[float]] = {}  # key -> [tokens left, expiry (monotonic seconds)]
        self._refills: dict[str, asyncio.Future[None]] = {}  # key -> the lease call in flight

    def take(self, key: str, *, rate_per_second: float, burst: int, cost: int = 1) -> float:
        """Take ``cost`` tokens from ``key``'s bucket (one Redis call, no lease).

        Args:
            key: whose bucket (a token id).
            rate_per_second: refill rate, tokens per second (> 0).
            burst: bucket size, tokens (>= ``cost`` for the request ever to pass).
            cost: tokens this request needs.

        Returns:
            0.0 when allowed, else the seconds to wait before ``cost`` tokens are available.

        Raises:
            redis.RedisError: Redis cannot be reached.
        """
        taken, wait_ms = self._script(keys=[self.prefix + key], args=[rate_per_second, burst, cost])
        return 0.0 if int(taken) else int(wait_ms) / 1000

    def lease_size(self, rate_per_second: float, burst: int, cost: int = 1) -> int:
        """Tokens one Redis call takes for a request of ``cost`` (``cost`` when leases are off or the
        bucket is slow)."""
        want = min(int(rate_per_second * self.lease_seconds), burst // 10)
        return want if want >= 2 * cost else cost

    async def take_async(self, key: str, *, rate_per_second: float, burst: int, cost: int = 1) -> float:
        """:meth:`take` on the event loop: from this process's lease of ``key`` when it holds one, else
        one ``EVALSHA`` round trip (no thread) that may take a new lease (see the class docstring).

        Returns:
            0.0 when allowed, else the seconds to wait before ``cost`` tokens are available.

        Raises:
            redis.RedisError: Redis cannot be reached.
        """
        if self._ascript is None:
            return await run_in_threadpool(
                self.take, key, rate_per_second=rate_per_second, burst=burst, cost=cost
            )
        want = self.lease_size(rate_per_second, burst, cost)
        if want <= cost:
            return await self._call(key, rate_per_second, burst, cost, cost, 0.0)
        while True:
            lease = self._leases.get(key)
            if lease is not None and lease[0] >= cost and lease[1] > time.monotonic():
                lease[0] -= cost
                return 0.0
            refill = self._refills.get(key)
            if refill is None:
                break
            await asyncio.shield(refill)  # another request of this key is taking a lease: use it
        done = asyncio.get_running_loop().create_future()
        self._refills[key] = done
        try:
            lease = self._leases.pop(key, None)
            give_back = lease[0] if lease is not None else 0.0  # expired or short of `cost`: returned
            return await self._call(key, rate_per_second, burst, cost, want, give_back)
        finally:
            del self._refills[key]
            done.set_result(None)

    async def _call(
        self, key: str, rate_per_second: float, burst: int, cost: int, want: int, give_back: float
    ) -> float:
        assert self._ascript is not None
        taken, wait_ms = await self._ascript(
            keys=[self.prefix + key], args=[rate_per_second, burst, cost, want, give_back]
        )
        taken = int(taken)
        if not taken:
            return int(wait_ms) / 1000
        if taken > cost:
            if len(self._leases) >= self.max_leases:
                self._leases.clear()
            self._leases[key] = [float(taken - cost), time.monotonic() + self.lease_seconds]
        return 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class IdempotentResult:
    """A stored first response: status code and JSON body."""

    status_code: int
    body: Any


class IdempotencyStore:
    """First responses by idempotency key, in Redis, with a TTL.

    A key moves from *pending* (claimed by the request in flight) to *done* (the response stored).
    The request's fingerprint (SHA-256 of method, path and body) is stored with it, so the same key
    reused for a different request is detected.

    Args:
        client: a Redis client.
        ttl_seconds: how long a stored response is kept (seconds).
        pending_ttl_seconds: how long a claim lives if its request dies before finishing (seconds).
        prefix: key prefix.
        aclient: an asyncio Redis client on the same server for the ``*_async`` methods (else they run
            the blocking ones in the thread pool).
    """

    def __init__(
        self,
        client: redis.Redis,
        *,
        ttl_seconds: int = 86_400,
        pending_ttl_seconds: int = 120,
        prefix: str = "backbone:api:idem:",
        aclient: redis.asyncio.Redis | None = None,
    ) -> None:
        self.client = client
        self.aclient = aclient
        self.ttl_seconds = ttl_seconds
        self.pending_ttl_seconds = pending_ttl_seconds
        self.prefix = prefix

    def claim(self, key: str, fingerprint: str) -> IdempotentResult | str | None:
        """Claim ``key`` for a new request.

        Returns:
            ``None`` when the claim is ours (go on); the stored :class:`IdempotentResult` when the key
            was already answered for the same request; ``"pending"`` when a request with this key is in
            flight; ``"mismatch"`` when the key was used for a different request.

        Raises:
            redis.RedisError: Redis cannot be reached.
        """
        k = self.prefix + key
        pending = json.dumps({"state": "pending", "fingerprint": fingerprint})
        if self.client.set(k, pending, nx=True, ex=self.pending_ttl_seconds):
            return None
        raw = self.client.get(k)
        if raw is None:  # expired between the two calls: try once more
            return None if self.client.set(k, pending, nx=True, ex=self.pending_ttl_seconds) else "pending"
        return _claim_answer(raw, fingerprint)

    async def claim_async(self, key: str, fingerprint: str) -> IdempotentResult | str | None:
        """:meth:`claim` on the event loop.

        Raises:
            redis.RedisError: Redis cannot be reached.
        """
        c = self.aclient
        if c is None:
            return await run_in_threadpool(self.claim, key, fingerprint)
        k = self.prefix + key
        pending = json.dumps({"state": "pending", "fingerprint": fingerprint})
        if await c.set(k, pending, nx=True, ex=self.pending_ttl_seconds):
            return None
        raw = await c.get(k)
        if raw is None:  # expired between the two calls: try once more
            return None if await c.set(k, pending, nx=True, ex=self.pending_ttl_seconds) else "pending"
        return _claim_answer(raw, fingerprint)

    def _done(self, fingerprint: str, result: IdempotentResult) -> str:
        return json.dumps({"state": "done", "fingerprint": fingerprint, "status_code": result.status_code,
                           "body": result.body})  # fmt: skip

    def complete(self, key: str, fingerprint: str, result: IdempotentResult) -> None:
        """Store the response of a claimed key for ``ttl_seconds``."""
        self.client.set(self.prefix + key, self._done(fingerprint, result), ex=self.ttl_seconds)

    async def complete_async(self, key: str, fingerprint: str, result: IdempotentResult) -> None:
        """:meth:`complete` on the event loop.

        Raises:
            redis.RedisError: Redis cannot be reached.
        """
        if self.aclient is None:
            await run_in_threadpool(self.complete, key, fingerprint, result)
        else:
            await self.aclient.set(self.prefix + key, self._done(fingerprint, result), ex=self.ttl_seconds)

    def release(self, key: str) -> None:
        """Drop a claim whose request failed in a way worth retrying (5xx): the retry will run again."""
        self.client.delete(self.prefix + key)

    async def release_async(self, key: str) -> None:
        """:meth:`release` on the event loop.

        Raises:
            redis.RedisError: Redis cannot be reached.
        """
        if self.aclient is None:
            await run_in_threadpool(self.release, key)
        else:
            await self.aclient.delete(self.prefix + key)


def _claim_answer(raw: bytes | str, fingerprint: str) -> IdempotentResult | str:
    stored = json.loads(raw)
    if stored.get("fingerprint") != fingerprint:
        return "mismatch"
    if stored["state"] == "pending":
        return "pending"
    return IdempotentResult(status_code=stored["status_code"], body=stored["body"])


# ------------------------------------------------------------------------------------------ FastAPI glue

ANONYMOUS = Principal(token_id="anonymous", name="anonymous (authentication off)", scopes=("*",))
"""The principal of every request when ``BACKBONE_API_AUTH_REQUIRED=false`` (development only)."""

_bearer = HTTPBearer(auto_error=False, description="An API token: `backbone api token create --scope ...`.")


def _unauthorized(message: str, error: str = "invalid_token") -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail={"message": message},
        headers={"WWW-Authenticate": f'Bearer realm="backbone", error="{error}"'},
    )


async def authenticate_request(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> Principal:
    """FastAPI dependency: the request's principal from its Bearer token, after its rate limit.

    Runs on the event loop: a token in the :class:`TokenStore` cache costs no query, one that is not is
    looked up in PostgreSQL in the thread pool; the rate limit is one Redis round trip
    (:meth:`RateLimiter.take_async`).

    Raises:
        HTTPException: 401 without a Bearer token or with an unknown or revoked one; 429 with
            ``Retry-After`` (seconds) when the token's bucket is empty; 503 when PostgreSQL is down.
    """
    return await _principal_of(request, credentials)


async def authenticate(request: Request) -> Principal:
    """:func:`authenticate_request` called from a route's body rather than solved as a dependency.

    The same Bearer parsing (:data:`_bearer`, FastAPI's ``HTTPBearer``), token lookup and rate limit, with
    the same answers; a route that calls it declares the ``HTTPBearer`` security requirement in its
    ``openapi_extra`` (:data:`BEARER_SECURITY`) so that the OpenAPI document is unchanged. It spares the
    hot ingest route FastAPI's two nested dependency levels per request.

    Raises:
        HTTPException: as :func:`authenticate_request`.
    """
    return await _principal_of(request, await _bearer(request))


BEARER_SECURITY: list[dict[str, list[str]]] = [{"HTTPBearer": []}]
"""The OpenAPI security requirement of a route that authenticates with :func:`authenticate`: the scheme that
:data:`_bearer` puts in ``components.securitySchemes`` (there because the read and SSE routes depend on
:func:`authenticate_request`; ``tests/unit/test_api_parts.py`` checks the ingest operation against it)."""


async def _principal_of(request: Request, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    state = request.app.state
    api = state.api_settings
    if not api.auth_required:
        return ANONYMOUS
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorized("a Bearer token is required (Authorization: Bearer <token>)", "invalid_request")
    tokens: TokenStore = state.tokens
    try:
        principal = tokens.cached(credentials.credentials) or await run_in_threadpool(
            tokens.authenticate, credentials.credentials
        )
    except psycopg.Error as exc:
        _log.warning("api.token_store_unavailable", error=str(exc))
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE,
            detail={"message": "the token store (PostgreSQL) is unavailable"},
            headers={"Retry-After": str(api.retry_after_seconds)},
        ) from exc
    if principal is None:
        raise _unauthorized("unknown or revoked token")
    await enforce_rate_limit(
        request,
        principal.token_id,
        rate_per_second=principal.rate_per_second or api.rate_per_second,
        burst=principal.burst or api.burst,
    )
    return principal


async def enforce_rate_limit(request: Request, key: str, *, rate_per_second: float, burst: int) -> None:
    """Take one token from ``key``'s bucket or answer 429; a Redis outage lets the request through.

    Raises:
        HTTPException: 429 with ``Retry-After`` (whole seconds, at least 1).
    """
    limiter: RateLimiter = request.app.state.rate_limiter
    try:
        wait_seconds = await limiter.take_async(key, rate_per_second=rate_per_second, burst=burst)
    except redis.RedisError as exc:  # fail open: the limiter protects capacity, not correctness
        _log.warning("api.rate_limiter_unavailable", error=str(exc))
        return
    if wait_seconds > 0:
        raise HTTPException(
            status.HTTP_429_TOO_MANY_REQUESTS,
            detail={"message": f"rate limit of {rate_per_second:g} request(s)/s (burst {burst}) exceeded"},
            headers={"Retry-After": str(max(1, math.ceil(wait_seconds)))},
        )


def require_scope(principal: Principal, scope: str) -> None:
    """Answer 403 unless ``principal`` holds ``scope``.

    Raises:
        HTTPException: 403 naming the missing scope.
    """
    if not principal.allows(scope):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN, detail={"message": f"token lacks scope {scope!r}", "scope": scope}
        )
