"""The fleet-wide GCRA script (``_lua/gcra.lua``) on a real Redis, beside the Python bucket.

Given the same times (the script's "now" argument), the script and `Gcra`
do the same floating-point operations, so they must agree exactly: every
turn, every refusal's retry_after, every turn given back. Without it, the
script reads the server's clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from stalwart._gcra import GRANTED, Gcra, Turn
from stalwart._lua import source

from .redis_support import REDIS_URL, require_redis, unique_prefix

pytestmark = [pytest.mark.redis, pytest.mark.realtime]


class Script:
    """The script, called the way a store would call it."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        self.client = client
        self.prefix = prefix
        self.script = client.register_script(source("gcra"))

    def reserve(
        self, key: str, bucket: Gcra, max_wait: float, now: float | None, *, persist: bool = False
    ) -> tuple[int, float, str, str]:
        reply = self._call(
            key,
            [
                "reserve",
                repr(bucket.interval),
                repr(bucket._tau),
                "inf" if max_wait == math.inf else repr(max_wait),
                "" if now is None else repr(now),
            ],
            persist=persist,
        )
        if reply[0] == 0:
            return 0, float(reply[1]), "", ""
        return 1, float(reply[1]), reply[2].decode(), reply[3].decode()

    def cancel(
        self, key: str, before: str, after: str, now: float | None, *, persist: bool = False
    ) -> int:
        result: int = self._call(
            key,
            ["cancel", before, after, "" if now is None else repr(now)],
            persist=persist,
        )
        return result

    def _call(self, key: str, args: list[str], *, persist: bool) -> Any:
        if not persist:
            return self.script(keys=[self.prefix + key], args=args)
        # The script gives the bucket an expiry in the server's own time,
        # while a test feeding it times of its own may ask to drop it: on a
        # slow machine the key would expire between two calls and look like
        # a full bucket to the next. The expiry is taken off in the same
        # transaction.
        with self.client.pipeline(transaction=True) as pipe:
            self.script(keys=[self.prefix + key], args=args, client=pipe)
            pipe.persist(self.prefix + key)
            reply, _ = pipe.execute()
        return reply


@pytest.fixture
def script() -> Iterator[Script]:
    require_redis()
    client = redis.Redis.from_url(REDIS_URL)
    prefix = unique_prefix()
    try:
        yield Script(client, prefix)
    finally:
        doomed = list(client.scan_iter(match=prefix + "*", count=1000))
        if doomed:
            client.delete(*doomed)
        client.close()


@pytest.mark.parametrize(
    ("rate", "per", "burst", "start"),
    [
        (10, 1.0, 1, 0.0),
        (3, 1.0, 4, 1_700_000_000.0),  # times like the server's clock: seconds since 1970
        (0.7, 2.5, 2, 12.345),
        (1000, 60.0, 50, 1_700_000_000.123),
    ],
)
def test_the_script_agrees_exactly_with_the_python_bucket(
    script: Script, rate: float, per: float, burst: int, start: float
) -> None:
    rng = random.Random(f"gcra-lua:{rate}:{per}:{burst}")
    bucket = Gcra(rate, per=per, burst=burst)
    key = "agree"
    now = start
    # Turns still waiting, newest last, with the script's handles for them.
    waiting: list[tuple[Turn, float, str, str]] = []
    outcomes = {"granted": 0, "waited": 0, "refused": 0, "given back": 0}
    for _ in range(600):
        now += rng.choice([0.0, 0.0, rng.uniform(0, 2 * bucket.interval)])
        waiting = [w for w in waiting if w[1] > now]
        if waiting and rng.random() < 0.2:
            turn, _, before, after = waiting.pop()  # the newest, before its time
            assert turn.cancel(now)
            assert script.cancel(key, before, after, now, persist=True) == 1
            outcomes["given back"] += 1
            continue
        max_wait = rng.choice([0.0, rng.uniform(0, 5 * bucket.interval), math.inf])
        turn_or_none = bucket.reserve(now, max_wait)
        # (The bucket keeps no expiry: the times here are the test's, not the
        # server's. The expiry has a test of its own.)
        granted, seconds, before, after = script.reserve(key, bucket, max_wait, now, persist=True)
        if turn_or_none is None:
            assert (granted, seconds) == (0, bucket.wait_time(now))
            outcomes["refused"] += 1
        elif turn_or_none is GRANTED:
            assert (granted, seconds) == (1, 0.0)
            waiting.clear()  # every earlier turn has come
            outcomes["granted"] += 1
        else:
            assert (granted, seconds) == (1, turn_or_none.delay)
            waiting.append((turn_or_none, now + turn_or_none.delay, before, after))
            outcomes["waited"] += 1
    assert all(outcomes.values()), outcomes  # the sequence tried every path


def test_a_turn_with_a_reservation_behind_it_is_not_given_back(script: Script) -> None:
    bucket = Gcra(1, per=1.0)
    script.reserve("k", bucket, 0.0, 100.0)
    _, delay, before, after = script.reserve("k", bucket, 10.0, 100.0)
    assert delay == 1.0
    script.reserve("k", bucket, 10.0, 100.0)
    assert script.cancel("k", before, after, 100.5) == 0
    assert script.reserve("k", bucket, 10.0, 100.5)[1] == 2.5  # its slot stays taken


def test_giving_back_the_first_turn_of_a_fresh_bucket_deletes_its_key(script: Script) -> None:
    bucket = Gcra(1, per=1.0)
    _, _, before, after = script.reserve("k", bucket, 0.0, 5.0)
    assert before == ""
    assert script.cancel("k", before, after, 5.0) == 1
    assert script.client.exists(script.prefix + "k") == 0


def test_the_bucket_expires_when_it_would_be_full_again(script: Script) -> None:
    bucket = Gcra(2, per=1.0, burst=3)  # full again 0.5 s after each call
    for _ in range(3):
        script.reserve("k", bucket, 0.0, 0.0)
    ttl = script.client.pttl(script.prefix + "k")
    assert 0 < ttl <= 1500  # the TAT is 1.5 s ahead


def test_without_now_the_server_clock_decides(script: Script) -> None:
    bucket = Gcra(1, per=3600.0, burst=2)
    server_time = script.client.time()
    before_call = server_time[0] + server_time[1] / 1e6
    assert script.reserve("k", bucket, 0.0, None)[:2] == (1, 0.0)
    assert script.reserve("k", bucket, 0.0, None)[:2] == (1, 0.0)
    granted, retry_after, _, _ = script.reserve("k", bucket, 0.0, None)
    assert granted == 0
    # The first call put the TAT at its own time plus an hour; the refusal came
    # moments later (generously: under 60 s on a loaded machine).
    assert 3600.0 - 60.0 < retry_after <= 3600.0
    raw = script.client.get(script.prefix + "k")
    assert isinstance(raw, bytes)
    stored = float(raw)
    assert before_call + 2 * 3600.0 - 60.0 < stored < before_call + 2 * 3600.0 + 60.0


def test_an_unknown_operation_is_an_error(script: Script) -> None:
    with pytest.raises(redis.ResponseError, match="unknown operation"):
        script.script(keys=[script.prefix + "k"], args=["drop"])


def test_every_reply_says_when_the_script_ran(script: Script) -> None:
    bucket = Gcra(1, per=1.0)
    args = ["reserve", repr(bucket.interval), repr(bucket._tau), "0", "42.5"]
    granted = script.script(keys=[script.prefix + "now"], args=args)
    refused = script.script(keys=[script.prefix + "now"], args=args)
    assert (granted[0], float(granted[3]), float(granted[4])) == (1, 43.5, 42.5)
    assert (refused[0], float(refused[1]), float(refused[2])) == (0, 1.0, 42.5)
