"""Prometheus metrics of one app instance (its own registry, so that several apps in one process do not clash).

- ``ircnn_requests_total{route, method, status}`` and ``ircnn_request_seconds{route, method, status}``: every
  HTTP request, by route template (unknown paths share the label ``unmatched``, which bounds the cardinality).
- ``ircnn_queue_depth`` jobs waiting for the networks; ``ircnn_inflight_jobs`` jobs in the running batch;
  ``ircnn_pixels_in_flight`` decoded pixels held by requests (decoding, queued or running; the 503 budget).
- ``ircnn_stage_seconds{task, stage}``: decode, queue wait, and the inference stages (classify: crops+forward;
  detect: proposals, scoring and NMS as the detector reports them).
- ``ircnn_batch_size{task}``, ``ircnn_dropped_jobs_total{task}`` (clients that left before their turn),
  ``ircnn_model_info`` (the bundle's task, members, architecture; not its path, as /metrics needs no token).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from service.batching import BatchObserver, MicroBatcher

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics(BatchObserver):
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("ircnn_requests", "HTTP requests", ("route", "method", "status"), registry=r)
        self.latency = Histogram("ircnn_request_seconds", "HTTP request latency", ("route", "method", "status"),
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("ircnn_stage_seconds", "seconds per request spent in each stage", ("task", "stage"),
                               buckets=LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram("ircnn_batch_size", "requests per network batch", ("task",),
                                    buckets=BATCH_BUCKETS, registry=r)
        self.dropped_jobs = Counter("ircnn_dropped_jobs", "jobs dropped because their client left before "
                                    "their turn", ("task",), registry=r)
        self.queue_depth = Gauge("ircnn_queue_depth", "jobs waiting for the networks", registry=r)
        self.inflight = Gauge("ircnn_inflight_jobs", "jobs in the batch the networks are running", registry=r)
        self.pixels_in_flight = Gauge("ircnn_pixels_in_flight", "decoded pixels held by requests being decoded, "
                                      "queued or run", registry=r)
        self.model_info = Info("ircnn_model", "the loaded model bundle", registry=r)

    def watch(self, batcher: MicroBatcher) -> None:
        self.queue_depth.set_function(lambda: batcher.depth)
        self.inflight.set_function(lambda: batcher.inflight)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- BatchObserver -------------------------------------------------------------------------------------

    def batch(self, kind: str, size: int, seconds: float) -> None:
        self.batch_size.labels(kind).observe(size)

    def queue_wait(self, kind: str, seconds: float) -> None:
        self.stage.labels(kind, "queue").observe(seconds)

    def dropped(self, kind: str) -> None:
        self.dropped_jobs.labels(kind).inc()
