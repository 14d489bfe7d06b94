"""Metrics: exercise every recording method and read the values back from the text
exposition, parsed with prometheus-client's own parser."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tusd_py.metrics import Metrics


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the exposition as ``(name, sorted labels) -> value``."""
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=")
    result: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            result[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return result


def value(metrics: Metrics, name: str, **labels: str) -> float:
    return samples(metrics)[(name, tuple(sorted(labels.items())))]


def test_fresh_metrics_expose_zeroes() -> None:
    metrics = Metrics()
    assert value(metrics, "tusd_py_received_bytes_total") == 0
    assert value(metrics, "tusd_py_connections_open") == 0
    assert value(metrics, "tusd_py_uploads_created_total") == 0
    assert value(metrics, "tusd_py_lock_takeovers_total") == 0


def test_hot_path_counters() -> None:
    metrics = Metrics()
    for _ in range(1000):
        metrics.bytes_received(65536)
    metrics.bytes_sent(123)
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_opened()
    metrics.connection_closed()
    metrics.spool_in_use(+1)
    metrics.spool_in_use(+1)
    metrics.spool_in_use(-1)
    assert value(metrics, "tusd_py_received_bytes_total") == 65536 * 1000
    assert value(metrics, "tusd_py_sent_bytes_total") == 123
    assert value(metrics, "tusd_py_connections_open") == 2
    assert value(metrics, "tusd_py_spool_slots_in_use") == 1


def test_requests_by_method_and_status() -> None:
    metrics = Metrics()
    metrics.request_finished("PATCH", 204, 0.3)
    metrics.request_finished("PATCH", 204, 12.0)
    metrics.request_finished("HEAD", 404, 0.001)
    metrics.request_finished("BREW", 405, 0.001)  # unknown methods fold into OTHER
    name = "tusd_py_requests_duration_seconds"
    assert value(metrics, f"{name}_count", method="PATCH", status="204") == 2
    assert value(metrics, f"{name}_sum", method="PATCH", status="204") == pytest.approx(12.3)
    assert value(metrics, f"{name}_bucket", method="PATCH", status="204", le="0.5") == 1
    assert value(metrics, f"{name}_bucket", method="PATCH", status="204", le="30.0") == 2
    assert value(metrics, f"{name}_count", method="HEAD", status="404") == 1
    assert value(metrics, f"{name}_count", method="OTHER", status="405") == 1
    assert not any(labels and ("method", "BREW") in labels for _, labels in samples(metrics))


def test_upload_lock_and_hook_counters() -> None:
    metrics = Metrics()
    metrics.upload_created()
    metrics.upload_created()
    metrics.upload_finished()
    metrics.upload_terminated()
    metrics.lock_wait(0.0)
    metrics.lock_wait(3.0)
    metrics.lock_takeover()
    metrics.lock_timeout()
    metrics.hook_delivery("post-finish", "ok")
    metrics.hook_delivery("post-finish", "failed")
    metrics.hook_delivery("post-finish", "ok")
    assert value(metrics, "tusd_py_uploads_created_total") == 2
    assert value(metrics, "tusd_py_uploads_finished_total") == 1
    assert value(metrics, "tusd_py_uploads_terminated_total") == 1
    assert value(metrics, "tusd_py_lock_wait_seconds_count") == 2
    assert value(metrics, "tusd_py_lock_wait_seconds_bucket", le="0.001") == 1
    assert value(metrics, "tusd_py_lock_takeovers_total") == 1
    assert value(metrics, "tusd_py_lock_timeouts_total") == 1
    assert value(metrics, "tusd_py_hook_deliveries_total", event="post-finish", outcome="ok") == 2
    assert value(metrics, "tusd_py_hook_deliveries_total", event="post-finish", outcome="failed") == 1


def test_s3_calls() -> None:
    metrics = Metrics()
    metrics.s3_call("UploadPart", 0.2, error=False)
    metrics.s3_call("UploadPart", 0.4, error=True)
    metrics.s3_call("PutObject", 0.1, error=False)
    metrics.s3_call("PutObject", 0.3, error=True)
    assert value(metrics, "tusd_py_s3_call_duration_seconds_count", operation="UploadPart") == 2
    assert value(metrics, "tusd_py_s3_call_duration_seconds_sum", operation="UploadPart") == pytest.approx(0.6)
    assert value(metrics, "tusd_py_s3_call_errors_total", operation="UploadPart") == 1
    assert value(metrics, "tusd_py_s3_call_duration_seconds_count", operation="PutObject") == 2
    assert value(metrics, "tusd_py_s3_call_errors_total", operation="PutObject") == 1


def test_two_instances_do_not_share_values() -> None:
    first, second = Metrics(), Metrics()
    first.upload_created()
    first.bytes_received(10)
    assert value(second, "tusd_py_uploads_created_total") == 0
    assert value(second, "tusd_py_received_bytes_total") == 0
    assert value(first, "tusd_py_received_bytes_total") == 10


def test_process_metrics_optional() -> None:
    assert ("process_open_fds", ()) in samples(Metrics())
    assert not any(name.startswith("process_") for name, _ in samples(Metrics(process_metrics=False)))
