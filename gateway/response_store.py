"""The Responses API's store: stored responses and their input items, by id and owner, bounded by age and size.

Two backends behind one interface: a SQLite file (the default; survives a restart, one server or pods sharing a local
volume) and Redis (replicas behind one Service see one store). The gateway owns it; the engine never sees it.
Unlike vLLM's in-process dict, entries expire and the total is bounded, and another owner's entry reads as missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pathlib
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

from gateway.settings import Settings

T = TypeVar("T")
REDIS_SCHEMES = ("redis", "rediss", "unix")
REDIS_KEY_PREFIX = "sirocco:response:"
MAX_ID_CHARS = 256  # longer ids are never stored (ours are ~30 characters): a lookup of one answers None at once
DEFAULT_CACHE_DIR = "~/.cache/sirocco"  # as the engine's cache_root: Settings.cache_dir unset
PRUNE_EVERY_PUTS = 64  # expired rows are deleted on one put in this many (and on the first), not on every put


@dataclass(slots=True)
class StoredResponse:
    response_id: str
    owner: str  # "" when no API keys are configured, else the SHA-256 hex of the caller's key
    response: dict[str, Any]  # the Response object as the API returns it (JSON-able)
    input_items: list[dict[str, Any]]  # this turn's input items as stored (JSON-able), each with an "id"
    previous_response_id: str | None
    created_at: float  # unix seconds


class ResponseStore(Protocol):
    async def put(self, record: StoredResponse) -> None:
        """Insert or replace; ResponseTooLargeError when the record alone exceeds the size bound."""

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        """The record; None when missing, expired, or another owner's."""

    async def delete(self, response_id: str, owner: str) -> bool:
        """Delete the owner's record; False when there was none to delete."""

    async def close(self) -> None: ...


class ResponseStoreConfigError(ValueError):
    """The settings name no usable store: an unknown scheme, no redis package, or a SQLite file that cannot be written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field  # the Settings field to fix


class ResponseTooLargeError(ValueError):
    """One record is larger than SIROCCO_RESPONSES_STORE_MAX_BYTES: it is not stored."""


class ResponseStoreError(Exception):
    """The backend failed (Redis unreachable, disk full): the request cannot be served now (503)."""


def owner_of(api_key: str | None) -> str:
    """The owner of what a caller stores: "" without API keys, else the SHA-256 hex of the caller's key."""
    return hashlib.sha256(api_key.encode()).hexdigest() if api_key else ""


def encode(record: StoredResponse) -> bytes:
    """The record as compact JSON; ValueError when it is not JSON-able or nested too deep to encode."""
    fields = {name: getattr(record, name) for name in StoredResponse.__dataclass_fields__}  # asdict() would deep-copy
    try:
        return json.dumps(fields, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    except RecursionError as exc:
        raise ValueError("the response is nested too deeply to store") from exc
    except TypeError as exc:
        raise ValueError(f"the response is not JSON-able: {exc}") from exc


def decode(data: bytes | str) -> StoredResponse:
    return StoredResponse(**json.loads(data))


def redacted(url: str) -> str:
    """A store URL without its password, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return parts._replace(netloc=netloc).geturl()


def store_kind(settings: Settings) -> str:
    """'sqlite' or 'redis' for settings.responses_store; ResponseStoreConfigError otherwise."""
    value = settings.responses_store
    if value == "sqlite":
        return "sqlite"
    if urlsplit(value).scheme in REDIS_SCHEMES:
        try:
            import redis.asyncio  # noqa: F401 - only whether it is installed
        except ImportError as exc:
            message = f"{redacted(value)} needs the redis package: pip install 'sirocco-llm[redis]'"
            raise ResponseStoreConfigError("responses_store", message) from exc
        return "redis"
    message = f"{redacted(value)!r} is neither sqlite nor a redis://, rediss:// or unix:// URL"
    raise ResponseStoreConfigError("responses_store", message)


def check_store(settings: Settings) -> None:
    """At start, before the model loads, without creating anything: the backend is usable as far as can be told
    offline (Redis is reached on first use); ResponseStoreConfigError naming the setting otherwise."""
    if store_kind(settings) != "sqlite":
        return
    path = sqlite_path(settings)
    folder = next(parent for parent in path.parents if parent.exists())  # the folder that is there, or will hold it
    is_writable = folder.is_dir() and os.access(folder, os.W_OK | os.X_OK)
    if path.exists():
        is_writable = path.is_file() and os.access(path, os.W_OK) and os.access(path.parent, os.W_OK)
    if not is_writable:
        field = "responses_store_path" if settings.responses_store_path else "cache_dir"
        raise ResponseStoreConfigError(field, f"cannot write the response store {path} (SQLite; or set a Redis URL)")


def sqlite_path(settings: Settings) -> pathlib.Path:
    if settings.responses_store_path:
        return pathlib.Path(settings.responses_store_path).expanduser()
    return pathlib.Path(settings.cache_dir or DEFAULT_CACHE_DIR).expanduser() / "responses.sqlite3"


def open_store(settings: Settings) -> ResponseStore:
    """The store settings name (nothing is opened or connected until first use); ResponseStoreConfigError if none fits."""
    bounds = {"max_age_s": settings.responses_store_max_age_s, "max_bytes": settings.responses_store_max_bytes}
    if store_kind(settings) == "redis":
        return RedisResponseStore(settings.responses_store, **bounds)
    return SQLiteResponseStore(sqlite_path(settings), **bounds)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    response_id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, num_bytes INTEGER NOT NULL, record TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_by_age ON responses (created_at);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), num_bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS count_insert AFTER INSERT ON responses
    BEGIN UPDATE totals SET num_bytes = num_bytes + NEW.num_bytes; END;
CREATE TRIGGER IF NOT EXISTS count_update AFTER UPDATE ON responses
    BEGIN UPDATE totals SET num_bytes = num_bytes + NEW.num_bytes - OLD.num_bytes; END;
CREATE TRIGGER IF NOT EXISTS count_delete AFTER DELETE ON responses
    BEGIN UPDATE totals SET num_bytes = num_bytes - OLD.num_bytes; END;
"""
_UPSERT = """
INSERT INTO responses VALUES (?, ?, ?, ?, ?) ON CONFLICT (response_id) DO UPDATE SET
    owner = excluded.owner, created_at = excluded.created_at, num_bytes = excluded.num_bytes, record = excluded.record
"""
# The oldest rows, a batch at a time, while the total is over the bound.
_EVICT = "DELETE FROM responses WHERE response_id IN (SELECT response_id FROM responses ORDER BY created_at, rowid LIMIT 32)"


class SQLiteResponseStore:
    """One SQLite file in WAL mode, used from one worker thread (the event loop never waits on the disk).

    The total size is kept by triggers in `totals`, so every put can enforce the size bound at once, evicting the oldest
    rows; rows past the age bound are skipped by get and deleted on every PRUNE_EVERY_PUTS-th put. Several processes may
    share the file on a local disk (SQLite's locks), not on a network filesystem.
    """

    def __init__(self, path: pathlib.Path, max_age_s: float, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sirocco-response-store")
        self._connection: sqlite3.Connection | None = None
        self._num_puts = 0

    async def _run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._worker, self._call, work)

    def _call(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if self._connection is None:
                self._connection = self._connect()
            return work(self._connection)
        except sqlite3.Error as exc:
            raise ResponseStoreError(f"the response store {self.path} failed: {exc}") from exc

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        connection = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable across a process crash, fast commits
        connection.executescript(_SCHEMA)
        return connection

    async def put(self, record: StoredResponse) -> None:
        await self._run(lambda connection: self._put(connection, record))

    def _put(self, connection: sqlite3.Connection, record: StoredResponse) -> None:
        data = encode(record)
        if len(data) > self.max_bytes:
            raise ResponseTooLargeError(f"the response is {len(data)} bytes; the store holds at most {self.max_bytes}")
        row = (record.response_id, record.owner, record.created_at, len(data), data.decode())
        with connection:  # one transaction: the row, the total, the evictions
            connection.execute("BEGIN IMMEDIATE")
            connection.execute(_UPSERT, row)
            if self._num_puts % PRUNE_EVERY_PUTS == 0:
                connection.execute("DELETE FROM responses WHERE created_at < ?", (self._clock() - self.max_age_s,))
            while connection.execute("SELECT num_bytes FROM totals").fetchone()[0] > self.max_bytes:
                if connection.execute(_EVICT).rowcount == 0:
                    break
        self._num_puts += 1

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        if len(response_id) > MAX_ID_CHARS:
            return None
        query = "SELECT record FROM responses WHERE response_id = ? AND owner = ? AND created_at >= ?"

        def read(connection: sqlite3.Connection) -> StoredResponse | None:
            row = connection.execute(query, (response_id, owner, self._clock() - self.max_age_s)).fetchone()
            return None if row is None else decode(row[0])

        return await self._run(read)

    async def delete(self, response_id: str, owner: str) -> bool:
        if len(response_id) > MAX_ID_CHARS:
            return False
        statement = "DELETE FROM responses WHERE response_id = ? AND owner = ?"
        return await self._run(lambda connection: connection.execute(statement, (response_id, owner)).rowcount > 0)

    async def close(self) -> None:
        def close_connection(connection: sqlite3.Connection) -> None:
            connection.close()
            self._connection = None

        if self._connection is not None:
            await self._run(close_connection)
        self._worker.shutdown(wait=True)


class RedisResponseStore:
    """One Redis key per record, `sirocco:response:<owner>:<id>`, its TTL the time left before the age bound.

    The owner is part of the key, so another owner's lookup or delete finds nothing (atomically, with no read first).
    Redis bounds the total by its own maxmemory and eviction policy (volatile-ttl evicts the oldest first).
    """

    def __init__(self, url: str, max_age_s: float, max_bytes: int, clock: Callable[[], float] = time.time) -> None:
        import redis.asyncio

        self.url = url
        self.max_age_s = max_age_s
        self.max_bytes = max_bytes
        self._clock = clock
        self._redis = redis.asyncio.Redis.from_url(url, socket_timeout=10.0, socket_connect_timeout=10.0)
        self._errors: tuple[type[Exception], ...] = (redis.RedisError,)

    @staticmethod
    def key(response_id: str, owner: str) -> str:
        return f"{REDIS_KEY_PREFIX}{owner}:{response_id}"

    async def put(self, record: StoredResponse) -> None:
        data = encode(record)
        if len(data) > self.max_bytes:
            raise ResponseTooLargeError(f"the response is {len(data)} bytes; the store holds at most {self.max_bytes}")
        ttl_ms = int((record.created_at + self.max_age_s - self._clock()) * 1000)
        key = self.key(record.response_id, record.owner)
        try:
            if ttl_ms > 0:
                await self._redis.set(key, data, px=ttl_ms)
            else:  # already past the age bound: it would be expired on arrival
                await self._redis.delete(key)
        except self._errors as exc:
            raise ResponseStoreError(f"the response store {redacted(self.url)} failed: {exc}") from exc

    async def get(self, response_id: str, owner: str) -> StoredResponse | None:
        if len(response_id) > MAX_ID_CHARS:
            return None
        try:
            data = await self._redis.get(self.key(response_id, owner))
        except self._errors as exc:
            raise ResponseStoreError(f"the response store {redacted(self.url)} failed: {exc}") from exc
        if data is None:
            return None
        record = decode(data)
        return record if record.created_at >= self._clock() - self.max_age_s else None

    async def delete(self, response_id: str, owner: str) -> bool:
        if len(response_id) > MAX_ID_CHARS:
            return False
        try:
            return bool(await self._redis.delete(self.key(response_id, owner)))
        except self._errors as exc:
            raise ResponseStoreError(f"the response store {redacted(self.url)} failed: {exc}") from exc

    async def close(self) -> None:
        await self._redis.aclose()
