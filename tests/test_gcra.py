"""The GCRA bucket: its schedule, the exact rate bound, FIFO turns, giving turns back, keys.

Pure arithmetic on explicit times: no event loop. Where a test needs exact
sums, its times and intervals are dyadic (multiples of a power of two), which
floats add without rounding.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stalwart._gcra import GRANTED, Gcra, KeyedGcra, Turn


def turn_at(bucket: Gcra, now: float, max_wait: float = math.inf) -> float:
    """The time of the turn ``bucket`` reserves at ``now`` (which must be granted)."""
    turn = bucket.reserve(now, max_wait)
    assert turn is not None
    return now + turn.delay


# -- validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"rate": 0}, ValueError, "rate must be > 0"),
        ({"rate": -1.0}, ValueError, "rate must be >= 0"),
        ({"rate": math.nan}, ValueError, "rate must be finite"),
        ({"rate": True}, TypeError, "rate must be a number"),
        ({"rate": "10"}, TypeError, "rate must be a number"),
        ({"rate": 1, "per": 0}, ValueError, "per must be > 0"),
        ({"rate": 1, "per": math.inf}, ValueError, "per must be finite"),
        ({"rate": 1, "burst": 0}, ValueError, "burst must be >= 1"),
        ({"rate": 1, "burst": 2.0}, TypeError, "burst must be an int"),
        ({"rate": 1e-320, "per": 1e300}, ValueError, "per / rate must be a finite number"),
    ],
)
def test_bad_options_are_refused_naming_the_parameter(
    options: dict[str, Any], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        Gcra(**options)


def test_keyed_max_keys_is_validated() -> None:
    with pytest.raises(ValueError, match="max_keys must be >= 1"):
        KeyedGcra(1, max_keys=0)
    with pytest.raises(TypeError, match="burst must be an int"):
        KeyedGcra(1, burst=None)  # type: ignore[arg-type]


def test_interval_and_burst_are_derived_from_the_options() -> None:
    bucket = Gcra(4, per=2.0, burst=3)
    assert bucket.interval == 0.5
    assert bucket.burst == 3
    assert repr(bucket) == "Gcra(interval=0.5, burst=3)"


# -- the schedule -------------------------------------------------------------------------


def test_a_full_bucket_grants_a_burst_at_once_then_refuses() -> None:
    bucket = Gcra(10, per=1.0, burst=3)
    assert [bucket.reserve(5.0) for _ in range(3)] == [GRANTED] * 3
    assert bucket.reserve(5.0) is None


def test_a_refusal_says_when_a_permit_is_free_and_then_one_is() -> None:
    bucket = Gcra(4, per=1.0, burst=2)
    bucket.reserve(0.0)
    bucket.reserve(0.0)
    assert bucket.reserve(0.0) is None
    assert bucket.wait_time(0.0) == 0.25
    assert bucket.reserve(0.125) is None
    assert bucket.wait_time(0.125) == 0.125
    assert bucket.reserve(0.25) is GRANTED
    assert bucket.wait_time(0.25) == 0.25


def test_a_refusal_changes_nothing() -> None:
    bucket = Gcra(1, per=1.0)
    bucket.reserve(0.0)
    for _ in range(100):
        assert bucket.reserve(0.5) is None
    assert bucket.reserve(1.0) is GRANTED


def test_the_sustained_rate_is_one_call_per_interval() -> None:
    bucket = Gcra(8, per=2.0, burst=1)  # one every 0.25 s
    granted = [t / 16 for t in range(160) if bucket.reserve(t / 16) is GRANTED]
    assert granted == [0.25 * k for k in range(40)]


def test_a_bucket_refills_one_permit_per_interval_up_to_the_burst() -> None:
    bucket = Gcra(2, per=1.0, burst=4)
    for _ in range(4):
        bucket.reserve(0.0)
    assert bucket.available(0.0) == 0
    assert bucket.available(0.5) == 1
    assert bucket.available(1.25) == 2
    assert bucket.available(2.0) == 4
    assert bucket.available(100.0) == 4
    assert bucket.refill_time(0.0) == 2.0
    assert bucket.refill_time(1.5) == 0.5
    assert bucket.refill_time(3.0) == 0.0


def test_a_new_bucket_is_full() -> None:
    bucket = Gcra(3, burst=5)
    assert bucket.available(-1e9) == 5
    assert bucket.wait_time(0.0) == 0.0
    assert bucket.refill_time(0.0) == 0.0


def test_waiting_turns_are_fifo_one_interval_apart() -> None:
    bucket = Gcra(4, per=1.0, burst=2)
    turns = [bucket.reserve(0.0, max_wait=10.0) for _ in range(6)]
    assert [t.delay for t in turns if t is not None] == [0.0, 0.0, 0.25, 0.5, 0.75, 1.0]


def test_a_turn_later_than_max_wait_is_refused_and_reserves_nothing() -> None:
    bucket = Gcra(4, per=1.0, burst=1)
    bucket.reserve(0.0)
    first = bucket.reserve(0.0, max_wait=0.3)
    assert first is not None
    assert first.delay == 0.25
    assert bucket.reserve(0.0, max_wait=0.3) is None  # its turn would be at 0.5
    assert bucket.wait_time(0.0) == 0.5
    second = bucket.reserve(0.0, max_wait=0.5)  # exactly max_wait is within it
    assert second is not None
    assert second.delay == 0.5


def test_an_unlimited_wait_always_gets_a_turn() -> None:
    bucket = Gcra(1, per=1.0)
    delays = [bucket.reserve(0.0, max_wait=math.inf) for _ in range(1000)]
    assert delays[-1] is not None
    assert delays[-1].delay == 999.0


def test_nobody_jumps_the_queue_even_when_a_permit_refills() -> None:
    bucket = Gcra(4, per=1.0, burst=4)
    for _ in range(4):
        bucket.reserve(0.0)
    waiting = bucket.reserve(0.0, max_wait=1.0)
    assert waiting is not None
    assert waiting.delay == 0.25
    # At 0.2 a permit has almost refilled; the newcomer queues behind the waiter.
    assert turn_at(bucket, 0.2, 1.0) == 0.5


def test_a_clock_that_goes_back_is_a_new_clock_and_the_bucket_starts_full() -> None:
    bucket = Gcra(1, per=10.0, burst=2)
    bucket.reserve(1000.0)
    bucket.reserve(1000.0)
    assert bucket.reserve(1000.0) is None
    assert bucket.wait_time(3.0) == 0.0
    assert bucket.available(3.0) == 2
    assert bucket.refill_time(3.0) == 0.0
    assert bucket.reserve(3.0) is GRANTED
    assert bucket.reserve(3.0) is GRANTED
    assert bucket.reserve(3.0) is None


def test_the_bound_is_reached_burst_at_once_then_one_per_interval() -> None:
    bucket = Gcra(4, per=1.0, burst=3)
    grants = [t for t in (0.0, 0.0, 0.0, 0.25, 0.5, 0.75, 1.0) if bucket.reserve(t) is GRANTED]
    assert len(grants) == 3 + 4  # burst + rate, all inside [0, per]
    assert bucket.reserve(1.0) is None


# -- giving turns back --------------------------------------------------------------------


def waiting_turns(bucket: Gcra, n: int, now: float = 0.0) -> list[Turn]:
    turns = []
    for _ in range(n):
        turn = bucket.reserve(now, max_wait=math.inf)
        assert turn is not None
        assert turn is not GRANTED
        turns.append(turn)
    return turns


def test_the_last_turn_given_back_is_the_next_callers() -> None:
    bucket = Gcra(4, per=1.0)
    bucket.reserve(0.0)
    (turn,) = waiting_turns(bucket, 1)
    assert turn.cancel(0.1)
    assert turn_at(bucket, 0.1, 1.0) == 0.25


def test_a_turn_with_turns_behind_it_is_not_given_back_alone() -> None:
    bucket = Gcra(4, per=1.0)
    bucket.reserve(0.0)
    first, _second = waiting_turns(bucket, 2)
    assert not first.cancel(0.1)
    assert turn_at(bucket, 0.1) == 0.75  # first's slot (0.25) is lost: the strict side


def test_turns_cancelled_front_first_are_all_given_back_with_the_last() -> None:
    bucket = Gcra(4, per=1.0)
    bucket.reserve(0.0)
    turns = waiting_turns(bucket, 4)
    assert [t.cancel(0.1) for t in turns] == [False, False, False, True]
    assert turn_at(bucket, 0.1) == 0.25  # as if none of the four had come


def test_giving_back_stops_at_a_turn_that_still_stands() -> None:
    bucket = Gcra(4, per=1.0)
    bucket.reserve(0.0)
    a, b, c, d = waiting_turns(bucket, 4)
    assert not a.cancel(0.1)
    assert not c.cancel(0.1)
    assert d.cancel(0.1)  # d and c go back; b stands, so a stays lost
    nxt = bucket.reserve(0.1, max_wait=math.inf)
    assert nxt is not None
    assert 0.1 + nxt.delay == 0.75
    assert nxt.cancel(0.2)
    assert b.cancel(0.2)  # now b is last: b and a go back
    assert bucket.reserve(0.2, max_wait=0.0) is None
    assert turn_at(bucket, 0.2, 1.0) == 0.25


def test_a_turn_whose_time_has_come_is_not_given_back() -> None:
    bucket = Gcra(4, per=1.0)
    bucket.reserve(0.0)
    (turn,) = waiting_turns(bucket, 1)
    assert not turn.cancel(0.25)
    assert bucket.reserve(0.25) is None


def test_cancelling_twice_or_a_granted_call_does_nothing() -> None:
    bucket = Gcra(4, per=1.0)
    granted = bucket.reserve(0.0)
    assert granted is GRANTED
    assert not granted.cancel(0.0)
    (turn,) = waiting_turns(bucket, 1)
    assert turn.cancel(0.1)
    assert not turn.cancel(0.1)
    assert "cancelled" in repr(turn)


def test_a_turn_of_an_earlier_clock_gives_nothing_back() -> None:
    bucket = Gcra(1, per=1.0)
    bucket.reserve(100.0)
    (turn,) = waiting_turns(bucket, 1, now=100.0)
    bucket.reserve(0.0)  # a new clock: the bucket started again
    assert not turn.cancel(0.5)
    assert bucket.reserve(0.5) is None


def test_a_turn_cancelled_after_a_later_one_was_granted_stays_lost() -> None:
    bucket = Gcra(4, per=1.0, burst=1)
    bucket.reserve(0.0)
    a, b = waiting_turns(bucket, 2)
    assert b.cancel(0.3) is True  # b was last: back
    assert not a.cancel(0.3)  # a's time (0.25) has come: it was let through
    assert bucket.reserve(0.5) is GRANTED


# -- properties ---------------------------------------------------------------------------

# Dyadic parameters and times: every sum below is exact in floating point.
RATES = st.sampled_from([1, 2, 4, 8, 16])
PERS = st.sampled_from([0.25, 0.5, 1.0, 2.0])
BURSTS = st.one_of(st.integers(min_value=1, max_value=3), st.integers(min_value=4, max_value=8))
STEP = 1 / 64
WAITS = st.one_of(
    st.just(0.0), st.integers(min_value=1, max_value=256).map(lambda k: k * STEP), st.just(math.inf)
)

Ops = list[tuple[int, float, int | None]]  # (ticks of STEP, max_wait, which turn to cancel)


def operations(waits: st.SearchStrategy[float]) -> st.SearchStrategy[Ops]:
    return st.lists(
        st.tuples(
            st.one_of(st.just(0), st.integers(min_value=0, max_value=12)),
            waits,
            st.one_of(st.none(), st.integers(min_value=0, max_value=1000)),
        ),
        min_size=4,
        max_size=200,
    )


# Any arrivals, and arrivals that mostly queue (so that many turns are cancelled).
OPS = st.one_of(
    operations(WAITS),
    operations(st.one_of(st.integers(16, 256).map(lambda k: k * STEP), st.just(math.inf))),
)


class Played:
    """What happened to a sequence of operations on one bucket."""

    def __init__(self, rate: int, per: float, burst: int) -> None:
        self.bucket = Gcra(rate, per=per, burst=burst)
        self.now = 0.0
        #: (reservation number, now, the turn's time or None if refused, the Turn)
        self.reserved: list[tuple[int, float, float | None, Turn | None]] = []
        self.withdrawn: set[int] = set()  # cancelled before their time: never let through

    def play(self, ops: Ops) -> None:
        for ticks, max_wait, cancel in ops:
            self.now += ticks * STEP
            if cancel is not None:
                self.cancel(cancel)
            turn = self.bucket.reserve(self.now, max_wait)
            if turn is None:
                assert self.bucket.wait_time(self.now) > max_wait
                self.reserved.append((len(self.reserved), self.now, None, None))
            else:
                assert 0.0 <= turn.delay <= max_wait
                at = self.now + turn.delay
                self.reserved.append((len(self.reserved), self.now, at, turn))

    def cancel(self, which: int) -> None:
        """Cancel a turn still waiting if there is one (else one whose time has come)."""
        turns = [r for r in self.reserved if r[3] is not None and r[3] is not GRANTED]
        waiting = [r for r in turns if r[2] is not None and r[2] > self.now]
        waiting = [r for r in waiting if r[0] not in self.withdrawn] or turns
        if not waiting:
            return
        number, _, at, turn = waiting[which % len(waiting)]
        assert turn is not None
        assert at is not None
        if number in self.withdrawn:
            return
        if self.now < at:
            self.withdrawn.add(number)
        turn.cancel(self.now)

    def given_back(self) -> set[int]:
        """The reservations the bucket took back (it unlinks them from itself)."""
        return {
            n
            for n, _, _, turn in self.reserved
            if turn is not None and turn is not GRANTED and turn._bucket is None
        }

    def grants(self) -> list[float]:
        """The times calls were let through, in reservation order."""
        return [at for n, _, at, _ in self.reserved if at is not None and n not in self.withdrawn]


def most_in_any_window(grants: list[float], length: float) -> int:
    ordered = sorted(grants)
    best, j = 0, 0
    for i, start in enumerate(ordered):
        while j < len(ordered) and ordered[j] <= start + length:
            j += 1
        best = max(best, j - i)
    return best


@settings(max_examples=400)
@given(rate=RATES, per=PERS, burst=BURSTS, ops=OPS)
def test_over_any_window_of_per_seconds_at_most_rate_plus_burst_calls_pass(
    rate: int, per: float, burst: int, ops: Ops
) -> None:
    played = Played(rate, per, burst)
    played.play(ops)
    grants = played.grants()
    assert most_in_any_window(grants, per) <= rate + burst
    interval = per / rate
    for windows in (1, 3, 10):  # and generally burst + floor(L / T) over L seconds
        assert most_in_any_window(grants, windows * interval) <= burst + windows


@settings(max_examples=400)
@given(rate=RATES, per=PERS, burst=BURSTS, ops=OPS)
def test_turns_are_granted_in_the_order_they_were_reserved(
    rate: int, per: float, burst: int, ops: Ops
) -> None:
    played = Played(rate, per, burst)
    played.play(ops)
    grants = played.grants()
    assert grants == sorted(grants)


@settings(max_examples=400)
@given(rate=RATES, per=PERS, burst=BURSTS, ops=OPS)
def test_turns_given_back_leave_no_trace(rate: int, per: float, burst: int, ops: Ops) -> None:
    """Replaying only the turns kept gives each the same time and leaves the same state.

    (Refusals change nothing, so the replay leaves them out: some were refused
    only because a turn later given back still held its place then.)
    """
    played = Played(rate, per, burst)
    played.play(ops)
    given_back = played.given_back()
    assert given_back <= played.withdrawn
    replay = Gcra(rate, per=per, burst=burst)
    for number, now, at, _ in played.reserved:
        if at is None or number in given_back:
            continue
        turn = replay.reserve(now, math.inf)
        assert turn is not None
        assert now + turn.delay == at
    end = played.now
    assert replay.refill_time(end) == played.bucket.refill_time(end)
    assert replay.wait_time(end) == played.bucket.wait_time(end)


@settings(max_examples=400)
@given(
    rate=RATES,
    per=PERS,
    burst=BURSTS,
    ticks=st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=300),
)
def test_without_waiting_it_is_exactly_a_token_bucket(
    rate: int, per: float, burst: int, ticks: list[int]
) -> None:
    """Neither stricter nor looser: the reference counts tokens in exact fractions."""
    bucket = Gcra(rate, per=per, burst=burst)
    tokens, last = Fraction(burst), Fraction(0)
    refill = Fraction(rate) / Fraction(per)
    now = Fraction(0)
    for tick in ticks:
        now += Fraction(tick, 64)
        tokens = min(Fraction(burst), tokens + (now - last) * refill)
        last = now
        expected = tokens >= 1
        if expected:
            tokens -= 1
        assert (bucket.reserve(float(now)) is GRANTED) == expected


@settings(max_examples=200)
@given(
    rate=st.floats(min_value=0.1, max_value=1000.0),
    per=st.floats(min_value=0.01, max_value=100.0),
    burst=BURSTS,
    gaps=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=200),
    max_wait=st.floats(min_value=0.0, max_value=5.0),
)
def test_the_bound_holds_for_any_parameters_and_times(
    rate: float, per: float, burst: int, gaps: list[float], max_wait: float
) -> None:
    """Arbitrary floats round; a window a billionth shorter than ``per`` absorbs that."""
    bucket = Gcra(rate, per=per, burst=burst)
    now, grants = 0.0, []
    for gap in gaps:
        now += gap * per
        turn = bucket.reserve(now, max_wait)
        if turn is not None:
            grants.append(now + turn.delay)
    assert grants == sorted(grants)
    assert most_in_any_window(grants, per * (1 - 1e-9)) <= math.floor(rate) + burst


# -- keys ---------------------------------------------------------------------------------


def test_keys_have_independent_limits() -> None:
    limits = KeyedGcra(1, per=1.0, burst=2)
    assert [limits.reserve("a", 0.0) is GRANTED for _ in range(3)] == [True, True, False]
    assert [limits.reserve("b", 0.0) is GRANTED for _ in range(3)] == [True, True, False]
    assert limits.wait_time("a", 0.0) == 1.0
    assert limits.available("b", 0.0) == 0
    assert limits.refill_time("a", 0.0) == 2.0


def test_a_key_without_a_bucket_reads_as_full_and_is_not_created_by_reading() -> None:
    limits = KeyedGcra(1, burst=3)
    assert limits.wait_time("x", 0.0) == 0.0
    assert limits.available("x", 0.0) == 3
    assert limits.refill_time("x", 0.0) == 0.0
    assert len(limits) == 0
    assert "x" not in limits


def test_at_most_max_keys_are_kept_the_least_recently_used_dropped() -> None:
    limits = KeyedGcra(1, per=1.0, max_keys=3)
    for key in "abc":
        limits.reserve(key, 0.0)
    limits.reserve("a", 0.0)  # a is now the most recently used
    limits.reserve("d", 0.0)  # drops b
    assert len(limits) == 3
    assert "b" not in limits
    assert all(key in limits for key in "acd")
    assert repr(limits) == "KeyedGcra(interval=1, burst=1, max_keys=3)"


def test_a_dropped_key_comes_back_with_a_full_bucket_at_most_one_burst_of_leniency() -> None:
    limits = KeyedGcra(1, per=60.0, burst=3, max_keys=1)
    passed = 0
    now = 0.0
    for _ in range(5):  # the key is dropped between rounds by another key
        passed += sum(limits.reserve("k", now) is GRANTED for _ in range(10))
        limits.reserve("other", now)
        now += 1.0
    # Within 4 s of a 1-per-minute limit: one burst, plus at most one per drop.
    assert passed == 3 + 4 * 3


def test_a_keyed_turn_given_back_returns_to_its_key() -> None:
    limits = KeyedGcra(4, per=1.0)
    limits.reserve("k", 0.0)
    turn = limits.reserve("k", 0.0, max_wait=1.0)
    assert turn is not None
    assert turn.delay == 0.25
    assert turn.cancel(0.1)
    again = limits.reserve("k", 0.1, max_wait=1.0)
    assert again is not None
    assert 0.1 + again.delay == 0.25
