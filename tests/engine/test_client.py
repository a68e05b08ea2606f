"""EngineClient is what the gateway calls: the gateway tests' FakeEngine and the benchmarks' ZeroCostEngine implement
it as AsyncEngine does (test_async_engine.py checks AsyncEngine in both modes), so neither needs a cast to be served."""

from __future__ import annotations

import inspect

from bench.engine_stand_ins import ZeroCostEngine
from engine import AsyncEngine, EngineClient
from tests.gateway.fake_engine import FakeEngine


def test_the_stand_ins_are_engine_clients() -> None:
    assert isinstance(FakeEngine(), EngineClient)
    assert isinstance(ZeroCostEngine(tokens_per_delta=1), EngineClient)


def test_the_stand_ins_take_the_same_arguments_as_async_engine() -> None:
    for name in ("generate", "abort", "decode", "tokenize", "detokenize", "token_texts", "stats"):
        expected = list(inspect.signature(getattr(AsyncEngine, name)).parameters)
        for stand_in in (FakeEngine, ZeroCostEngine):
            assert list(inspect.signature(getattr(stand_in, name)).parameters) == expected, (stand_in.__name__, name)
