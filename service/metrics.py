"""Prometheus metrics of the API and its workers (served at ``GET /metrics``)."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

REGISTRY = CollectorRegistry(auto_describe=True)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "merc_http_requests_total", "HTTP requests by route and status", ["method", "route", "status"], registry=REGISTRY
)
LATENCY = Histogram(
    "merc_http_request_seconds",
    "HTTP request latency",
    ["method", "route"],
    buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
STAGE_SECONDS = Histogram(
    "merc_stage_seconds", "Seconds per processing stage", ["stage"], buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "merc_batch_jobs", "Jobs per micro-batch (several)", buckets=(2, 4, 8, 16, 32, 64, 128, 256), registry=REGISTRY
)
JOBS = Counter("merc_jobs_total", "Finished jobs by final status", ["status"], registry=REGISTRY)
JOB_SECONDS = Histogram("merc_job_seconds", "Job run time", buckets=_LATENCY_BUCKETS, registry=REGISTRY)
REJECTED = Counter("merc_rejected_total", "Requests answered 4xx, by problem type", ["problem"], registry=REGISTRY)
CALLBACKS = Counter("merc_callbacks_total", "Callback POSTs by outcome", ["outcome"], registry=REGISTRY)
MODELS_LOADED = Gauge("merc_models_loaded", "Bundles loaded in this process", registry=REGISTRY)


class QueueCollector:
    """Reads queue depth per status from the job store at scrape time."""

    def __init__(self, depth: Callable[[], dict[str, int]]) -> None:
        self.depth = depth

    def collect(self):
        family = GaugeMetricFamily("merc_queue_jobs", "Jobs in the store by status", labels=["status"])
        for status, count in self.depth().items():
            family.add_metric([status], count)
        yield family


_queue_collector: QueueCollector | None = None


def watch_queue(depth: Callable[[], dict[str, int]]) -> None:
    """Report ``depth()`` as merc_queue_jobs (replacing an earlier store's collector)."""
    global _queue_collector
    if _queue_collector is not None:
        REGISTRY.unregister(_queue_collector)
    _queue_collector = QueueCollector(depth)
    REGISTRY.register(_queue_collector)


def render() -> bytes:
    return generate_latest(REGISTRY)
