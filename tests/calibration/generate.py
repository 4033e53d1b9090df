"""Make the committed Prometheus expositions that ``tune --calibrate`` is tested on.

Run from the repository's root (it needs the dev extra, which brings
``opentelemetry-exporter-prometheus``)::

    python tests/calibration/generate.py

Both expositions record the same 20,000 requests to a dependency: a latency
drawn from a log-normal distribution with a median of 50 ms and a p99 of
400 ms, and 2% of the requests failing with a 503 after about 5 ms. One is
written by prometheus_client (a ``*_seconds`` histogram labelled by status),
the other by the OpenTelemetry SDK's Prometheus exporter
(``http.client.request.duration``, as the httpx and aiohttp instrumentations
record it, with semantic-convention attributes and bucket boundaries).
"""

from __future__ import annotations

import math
import random
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

HERE = Path(__file__).parent
REQUESTS = 20_000
MEDIAN, P99, ERRORS = 0.050, 0.400, 0.02
SIGMA = math.log(P99 / MEDIAN) / 2.3263478740408408
# The semantic conventions' advice for http.client.request.duration.
OTEL_BOUNDARIES = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)


def requests() -> list[tuple[int, float]]:
    rng = random.Random(2026)
    out = []
    for _ in range(REQUESTS):
        if rng.random() < ERRORS:
            out.append((503, rng.uniform(0.003, 0.007)))
        else:
            out.append((200, math.exp(math.log(MEDIAN) + SIGMA * rng.gauss(0.0, 1.0))))
    return out


def with_prometheus_client() -> bytes:
    registry = CollectorRegistry()
    duration = Histogram(
        "payments_request_duration_seconds",
        "Time spent calling the payments API.",
        ["method", "status"],
        registry=registry,
    )
    calls = Counter(
        "payments_requests", "Calls to the payments API.", ["status"], registry=registry
    )
    for status, seconds in requests():
        duration.labels("GET", str(status)).observe(seconds)
        calls.labels(str(status)).inc()
    return generate_latest(registry)


def with_opentelemetry() -> bytes:
    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.resources import Resource
    from prometheus_client import REGISTRY

    reader = PrometheusMetricReader()
    provider = MeterProvider(
        metric_readers=[reader], resource=Resource.create({"service.name": "checkout"})
    )
    meter = provider.get_meter("opentelemetry.instrumentation.httpx", "0.50b0")
    duration = meter.create_histogram(
        "http.client.request.duration",
        unit="s",
        description="Duration of HTTP client requests.",
        explicit_bucket_boundaries_advisory=OTEL_BOUNDARIES,
    )
    for status, seconds in requests():
        attributes: dict[str, str | int] = {
            "http.request.method": "GET",
            "server.address": "payments.internal",
            "server.port": 443,
            "network.protocol.version": "1.1",
            "http.response.status_code": status,
        }
        if status >= 500:
            attributes["error.type"] = str(status)
        duration.record(seconds, attributes)
    text = generate_latest(REGISTRY)
    provider.shutdown()
    # Only the exporter's families: the default registry's process metrics vary by machine.
    lines = text.decode().splitlines(keepends=True)
    kept = [
        line for line in lines if "http_client_request_duration" in line or "target_info" in line
    ]
    return "".join(kept).encode()


if __name__ == "__main__":
    (HERE / "prometheus_client.prom").write_bytes(with_prometheus_client())
    (HERE / "opentelemetry.prom").write_bytes(with_opentelemetry())
