"""Prometheus metrics of one server (``python -m service serve --metrics-port PORT``).

Every :class:`Metrics` has its own ``CollectorRegistry`` (tests run several servers in one
process) and its own HTTP endpoint (``/metrics``). The gRPC adapters (service/servicer.py,
service/oip.py) count requests and time decoding and the whole call; the data plane times the
model, the policy and the monitor and reports the level it sees each client at; escalations are
counted from the monitor's level transitions through a thin wrapper around its store (the one
place every transition passes), so monitor/ never imports prometheus_client. The monitor's log
queue is read at scrape time. Names and meanings: docs/ecosystem.md.
"""
from __future__ import annotations

import logging
import threading

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from common.types import Level

log = logging.getLogger("modelguard.metrics")

# 100 us .. 10 s: decoding takes tens of microseconds, a 512-image batch with the monitor ~1 s.
BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
           1.0, 2.5, 5.0, 10.0)
STAGES = ("decode", "queue", "model", "policy", "monitor", "total")
NONE = "none"   # level / answer of a request rejected before they were known


def level_label(level) -> str:
    return NONE if level is None else Level(level).name.lower()


class _MonitorCollector:
    """Gauges read from the monitor (``Monitor.stats()``) when scraped; none for NullMonitor."""

    def __init__(self):
        self.monitor = None

    def describe(self):
        return []

    def collect(self):
        mon = self.monitor
        stats = getattr(mon, "stats", None)
        if not callable(stats):
            return
        st = stats()
        if "log_queue_depth" in st:
            yield GaugeMetricFamily(
                "modelguard_monitor_log_queue_depth",
                "Log items (requests, transitions, checkpoints) queued for the monitor's "
                "writer thread, not yet in a transaction", value=st["log_queue_depth"])
        if "log_uncommitted" in st:
            yield GaugeMetricFamily(
                "modelguard_monitor_log_uncommitted",
                "Log items put but not yet committed to the database (queued plus the "
                "transaction in progress): the writer's lag in items",
                value=st["log_uncommitted"])
        if "detector_queue_depth" in st:   # execution.mode = "async"
            yield GaugeMetricFamily(
                "modelguard_monitor_detector_queue_depth",
                "Requests waiting for the monitor's detectors (async mode)",
                value=st["detector_queue_depth"])
        if "resident_clients" in st:
            yield GaugeMetricFamily(
                "modelguard_monitor_resident_clients",
                "Clients whose detector state is held in memory", value=st["resident_clients"])
        if "resident_state_bytes" in st:
            yield GaugeMetricFamily(
                "modelguard_monitor_resident_state_bytes",
                "Detector state of the clients held in memory, in bytes (bounded by "
                "execution.max_state_mb)", value=st["resident_state_bytes"])
        if "state_budget_bytes" in st:
            yield GaugeMetricFamily(
                "modelguard_monitor_state_budget_bytes",
                "The client-state budget in force: execution.max_state_mb, lowered to keep the "
                "process under execution.max_rss_mb", value=st["state_budget_bytes"])
        if "log_failing" in st:
            yield GaugeMetricFamily(
                "modelguard_monitor_log_failing",
                "1 while the monitor's log cannot be written (disk full, I/O error); the writer "
                "retries by itself", value=st["log_failing"])
        if "log_dropped" in st:
            yield CounterMetricFamily(
                "modelguard_monitor_log_dropped",
                "Log rows and checkpoints dropped because log.max_queue items were waiting "
                "(fail-open only)", value=st["log_dropped"])


class Metrics:
    """The server's metrics; ``start(host, port)`` serves them, ``stop()`` ends that."""

    def __init__(self, registry: CollectorRegistry | None = None):
        r = self.registry = registry if registry is not None else CollectorRegistry()
        labels = ("api", "level", "answer", "code")
        self.requests = Counter("modelguard_requests", "Prediction calls by API, the level the "
                                "client was answered at, the answer kind and the status code",
                                labels, registry=r)
        self.images = Counter("modelguard_images", "Images in prediction calls, same labels",
                              labels, registry=r)
        self.latency = Histogram("modelguard_latency_seconds", "Time per prediction call in "
                                 "each stage: decode, queue (waiting for a compute slot: "
                                 "small calls, or every call with compute_slots set), "
                                 "model, policy (defence + "
                                 "watermark), monitor (level + observe + commit), total (the "
                                 "whole handler)",
                                 ("stage",), buckets=BUCKETS, registry=r)
        self.escalations = Counter("modelguard_escalations", "Level transitions the monitor "
                                   "recorded, by rule", ("rule", "from_level", "to_level"),
                                   registry=r)
        self.clients = Gauge("modelguard_clients", "Clients by the level the data plane last "
                             "saw them at (since this server started)", ("level",), registry=r)
        for lvl in Level:
            self.clients.labels(level_label(lvl)).set(0)
        self._stage = {s: self.latency.labels(s) for s in STAGES}
        self._children: dict[tuple, tuple] = {}
        self._seen: dict[str, Level] = {}
        self._seen_lock = threading.Lock()
        self._monitor = _MonitorCollector()
        r.register(self._monitor)
        self._http = None
        self.port: int | None = None

    # -- recording (hot path: pre-bound children, no label lookups after the first) ------------
    def request(self, api: str, code: str, level, answer: str | None, n_images: int,
                total_s: float | None, decode_s: float | None = None) -> None:
        """One prediction call; ``total_s`` None for calls no handler saw (rejected keys)."""
        key = (api, level_label(level), answer or NONE, code)
        ch = self._children.get(key)
        if ch is None:
            ch = self._children.setdefault(key, (self.requests.labels(*key),
                                                 self.images.labels(*key)))
        ch[0].inc()
        if n_images:
            ch[1].inc(n_images)
        if total_s is not None:
            self._stage["total"].observe(total_s)
        if decode_s is not None:
            self._stage["decode"].observe(decode_s)

    def stages(self, model_s: float, policy_s: float, monitor_s: float,
               queue_s: float | None = None) -> None:
        if queue_s is not None:
            self._stage["queue"].observe(queue_s)
        self._stage["model"].observe(model_s)
        self._stage["policy"].observe(policy_s)
        self._stage["monitor"].observe(monitor_s)

    def client_level(self, client: str, level) -> None:
        """The level the data plane sees ``client`` at after its latest request."""
        level = Level(level)
        if self._seen.get(client) == level:    # the common case, without the lock
            return
        with self._seen_lock:
            prev = self._seen.get(client)
            if prev == level:
                return
            self._seen[client] = level
            if prev is not None:
                self.clients.labels(level_label(prev)).dec()
            self.clients.labels(level_label(level)).inc()

    def transition(self, tr) -> None:
        self.escalations.labels(str(tr.rule), level_label(tr.from_level),
                                level_label(tr.to_level)).inc()

    # -- wiring --------------------------------------------------------------------------------
    def watch_monitor(self, monitor) -> bool:
        """Count ``monitor``'s transitions and read its queues at scrape time. False when it has
        no store (NullMonitor: nothing to count)."""
        self._monitor.monitor = monitor
        hook = getattr(monitor, "on_transition", None)
        if hook is None:
            return False
        hook(self.transition)
        return True

    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on host:port (0: a free port); returns the bound port."""
        from prometheus_client import start_http_server

        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        self.port = self._http.server_port
        return self.port

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
