"""The response store, every behaviour against both backends: a SQLite file and a real Redis server on loopback."""

from __future__ import annotations

import asyncio
import dataclasses
import pathlib
import sqlite3
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis

from gateway.response_store import (
    RedisResponseStore,
    ResponseStore,
    ResponseStoreConfigError,
    ResponseStoreError,
    ResponseTooLargeError,
    SQLiteResponseStore,
    StoredResponse,
    open_store,
    owner_of,
    redacted,
)
from gateway.settings import Settings
from tests.redis_server import redis_server

DAY_S = 24 * 3600.0
T0 = 1_800_000_000.0


class Clock:
    """Time the test moves by hand: expiry is checked without sleeping."""

    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def record(owner: str = "", created_at: float = T0, text: str = "hello", **fields: Any) -> StoredResponse:
    response_id = fields.pop("response_id", f"resp_{uuid.uuid4().hex}")
    response = {"id": response_id, "object": "response", "output": [{"type": "message", "content": [{"text": text}]}]}
    items = [{"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "user", "content": "Hi, Zoë ✓"}]
    return StoredResponse(response_id, owner, response, items, fields.pop("previous_response_id", None), created_at)


StoreFactory = Callable[..., ResponseStore]


@pytest.fixture(params=["sqlite", "redis"])
def make_store(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> StoreFactory:
    """make_store(clock, max_age_s=30 days, max_bytes=1 MiB) of the parametrized backend; closed by the test."""
    path = tmp_path / "store" / "responses.sqlite3"

    def make(clock: Clock, max_age_s: float = 30 * DAY_S, max_bytes: int = 1 << 20) -> ResponseStore:
        if request.param == "sqlite":
            return SQLiteResponseStore(path, max_age_s=max_age_s, max_bytes=max_bytes, clock=clock)
        url = request.getfixturevalue("redis_url")
        return RedisResponseStore(url, max_age_s=max_age_s, max_bytes=max_bytes, clock=clock)

    return make


def run(store: ResponseStore, test: Callable[[ResponseStore], Awaitable[None]]) -> None:
    async def body() -> None:
        try:
            await test(store)
        finally:
            await store.close()

    asyncio.run(body())


def test_put_get_delete_round_trip(make_store: StoreFactory) -> None:
    stored = record(owner=owner_of("sk-a"), previous_response_id="resp_before")

    async def test(store: ResponseStore) -> None:
        await store.put(stored)
        assert await store.get(stored.response_id, stored.owner) == stored
        replaced = dataclasses.replace(stored, response={**stored.response, "status": "completed"})
        await store.put(replaced)  # insert or replace
        assert await store.get(stored.response_id, stored.owner) == replaced
        assert await store.delete(stored.response_id, stored.owner) is True
        assert await store.get(stored.response_id, stored.owner) is None
        assert await store.delete(stored.response_id, stored.owner) is False

    run(make_store(Clock()), test)


def test_another_owner_gets_nothing_and_deletes_nothing(make_store: StoreFactory) -> None:
    mine, theirs = owner_of("sk-mine"), owner_of("sk-theirs")
    stored = record(owner=mine)

    async def test(store: ResponseStore) -> None:
        await store.put(stored)
        assert await store.get(stored.response_id, theirs) is None
        assert await store.get(stored.response_id, "") is None  # no key is not a wildcard
        assert await store.delete(stored.response_id, theirs) is False
        assert await store.get(stored.response_id, mine) == stored

    run(make_store(Clock()), test)


def test_expired_by_age(make_store: StoreFactory) -> None:
    clock = Clock()
    old, young = record(created_at=T0), record(created_at=T0 + DAY_S)

    async def test(store: ResponseStore) -> None:
        await store.put(old)
        await store.put(young)
        clock.now = T0 + 2 * DAY_S - 1
        assert await store.get(old.response_id, "") == old
        clock.now = T0 + 2 * DAY_S + 1  # old is past the 2-day bound, young is not
        assert await store.get(old.response_id, "") is None
        assert await store.get(young.response_id, "") == young
        expired_on_arrival = record(created_at=T0)
        await store.put(expired_on_arrival)
        assert await store.get(expired_on_arrival.response_id, "") is None

    run(make_store(clock, max_age_s=2 * DAY_S), test)


def test_sqlite_deletes_expired_rows_while_running(tmp_path: pathlib.Path) -> None:
    clock = Clock()
    path = tmp_path / "responses.sqlite3"
    old = [record(created_at=T0) for _ in range(3)]

    async def test(store: ResponseStore) -> None:
        for stored in old:
            await store.put(stored)
        clock.now = T0 + 2 * DAY_S
        for _ in range(64):  # a prune happens on one put in 64
            await store.put(record(created_at=clock.now))

    run(SQLiteResponseStore(path, max_age_s=DAY_S, max_bytes=1 << 20, clock=clock), test)
    with sqlite3.connect(path) as connection:
        ids = {row[0] for row in connection.execute("SELECT response_id FROM responses")}
        total = connection.execute("SELECT num_bytes FROM totals").fetchone()[0]
        assert total == connection.execute("SELECT SUM(num_bytes) FROM responses").fetchone()[0]
    assert len(ids) == 64
    assert not ids & {stored.response_id for stored in old}


def test_redis_keys_carry_the_age_bound_as_ttl(redis_url: str) -> None:
    clock = Clock()
    stored = record(created_at=T0 - DAY_S)  # made a day ago: a day left of the two

    async def test(store: ResponseStore) -> None:
        await store.put(stored)

    run(RedisResponseStore(redis_url, max_age_s=2 * DAY_S, max_bytes=1 << 20, clock=clock), test)
    client = redis.Redis.from_url(redis_url)
    try:
        ttl_ms = client.pttl(RedisResponseStore.key(stored.response_id, ""))
    finally:
        client.close()
    assert DAY_S * 1000 - 60_000 < ttl_ms <= DAY_S * 1000


def test_sqlite_size_bound_evicts_oldest(tmp_path: pathlib.Path) -> None:
    clock = Clock()
    records = [record(created_at=T0 + i, text="x" * 1000) for i in range(20)]
    size = len(str(records[0].response)) + 1000  # about one record's size

    async def test(store: ResponseStore) -> None:
        for stored in records:
            await store.put(stored)
        present = [await store.get(stored.response_id, "") is not None for stored in records]
        num_kept = sum(present)
        assert 0 < num_kept < len(records)
        assert present == [False] * (len(records) - num_kept) + [True] * num_kept  # the oldest went first

    run(SQLiteResponseStore(tmp_path / "r.sqlite3", max_age_s=DAY_S, max_bytes=5 * size, clock=clock), test)


def test_redis_maxmemory_volatile_ttl_evicts_oldest(tmp_path: pathlib.Path) -> None:
    """The documented Redis setup: maxmemory bounds the store, volatile-ttl evicts the shortest TTL (the oldest) first."""
    clock = Clock()
    records = [record(created_at=T0 + i, text="x" * 20_000) for i in range(300)]  # about 6 MB into a 2 MB Redis
    kept: list[bool] = []

    async def test(store: ResponseStore) -> None:
        for stored in records:
            await store.put(stored)
        kept.extend([await store.get(stored.response_id, "") is not None for stored in records])

    config = ("--maxmemory", "2mb", "--maxmemory-policy", "volatile-ttl", "--maxmemory-samples", "10")
    with redis_server(tmp_path, *config) as url:
        run(RedisResponseStore(url, max_age_s=DAY_S, max_bytes=1 << 20, clock=clock), test)
    half = len(records) // 2
    assert kept[-1]
    assert 0 < sum(kept) < len(records) / 2
    assert sum(kept[:half]) < sum(kept[half:]) / 4, kept


def test_sqlite_survives_a_restart(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "deep" / "responses.sqlite3"  # parent folders are made
    stored = record(owner=owner_of("sk-a"))

    async def write(store: ResponseStore) -> None:
        await store.put(stored)

    async def read(store: ResponseStore) -> None:
        assert await store.get(stored.response_id, stored.owner) == stored
        assert await store.delete(stored.response_id, stored.owner) is True

    run(SQLiteResponseStore(path, max_age_s=DAY_S, max_bytes=1 << 20, clock=Clock()), write)
    run(SQLiteResponseStore(path, max_age_s=DAY_S, max_bytes=1 << 20, clock=Clock()), read)


def test_two_clients_of_one_redis_share_the_store(redis_url: str) -> None:
    stored = record()

    async def test() -> None:
        first = RedisResponseStore(redis_url, max_age_s=DAY_S, max_bytes=1 << 20, clock=Clock())
        second = RedisResponseStore(redis_url, max_age_s=DAY_S, max_bytes=1 << 20, clock=Clock())
        try:
            await first.put(stored)
            assert await second.get(stored.response_id, "") == stored
        finally:
            await first.close()
            await second.close()

    asyncio.run(test())


def test_hostile_sizes(make_store: StoreFactory) -> None:
    many_items = record()
    many_items.input_items = [{"id": f"msg_{i}", "type": "message", "content": "x" * 10} for i in range(10_000)]
    too_large = record(text="x" * (1 << 20))
    nested: Any = "bottom"
    for _ in range(200):  # 400 levels of containers
        nested = {"n": [nested]}
    deep = record()
    deep.response["metadata"] = nested

    async def test(store: ResponseStore) -> None:
        await store.put(many_items)
        assert await store.get(many_items.response_id, "") == many_items
        await store.put(deep)
        assert await store.get(deep.response_id, "") == deep
        with pytest.raises(ResponseTooLargeError):
            await store.put(too_large)
        assert await store.get(too_large.response_id, "") is None
        for hostile_id in ("r" * 1_000_000, "\x00", "resp_' OR 1=1 --", "*", "resp_ü\U0001f600", ""):
            assert await store.get(hostile_id, "") is None
            assert await store.delete(hostile_id, "") is False
        too_deep = record()
        too_deep.response["metadata"] = nested
        for _ in range(100_000):
            too_deep.response["metadata"] = [too_deep.response["metadata"]]
        with pytest.raises(ValueError, match="nested too deeply"):
            await store.put(too_deep)
        with pytest.raises(ValueError):
            await store.put(record(text=float("nan")))  # type: ignore[arg-type]  # not JSON: refused, store unharmed
        assert await store.get(many_items.response_id, "") == many_items

    run(make_store(Clock()), test)


def test_unreachable_redis_is_a_store_error() -> None:
    from tests.server import free_port

    async def test(store: ResponseStore) -> None:
        with pytest.raises(ResponseStoreError):
            await store.get("resp_1", "")

    run(RedisResponseStore(f"redis://127.0.0.1:{free_port()}/0", max_age_s=DAY_S, max_bytes=1 << 20), test)


def test_open_store_picks_the_backend(tmp_path: pathlib.Path, redis_url: str) -> None:
    sqlite_store = open_store(Settings(cache_dir=str(tmp_path)))
    assert isinstance(sqlite_store, SQLiteResponseStore)
    assert sqlite_store.path == tmp_path / "responses.sqlite3"
    custom = open_store(Settings(responses_store_path=str(tmp_path / "elsewhere.db")))
    assert isinstance(custom, SQLiteResponseStore) and custom.path == tmp_path / "elsewhere.db"
    redis_store = open_store(Settings(responses_store=redis_url, responses_store_max_age_s=60))
    assert isinstance(redis_store, RedisResponseStore) and redis_store.max_age_s == 60

    async def close_all() -> None:
        for store in (sqlite_store, custom, redis_store):
            await store.close()

    asyncio.run(close_all())


def test_open_store_refuses_unknown_backends_without_showing_passwords() -> None:
    with pytest.raises(ResponseStoreConfigError, match="'http://u:\\*\\*\\*@host' is neither sqlite nor a redis://") as caught:
        open_store(Settings(responses_store="http://u:hunter2@host"))
    assert "hunter2" not in str(caught.value) and caught.value.field == "responses_store"
    assert redacted("redis://:pw@127.0.0.1:6379/0") == "redis://:***@127.0.0.1:6379/0"


def test_startup_refuses_a_store_it_cannot_use(tmp_path: pathlib.Path) -> None:
    """sirocco serve says so in one line before the model loads, and creates nothing while checking."""
    from gateway.startup import StartupError, check_settings

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(StartupError, match=r"^--responses-store-path / SIROCCO_RESPONSES_STORE_PATH: cannot write"):
        check_settings(Settings(responses_store_path=str(blocker / "responses.sqlite3")))
    with pytest.raises(StartupError, match=r"^--responses-store / SIROCCO_RESPONSES_STORE: 'memcached://h' is neither"):
        check_settings(Settings(responses_store="memcached://h"))
    check_settings(Settings(cache_dir=str(tmp_path / "new" / "cache")))
    assert not (tmp_path / "new").exists()


def test_missing_redis_package_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis.asyncio", None)  # import redis.asyncio now raises ImportError
    with pytest.raises(ResponseStoreConfigError, match=r"needs the redis package: pip install 'sirocco-llm\[redis\]'"):
        open_store(Settings(responses_store="redis://127.0.0.1:6379/0"))
