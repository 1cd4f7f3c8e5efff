"""Endpoint metrics through Ray's Prometheus export (ray.serve.metrics): requests, latency, queue depth."""

from __future__ import annotations


class ServeMetrics:
    def __init__(self):
        from ray.serve import metrics

        self.requests = metrics.Counter("pidray_requests", "upscale requests by HTTP status", tag_keys=("status",))
        self.latency = metrics.Histogram(
            "pidray_request_latency_s", "upscale request latency (s)",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120],
        )  # fmt: skip
        self.in_flight = metrics.Gauge("pidray_in_flight", "upscale requests being processed by this ingress replica")

    def request(self, status: int, seconds: float) -> None:
        self.requests.inc(tags={"status": str(status)})
        self.latency.observe(seconds)

    def queue(self, n: int) -> None:
        self.in_flight.set(n)
