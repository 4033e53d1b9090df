"""What an ``on=``, ``failure_on=`` or ``ignore=`` option matches: one type for all.

Every policy that sorts exceptions takes the same three forms (an exception
type, a tuple of them, or a predicate ``exc -> bool``), validated once, at
construction, by `Matcher`, with a message naming the option.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeAlias, final

__all__ = ["ExceptionMatcher", "Matcher", "matcher_text"]

ExceptionMatcher: TypeAlias = (
    type[BaseException] | tuple[type[BaseException], ...] | Callable[[BaseException], bool]
)
"""An exception type, a tuple of them, or a predicate ``exc -> bool``."""


@final
class Matcher:
    """A validated `ExceptionMatcher`: call it with an exception.

    Matchers made of types compare equal (and hash) by value, so options
    objects holding them can be shared; a predicate is compared by identity.

    Args:
        param: the option's name, for error messages.
        value: the option's value.
        allow_empty: accept an empty tuple (it matches nothing).
    """

    __slots__ = ("_types", "spec")

    def __init__(self, param: str, value: Any, *, allow_empty: bool = False) -> None:
        types: type[BaseException] | tuple[type[BaseException], ...] | None
        if isinstance(value, type) and issubclass(value, BaseException):
            types = value
        elif isinstance(value, tuple):
            if (not value and not allow_empty) or not all(
                isinstance(t, type) and issubclass(t, BaseException) for t in value
            ):
                raise TypeError(
                    f"{param} must be an exception type, a "
                    f"{'' if allow_empty else 'non-empty '}tuple of them, or a predicate"
                )
            types = value
        elif callable(value):
            types = None
        else:
            raise TypeError(
                f"{param} must be an exception type, a tuple of them, or a predicate, "
                f"not {type(value).__name__}"
            )
        self.spec: ExceptionMatcher = value
        self._types = types

    @property
    def is_predicate(self) -> bool:
        """Is it a predicate (anything may hang on to it) rather than types?"""
        return self._types is None

    def __call__(self, exc: BaseException) -> bool:
        types = self._types
        if types is not None:
            return isinstance(exc, types)
        return bool(self.spec(exc))  # type: ignore[operator]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Matcher) and (
            self.spec is other.spec if self.is_predicate else self.spec == other.spec
        )

    def __hash__(self) -> int:
        return id(self.spec) if self.is_predicate else hash(self.spec)

    def __repr__(self) -> str:
        return f"Matcher({matcher_text(self.spec)})"


def matcher_text(spec: object) -> str:
    """An ``on=`` (or ``on_result=``) option as written: ``KeyError``, ``(KeyError, OSError)``."""
    if isinstance(spec, tuple):
        return f"({', '.join(matcher_text(item) for item in spec)})"
    return getattr(spec, "__qualname__", None) or repr(spec)
