"""Redis as the shared store: breakers, limits and idempotency records across replicas.

One `RedisStore` serves as the ``store=`` of `CircuitBreaker`, of
`RateLimiter`, `RetryBudget` and `Bulkhead`, of `Idempotency` and of the ASGI
``IdempotencyMiddleware``, so that a service running as many replicas
(processes, pods, hosts) learns of an outage once, keeps to one rate limit,
one retry budget and one concurrency limit, and runs a duplicated request
once.
``pip install 'stalwart[redis]'``; it runs on asyncio (redis-py's
``redis.asyncio`` client), not on trio. Example::

    import redis.asyncio
    import stalwart as sw
    from stalwart.redis import RedisStore

    client = redis.asyncio.Redis.from_url("redis://redis:6379/0", socket_timeout=0.5)
    store = RedisStore(client, prefix="payments:")
    breaker = sw.CircuitBreaker(name="bank", store=store)
    charge_once = sw.Idempotency(key="payment_id", store=store)

    async def lifespan():
        async with store:  # follows the breakers' shared state until closed
            yield

``docs/how-to/redis.md`` covers running many replicas: the lifecycle of the
store, its guarantees, its failure modes and its tuning.
"""

# One module per concern: _client (requests, their bound, errors, tokens and
# give-backs), _scripts (the Lua scripts of stalwart/_lua/ and how they run),
# _follower (the pub/sub task and reconciliation), _circuit, _idempotency,
# _rate_limit, _budget and _bulkhead (the stores' protocols), _store
# (RedisStore: options and lifecycle).

from __future__ import annotations

try:
    import redis.asyncio  # noqa: F401 - checked here, before any of the package's modules
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "stalwart.redis needs redis-py: install it with `pip install 'stalwart[redis]'`"
    ) from exc

from ._client import MAX_DURATION  # noqa: F401 - importable here, as before the split
from ._idempotency import OnUnavailable
from ._store import (  # noqa: F401 - the defaults stay importable here
    DEFAULT_PREFIX,
    DEFAULT_RECONCILE_INTERVAL,
    DEFAULT_TIMEOUT,
    DEFAULT_TRIAL_LEASE,
    RedisStore,
)

__all__ = ["OnUnavailable", "RedisStore"]
