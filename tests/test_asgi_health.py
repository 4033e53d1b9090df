"""BreakerHealth: circuit breakers' states as JSON for readiness probes, in real frameworks."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.routing import Route

import stalwart as sw
from stalwart.asgi import BreakerHealth
from stalwart.httpx import ResilientTransport

from .conftest import jump
from .http_support import serve


def private() -> sw.Telemetry:
    return sw.Telemetry(registry=CollectorRegistry())


def breaker(name: str, **options: Any) -> sw.CircuitBreaker:
    options.setdefault("consecutive_failures", 1)
    options.setdefault("open_for", 30.0)
    return sw.CircuitBreaker(name=name, telemetry=private(), **options)


async def fail(guarded: sw.CircuitBreaker) -> None:
    """One failed call through ``guarded``: with consecutive_failures=1, it opens."""

    async def boom() -> None:
        raise RuntimeError("down")

    with pytest.raises(RuntimeError):
        await guarded.call(boom)


def starlette(health: BreakerHealth) -> httpx.AsyncClient:
    app = Starlette(routes=[Route("/health/breakers", health)])
    return httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://service")


async def probe(health: BreakerHealth) -> tuple[int, dict[str, Any]]:
    async with starlette(health) as client:
        response = await client.get("/health/breakers")
    assert response.headers["content-type"] == "application/json"
    assert response.headers["cache-control"] == "no-store"
    body: dict[str, Any] = response.json()
    return response.status_code, body


def states(body: dict[str, Any]) -> dict[str, str]:
    return {entry["name"]: entry["state"] for entry in body["breakers"]}


# -- the rule -----------------------------------------------------------------------------


async def test_all_closed_is_ok() -> None:
    status, body = await probe(BreakerHealth([breaker("a"), breaker("b")]))
    assert status == 200
    assert body == {
        "status": "ok",
        "breakers": [
            {"name": "a", "key": None, "state": "closed", "retry_after": None, "required": True},
            {"name": "b", "key": None, "state": "closed", "retry_after": None, "required": True},
        ],
    }


async def test_an_open_breaker_fails_the_probe_and_says_when_it_half_opens() -> None:
    a, b = breaker("a"), breaker("b")
    await fail(b)
    jump(10.0)
    status, body = await probe(BreakerHealth([a, b]))
    assert status == 503
    assert body["status"] == "unavailable"
    assert body["breakers"][1] == {
        "name": "b",
        "key": None,
        "state": "open",
        "retry_after": 20.0,
        "required": True,
    }


async def test_a_half_open_breaker_counts_as_up() -> None:
    b = breaker("b")
    await fail(b)
    jump(30.0)
    status, body = await probe(BreakerHealth(b))
    assert (status, body["status"], states(body)) == (200, "ok", {"b": "half_open"})


async def test_a_forced_open_breaker_fails_the_probe_with_no_retry_after() -> None:
    b = breaker("b")
    b.force_open()
    status, body = await probe(BreakerHealth(b))
    assert status == 503
    assert body["breakers"][0]["retry_after"] is None


async def test_only_required_breakers_fail_the_probe_by_name_or_key() -> None:
    a, b = breaker("a"), breaker("b")
    await fail(b)
    status, body = await probe(BreakerHealth([a, b], required={"a"}))
    assert (status, body["status"]) == (200, "degraded")
    assert [e["required"] for e in body["breakers"]] == [True, False]
    status, _ = await probe(BreakerHealth({"key-b": b}, required={"key-b"}))
    assert status == 503


async def test_a_shadow_breaker_is_reported_but_never_fails_the_probe() -> None:
    shadow = breaker("shadow", mode="observe")
    await fail(shadow)
    status, body = await probe(BreakerHealth(shadow))
    assert (status, body["status"], states(body)) == (200, "degraded", {"shadow": "open"})
    assert body["breakers"][0]["required"] is False
    status, _ = await probe(BreakerHealth(shadow, required={"shadow"}))
    assert status == 200


async def test_required_empty_never_fails_the_probe() -> None:
    b = breaker("b")
    await fail(b)
    status, body = await probe(BreakerHealth(b, required=()))
    assert (status, body["status"]) == (200, "degraded")


async def test_no_breakers_is_ok() -> None:
    status, body = await probe(BreakerHealth())
    assert (status, body) == (200, {"status": "ok", "breakers": []})


# -- where the breakers come from ---------------------------------------------------------


async def test_a_per_key_reports_its_breakers_by_key_also_inside_pipelines() -> None:
    per_key = sw.PerKey(
        lambda host: sw.Pipeline(breaker(f"upstream {host}"), sw.Timeout(1.0)), key="host"
    )

    @per_key
    async def fetch(host: str) -> None:
        if host == "sick":
            raise RuntimeError(host)

    await fetch("well")
    with pytest.raises(RuntimeError):
        await fetch("sick")
    status, body = await probe(BreakerHealth(per_key))
    assert status == 503
    assert [(e["key"], e["name"], e["state"]) for e in body["breakers"]] == [
        ("well", "upstream well", "closed"),
        ("sick", "upstream sick", "open"),
    ]


async def test_sources_are_read_afresh_on_each_request() -> None:
    kept: list[sw.CircuitBreaker] = []
    health = BreakerHealth(lambda: kept)
    assert (await probe(health))[1]["breakers"] == []
    kept.append(breaker("late"))
    assert states((await probe(health))[1]) == {"late": "closed"}


async def test_a_breaker_found_twice_is_reported_once_and_other_policies_not_at_all() -> None:
    shared = breaker("shared")
    health = BreakerHealth(
        [shared, sw.Retry(), sw.Pipeline(shared, sw.Timeout(1.0))], {"k": shared}
    )
    assert states((await probe(health))[1]) == {"shared": "closed"}


# -- HTTP ---------------------------------------------------------------------------------


async def test_head_answers_without_a_body_and_other_methods_get_405() -> None:
    async with starlette(BreakerHealth(breaker("a"))) as client:
        head = await client.head("/health/breakers")
        post = await client.post("/health/breakers")
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0
    assert post.status_code == 405
    assert post.headers["allow"] == "GET, HEAD"


async def test_fastapi_with_per_host_breakers_of_an_httpx_client() -> None:
    async def upstream(request: httpx.Request) -> httpx.Response:
        return httpx.Response(503 if request.url.host == "sick.test" else 200)

    transport = ResilientTransport(
        sw.Retry(attempts=1, telemetry=private()),
        transport=httpx.MockTransport(upstream),
        per_host=lambda origin: breaker(f"upstream {origin}"),
    )
    app = FastAPI()
    health = BreakerHealth(transport.per_host, required={"http://sick.test:80"})
    outbound = httpx.AsyncClient(transport=transport)

    @app.get("/ready")
    async def readiness() -> JSONResponse:
        status, body = health.report()
        return JSONResponse(body, status_code=status)

    @app.get("/work/{host}")
    async def work(host: str) -> dict[str, int]:
        return {"upstream": (await outbound.get(f"http://{host}/")).status_code}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app), base_url="http://service"
    ) as client:
        assert (await client.get("/work/well.test")).json() == {"upstream": 200}
        assert (await client.get("/ready")).status_code == 200
        assert (await client.get("/work/sick.test")).json() == {"upstream": 503}
        ready = await client.get("/ready")
    await outbound.aclose()
    assert ready.status_code == 503
    assert [(e["key"], e["state"], e["required"]) for e in ready.json()["breakers"]] == [
        ("http://well.test:80", "closed", False),
        ("http://sick.test:80", "open", True),
    ]


# -- options ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sources", "options", "message"),
    [
        (("breaker",), {}, r"sources\[0\] must be a policy"),
        ((42,), {}, r"sources\[0\] must be a policy"),
        ((), {"required": "a"}, "required must be a collection of breaker names"),
        ((), {"required": [1]}, "required must be a collection of breaker names"),
    ],
)
def test_bad_options_are_refused_naming_them(
    sources: tuple[Any, ...], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(TypeError, match=message):
        BreakerHealth(*sources, **options)


def test_the_repr_shows_the_rule() -> None:
    assert repr(BreakerHealth(required=["b", "a"])) == "BreakerHealth(required=['a', 'b'])"


def test_the_repr_shows_each_source_and_counts_what_lists_and_mappings_hold() -> None:
    def current() -> list[sw.CircuitBreaker]:
        return []

    per_key, a = sw.PerKey(breaker, key="origin"), breaker("a")
    health = BreakerHealth(per_key, a, [a, breaker("b")], {"k": a}, current, None)
    assert repr(health) == (
        f"BreakerHealth({per_key!r}, {a!r}, <list of 2 policies>, <dict of 1 policy>, "
        "test_the_repr_shows_each_source_and_counts_what_lists_and_mappings_hold.<locals>"
        ".current, None, required=None)"
    )


async def test_the_repr_neither_iterates_nor_calls_a_source() -> None:
    calls: list[None] = []

    def current() -> list[sw.CircuitBreaker]:
        calls.append(None)
        return [breaker("called")]

    health = BreakerHealth(iter([breaker("iterated")]), current)
    repr(health)
    assert calls == []
    assert states((await probe(health))[1]) == {"iterated": "closed", "called": "closed"}
    assert repr(health).startswith("BreakerHealth(<list_iterator>, ")


@pytest.mark.realtime
@pytest.mark.parametrize("anyio_backend", [("asyncio", {})])
async def test_a_probe_over_http_to_uvicorn() -> None:
    sick, well = breaker("sick"), breaker("well")
    sick.force_open()
    app = Starlette(routes=[Route("/ready", BreakerHealth([well, sick], required={"well"}))])
    with serve(app) as url:
        async with httpx.AsyncClient(base_url=url) as client:
            degraded = await client.get("/ready")
            well.force_open()
            down = await client.get("/ready")
    assert (degraded.status_code, degraded.json()["status"]) == (200, "degraded")
    assert (down.status_code, down.json()["status"]) == (503, "unavailable")
    assert states(down.json()) == {"well": "open", "sick": "open"}
