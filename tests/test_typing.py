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
