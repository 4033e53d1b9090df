"""stalwart: resilience for async Python services.

Retry, timeouts and deadlines, bulkheads, circuit breakers, hedging and
idempotency keys, as composable decorators for ``async def`` code on
asyncio and trio.

    import stalwart as sw

    @sw.Pipeline(sw.Timeout(10), sw.Retry(attempts=3), sw.Bulkhead(8))
    async def fetch(url: str) -> bytes: ...
"""

from ._adaptive_limits import AimdLimit, Gradient2Limit, LimitAlgorithm, VegasLimit
from ._adaptive_throttle import AdaptiveThrottle
from ._bulkhead import Bulkhead, BulkheadStatistics
from ._circuit_breaker import (
    CircuitBreaker,
    CircuitBreakerMode,
    CircuitBreakerStatistics,
    CircuitState,
)
from ._circuit_store import CircuitRecord, CircuitStore, InProcessCircuitStore
from ._codec import Codec, JSONCodec
from ._concurrency_limit import ConcurrencyLimit
from ._deadline import deadline, remaining
from ._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DeadlineExceeded,
    IdempotencyConflict,
    IdempotencyKeyReused,
    RateLimitExceeded,
    StalwartError,
    StalwartWarning,
    StoreUnavailable,
)
from ._fallback import Fallback
from ._hedge import AdaptiveDelay, Hedge
from ._idempotency import Idempotency
from ._idempotency_store import Completed, IdempotencyStore, InFlight, Lease, MemoryStore
from ._metrics import MetricFamily, PolicyMetrics
from ._per_key import PerKey
from ._pipeline import Pipeline
from ._policy import Binding, Policy
from ._rate_limiter import RateLimiter
from ._retry import Backoff, Jitter, Retry
from ._retry_budget import RetryBudget, RetryBudgetStatistics
from ._telemetry import Telemetry
from ._timeout import Timeout
from ._version import __version__
from ._windows import CountWindow, TimeWindow

__all__ = [
    "AdaptiveDelay",
    "AdaptiveThrottle",
    "AimdLimit",
    "Backoff",
    "Binding",
    "Bulkhead",
    "BulkheadFullError",
    "BulkheadStatistics",
    "CircuitBreaker",
    "CircuitBreakerMode",
    "CircuitBreakerStatistics",
    "CircuitOpenError",
    "CircuitRecord",
    "CircuitState",
    "CircuitStore",
    "Codec",
    "Completed",
    "ConcurrencyLimit",
    "CountWindow",
    "DeadlineExceeded",
    "Fallback",
    "Gradient2Limit",
    "Hedge",
    "Idempotency",
    "IdempotencyConflict",
    "IdempotencyKeyReused",
    "IdempotencyStore",
    "InFlight",
    "InProcessCircuitStore",
    "JSONCodec",
    "Jitter",
    "Lease",
    "LimitAlgorithm",
    "MemoryStore",
    "MetricFamily",
    "PerKey",
    "Pipeline",
    "Policy",
    "PolicyMetrics",
    "RateLimitExceeded",
    "RateLimiter",
    "Retry",
    "RetryBudget",
    "RetryBudgetStatistics",
    "StalwartError",
    "StalwartWarning",
    "StoreUnavailable",
    "Telemetry",
    "TimeWindow",
    "Timeout",
    "VegasLimit",
    "__version__",
    "deadline",
    "remaining",
]
