"""Composition of policies: first = outermost."""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, ParamSpec, TypeVar, final

from ._policy import Binding, Policy
from ._telemetry import _NO_PROVIDER, Telemetry, run_in_span

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
    and send their events on their own telemetry; the pipeline counts its
    calls (``stalwart_calls_total{kind="pipeline"}``) on its own.

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

    def wrap(
        self, fn: Callable[P, Coroutine[Any, Any, T]], binding: Binding
    ) -> Callable[P, Coroutine[Any, Any, T]]:
        inner = fn
        members = Binding(binding.origin, traced=False)
        for policy in reversed(self._policies):
            inner = policy.wrap(inner, members)
        chain: Callable[..., Coroutine[Any, Any, T]] = inner
        telemetry, timer, metrics = self._telemetry, self.timer(), self._metrics
        # Traced, the wrapper opens its span around the members' chain itself
        # (`run_in_span`), rather than around an untraced twin of itself as
        # other policies do: a coroutine frame less per traced call (the
        # "Pipeline, SDK TracerProvider" row of benchmarks/telemetry_cost.py).
        # The pipeline's own outcome is counted around the span.
        slot = telemetry.provider_slot if binding.traced else _NO_PROVIDER
        registration = self._registration
        span_name, attributes = registration.span_name, registration.span_attributes

        async def pipeline(*args: P.args, **kwargs: P.kwargs) -> T:
            start = None if timer is None else timer()
            try:
                if slot._TRACER_PROVIDER is None:
                    result = await (chain(*args, **kwargs) if kwargs else chain(*args))
                else:
                    result = await run_in_span(
                        telemetry, span_name, attributes, chain, args, kwargs
                    )
                metrics.success += 1
            except BaseException as exc:
                metrics.failed(exc, start)
                raise
            return result if start is None else metrics.returned(result, start)

        return pipeline

    def __repr__(self) -> str:
        inner = ", ".join(repr(p) for p in self._policies)
        return f"Pipeline({inner}, name={self._name!r})"
