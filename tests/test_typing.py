"""Static checks: mypy --strict verifies these `assert_type`s in `nox -s typecheck`."""

from __future__ import annotations

from typing import assert_type

import stalwart as sw


async def fetch(url: str, *, retries: int = 1) -> bytes:
    return url.encode() * retries


async def test_decorators_keep_the_signature_for_type_checkers() -> None:
    retried = sw.Retry()(fetch)
    timed = sw.Timeout(1)(fetch)
    guarded = sw.Bulkhead(1)(fetch)
    piped = sw.Pipeline(sw.Retry(), sw.Timeout(1))(fetch)
    for wrapped in (retried, timed, guarded, piped):
        assert_type(await wrapped("a", retries=2), bytes)
        assert await wrapped("a", retries=2) == b"aa"


async def test_call_keeps_the_return_type() -> None:
    result = await sw.Retry().call(fetch, "b")
    assert_type(result, bytes)
    assert result == b"b"


async def fallback_answer(exc: BaseException) -> bytes:
    return b"async"


async def maybe(url: str) -> bytes | None:
    return None


async def test_a_fallback_of_the_functions_type_keeps_its_return_type() -> None:
    by_value = sw.Fallback(b"")(fetch)
    by_sync = sw.Fallback(lambda exc: b"sync")(fetch)
    by_async = sw.Fallback(fallback_answer)(fetch)
    for wrapped in (by_value, by_sync, by_async):
        assert_type(await wrapped("a", retries=2), bytes)
    assert_type(await sw.Fallback(b"").call(fetch, "b"), bytes)
    # A fallback narrower than an Optional return type: spell the type out.
    assert_type(await sw.Fallback[bytes | None](b"")(maybe)("c"), bytes | None)


async def test_a_none_fallback_makes_the_result_optional() -> None:
    assert_type(await sw.Fallback(None)(maybe)("a"), bytes | None)
    assert_type(await sw.Fallback(None)(fetch)("a"), bytes | None)
    assert_type(await sw.Fallback(None).call(fetch, "a"), bytes | None)


async def test_a_fallback_of_another_type_is_a_type_error() -> None:
    # Must fail: mypy --strict reports an unused `type: ignore` if it does not.
    wrong = sw.Fallback("text")(fetch)  # type: ignore[arg-type]
    called = await sw.Fallback(0).call(fetch, "a")  # type: ignore[arg-type]
    assert [await wrong("a"), called] == [b"a", b"a"]
    narrower = sw.Fallback(b"")(maybe)  # type: ignore[arg-type]
    assert await narrower("a") is None
