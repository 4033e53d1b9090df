"""``tune --calibrate``: the [downstream] table from committed Prometheus expositions.

``tests/calibration/*.prom`` were written by prometheus_client and by the
OpenTelemetry SDK's Prometheus exporter (``tests/calibration/generate.py``):
20,000 requests, log-normal latency with a median of 50 ms and a p99 of
400 ms, 2% failing with a 503 after about 5 ms.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stalwart.__main__ import main
from stalwart._tune.calibrate import calibrate, histogram_quantile

from .http_support import serve

SAMPLES = Path(__file__).parent / "calibration"

# The same requests, so the same table; only the first line names the histogram.
EXPECTED_BODY = """\
# 20000 requests, 404 failed (error_type set, or a 5xx status); quantiles of the successful ones,
# interpolated within buckets as histogram_quantile does. Add capacity, queue and a timeline.
[downstream]
latency = { median = 0.0509, p99 = 0.462 }
error_rate = 0.0202
error_latency = 0.00543
"""


def tune(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["tune", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize(
    ("sample", "metric"),
    [
        ("prometheus_client.prom", "payments_request_duration_seconds"),
        ("opentelemetry.prom", "http_client_request_duration_seconds"),
    ],
)
def test_calibrate_prints_the_downstream_table(
    sample: str, metric: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = str(SAMPLES / sample)
    code, out, err = tune(capsys, "--calibrate", path)
    assert (code, err) == (0, "")
    assert out == f"# From {metric} in {path}:\n{EXPECTED_BODY}"


def test_the_printed_table_is_a_valid_downstream(capsys: pytest.CaptureFixture[str]) -> None:
    from stalwart._tune.scenario import parse_text

    tune(capsys, "--calibrate", str(SAMPLES / "opentelemetry.prom"))
    _, out, _ = tune(capsys, "--calibrate", str(SAMPLES / "opentelemetry.prom"))
    scenario = parse_text("[traffic]\nrate = 1.0\nduration = 1.0\n" + out, name="calibrated")
    assert scenario.downstream.latency.median == 0.0509
    assert scenario.downstream.error_rate == 0.0202


def test_the_opentelemetry_name_finds_the_exported_histogram(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name in ("http.client.request.duration", "http_client_request_duration"):
        code, out, _ = tune(
            capsys, "--calibrate", str(SAMPLES / "opentelemetry.prom"), "--metric", name
        )
        assert code == 0
        assert "http_client_request_duration_seconds" in out


def test_calibrate_as_json(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = tune(capsys, "--calibrate", str(SAMPLES / "prometheus_client.prom"), "--json")
    assert code == 0
    data = json.loads(out)
    assert (data["requests"], data["errors"]) == (20000, 404)
    assert data["downstream"]["latency"]["median"] == pytest.approx(0.0509, rel=1e-3)


async def test_calibrate_reads_a_metrics_url(capsys: pytest.CaptureFixture[str]) -> None:
    body = (SAMPLES / "prometheus_client.prom").read_bytes()

    async def metrics(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] != "http":
            return
        headers = [(b"content-type", b"text/plain; version=0.0.4")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})  # type: ignore[operator]
        await send({"type": "http.response.body", "body": body})  # type: ignore[operator]

    with serve(metrics) as url:
        code, out, err = tune(capsys, "--calibrate", f"{url}/metrics")
    assert (code, err) == (0, "")
    assert out.endswith(EXPECTED_BODY)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("this is { not an exposition\n", "is not a Prometheus text exposition"),
        ("# TYPE up gauge\nup 1\n", "holds no histogram"),
        (
            '# TYPE a_seconds histogram\na_seconds_bucket{le="1"} 1\n'
            'a_seconds_bucket{le="+Inf"} 1\na_seconds_count 1\na_seconds_sum 1\n'
            '# TYPE b_seconds histogram\nb_seconds_bucket{le="+Inf"} 0\n',
            "has 2 latency histograms: a_seconds, b_seconds; name one with --metric",
        ),
        (
            '# TYPE a_bytes histogram\na_bytes_bucket{le="+Inf"} 3\n',
            "has no latency histogram (a name ending in _seconds)",
        ),
        (
            '# TYPE a_seconds histogram\na_seconds_bucket{le="1"} 3\n',
            "has a series without a +Inf bucket",
        ),
        (
            '# TYPE a_seconds histogram\na_seconds_bucket{le="+Inf",status="500"} 3\n',
            "holds no successful request (3 failed)",
        ),
        (
            '# TYPE a_seconds histogram\na_seconds_bucket{le="soon"} 3\n',
            "with le='soon', not a number",
        ),
    ],
)
def test_malformed_input_is_a_clear_error_and_exit_code_2(
    text: str, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "metrics.prom"
    path.write_text(text)
    code, out, err = tune(capsys, "--calibrate", str(path))
    assert (code, out) == (2, "")
    assert err.startswith(f"python -m stalwart tune: error: {path}")
    assert message in err
    assert "Traceback" not in err


def test_unreadable_sources_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tune(capsys, "--calibrate", str(tmp_path / "missing.prom"))
    assert code == 2
    assert "cannot read" in err
    (tmp_path / "binary.prom").write_bytes(b"\xff\xfe\x00")
    code, _, err = tune(capsys, "--calibrate", str(tmp_path / "binary.prom"))
    assert (code, "not UTF-8" in err) == (2, True)
    code, _, err = tune(capsys, "--calibrate", "http://127.0.0.1:1/metrics")
    assert (code, "cannot read http://127.0.0.1:1/metrics" in err) == (2, True)


def test_an_unknown_metric_lists_the_histograms(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tune(
        capsys, "--calibrate", str(SAMPLES / "prometheus_client.prom"), "--metric", "nope"
    )
    assert code == 2
    assert "has no histogram 'nope'; its histograms: payments_request_duration_seconds" in err


def test_calibrate_goes_alone(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = tune(capsys, "x.toml", "--calibrate", "m.prom")
    assert code == 2
    assert "give it alone" in err
    code, _, err = tune(capsys, "--metric", "x")
    assert (code, "--metric needs --calibrate" in err) == (2, True)


# -- histogram_quantile, as Prometheus computes it -----------------------------------------

BUCKETS = [(0.1, 10.0), (0.5, 60.0), (1.0, 90.0), (math.inf, 100.0)]


def test_quantiles_interpolate_linearly_within_a_bucket() -> None:
    # rank 50 of 100: 40 of the 50 in (0.1, 0.5] -> 0.1 + 0.4 * 40/50
    assert histogram_quantile(0.5, BUCKETS) == pytest.approx(0.42)
    # the first bucket starts at 0
    assert histogram_quantile(0.05, BUCKETS) == pytest.approx(0.05)


def test_a_quantile_in_the_inf_bucket_is_the_highest_finite_bound() -> None:
    assert histogram_quantile(0.99, BUCKETS) == 1.0


def test_no_observations_or_no_inf_bucket_is_nan() -> None:
    assert math.isnan(histogram_quantile(0.5, [(1.0, 0.0), (math.inf, 0.0)]))
    assert math.isnan(histogram_quantile(0.5, [(1.0, 3.0), (2.0, 3.0)]))


def test_counts_that_go_down_are_made_monotonic() -> None:
    buckets = [(0.1, 10.0), (0.5, 8.0), (1.0, 20.0), (math.inf, 20.0)]
    # as if (0.5, 10): rank 15 is half-way through the 10 of (0.5, 1.0]
    assert histogram_quantile(0.75, buckets) == pytest.approx(0.75)


def test_a_non_positive_first_bound_is_returned_as_is() -> None:
    assert histogram_quantile(0.1, [(-1.0, 5.0), (1.0, 10.0), (math.inf, 10.0)]) == -1.0


def test_calibrate_flags_a_p99_in_the_inf_bucket() -> None:
    text = (
        "# TYPE a_seconds histogram\n"
        'a_seconds_bucket{le="0.1"} 90\na_seconds_bucket{le="+Inf"} 100\n'
        "a_seconds_count 100\na_seconds_sum 20\n"
    )
    result = calibrate(text, source="m")
    assert (result.p99, result.p99_capped) == (0.1, True)
    assert "at least" in result.toml()
