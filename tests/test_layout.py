"""The pieces every policy shares: the exception matcher, and the wall of private reads."""

from __future__ import annotations

import warnings

import pytest

from stalwart import _privates
from stalwart._matchers import Matcher


def test_a_matcher_takes_a_type_a_tuple_or_a_predicate() -> None:
    assert Matcher("on", ValueError)(ValueError())
    assert not Matcher("on", ValueError)(KeyError())
    assert Matcher("on", (KeyError, ValueError))(KeyError())
    assert Matcher("on", lambda exc: "retry" in str(exc))(ValueError("retry me"))


@pytest.mark.parametrize(
    ("value", "allow_empty", "message"),
    [
        ((), False, "failure_on must be an exception type, a non-empty tuple"),
        ((ValueError, 1), True, "failure_on must be an exception type, a tuple"),
        (
            42,
            False,
            "failure_on must be an exception type, a tuple of them, or a predicate, not int",
        ),
    ],
)
def test_a_bad_matcher_is_refused_naming_the_option(
    value: object, allow_empty: bool, message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        Matcher("failure_on", value, allow_empty=allow_empty)


def test_an_empty_tuple_matches_nothing_where_allowed() -> None:
    assert not Matcher("ignore", (), allow_empty=True)(ValueError())


def test_matchers_of_types_are_equal_by_value_and_predicates_by_identity() -> None:
    def predicate(exc: BaseException) -> bool:
        return True

    assert Matcher("on", (ValueError,)) == Matcher("on", (ValueError,))
    assert hash(Matcher("on", ValueError)) == hash(Matcher("on", ValueError))
    assert Matcher("on", predicate) == Matcher("on", predicate)
    assert Matcher("on", predicate) != Matcher("on", lambda exc: True)
    assert Matcher("on", predicate).is_predicate
    assert not Matcher("on", ValueError).is_predicate


def test_a_failed_probe_says_so_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_privates, "_warned", set())
    with pytest.warns(RuntimeWarning, match="could not read thing._x.*falls back to a slow way"):
        _privates.probe_failed("thing._x", "a slow way")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _privates.probe_failed("thing._x", "a slow way")


def test_a_loop_without_its_timer_heap_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_privates, "_warned", set())
    with pytest.warns(RuntimeWarning, match="_scheduled"):
        assert _privates.scheduled_timers(object()) is None


def test_the_slow_tracer_probe_reads_the_public_api() -> None:
    probe = _privates._SlowProbe()
    # No SDK was installed globally in this process: the proxy means "none".
    assert probe._TRACER_PROVIDER is None or hasattr(probe._TRACER_PROVIDER, "get_tracer")
