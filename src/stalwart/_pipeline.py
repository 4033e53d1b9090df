"""Composition of policies: first = outermost."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, TypeVar, final

from typing_extensions import ParamSpec

from ._policy import Policy
from ._telemetry import Telemetry, otel_probe, run_in_span

__all__ = ["Pipeline"]

P = ParamSpec("P")
T = TypeVar("T")


@final
class Pipeline(Policy):
    """Several policies applied as one, the first outermost.

    ``Pipeline(a, b, c)(fn)`` behaves exactly like ``a(b(c(fn)))``, with one
    difference in tracing: the pipeline opens a single span
    (``stalwart.pipeline <name>``) and its members record their events on it
    instead of opening spans of their own. Members still count their metrics
    on their own telemetry.

    The order matters. A typical stack, outermost first::

        sw.Pipeline(
            sw.Timeout(10),          # the whole operation, retries included
            sw.Retry(attempts=3),    # retry what fails below
            sw.CircuitBreaker(),     # stop calling a dependency that is down
            sw.Bulkhead(8),          # at most 8 calls in flight
            sw.Timeout(2),           # each single attempt
        )

    Pipelines nest, and a pipeline is reusable like any policy.

    Args:
        *policies: the policies, outermost first.
        name: the ``policy`` attribute of its span.
        telemetry: where its span goes (``None``: the default `Telemetry`);
            the members report their metrics to their own.
    """

    kind = "pipeline"
    _decorator_call = "Pipeline(policy, ...)"
    __slots__ = ("_policies",)

    def __init__(
        self, *policies: Policy, name: str = "pipeline", telemetry: Telemetry | None = None
    ) -> None:
        super().__init__(name=name, telemetry=telemetry)
        for i, policy in enumerate(policies):
            if not isinstance(policy, Policy):
                raise TypeError(
                    f"policies[{i}] must be a stalwart policy, not {type(policy).__name__}"
                )
        self._policies = policies

    @property
    def policies(self) -> tuple[Policy, ...]:
        """The policies, outermost first."""
        return self._policies

    def _bind(
        self,
        fn: Callable[P, Coroutine[Any, Any, T]],
        *,
        origin: Callable[..., Any],
        traced: bool,
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        inner = fn
        for policy in reversed(self._policies):
            inner = policy._bind(inner, origin=origin, traced=False)
        if not traced:
            return inner
        tel, span_name, attrs, chain = (
            self._telemetry,
            self._span_name,
            self._span_attributes,
            inner,
        )

        async def traced_pipeline(*args: P.args, **kwargs: P.kwargs) -> T:
            if otel_probe._TRACER_PROVIDER is not None or tel._tracer is not None:
                return await run_in_span(tel, span_name, attrs, chain, args, kwargs)
            return await chain(*args, **kwargs)

        return traced_pipeline

    def __repr__(self) -> str:
        inner = ", ".join(repr(p) for p in self._policies)
        return f"Pipeline({inner}, name={self._name!r})"
