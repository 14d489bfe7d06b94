"""Prometheus metrics of one tusd-py server.

Every ``Metrics`` owns its own ``CollectorRegistry`` (never the process-global one), so
several servers in one process (tests, embedders) do not collide and each exposes only
its own numbers.

Cost on the hot path: the per-chunk and per-connection numbers (bytes received and
sent, open connections, spool slots in use) are plain ``int`` attributes that a custom
collector reads at scrape time; updating them is one integer add, with no lock and no
prometheus-client call. That is safe because everything runs on the server's event
loop thread, and the scrape (``render``) runs on that thread too. Per-request numbers
(request histogram, upload counters, lock and S3 timings) use prometheus-client
objects: one observation per request or S3 call is cheap next to the I/O it measures.

The metrics are always collected (they cost next to nothing); ``metrics.enabled`` only
decides whether the HTTP layer serves ``metrics.path``.

With ``server.workers > 1`` each worker process has its own ``Metrics``; a scrape
reaches whichever worker accepted it. See README.md ("Several instances").
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

NAMESPACE = "tusd_py"

# Methods the tus handler serves; anything else is folded into "OTHER" so a client
# sending random methods cannot create unbounded label values.
_KNOWN_METHODS = frozenset({"GET", "HEAD", "POST", "PATCH", "DELETE", "OPTIONS", "PUT"})

# Request durations span a 1 ms OPTIONS to a PATCH streaming gigabytes for an hour.
REQUEST_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600)
# Lock waits are bounded by lock.acquire_timeout (20 s default).
LOCK_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60)
# S3 calls: a HEAD of a few ms up to an 8-5000 MiB UploadPart over a slow link.
S3_CALL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class _HotCounters(Collector):
    """Exposes the plain-int hot-path numbers of a ``Metrics`` at scrape time."""

    def __init__(self, owner: Metrics) -> None:
        self._owner = owner

    def collect(self) -> Iterable[Metric]:
        owner = self._owner
        received = CounterMetricFamily(
            f"{NAMESPACE}_received_bytes", "Request body bytes received from clients (PATCH and POST)."
        )
        received.add_metric([], owner.received_bytes)
        sent = CounterMetricFamily(f"{NAMESPACE}_sent_bytes", "Response body bytes sent to clients (downloads).")
        sent.add_metric([], owner.sent_bytes)
        connections = GaugeMetricFamily(f"{NAMESPACE}_connections_open", "Client connections currently open.")
        connections.add_metric([], owner.open_connections)
        spool = GaugeMetricFamily(
            f"{NAMESPACE}_spool_slots_in_use", "Spool ring slots holding parts received but not yet uploaded."
        )
        spool.add_metric([], owner.spool_slots_in_use)
        return [received, sent, connections, spool]

    def describe(self) -> Iterable[Metric]:
        return self.collect()


class Metrics:
    """The server's metrics. Create one per server; pass it to the HTTP layer, the tus
    handler, the store, the locker and the hooks.

    All methods must be called on the server's event loop thread.
    """

    def __init__(self, *, process_metrics: bool = True) -> None:
        """``process_metrics`` adds the standard ``process_*`` series (CPU seconds,
        resident memory, open file descriptors) read from /proc at scrape time."""
        self.registry = CollectorRegistry()
        # Hot-path numbers: plain ints, read by _HotCounters at scrape time.
        self.received_bytes = 0
        self.sent_bytes = 0
        self.open_connections = 0
        self.spool_slots_in_use = 0
        self.registry.register(_HotCounters(self))
        if process_metrics:
            ProcessCollector(registry=self.registry)

        registry = self.registry
        self._request_children: dict[tuple[str, int], Histogram] = {}
        self._requests = Histogram(
            "requests_duration_seconds",
            "Time from request head received to response finished, by method and status.",
            ["method", "status"],
            namespace=NAMESPACE,
            buckets=REQUEST_DURATION_BUCKETS,
            registry=registry,
        )
        self._uploads_created = Counter(
            "uploads_created", "Uploads created (POST accepted).", namespace=NAMESPACE, registry=registry
        )
        self._uploads_finished = Counter(
            "uploads_finished", "Uploads that received their last byte and were completed by the store.",
            namespace=NAMESPACE, registry=registry,
        )
        self._uploads_terminated = Counter(
            "uploads_terminated", "Uploads deleted by a client (tus termination).", namespace=NAMESPACE,
            registry=registry,
        )
        self._lock_wait = Histogram(
            "lock_wait_seconds", "Time a request waited to acquire an upload's lock.",
            namespace=NAMESPACE, buckets=LOCK_WAIT_BUCKETS, registry=registry,
        )
        self._lock_takeovers = Counter(
            "lock_takeovers",
            "Release requests that made a lock holder let go (e.g. a client resumed while its old "
            "connection still held the lock).",
            namespace=NAMESPACE, registry=registry,
        )
        self._lock_timeouts = Counter(
            "lock_timeouts", "Lock acquisitions that gave up after lock.acquire_timeout (answered 423).",
            namespace=NAMESPACE, registry=registry,
        )
        self._s3_duration = Histogram(
            "s3_call_duration_seconds", "Duration of S3 API calls (including retries), by operation.",
            ["operation"], namespace=NAMESPACE, buckets=S3_CALL_BUCKETS, registry=registry,
        )
        self._s3_errors = Counter(
            "s3_call_errors", "S3 API calls that failed after retries, by operation.",
            ["operation"], namespace=NAMESPACE, registry=registry,
        )
        self._s3_timeouts = Counter(
            "s3_request_timeouts", "S3 requests cut off by store.s3.request_timeout (each attempt), by operation.",
            ["operation"], namespace=NAMESPACE, registry=registry,
        )
        self._hook_deliveries = Counter(
            "hook_deliveries", "Hook deliveries by event and outcome (ok, failed, dropped).",
            ["event", "outcome"], namespace=NAMESPACE, registry=registry,
        )

    # --- HTTP layer ------------------------------------------------------------------

    def connection_opened(self) -> None:
        """A client connection was accepted."""
        self.open_connections += 1

    def connection_closed(self) -> None:
        """A client connection was closed (call exactly once per ``connection_opened``)."""
        self.open_connections -= 1

    def request_finished(self, method: str, status: int, duration: float) -> None:
        """A response was sent completely (or the connection failed while sending it).
        ``duration`` in seconds from the request head to the end of the response."""
        child = self._request_children.get((method, status))
        if child is None:  # labels() validates and locks on every call: once per pair
            label = method if method in _KNOWN_METHODS else "OTHER"
            child = self._requests.labels(label, str(status))
            if len(self._request_children) < 1024:
                self._request_children[(method, status)] = child
        child.observe(duration)

    def bytes_received(self, count: int) -> None:
        """``count`` request body bytes were handed to the application. Called per chunk:
        one int add. (Callers in a tight loop may also add to ``received_bytes``.)"""
        self.received_bytes += count

    def bytes_sent(self, count: int) -> None:
        """``count`` response body bytes were sent (downloads)."""
        self.sent_bytes += count

    # --- tus handler ------------------------------------------------------------------

    def upload_created(self) -> None:
        """An upload was created (after the store's ``create`` succeeded)."""
        self._uploads_created.inc()

    def upload_finished(self) -> None:
        """An upload was completed (after the store's ``finish`` succeeded)."""
        self._uploads_finished.inc()

    def upload_terminated(self) -> None:
        """An upload was deleted by its client (after the store's ``terminate``)."""
        self._uploads_terminated.inc()

    # --- lockers ----------------------------------------------------------------------

    def lock_wait(self, seconds: float) -> None:
        """A lock was acquired after waiting ``seconds`` (0 when it was free)."""
        self._lock_wait.observe(seconds)

    def lock_takeover(self) -> None:
        """A release request made the holder of a lock let go, and the waiter got it."""
        self._lock_takeovers.inc()

    def lock_timeout(self) -> None:
        """A waiter gave up after the acquire timeout."""
        self._lock_timeouts.inc()

    # --- S3 store ---------------------------------------------------------------------

    def s3_call(self, operation: str, seconds: float, error: bool) -> None:
        """An S3 call ``operation`` (e.g. ``"UploadPart"``) took ``seconds`` including
        retries; ``error`` when it failed in the end."""
        self._s3_duration.labels(operation).observe(seconds)
        if error:
            self._s3_errors.labels(operation).inc()

    def spool_in_use(self, delta: int) -> None:
        """A spool slot was taken (+1) or freed (-1)."""
        self.spool_slots_in_use += delta

    def s3_timeout(self, operation: str) -> None:
        """One request of S3 call ``operation`` ran out of time (store.s3.request_timeout)."""
        self._s3_timeouts.labels(operation).inc()

    # --- hooks ------------------------------------------------------------------------

    def hook_delivery(self, event: str, outcome: str) -> None:
        """A hook event was delivered (``"ok"``), failed after retries (``"failed"``) or
        was dropped because too many deliveries were pending (``"dropped"``)."""
        self._hook_deliveries.labels(event, outcome).inc()

    # --- exposition -------------------------------------------------------------------

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its Content-Type, for ``GET metrics.path``."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
