from __future__ import annotations

import importlib
import inspect
import re
from typing import get_args

import pytest

import stalwart as sw

CONTRACT = [
    "StalwartError",
    "CircuitOpenError",
    "BulkheadFullError",
    "DeadlineExceeded",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "RateLimitExceeded",
    "StalwartWarning",
    "RateLimiter",
    "Backoff",
    "Retry",
    "RetryBudget",
    "Bulkhead",
    "CircuitBreaker",
    "CircuitState",
    "CountWindow",
    "TimeWindow",
    "Timeout",
    "deadline",
    "remaining",
    "Pipeline",
    "Idempotency",
    "Telemetry",
    "ConcurrencyLimit",
    "AdaptiveThrottle",
    "Hedge",
    "Fallback",
    "PerKey",
]

# Modules imported on demand (each needs its extra), so not in `stalwart.__all__`.
INTEGRATIONS = {
    "aiohttp": ["DeadlineMiddleware", "ResilientMiddleware"],
    "asgi": [
        "BreakerHealth",
        "DeadlineMiddleware",
        "ErrorMiddleware",
        "IdempotencyMiddleware",
        "LoadShedMiddleware",
        "RateLimitMiddleware",
    ],
    "grpc": ["ClientInterceptor", "ServerInterceptor"],
    "httpx": [
        "ResilientTransport",
        "TransportBulkheadFullError",
        "TransportCircuitOpenError",
        "TransportDeadlineExceeded",
        "TransportRateLimitExceeded",
    ],
    "redis": ["RedisStore"],
}


def test_all_is_sorted_and_complete() -> None:
    assert sw.__all__ == sorted(sw.__all__)
    for name in sw.__all__:
        assert hasattr(sw, name), name
    public = {n for n in dir(sw) if not n.startswith("_")} - {"events", "testing", *INTEGRATIONS}
    assert public <= set(sw.__all__) | {"annotations"}


@pytest.mark.parametrize("name", CONTRACT)
def test_the_contract_names_are_exported(name: str) -> None:
    assert name in sw.__all__


@pytest.mark.parametrize("name", [n for n in sw.__all__ if n != "__version__"])
def test_every_public_name_is_documented(name: str) -> None:
    obj = getattr(sw, name)
    if inspect.isclass(obj) or inspect.isfunction(obj):
        assert inspect.getdoc(obj), name


def test_the_breaker_modes_are_a_literal_type() -> None:
    assert get_args(sw.CircuitBreakerMode) == ("enforce", "observe")


def test_errors_have_the_contract_bases() -> None:
    assert issubclass(sw.StalwartError, Exception)
    for error in (
        sw.CircuitOpenError,
        sw.BulkheadFullError,
        sw.DeadlineExceeded,
        sw.IdempotencyConflict,
        sw.IdempotencyKeyReused,
        sw.RateLimitExceeded,
        sw.StoreUnavailable,
    ):
        assert issubclass(error, sw.StalwartError)
    assert issubclass(sw.DeadlineExceeded, TimeoutError)
    assert issubclass(sw.StalwartWarning, UserWarning)
    assert not issubclass(sw.StalwartWarning, sw.StalwartError)


def test_errors_carry_their_attributes_and_survive_pickling() -> None:
    import pickle

    errors = [
        sw.StalwartError("x", policy="p"),
        sw.CircuitOpenError("open", policy="cb", retry_after=1.5),
        sw.DeadlineExceeded("late", policy="t", timeout=2.0),
        sw.BulkheadFullError("full", policy="b"),
        sw.StoreUnavailable("down", policy="redis"),
        sw.RateLimitExceeded("limited", policy="rl", retry_after=0.25),
        sw.RateLimitExceeded("limited", policy="rl"),
    ]
    for error in errors:
        copy = pickle.loads(pickle.dumps(error))
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.__dict__ == error.__dict__
    assert errors[1].retry_after == 1.5  # type: ignore[attr-defined]
    assert errors[2].timeout == 2.0  # type: ignore[attr-defined]
    assert pickle.loads(pickle.dumps(errors[5])).retry_after == 0.25
    assert pickle.loads(pickle.dumps(errors[6])).retry_after is None


def test_testing_module_is_importable() -> None:
    module = importlib.import_module("stalwart.testing")
    assert module.__all__ == sorted(module.__all__)


def test_version_is_a_string() -> None:
    assert isinstance(sw.__version__, str)


@pytest.mark.parametrize("module", sorted(INTEGRATIONS))
def test_the_integrations_export_their_contract_names(module: str) -> None:
    imported = importlib.import_module(f"stalwart.{module}")
    assert imported.__all__ == sorted(imported.__all__)
    for name in INTEGRATIONS[module]:
        assert name in imported.__all__
        assert inspect.getdoc(getattr(imported, name)), name


def test_errors_are_named_by_their_public_module() -> None:
    assert sw.DeadlineExceeded.__module__ == "stalwart"
    assert sw.RateLimitExceeded.__module__ == "stalwart"
    assert sw.StalwartWarning.__module__ == "stalwart"
    assert repr(sw.BulkheadFullError("full", policy="b")) == "BulkheadFullError('full')"
    assert f"{sw.CircuitOpenError.__module__}.{sw.CircuitOpenError.__qualname__}" == (
        "stalwart.CircuitOpenError"
    )


DECORATOR_CLASSES = [
    (sw.Retry, "@sw.Retry()"),
    (sw.Timeout, "@sw.Timeout(seconds)"),
    (sw.CircuitBreaker, "@sw.CircuitBreaker()"),
    (sw.Bulkhead, "@sw.Bulkhead(max_concurrent)"),
    (sw.Idempotency, "@sw.Idempotency(key=...)"),
    (sw.Pipeline, "@sw.Pipeline(policy, ...)"),
    (sw.ConcurrencyLimit, "@sw.ConcurrencyLimit()"),
    (sw.AdaptiveThrottle, "@sw.AdaptiveThrottle()"),
    (sw.Hedge, "@sw.Hedge()"),
]


@pytest.mark.parametrize(
    ("cls", "call"), DECORATOR_CLASSES, ids=lambda v: getattr(v, "__name__", "")
)
def test_a_policy_class_used_bare_as_a_decorator_says_to_call_it(cls: type, call: str) -> None:
    with pytest.raises(TypeError) as info:

        @cls
        async def fetch(url: str) -> bytes:
            return b""

    message = str(info.value)
    assert f"write {call}, not @sw.{cls.__name__}" in message
    assert "fetch" in message


@pytest.mark.parametrize(
    ("cls", "call"), DECORATOR_CLASSES, ids=lambda v: getattr(v, "__name__", "")
)
def test_a_policy_class_used_bare_on_a_method_or_sync_function_says_it_too(
    cls: type, call: str
) -> None:
    def sync(url: str) -> bytes:
        return b""

    class Client:
        async def get(self, url: str) -> bytes:
            return b""

    for fn in (sync, Client.get, Client().get):
        with pytest.raises(TypeError, match=re.escape(f"write {call}")):
            cls(fn)


def test_a_policy_class_called_properly_is_not_mistaken_for_a_bare_decorator() -> None:
    assert sw.Retry(3).attempts == 3
    assert isinstance(sw.Pipeline(sw.Retry()), sw.Pipeline)
    assert sw.Timeout(2.0).seconds == 2.0
