from __future__ import annotations

import hashlib
import inspect
import logging
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, assert_type

import anyio
import pytest
from prometheus_client import CollectorRegistry, generate_latest

import stalwart as sw
from stalwart import IdempotencyStore

from .conftest import Spans, sample
from .shared_store import SharedStore

# Both kinds of store behave the same to a user: the in-process one (the
# policy's fast path) and one that works like a shared store (the protocol
# path: codec, tokens, expiring leases renewed while the call runs, polling).
STORES: dict[str, Callable[[], IdempotencyStore]] = {
    "memory": sw.MemoryStore,
    "shared": SharedStore,
}


@pytest.fixture(params=list(STORES))
def store(request: pytest.FixtureRequest) -> IdempotencyStore:
    return STORES[request.param]()


class Recorder:
    """The body of an idempotent function: counts runs, can fail or take time."""

    def __init__(self, *, duration: float = 0.0, failures: int = 0) -> None:
        self.duration = duration
        self.failures = failures
        self.runs: list[tuple[str, float]] = []
        self.running = 0
        self.peak = 0

    async def __call__(self, key: str) -> dict[str, Any]:
        self.runs.append((key, anyio.current_time()))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await anyio.sleep(self.duration)
            if self.failures:
                self.failures -= 1
                raise RuntimeError(f"run {len(self.runs)} failed")
            return {"key": key, "run": len(self.runs)}
        finally:
            self.running -= 1


def idempotent(recorder: Recorder, policy: sw.Idempotency) -> Callable[..., Any]:
    async def handle(key: str) -> dict[str, Any]:
        return await recorder(key)

    wrapped = policy(handle)

    async def call(key: str) -> dict[str, Any]:
        with anyio.fail_after(WITHIN):  # a hang is a failure, not a stuck suite
            return await wrapped(key)

    return call


# Virtual time: generous, and instant.
WITHIN = 1_000.0


async def settle() -> None:
    await anyio.sleep(0.001)


# -- run once, replay --------------------------------------------------------


async def test_the_first_call_runs_and_later_calls_replay_its_result(
    store: IdempotencyStore,
) -> None:
    body = Recorder()
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    first = await handle("order-1")
    assert await handle("order-1") == first
    assert await handle(key="order-1") == first
    assert len(body.runs) == 1


async def test_different_keys_run_separately(store: IdempotencyStore) -> None:
    body = Recorder()
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    assert (await handle("a"))["run"] == 1
    assert (await handle("b"))["run"] == 2
    assert (await handle("a"))["run"] == 1


async def test_a_none_key_means_no_de_duplication(store: IdempotencyStore) -> None:
    runs = 0

    @sw.Idempotency(key="key", store=store)
    async def handle(key: str | None) -> int:
        nonlocal runs
        runs += 1
        return runs

    assert [await handle(None), await handle(None)] == [1, 2]


async def test_replays_from_the_memory_store_return_the_same_object() -> None:
    handle = idempotent(Recorder(), sw.Idempotency(key="key"))
    first = await handle("k")
    assert await handle("k") is first


async def test_replays_through_a_codec_return_equal_copies() -> None:
    store = sw.MemoryStore(codec=sw.JSONCodec())
    handle = idempotent(Recorder(), sw.Idempotency(key="key", store=store))
    first = await handle("k")
    second = await handle("k")
    assert second == first
    assert second is not first


async def test_a_result_the_codec_cannot_encode_fails_the_call_and_frees_the_key(
    store: IdempotencyStore,
) -> None:
    if isinstance(store, sw.MemoryStore):
        store = sw.MemoryStore(codec=sw.JSONCodec())
    runs = 0

    @sw.Idempotency(key="key", store=store)
    async def handle(key: str) -> Any:
        nonlocal runs
        runs += 1
        return {"when": datetime(2024, 1, 1, tzinfo=UTC)}

    with pytest.raises(TypeError, match=r"JSONCodec cannot encode value\['when'\].*datetime"):
        await handle("k")
    with pytest.raises(TypeError):
        await handle("k")
    assert runs == 2


# -- where the key comes from --------------------------------------------------


async def test_the_key_parameter_may_be_passed_by_position_or_by_name() -> None:
    runs = 0

    @sw.Idempotency(key="order_id")
    async def create(customer: str, order_id: str, note: str = "") -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await create("ann", "o-1") == 1
    assert await create("ann", order_id="o-1") == 1
    assert await create(customer="ann", order_id="o-1", note="x") == 1
    assert await create("ann", "o-2") == 2


async def test_the_key_may_be_a_keyword_only_parameter() -> None:
    runs = 0

    @sw.Idempotency(key="request_id")
    async def create(*items: str, request_id: str) -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await create("a", "b", request_id="r") == 1
    assert await create(request_id="r") == 1


async def test_the_key_may_be_a_positional_only_parameter() -> None:
    runs = 0

    @sw.Idempotency(key="key")
    async def create(key: str, /, **fields: str) -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await create("k", key="a field, not the key") == 1
    assert await create("k") == 1


async def test_a_parameter_default_is_the_key_when_the_argument_is_left_out() -> None:
    runs = 0

    @sw.Idempotency(key="key")
    async def refresh(key: str | None = "singleton") -> int:
        nonlocal runs
        runs += 1
        return runs

    assert [await refresh(), await refresh("singleton"), await refresh(None)] == [1, 1, 2]


async def test_the_key_may_be_passed_into_var_keyword_arguments() -> None:
    runs = 0

    @sw.Idempotency(key="idempotency_key")
    async def create(**fields: str) -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await create(idempotency_key="k", a="1") == 1
    assert await create(idempotency_key="k") == 1
    assert await create(a="1") == 2  # no key: runs every time


async def test_a_missing_key_argument_fails_as_the_function_itself_would() -> None:
    @sw.Idempotency(key="key")
    async def handle(key: str) -> None:
        raise AssertionError("not reached")

    with pytest.raises(TypeError, match="missing 1 required positional argument: 'key'"):
        await handle()  # type: ignore[call-arg]


async def test_a_key_callable_gets_the_call_arguments() -> None:
    seen: list[tuple[Any, ...]] = []

    def key_of(customer: str, order: dict[str, str]) -> str:
        seen.append((customer, order))
        return f"{customer}/{order['id']}"

    runs = 0

    @sw.Idempotency(key=key_of)
    async def create(customer: str, order: dict[str, str]) -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await create("ann", {"id": "1"}) == 1
    assert await create(customer="ann", order={"id": "1", "note": "x"}) == 1
    assert await create("bob", {"id": "1"}) == 2
    assert seen[1] == ("ann", {"id": "1", "note": "x"})


async def test_a_method_finds_its_key_after_self() -> None:
    class Orders:
        def __init__(self) -> None:
            self.runs = 0

        @sw.Idempotency(key="order_id")
        async def create(self, order_id: str) -> int:
            self.runs += 1
            return self.runs

    orders = Orders()
    assert [await orders.create("o"), await orders.create(order_id="o")] == [1, 1]


# -- invalid keys ------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "x" * 256, "line\nbreak", "nul\x00", "tab\there", "\x7f", "zero\u200bwidth"],
    ids=["empty", "256-chars", "newline", "nul", "tab", "del", "zero-width-space"],
)
async def test_an_invalid_key_is_refused_before_anything_runs(key: str) -> None:
    store = sw.MemoryStore()
    runs = 0

    @sw.Idempotency(key="payment_id", store=store)
    async def charge(payment_id: str) -> None:
        nonlocal runs
        runs += 1

    with pytest.raises(ValueError, match=r"parameter 'payment_id' of .*charge.* 1-255 printable"):
        await charge(key)
    assert runs == 0
    assert not store._claims
    assert len(store) == 0


async def test_a_key_of_255_printable_characters_is_accepted() -> None:
    handle = idempotent(Recorder(), sw.Idempotency(key="key"))
    for key in ("é" * 255, "x y", "🙂", "~!@#$%^&*()"):
        assert (await handle(key))["key"] == key


async def test_a_key_that_is_not_a_str_is_a_type_error_naming_the_parameter() -> None:
    @sw.Idempotency(key="order_id")
    async def create(order_id: Any) -> None:
        raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"parameter 'order_id' of .*create.* must be a str.*int"):
        await create(42)


async def test_a_bad_key_from_a_callable_names_the_callable() -> None:
    def key_of(x: int) -> str:
        return "bad\n"

    @sw.Idempotency(key=key_of)
    async def create(x: int) -> None:
        raise AssertionError("not reached")

    with pytest.raises(ValueError, match=r"returned by key=.*key_of"):
        await create(1)


# -- failures and cancellation ---------------------------------------------------


async def test_a_failed_call_stores_nothing_and_frees_the_key(store: IdempotencyStore) -> None:
    body = Recorder(failures=1)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    with pytest.raises(RuntimeError, match="run 1 failed"):
        await handle("k")
    assert (await handle("k"))["run"] == 2
    assert (await handle("k"))["run"] == 2


async def test_a_cancelled_call_frees_the_key(store: IdempotencyStore) -> None:
    body = Recorder(duration=10.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    with anyio.move_on_after(1.0):
        await handle("k")
    body.duration = 0.0
    assert (await handle("k"))["run"] == 2


async def test_the_call_keeps_its_signature() -> None:
    async def create(order_id: str, amount: int = 1) -> list[int]:
        return [amount]

    wrapped = sw.Idempotency(key="order_id")(create)
    assert inspect.signature(wrapped) == inspect.signature(create)
    assert wrapped.__name__ == "create"
    assert_type(await wrapped("o", amount=2), list[int])
    result = await sw.Idempotency(key="order_id").call(create, "o", 3)
    assert_type(result, list[int])
    assert result == [3]


# -- ttl ---------------------------------------------------------------------------


async def test_the_result_is_replayed_until_the_ttl_has_passed(store: IdempotencyStore) -> None:
    body = Recorder()
    handle = idempotent(body, sw.Idempotency(key="key", store=store, ttl=10.0))
    await handle("k")
    await anyio.sleep(9.9)
    assert (await handle("k"))["run"] == 1
    await anyio.sleep(0.2)
    assert (await handle("k"))["run"] == 2
    assert body.runs[1][1] - body.runs[0][1] == pytest.approx(10.1)


# -- scope -------------------------------------------------------------------------


async def test_two_functions_never_share_a_record() -> None:
    policy = sw.Idempotency(key="key")

    @policy
    async def create(key: str) -> str:
        return "create"

    @policy
    async def delete(key: str) -> str:
        return "delete"

    assert [await create("k"), await delete("k"), await create("k")] == [
        "create",
        "delete",
        "create",
    ]


async def test_policies_with_different_names_never_share_a_record_in_one_store() -> None:
    store = sw.MemoryStore()
    body = Recorder()

    async def handle(key: str) -> dict[str, Any]:
        return await body(key)

    a = sw.Idempotency(key="key", store=store, name="a")(handle)
    b = sw.Idempotency(key="key", store=store, name="b")(handle)
    assert [(await a("k"))["run"], (await b("k"))["run"], (await a("k"))["run"]] == [1, 2, 1]


async def test_inside_a_pipeline_records_are_scoped_to_the_users_function() -> None:
    pipeline = sw.Pipeline(sw.Idempotency(key="key"), sw.Retry(attempts=2))
    runs: list[str] = []

    @pipeline
    async def create(key: str) -> str:
        runs.append("create")
        return "created"

    @pipeline
    async def delete(key: str) -> str:
        runs.append("delete")
        return "deleted"

    assert [await create("k"), await delete("k"), await create("k")] == [
        "created",
        "deleted",
        "created",
    ]
    assert runs == ["create", "delete"]


async def test_a_retry_inside_runs_under_one_claim() -> None:
    attempts = 0

    @sw.Pipeline(sw.Idempotency(key="key"), sw.Retry(attempts=3, backoff=sw.Backoff(0, maximum=0)))
    async def create(key: str) -> int:
        nonlocal attempts
        attempts += 1
        if attempts < 3:
            raise ConnectionError
        return attempts

    assert [await create("k"), await create("k")] == [3, 3]


async def test_call_scopes_records_to_the_function_it_is_given() -> None:
    policy = sw.Idempotency(key="key")

    async def create(key: str) -> str:
        return "create"

    async def delete(key: str) -> str:
        return "delete"

    assert await policy.call(create, "k") == "create"
    assert await policy.call(delete, "k") == "delete"


# -- single flight ------------------------------------------------------------------


async def test_concurrent_calls_with_one_key_run_once_and_share_the_result(
    store: IdempotencyStore,
) -> None:
    body = Recorder(duration=5.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    results: list[tuple[dict[str, Any], float]] = []

    async def caller() -> None:
        results.append((await handle("k"), anyio.current_time()))

    start = anyio.current_time()
    with anyio.fail_after(WITHIN):  # a hang is a failure, not a stuck suite
        async with anyio.create_task_group() as tg:
            for _ in range(10):
                tg.start_soon(caller)
    assert len(body.runs) == 1
    assert {r["run"] for r, _ in results} == {1}
    # Waiters are answered when the call ends (a shared store: within its polling interval).
    assert all(t - start == pytest.approx(5.0, abs=0.06) for _, t in results), results


async def test_on_conflict_raise_rejects_a_call_whose_key_is_in_flight(
    store: IdempotencyStore,
) -> None:
    body = Recorder(duration=5.0)
    handle = idempotent(
        body, sw.Idempotency(key="key", store=store, on_conflict="raise", name="pay")
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle, "k")
        await settle()
        start = anyio.current_time()
        with pytest.raises(sw.IdempotencyConflict, match="already in flight") as info:
            await handle("k")
        assert anyio.current_time() == start
        assert info.value.policy == "pay"
    assert len(body.runs) == 1
    assert (await handle("k"))["run"] == 1  # done: a replay, not a conflict


async def test_when_the_running_call_fails_exactly_one_waiter_runs_next(
    store: IdempotencyStore,
) -> None:
    body = Recorder(duration=1.0, failures=1)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    outcomes: list[object] = []

    async def caller() -> None:
        try:
            outcomes.append((await handle("k"))["run"])
        except RuntimeError as exc:
            outcomes.append(str(exc))

    with anyio.fail_after(WITHIN):  # a hang is a failure, not a stuck suite
        async with anyio.create_task_group() as tg:
            for _ in range(5):
                tg.start_soon(caller)
                await settle()
    assert len(body.runs) == 2
    assert body.peak == 1
    assert sorted(outcomes, key=str) == [2, 2, 2, 2, "run 1 failed"]
    assert body.runs[1][1] - body.runs[0][1] == pytest.approx(1.0, abs=0.1)


async def test_when_every_run_fails_each_caller_runs_in_turn_and_gets_its_own_error(
    store: IdempotencyStore,
) -> None:
    body = Recorder(duration=1.0, failures=1_000)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    errors: list[str] = []

    async def caller() -> None:
        with pytest.raises(RuntimeError) as info:
            await handle("k")
        errors.append(str(info.value))

    with anyio.fail_after(WITHIN):  # a hang is a failure, not a stuck suite
        async with anyio.create_task_group() as tg:
            for _ in range(4):
                tg.start_soon(caller)
    assert sorted(errors) == [f"run {i} failed" for i in range(1, 5)]
    assert body.peak == 1


async def test_a_cancelled_owner_hands_the_key_to_a_waiter(store: IdempotencyStore) -> None:
    body = Recorder(duration=10.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    results: list[int] = []

    async def waiter() -> None:
        results.append((await handle("k"))["run"])

    with anyio.fail_after(WITHIN):  # a hang is a failure, not a stuck suite
        async with anyio.create_task_group() as tg, anyio.create_task_group() as owner:
            owner.start_soon(handle, "k")
            await settle()
            tg.start_soon(waiter)
            tg.start_soon(waiter)
            await anyio.sleep(2.0)
            owner.cancel_scope.cancel()
    assert results == [2, 2]
    assert len(body.runs) == 2
    assert body.runs[1][1] - body.runs[0][1] == pytest.approx(2.0, abs=0.1)


async def test_a_cancelled_waiter_leaves_the_others_waiting(store: IdempotencyStore) -> None:
    body = Recorder(duration=10.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    results: list[int] = []

    async def waiter() -> None:
        results.append((await handle("k"))["run"])

    with anyio.fail_after(WITHIN):  # a hang is a failure, not a stuck suite
        async with anyio.create_task_group() as tg:
            tg.start_soon(handle, "k")
            await settle()
            with anyio.move_on_after(2.0):
                await handle("k")
            tg.start_soon(waiter)
    assert results == [1]
    assert len(body.runs) == 1


async def test_waiting_respects_the_ambient_deadline(store: IdempotencyStore) -> None:
    body = Recorder(duration=10.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle, "k")
        await settle()
        start = anyio.current_time()
        with pytest.raises(sw.DeadlineExceeded), sw.deadline(2.0):
            await handle("k")
        assert anyio.current_time() - start == pytest.approx(2.0)
    assert len(body.runs) == 1
    assert (await handle("k"))["run"] == 1


async def test_the_holder_is_bounded_by_the_ambient_deadline_and_frees_the_key(
    store: IdempotencyStore,
) -> None:
    body = Recorder(duration=10.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    with pytest.raises(sw.DeadlineExceeded), sw.deadline(2.0):
        await handle("k")
    body.duration = 0.0
    assert (await handle("k"))["run"] == 2


# -- leases on a shared store ----------------------------------------------------------


async def test_a_waiter_takes_over_the_key_of_a_holder_that_died() -> None:
    store = SharedStore()
    runs: list[float] = []

    async def handle(key: str) -> str:
        runs.append(anyio.current_time())
        return "ok"

    idempotent_handle = sw.Idempotency(key="key", store=store, lease=3.0)(handle)
    # Another process claimed the key, then died: its lease is never renewed.
    await store.claim(f"idempotency:{_scope_of(handle)}", "k", fingerprint=None, lease=3.0)
    start = anyio.current_time()
    with anyio.fail_after(WITHIN):
        assert await idempotent_handle("k") == "ok"
    assert len(runs) == 1
    assert 3.0 <= runs[0] - start < 3.1


async def test_a_call_that_outlives_its_lease_keeps_the_key_by_renewing_it() -> None:
    store = SharedStore()
    body = Recorder(duration=20.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store, lease=3.0))
    results: list[int] = []

    async def late_caller() -> None:
        await anyio.sleep(10.0)
        results.append((await handle("k"))["run"])

    async with anyio.create_task_group() as tg:
        tg.start_soon(handle, "k")
        tg.start_soon(late_caller)
    assert results == [1]
    assert len(body.runs) == 1
    assert store.calls["renew"] >= 6
    assert store.calls["complete"] == 1


async def test_a_call_whose_claim_was_lost_returns_but_stores_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = SharedStore()
    body = Recorder(duration=5.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store, lease=3.0))

    async def lose_the_claim() -> None:
        await anyio.sleep(1.5)
        store.data.clear()  # e.g. the store was flushed or failed over

    with caplog.at_level(logging.WARNING, logger="stalwart.idempotency"):
        async with anyio.create_task_group() as tg:
            tg.start_soon(lose_the_claim)
            assert (await handle("k"))["run"] == 1
    assert "lost the claim" in caplog.text
    assert "was not stored" in caplog.text
    assert (await handle("k"))["run"] == 2


class FlakyStore(SharedStore):
    """A shared store whose renew or release fails like a network call can."""

    def __init__(self, *, failing: str) -> None:
        super().__init__()
        self.failing = failing

    async def renew(self, lease: sw.Lease) -> bool:
        if self.failing == "renew":
            raise ConnectionError("store unreachable")
        return await super().renew(lease)

    async def release(self, lease: sw.Lease) -> None:
        if self.failing == "release":
            raise ConnectionError("store unreachable")
        await super().release(lease)


async def test_a_failed_renewal_does_not_fail_the_call(caplog: pytest.LogCaptureFixture) -> None:
    store = FlakyStore(failing="renew")
    body = Recorder(duration=2.0)
    handle = idempotent(body, sw.Idempotency(key="key", store=store, lease=3.0))
    with caplog.at_level(logging.WARNING, logger="stalwart.idempotency"):
        assert (await handle("k"))["run"] == 1
    assert "could not renew" in caplog.text
    assert (await handle("k"))["run"] == 1


async def test_a_store_that_cannot_release_never_hides_the_calls_own_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = FlakyStore(failing="release")
    handle = idempotent(Recorder(failures=1), sw.Idempotency(key="key", store=store, lease=3.0))
    with (
        caplog.at_level(logging.WARNING, logger="stalwart.idempotency"),
        pytest.raises(RuntimeError, match="run 1 failed"),
    ):
        await handle("k")
    assert "could not release" in caplog.text


class BrokenStore(SharedStore):
    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        return "yes"


async def test_a_store_that_breaks_the_protocol_is_named_in_the_error() -> None:
    handle = idempotent(Recorder(), sw.Idempotency(key="key", store=BrokenStore()))
    with pytest.raises(TypeError, match=r"claim\(\) returned 'yes': expected a Lease"):
        await handle("k")


async def test_a_shared_store_claims_and_completes_in_two_round_trips() -> None:
    store = SharedStore()
    handle = idempotent(Recorder(), sw.Idempotency(key="key", store=store))
    await handle("k")
    assert store.calls == {"claim": 1, "complete": 1}
    await handle("k")
    assert store.calls == {"claim": 2, "complete": 1}


# -- fingerprints -----------------------------------------------------------------------


def _scope_of(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


async def test_with_fingerprint_args_the_same_arguments_replay(store: IdempotencyStore) -> None:
    runs = 0

    @sw.Idempotency(key="payment_id", fingerprint="args", store=store)
    async def charge(payment_id: str, amount: int, currency: str = "EUR") -> int:
        nonlocal runs
        runs += 1
        return runs

    assert await charge("p", 100) == 1
    assert await charge("p", amount=100) == 1
    assert await charge(currency="EUR", amount=100, payment_id="p") == 1


async def test_a_key_reused_with_other_arguments_is_refused(store: IdempotencyStore) -> None:
    runs = 0

    @sw.Idempotency(key="payment_id", fingerprint="args", store=store, name="pay")
    async def charge(payment_id: str, amount: int) -> int:
        nonlocal runs
        runs += 1
        return runs

    await charge("p", 100)
    with pytest.raises(sw.IdempotencyKeyReused, match="different arguments") as info:
        await charge("p", 200)
    assert info.value.policy == "pay"
    assert runs == 1


async def test_the_fingerprint_is_checked_before_waiting_on_a_call_in_flight(
    store: IdempotencyStore,
) -> None:
    @sw.Idempotency(key="payment_id", fingerprint="args", store=store)
    async def charge(payment_id: str, amount: int) -> int:
        await anyio.sleep(10.0)
        return amount

    async with anyio.create_task_group() as tg:
        tg.start_soon(charge, "p", 100)
        await settle()
        start = anyio.current_time()
        with pytest.raises(sw.IdempotencyKeyReused):
            await charge("p", 200)
        assert anyio.current_time() == start


async def test_without_a_fingerprint_a_reused_key_replays() -> None:
    @sw.Idempotency(key="payment_id")
    async def charge(payment_id: str, amount: int) -> int:
        return amount

    assert [await charge("p", 100), await charge("p", 200)] == [100, 100]


async def test_the_args_fingerprint_is_canonical_json_hashed_with_sha256() -> None:
    store = sw.MemoryStore()

    @sw.Idempotency(key="payment_id", fingerprint="args", store=store)
    async def charge(payment_id: str, amount: int, meta: Any = None, note: str = "é") -> None:
        return None

    await charge("p", 5, {"b": [1, (2, 3)], "a": True})
    record = await store.claim(f"idempotency:{_scope_of(charge)}", "p", fingerprint=None, lease=1)
    assert isinstance(record, sw.Completed)
    canonical = '{"amount":5,"meta":{"a":true,"b":[1,[2,3]]},"note":"\\u00e9"}'
    assert record.fingerprint == hashlib.sha256(canonical.encode()).hexdigest()
    # Dict order, tuples or lists, positional or keyword: the same request.
    await charge(amount=5, meta={"a": True, "b": [1, [2, 3]]}, payment_id="p")


async def test_the_args_fingerprint_keeps_var_keyword_arguments_apart_from_parameters() -> None:
    @sw.Idempotency(key="key", fingerprint="args")
    async def create(key: str, note: str = "", /, **fields: str) -> str:
        return "created"

    await create("k", "a", note="b")
    with pytest.raises(sw.IdempotencyKeyReused):
        await create("k", "b", note="a")
    await create("k", "a", note="b")


async def test_the_args_fingerprint_leaves_out_a_key_passed_into_var_keyword_arguments() -> None:
    store = sw.MemoryStore()

    @sw.Idempotency(key="request_id", fingerprint="args", store=store)
    async def create(**fields: str) -> None:
        return None

    await create(request_id="r", size="L")
    record = await store.claim(f"idempotency:{_scope_of(create)}", "r", fingerprint=None, lease=1)
    assert isinstance(record, sw.Completed)
    canonical = '{"fields":{"size":"L"}}'
    assert record.fingerprint == hashlib.sha256(canonical.encode()).hexdigest()


async def test_the_args_fingerprint_names_an_argument_it_cannot_encode() -> None:
    @sw.Idempotency(key="payment_id", fingerprint="args")
    async def charge(payment_id: str, items: list[Any]) -> None:
        raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"cannot encode argument items\[1\] of type datetime"):
        await charge("p", ["ok", datetime.now(UTC)])
    with pytest.raises(ValueError, match=r"items\[0\]"):
        await charge("p", [math.nan])


async def test_the_args_fingerprint_leaves_out_self() -> None:
    class Payments:
        @sw.Idempotency(key="payment_id", fingerprint="args")
        async def charge(self, payment_id: str, amount: int) -> int:
            return amount

    assert await Payments().charge("p", 5) == 5
    assert await Payments().charge("p", 5) == 5
    with pytest.raises(sw.IdempotencyKeyReused):
        await Payments().charge("p", 6)


async def test_a_fingerprint_callable_decides_what_makes_a_request_the_same() -> None:
    @sw.Idempotency(key="payment_id", fingerprint=lambda payment_id, amount, note="": str(amount))
    async def charge(payment_id: str, amount: int, note: str = "") -> int:
        return amount

    assert await charge("p", 5, note="a") == 5
    assert await charge("p", 5, note="b") == 5
    with pytest.raises(sw.IdempotencyKeyReused):
        await charge("p", 6)


async def test_a_fingerprint_callable_must_return_a_str() -> None:
    @sw.Idempotency(key="key", fingerprint=lambda key: 42)  # type: ignore[arg-type,return-value]
    async def handle(key: str) -> None:
        raise AssertionError("not reached")

    with pytest.raises(TypeError, match=r"fingerprint=.*must return a str, not int"):
        await handle("k")


# -- the in-process store's bounds -------------------------------------------------------


async def test_the_default_store_keeps_at_most_max_entries_results() -> None:
    body = Recorder()
    policy = sw.Idempotency(key="key", max_entries=2)
    handle = idempotent(body, policy)
    for key in "abc":
        await handle(key)
    assert isinstance(policy.store, sw.MemoryStore)
    assert len(policy.store) == 2
    assert (await handle("a"))["run"] == 4  # evicted: runs again


async def test_the_least_recently_used_result_is_evicted_first() -> None:
    body = Recorder()
    handle = idempotent(body, sw.Idempotency(key="key", store=sw.MemoryStore(2)))
    await handle("a")
    await handle("b")
    await handle("a")  # a replay counts as a use
    await handle("c")  # evicts "b"
    assert (await handle("a"))["run"] == 1
    assert (await handle("b"))["run"] == 4


async def test_memory_stays_flat_however_many_keys_pass_through() -> None:
    store = sw.MemoryStore(100)

    @sw.Idempotency(key="key", store=store)
    async def handle(key: str) -> str:
        return key

    for i in range(5_000):
        assert await handle(f"key-{i}") == f"key-{i}"
    assert len(store) == 100
    assert not store._claims
    assert not store._events


async def test_expired_results_are_dropped_without_being_looked_up() -> None:
    store = sw.MemoryStore()
    handle = idempotent(Recorder(), sw.Idempotency(key="key", store=store, ttl=10.0))
    for i in range(5):
        await handle(f"old-{i}")
    await anyio.sleep(11.0)
    for i in range(5):
        await handle(f"new-{i}")
    assert len(store) == 5


async def test_clear_forgets_every_result() -> None:
    store = sw.MemoryStore()
    body = Recorder()
    handle = idempotent(body, sw.Idempotency(key="key", store=store))
    await handle("k")
    store.clear()
    assert (await handle("k"))["run"] == 2


# -- telemetry ---------------------------------------------------------------------------


async def test_replays_and_conflicts_are_counted(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    handle = idempotent(
        Recorder(duration=1.0), sw.Idempotency(key="key", name="pay", telemetry=telemetry)
    )
    assert sample(registry, "stalwart_idempotency_replays_total", policy="pay") == 0
    assert sample(registry, "stalwart_idempotency_conflicts_total", policy="pay") == 0
    async with anyio.create_task_group() as tg:
        for _ in range(3):
            tg.start_soon(handle, "k")
    await handle("k")
    assert sample(registry, "stalwart_idempotency_conflicts_total", policy="pay") == 2
    assert sample(registry, "stalwart_idempotency_replays_total", policy="pay") == 3


async def test_a_conflict_raised_is_counted(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    handle = idempotent(
        Recorder(duration=1.0),
        sw.Idempotency(key="key", on_conflict="raise", name="p", telemetry=telemetry),
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(handle, "k")
        await settle()
        with pytest.raises(sw.IdempotencyConflict):
            await handle("k")
    assert sample(registry, "stalwart_idempotency_conflicts_total", policy="p") == 1


async def test_the_key_never_appears_in_metrics(registry: CollectorRegistry) -> None:
    telemetry = sw.Telemetry(registry=registry)
    handle = idempotent(Recorder(), sw.Idempotency(key="key", telemetry=telemetry))
    await handle("secret-key-123")
    await handle("secret-key-123")
    assert b"secret-key-123" not in generate_latest(registry)


async def test_each_call_runs_in_a_span_and_a_replay_is_an_event(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    handle = idempotent(Recorder(), sw.Idempotency(key="key", name="pay", telemetry=telemetry))
    await handle("k")
    await handle("k")
    first, second = spans.named("stalwart.idempotency pay")
    assert first.attributes == {"stalwart.policy": "pay"}
    assert [e.name for e in first.events] == []
    ((event,),) = [second.events]
    assert event.name == "stalwart.idempotency.replayed"
    assert event.attributes == {"stalwart.policy": "pay"}


async def test_a_span_records_a_refused_call_as_an_error(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    @sw.Idempotency(key="key", fingerprint="args", name="pay", telemetry=telemetry)
    async def charge(key: str, amount: int) -> int:
        return amount

    await charge("k", 1)
    with pytest.raises(sw.IdempotencyKeyReused):
        await charge("k", 2)
    span = spans.named("stalwart.idempotency pay")[-1]
    assert not span.status.is_ok
    assert span.attributes is not None
    assert span.attributes["error.type"] == "stalwart.IdempotencyKeyReused"


async def test_inside_a_pipeline_the_replay_is_an_event_on_the_pipelines_span(
    telemetry: sw.Telemetry, spans: Spans
) -> None:
    pipeline = sw.Pipeline(
        sw.Idempotency(key="key", name="pay", telemetry=telemetry),
        name="checkout",
        telemetry=telemetry,
    )
    handle = idempotent(Recorder(), pipeline)  # type: ignore[arg-type]
    await handle("k")
    await handle("k")
    assert spans.named("stalwart.idempotency pay") == []
    replayed = spans.named("stalwart.pipeline checkout")[1]
    assert [e.name for e in replayed.events] == ["stalwart.idempotency.replayed"]


# -- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"key": 3}, TypeError, "key must be a parameter name"),
        ({"key": "not a name"}, ValueError, "key must be the name of a parameter"),
        ({"ttl": 0}, ValueError, "ttl must be > 0"),
        ({"ttl": math.inf}, ValueError, "ttl must be finite"),
        ({"ttl": "1h"}, TypeError, "ttl must be a number"),
        ({"lease": -1}, ValueError, "lease must be > 0"),
        ({"on_conflict": "skip"}, ValueError, "on_conflict must be 'wait' or 'raise'"),
        ({"fingerprint": "kwargs"}, ValueError, "fingerprint must be None, 'args' or a callable"),
        ({"fingerprint": 1}, TypeError, "fingerprint must be None, 'args' or a callable"),
        ({"store": object()}, TypeError, "store must implement stalwart.IdempotencyStore"),
        ({"max_entries": 0}, ValueError, "max_entries must be >= 1"),
        ({"max_entries": 5, "store": sw.MemoryStore()}, ValueError, "max_entries sizes"),
        ({"name": ""}, ValueError, "name must be"),
    ],
)
def test_invalid_options_are_refused_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sw.Idempotency(**{"key": "key", **options})


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"max_entries": 0}, ValueError, "max_entries must be >= 1"),
        ({"max_entries": 1.5}, TypeError, "max_entries must be an int"),
        ({"codec": "json"}, TypeError, "codec must have encode"),
    ],
)
def test_invalid_store_options_are_refused_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        sw.MemoryStore(**options)


def test_the_key_must_name_a_parameter_of_the_decorated_function() -> None:
    async def create(order_id: str) -> None:
        return None

    with pytest.raises(ValueError, match=r"key='order' is not a parameter of .*create\(order_id"):
        sw.Idempotency(key="order")(create)


def test_the_key_cannot_name_a_variadic_parameter() -> None:
    async def create(*keys: str) -> None:
        return None

    with pytest.raises(ValueError, match="key='keys' names the variadic parameter"):
        sw.Idempotency(key="keys")(create)


def test_decorating_a_sync_function_is_a_type_error() -> None:
    def create(key: str) -> None:
        return None

    with pytest.raises(TypeError, match="async def"):
        sw.Idempotency(key="key")(create)  # type: ignore[arg-type]


def test_the_policy_shows_its_settings() -> None:
    store = sw.MemoryStore(5)
    policy = sw.Idempotency(key="k", store=store, ttl=60, on_conflict="raise", lease=9, name="p")
    assert (policy.store, policy.ttl, policy.on_conflict, policy.lease) == (store, 60, "raise", 9)
    assert repr(policy) == (
        "Idempotency(key='k', ttl=60, on_conflict='raise', "
        "store=MemoryStore(max_entries=5), name='p')"
    )
    assert store.max_entries == 5
    assert store.codec is None
    assert isinstance(store, sw.IdempotencyStore)
