"""Prometheus metrics and structured request logs, from one pure-ASGI middleware.

``GET /metrics`` (text exposition format, ``predict`` key) exposes:

- ``fedmeta_requests_total{route,method,status}``; a client that disconnects
  before its response is sent is counted with status ``499`` (nginx's
  "client closed request"), a request whose body did not arrive in time
  with ``408``;
- ``fedmeta_request_duration_seconds{route}`` (histogram);
- ``fedmeta_predictions_total{task}`` (rows predicted, per task);
- ``fedmeta_outside_training_range_total{feature}`` (values answered that lie
  outside the range the served model was trained on, per numeric feature;
  see :mod:`fedmeta.training_range`);
- ``fedmeta_model_info{site,version,sha256}`` (1 for the served version).

The exposition is ``prometheus_client``'s, from a registry of the app's own
(not the process-global one), so every app built by ``create_app`` counts
alone. prometheus_client escapes label values, so no label can add a line.
Label sets are bounded: routes are templates (``unmatched`` otherwise) and
methods outside the HTTP standard ones are ``other``.

The middleware is plain ASGI (no ``BaseHTTPMiddleware``) so that it costs a
few microseconds per request. It also refuses bodies whose declared length
exceeds the server's limit before any route reads them, answers a server
fault (one log line, no traceback: :func:`serving.errors.internal_error`),
and while the server drains adds ``Connection: close`` to every response.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from fedmeta.training_range import counts
from serving.errors import internal_error, json_response

BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
DISCONNECTED = 499
TIMED_OUT = 408
access_log = logging.getLogger("fedmeta.serving.access")
log = logging.getLogger("fedmeta.serving")


class _ModelInfo:
    """A collector reading the served model at scrape time, so the gauge never lags a swap."""

    def __init__(self, labels: Callable[[], dict[str, str]]):
        self.labels = labels

    def collect(self):
        labels = self.labels()
        family = GaugeMetricFamily("fedmeta_model_info", "The model version being served.", labels=list(labels))
        family.add_metric(list(labels.values()), 1)
        yield family


class _Predictions:
    """``fedmeta_predictions_total{task}``: rows predicted, kept per set of tasks asked for and summed per task at scrape time.

    A request adds its rows to one plain counter (its task set's) on the event loop, where every
    request is observed: one dict update instead of a locked Prometheus child per task (~1.5 us).
    Scrapes read a copy, so they need no lock either.
    """

    def __init__(self):
        self.rows: dict[tuple[str, ...], int] = {}
        self.created: dict[str, float] = {}

    def add(self, tasks: list[str], rows: int) -> None:
        key = tuple(tasks)
        seen = self.rows.get(key)
        if seen is None:
            now = time.time()
            for task in tasks:
                self.created.setdefault(task, now)
            seen = 0
        self.rows[key] = seen + rows

    def collect(self):
        totals: dict[str, int] = {}
        for tasks, rows in list(self.rows.items()):
            for task in tasks:
                totals[task] = totals.get(task, 0) + rows
        family = CounterMetricFamily("fedmeta_predictions", "Rows predicted, by task.", labels=["task"])
        for task, rows in totals.items():
            family.add_metric([task], rows, created=self.created[task])
        yield family


class Metrics:
    """The app's Prometheus registry and the series it keeps."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, model_labels: Callable[[], dict[str, str]]):
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fedmeta_requests", "HTTP requests by route, method and status.", ["route", "method", "status"], registry=self.registry)
        self.duration = Histogram("fedmeta_request_duration_seconds", "Request latency by route.", ["route"], buckets=BUCKETS, registry=self.registry)
        self.predictions = _Predictions()
        self.registry.register(self.predictions)
        self.outside = Counter(
            "fedmeta_outside_training_range", "Values answered outside the served model's training range, by feature.", ["feature"], registry=self.registry
        )
        self.registry.register(_ModelInfo(model_labels))
        self._request_series: dict[tuple[str, str, int], object] = {}
        self._duration_series: dict[str, object] = {}

    def observe(self, route: str, method: str, status: int, seconds: float, predicted: tuple[list[str], int, list[dict] | None] | None) -> None:
        key = (route, method, status)
        series = self._request_series.get(key)
        if series is None:  # label lookups cost ~1 us each; keep the children
            series = self._request_series[key] = self.requests.labels(route, method, str(status))
        series.inc()
        histogram = self._duration_series.get(route)
        if histogram is None:
            histogram = self._duration_series[route] = self.duration.labels(route)
        histogram.observe(seconds)
        if predicted is not None:
            tasks, rows, outside = predicted
            self.predictions.add(tasks, rows)
            if outside:  # feature names come from the served schema: a bounded label set
                for feature, values in counts(outside).items():
                    self.outside.labels(feature).inc(values)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts and times every request by route template; logs one JSON line per request at INFO."""

    def __init__(self, app, metrics: Metrics, max_body_bytes: int, server=None):
        self.app, self.metrics, self.max_body_bytes, self.server = app, metrics, max_body_bytes, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_body_bytes:
                response = json_response({"error": f"request body of {int(value)} bytes exceeds the limit of {self.max_body_bytes} bytes"}, 413)
                return await response(scope, receive, send)
        start = time.perf_counter()
        status = 500
        disconnected = started = False

        async def send_status(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if self.server is not None and self.server.draining:  # tell the client not to reuse a closing connection
                    message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            await send(message)

        async def receive_watch():
            nonlocal disconnected
            message = await receive()
            if message["type"] == "http.disconnect":
                disconnected = True
            return message

        try:
            await self.app(scope, receive_watch, send_status)
        except Exception as e:  # a server fault: answered and logged here, once, as one JSON line
            route = scope.get("route")
            response = internal_error(e, route.path if route is not None else "unmatched")
            if not started and not disconnected:
                await response(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - start
            if disconnected:
                status = TIMED_OUT if scope.get("fedmeta.timed_out") else DISCONNECTED
            route = scope.get("route")
            template = route.path if route is not None else "unmatched"
            method = scope["method"] if scope["method"] in METHODS else "other"
            predicted = scope.get("state", {}).get("predicted")
            self.metrics.observe(template, method, status, seconds, predicted)
            if disconnected:
                event = "request_timeout" if status == TIMED_OUT else "client_disconnected"
                log.info(json.dumps({"event": event, "route": template, "method": method, "status": status, "ms": round(seconds * 1000, 3)}))
            elif access_log.isEnabledFor(logging.INFO):
                access_log.info(json.dumps({"route": template, "method": method, "status": status, "ms": round(seconds * 1000, 3)}))
