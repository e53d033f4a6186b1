"""Prometheus metrics and structured request logs, from one pure-ASGI middleware.

``GET /metrics`` (text exposition format, admin key) exposes:

- ``fedmeta_requests_total{route,method,status}``
- ``fedmeta_request_duration_seconds{route}`` (histogram)
- ``fedmeta_predictions_total{task}`` (rows predicted, per task)
- ``fedmeta_model_info{site,version,sha256}`` (1 for the served version)

The middleware is plain ASGI (no ``BaseHTTPMiddleware``) so that it costs a
few microseconds per request. It also refuses bodies whose declared length
exceeds the server's limit before any route reads them.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict

from serving.errors import json_response

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
access_log = logging.getLogger("fedmeta.serving.access")


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)
        self.buckets: dict[str, list[int]] = defaultdict(lambda: [0] * len(BUCKETS))
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.predictions: dict[str, int] = defaultdict(int)

    def observe(self, route: str, method: str, status: int, seconds: float, predicted: tuple[list[str], int] | None) -> None:
        with self._lock:
            self.requests[(route, method, status)] += 1
            buckets = self.buckets[route]
            for i, edge in enumerate(BUCKETS):
                if seconds <= edge:
                    buckets[i] += 1
                    break
            self.sums[route] += seconds
            self.counts[route] += 1
            if predicted is not None:
                tasks, rows = predicted
                for task in tasks:
                    self.predictions[task] += rows

    def exposition(self, model_labels: dict[str, str]) -> str:
        def labels(**kv) -> str:
            return "{" + ",".join(f'{k}="{str(v).replace(chr(92), chr(92) * 2).replace(chr(34), chr(92) + chr(34))}"' for k, v in kv.items()) + "}"

        lines = ["# HELP fedmeta_requests_total HTTP requests by route, method and status.", "# TYPE fedmeta_requests_total counter"]
        with self._lock:
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f"fedmeta_requests_total{labels(route=route, method=method, status=status)} {n}")
            lines += ["# HELP fedmeta_request_duration_seconds Request latency by route.", "# TYPE fedmeta_request_duration_seconds histogram"]
            for route in sorted(self.counts):
                cumulative = 0
                for edge, n in zip(BUCKETS, self.buckets[route]):
                    cumulative += n
                    lines.append(f"fedmeta_request_duration_seconds_bucket{labels(route=route, le=edge)} {cumulative}")
                lines.append(f"fedmeta_request_duration_seconds_bucket{labels(route=route, le='+Inf')} {self.counts[route]}")
                lines.append(f"fedmeta_request_duration_seconds_sum{labels(route=route)} {self.sums[route]:.6f}")
                lines.append(f"fedmeta_request_duration_seconds_count{labels(route=route)} {self.counts[route]}")
            lines += ["# HELP fedmeta_predictions_total Rows predicted, by task.", "# TYPE fedmeta_predictions_total counter"]
            for task, n in sorted(self.predictions.items()):
                lines.append(f"fedmeta_predictions_total{labels(task=task)} {n}")
        lines += ["# HELP fedmeta_model_info The model version being served.", "# TYPE fedmeta_model_info gauge"]
        lines.append(f"fedmeta_model_info{labels(**model_labels)} 1")
        return "\n".join(lines) + "\n"


class MetricsMiddleware:
    """Counts and times every request by route template; logs one JSON line per request at INFO."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int):
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                response = json_response({"error": f"request body of {int(value)} bytes exceeds the limit of {self.max_body_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        start = time.perf_counter()
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            route = scope.get("route")
            template = route.path if route is not None else "unmatched"
            predicted = scope.get("state", {}).get("predicted")
            self.metrics.observe(template, scope["method"], status, seconds, predicted)
            if access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({"route": template, "path": scope["path"], "method": scope["method"], "status": status, "ms": round(seconds * 1000, 3)}))
