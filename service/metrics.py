"""Prometheus metrics, on a registry of the app's own (so several apps can share a process)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvclip_http_requests", "HTTP requests by route and status",
                                ("method", "route", "status"), registry=r)
        self.latency = Histogram("kvclip_http_request_duration_seconds", "HTTP request latency",
                                 ("method", "route"), buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_images = Histogram("kvclip_batch_images", "Images per encoder batch",
                                      buckets=_BATCH_BUCKETS, registry=r)
        self.batch_seconds = Histogram("kvclip_batch_duration_seconds", "Encoder time per batch",
                                       buckets=_LATENCY_BUCKETS, registry=r)
        self.queue_images = Gauge("kvclip_queue_images", "Images waiting for the encoder", registry=r)
        self.rejected = Counter("kvclip_rejected_requests", "Requests refused because the queue was full",
                                registry=r)
        self.cache_requests = Counter("kvclip_cache_requests", "Classify requests by cache and method",
                                      ("cache", "method"), registry=r)
        self.images = Counter("kvclip_images_classified", "Images classified by cache", ("cache",),
                              registry=r)
        self.model = Info("kvclip_model", "The model this server encodes with", registry=r)
        self.cache_info = Gauge("kvclip_cache_info", "Loaded caches (value 1), by version",
                                ("cache", "version", "model", "classes", "items"), registry=r)
        self.ready = Gauge("kvclip_ready", "1 when the model and caches are loaded", registry=r)
        self.build_jobs = Counter("kvclip_build_jobs", "Build jobs by the state they reached",
                                  ("state",), registry=r)
        self.build_running = Gauge("kvclip_build_jobs_running", "Build jobs running now", registry=r)

    def set_caches(self, caches: dict) -> None:
        """Replace the cache info series with the loaded caches (name -> LoadedCache)."""
        self.cache_info.clear()
        for name, loaded in caches.items():
            self.cache_info.labels(name, loaded.version, loaded.model_id, str(loaded.num_classes),
                                   str(loaded.num_items)).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


def metric_value(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """One sample's value in Prometheus text output (0.0 when absent); for tests and benchmarks."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in (labels or {}).items()):
                return sample.value
    return 0.0
