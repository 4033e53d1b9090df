"""PerKey: one policy per key, at most max_keys of them, least recently used dropped."""

from __future__ import annotations

import gc
import warnings
from collections import OrderedDict
from typing import Any, assert_type

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

import stalwart as sw
from stalwart import _metrics

from .conftest import Spans, sample


class Down(Exception):
    """The upstream failed."""


async def fetch(host: str, path: str = "/") -> str:
    if host.startswith("sick"):
        raise Down(host)
    return f"{host}{path}"


class Factory:
    """Builds a breaker per key, named after it, and notes every key it built one for."""

    def __init__(self, telemetry: sw.Telemetry | None = None, **options: Any) -> None:
        self.telemetry = telemetry or sw.Telemetry(registry=CollectorRegistry())
        self.options = {"consecutive_failures": 1, "open_for": 30.0, **options}
        self.built: list[str] = []

    def __call__(self, key: str) -> sw.CircuitBreaker:
        self.built.append(key)
        return sw.CircuitBreaker(name=f"upstream {key}", telemetry=self.telemetry, **self.options)


# -- one policy per key -------------------------------------------------------------------


async def test_each_key_gets_a_policy_of_its_own() -> None:
    factory = Factory()
    guarded = sw.PerKey(factory, key="host")(fetch)
    with pytest.raises(Down):
        await guarded("sick.test")
    with pytest.raises(sw.CircuitOpenError):
        await guarded("sick.test", "/again")
    assert await guarded("well.test", "/x") == "well.test/x"
    assert factory.built == ["sick.test", "well.test"]


async def test_the_key_may_be_passed_by_name_or_read_by_a_callable() -> None:
    factory = Factory()
    by_name = sw.PerKey(factory, key="host")(fetch)
    await by_name(host="a.test")
    by_callable = sw.PerKey(factory, key=lambda host, path="/": host.upper())(fetch)
    await by_callable("b.test")
    assert factory.built == ["a.test", "B.TEST"]


async def test_an_int_key_is_made_its_decimal_str() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="tenant")

    @per_key
    async def work(tenant: int) -> int:
        return tenant

    assert await work(42) == 42
    assert factory.built == ["42"]
    assert per_key.get(42) is per_key.get("42") is not None


async def test_a_none_key_runs_the_call_without_a_policy() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key=lambda host, path="/": None)
    assert await per_key(fetch)("a.test") == "a.test/"
    assert factory.built == []
    assert per_key.items() == []


async def test_the_last_key_is_matched_by_value_and_only_as_a_plain_str() -> None:
    class Liar(str):
        """A str that says it equals every other."""

        def __eq__(self, other: object) -> bool:
            return True

        __hash__ = str.__hash__

    factory = Factory()
    per_key = sw.PerKey(factory, key="host")
    guarded = per_key(fetch)
    await guarded("a.test")
    await guarded("".join(["a", ".test"]))  # equal, another object: the same policy
    assert factory.built == ["a.test"]
    assert await guarded(Liar("b.test")) == "b.test/"  # its own value, not the last key's
    assert factory.built == ["a.test", "b.test"]
    assert [key for key, _ in per_key.items()] == ["a.test", "b.test"]


async def test_a_none_key_after_a_key_runs_the_call_without_a_policy() -> None:
    factory = Factory()
    keys = iter(["sick.test", None])
    guarded = sw.PerKey(factory, key=lambda host, path="/": next(keys))(fetch)
    with pytest.raises(Down):
        await guarded("sick.test")  # its breaker opens
    with pytest.raises(Down):  # no policy: not the open breaker's rejection
        await guarded("sick.test")
    assert factory.built == ["sick.test"]


@pytest.mark.parametrize(
    ("key", "error", "message"),
    [
        ("", ValueError, "1-255 characters"),
        ("x" * 256, ValueError, "1-255 characters"),
        (b"bytes", TypeError, "a str, an int or None"),
        (2**64, ValueError, "an int in"),
    ],
)
async def test_a_bad_key_fails_the_call_naming_it(
    key: object, error: type[Exception], message: str
) -> None:
    factory = Factory()
    bad: Any = key
    guarded = sw.PerKey(factory, key=lambda host, path="/": bad)(fetch)
    with pytest.raises(error, match=f"the per-key policy's key must be {message}"):
        await guarded("a.test")
    assert factory.built == []


async def test_a_validated_key_may_be_longer_than_a_key_read_from_arguments() -> None:
    from stalwart._keys import ValidatedKey, validated_key

    long = "https://" + "h" * 253 + ":443"
    assert type(validated_key("short.test")) is str  # the fast path's exact str
    assert type(validated_key(long)) is ValidatedKey
    made: list[str] = []

    def factory(key: str) -> sw.Policy:
        made.append(key)
        return sw.Bulkhead(1, name="long")

    per_key = sw.PerKey(factory, key=lambda host, path="/": validated_key(host))
    guarded = per_key(fetch)
    assert await guarded(long) == long + "/"
    assert await guarded(long) == long + "/"
    assert made == [long]
    assert [type(key) for key, _ in per_key.items()] == [str]
    plain = sw.PerKey(factory, key="host")(fetch)
    with pytest.raises(ValueError, match="must be 1-255 characters, got 265"):
        await plain(long)
    with pytest.raises(ValueError, match="must be 1-255 characters, got 0"):
        await sw.PerKey(factory, key=lambda host, path="/": ValidatedKey(""))(fetch)("x")


async def test_one_policy_serves_every_function_it_wraps() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="host")

    @per_key
    async def other(host: str) -> str:
        raise Down(host)

    with pytest.raises(Down):
        await other("a.test")
    with pytest.raises(sw.CircuitOpenError):
        await per_key(fetch)("a.test")
    assert factory.built == ["a.test"]


async def test_call_goes_through_the_keys_policy() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="host")
    assert await per_key.call(fetch, "a.test", "/c") == "a.test/c"
    assert factory.built == ["a.test"]


async def test_concurrent_first_calls_with_a_key_build_one_policy() -> None:
    factory = Factory()
    running = 0
    peak = 0

    @sw.PerKey(lambda key: (factory(key), sw.Bulkhead(2, max_queued=None, name=key))[1], key="k")
    async def slow(k: str) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await anyio.sleep(1.0)
        running -= 1

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(slow, "same")
    assert factory.built == ["same"]
    assert peak == 2  # one bulkhead: the six calls shared its two slots
    assert anyio.current_time() == 3.0


# -- bounded, least recently used dropped -------------------------------------------------


async def test_at_most_max_keys_are_kept_the_least_recently_used_dropped() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="host", max_keys=2)
    guarded = per_key(fetch)
    for host in ("a", "b", "a", "c", "a", "b"):
        await guarded(host)
    # c dropped b (a had just been used); b came back afresh, dropping c.
    assert factory.built == ["a", "b", "c", "b"]
    assert [key for key, _ in per_key.items()] == ["a", "b"]
    assert len(per_key) == 2


async def test_every_function_wrapped_sees_a_dropped_keys_new_policy() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="host", max_keys=1)
    first, second = per_key(fetch), per_key(fetch)
    with pytest.raises(Down):
        await first("sick")
    await second("well")  # drops sick
    with pytest.raises(Down):
        await second("sick")  # a new breaker for sick, closed
    with pytest.raises(sw.CircuitOpenError):  # first goes through that new one, now open
        await first("sick")
    assert factory.built == ["sick", "well", "sick"]


async def test_a_dropped_keys_policy_starts_afresh() -> None:
    per_key = sw.PerKey(Factory(), key="host", max_keys=1)
    guarded = per_key(fetch)
    with pytest.raises(Down):
        await guarded("sick.test")
    with pytest.raises(sw.CircuitOpenError):
        await guarded("sick.test")
    await guarded("well.test")
    with pytest.raises(Down):  # a closed breaker again
        await guarded("sick.test")


async def test_a_call_running_when_its_key_is_dropped_finishes_through_its_policy() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="host", max_keys=1)
    started = anyio.Event()

    @per_key
    async def slow(host: str) -> str:
        started.set()
        await anyio.sleep(1.0)
        return host

    results: list[str] = []

    async def first() -> None:
        results.append(await slow("a"))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await started.wait()
        breaker = per_key.get("a")
        assert isinstance(breaker, sw.CircuitBreaker)
        assert await fetch("b") == "b/"
        await per_key(fetch)("b")  # drops a
        assert per_key.get("a") is None
    assert results == ["a"]
    assert isinstance(breaker, sw.CircuitBreaker)
    assert breaker.statistics().calls == 1


async def test_get_and_items_show_the_policies_without_using_them() -> None:
    factory = Factory()
    per_key = sw.PerKey(factory, key="host", max_keys=2)
    guarded = per_key(fetch)
    await guarded("a")
    await guarded("b")
    a = per_key.get("a")
    assert isinstance(a, sw.CircuitBreaker)
    assert a.name == "upstream a"
    assert per_key.get("c") is None
    await guarded("c")  # get() did not make a recent: a is dropped
    assert [key for key, _ in per_key.items()] == ["b", "c"]


async def test_items_is_a_snapshot() -> None:
    per_key = sw.PerKey(Factory(), key="host")
    guarded = per_key(fetch)
    await guarded("a")
    snapshot = per_key.items()
    await guarded("b")
    assert [key for key, _ in snapshot] == ["a"]


def test_get_and_items_are_typed_by_the_factory() -> None:
    per_key = sw.PerKey(Factory(), key="host")
    assert_type(per_key, sw.PerKey[sw.CircuitBreaker])
    assert_type(per_key.get("a"), sw.CircuitBreaker | None)
    assert_type(per_key.items(), list[tuple[str, sw.CircuitBreaker]])


# -- what it reports ----------------------------------------------------------------------


async def test_a_dropped_keys_metrics_stop_being_exported() -> None:
    registry = CollectorRegistry()
    factory = Factory(sw.Telemetry(registry=registry))
    per_key = sw.PerKey(factory, key="host", max_keys=2)
    guarded = per_key(fetch)
    for host in ("a", "b", "c"):
        await guarded(host)
    gc.collect()
    state = "stalwart_circuit_state"
    assert sample(registry, state, policy="upstream a", state="closed") is None
    assert sample(registry, "stalwart_circuit_rejected_total", policy="upstream a") is None
    assert sample(registry, state, policy="upstream c", state="closed") == 1.0
    assert _metrics.collector_for(registry).retired() == 0


async def test_a_dropped_keys_metrics_stop_being_exported_while_its_policy_lives_on() -> None:
    # A traceback, or a call still running, can keep a dropped key's policy
    # alive: its series go all the same, at once, not at the next collection.
    registry = CollectorRegistry()
    per_key = sw.PerKey(Factory(sw.Telemetry(registry=registry)), key="host", max_keys=1)
    guarded = per_key(fetch)
    await guarded("a")
    kept = per_key.get("a")
    await guarded("b")
    assert kept is not None
    state = "stalwart_circuit_state"
    assert sample(registry, state, policy="upstream a", state="closed") is None
    assert (
        sample(
            registry,
            "stalwart_calls_total",
            policy="upstream a",
            kind="circuit_breaker",
            outcome="success",
        )
        is None
    )
    assert sample(registry, state, policy="upstream b", state="closed") == 1.0
    assert kept.state is sw.CircuitState.CLOSED  # and it still works, unseen


async def test_a_dropped_key_back_while_its_old_policy_lives_is_no_name_clash() -> None:
    registry = CollectorRegistry()
    per_key = sw.PerKey(Factory(sw.Telemetry(registry=registry)), key="host", max_keys=1)
    guarded = per_key(fetch)
    await guarded("a")
    old = per_key.get("a")  # a call still running through it, say
    await guarded("b")
    with warnings.catch_warnings():
        warnings.simplefilter("error", sw.StalwartWarning)
        await guarded("a")  # back: a new breaker of the same name
    new = per_key.get("a")
    assert new is not None
    assert new is not old
    calls = {"kind": "circuit_breaker", "outcome": "success"}
    assert sample(registry, "stalwart_calls_total", policy="upstream a", **calls) == 1.0
    state = "stalwart_circuit_state"
    assert sample(registry, state, policy="upstream a", state="closed") == 1.0


async def test_a_key_that_comes_back_is_exported_again() -> None:
    registry = CollectorRegistry()
    per_key = sw.PerKey(Factory(sw.Telemetry(registry=registry)), key="host", max_keys=1)
    guarded = per_key(fetch)
    for host in ("a", "b", "a"):
        await guarded(host)
    gc.collect()
    state = "stalwart_circuit_state"
    assert sample(registry, state, policy="upstream a", state="closed") == 1.0
    assert sample(registry, state, policy="upstream b", state="closed") is None


async def test_a_shared_policy_is_not_forgotten_when_a_key_is_dropped() -> None:
    registry = CollectorRegistry()
    shared = sw.CircuitBreaker(name="shared", telemetry=sw.Telemetry(registry=registry))
    per_key = sw.PerKey(lambda key: shared, key="host", max_keys=1)
    guarded = per_key(fetch)
    for host in ("a", "b", "c"):
        await guarded(host)
    gc.collect()
    assert sample(registry, "stalwart_circuit_state", policy="shared", state="closed") == 1.0


async def test_its_own_metrics_count_calls_keys_and_drops() -> None:
    registry = CollectorRegistry()
    telemetry = sw.Telemetry(registry=registry)
    per_key = sw.PerKey(Factory(), key="host", max_keys=2, name="hosts", telemetry=telemetry)
    guarded = per_key(fetch)
    for host in ("a", "b", "c"):
        await guarded(host)
    with pytest.raises(Down):
        await guarded("sick")
    assert sample(registry, "stalwart_per_key_keys", policy="hosts") == 2.0
    assert sample(registry, "stalwart_per_key_dropped_total", policy="hosts") == 2.0
    labels = {"policy": "hosts", "kind": "per_key"}
    assert sample(registry, "stalwart_calls_total", **labels, outcome="success") == 3.0
    assert sample(registry, "stalwart_calls_total", **labels, outcome="error") == 1.0


async def test_the_keys_policy_records_on_its_span(spans: Spans) -> None:
    telemetry = sw.Telemetry(registry=CollectorRegistry(), tracer_provider=spans.provider)
    factory = Factory(telemetry)
    guarded = sw.PerKey(factory, key="host", name="hosts", telemetry=telemetry)(fetch)
    with pytest.raises(Down):
        await guarded("sick")
    span = spans.only()
    assert span.name == "stalwart.per_key hosts"
    assert "stalwart.circuit.transition" in [e.name for e in span.events]


async def test_a_factory_that_returns_no_policy_fails_the_call_naming_the_key() -> None:
    not_a_policy: Any = lambda key: "breaker"  # noqa: E731
    guarded = sw.PerKey(not_a_policy, key="host")(fetch)
    with pytest.raises(TypeError, match=r"factory must return a stalwart policy.*'a\.test'"):
        await guarded("a.test")


async def test_a_factory_that_raises_keeps_nothing() -> None:
    def broken(key: str) -> sw.Policy:
        raise RuntimeError("no")

    per_key = sw.PerKey(broken, key="host")
    with pytest.raises(RuntimeError):
        await per_key(fetch)("a.test")
    assert per_key.items() == []


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("factory", "options", "error", "message"),
    [
        (sw.Retry(), {"key": "host"}, TypeError, "factory must be a callable making a new"),
        ("retry", {"key": "host"}, TypeError, "factory must be a callable taking a key"),
        (Factory(), {}, TypeError, "key"),
        (Factory(), {"key": None}, TypeError, "key must be a parameter name"),
        (Factory(), {"key": "not a name"}, ValueError, "key must be the name of a parameter"),
        (Factory(), {"key": "host", "max_keys": 0}, ValueError, "max_keys"),
        (Factory(), {"key": "host", "max_keys": 1.5}, TypeError, "max_keys"),
    ],
)
def test_bad_options_are_refused_naming_them(
    factory: Any, options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        sw.PerKey(factory, **options)


def test_a_key_that_is_not_a_parameter_is_refused_at_decoration() -> None:
    with pytest.raises(ValueError, match="key='tenant' is not a parameter"):
        sw.PerKey(Factory(), key="tenant")(fetch)


def test_the_repr_shows_its_options() -> None:
    def breaker(key: str) -> sw.CircuitBreaker:
        return sw.CircuitBreaker(name=key)

    per_key = sw.PerKey(breaker, key="host", max_keys=5, name="hosts")
    shown = "PerKey(test_the_repr_shows_its_options.<locals>.breaker, key='host', max_keys=5"
    assert repr(per_key) == shown + ", name='hosts')"


@settings(max_examples=50)
@given(
    keys=st.lists(st.sampled_from("abcdef"), max_size=40),
    max_keys=st.integers(min_value=1, max_value=4),
    functions=st.integers(min_value=1, max_value=3),
)
async def test_the_keys_kept_are_a_least_recently_used_cache(
    keys: list[str], max_keys: int, functions: int
) -> None:
    built: list[str] = []

    def factory(key: str) -> sw.Pipeline:
        built.append(key)
        return sw.Pipeline(name=f"pipeline {key}")

    per_key = sw.PerKey(factory, key="host", max_keys=max_keys)
    wrapped = [per_key(fetch) for _ in range(functions)]
    model: OrderedDict[str, None] = OrderedDict()
    expected: list[str] = []
    for i, key in enumerate(keys):
        if key in model:
            model.move_to_end(key)
        else:
            expected.append(key)
            model[key] = None
            if len(model) > max_keys:
                model.popitem(last=False)
        assert await wrapped[i % functions](key) == f"{key}/"
    assert built == expected
    assert [key for key, _ in per_key.items()] == list(model)
