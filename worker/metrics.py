"""Prometheus metrics for every cxr-triage process.

Two sources feed one endpoint per process:

* event counters and histograms that the listener and the tasks bump as things happen
  (:func:`instance_received`, :func:`instance_rejected`, :func:`observe_queue_wait`,
  :func:`observe_inference`, :func:`delivery_outcome`, :func:`prediction_made`);
* a collector that reads the database at scrape time (:class:`DatabaseCollector`): studies
  by state, deliveries by state, the oldest waiting and the oldest queued study, the
  production model, the positive ratio by model version and the last successful retrain;
* a collector that asks the broker at scrape time (:class:`BrokerCollector`): messages
  waiting in each Celery queue.  It covers what no process counted, and it is the same
  whichever process is scraped, so it is served once: at ``/metrics`` of the web page
  (``cxr-triage web``, also inside ``up``).

Several processes on one host each serve their own port: the listener on
``settings.metrics_port`` (it sits on a lower floor and cannot import this module; it
keeps its own counters under the same names), workers on the ports
:func:`worker_metrics_port` assigns.  Counters are per process; Prometheus sums them.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from db.metrics import (  # noqa: F401  (re-exported: one registration per process)
    INSTANCES_RECEIVED,
    INSTANCES_REJECTED,
    instance_received,
    instance_rejected,
    label,
)
from db.settings import Settings

log = logging.getLogger(__name__)

QUEUE_WAIT = Histogram(
    "cxr_queue_wait_seconds", "From a study being queued to its analysis starting",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800, 3600),
)
INFERENCE_LATENCY = Histogram(
    "cxr_inference_seconds", "Scoring one study: pixels, model and heatmap",
    ["model_version"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
)
DELIVERIES = Counter(
    "cxr_delivery_attempts", "C-STORE attempts of results to PACS, by outcome",
    ["kind", "outcome"],
)
PREDICTIONS = Counter(
    "cxr_predictions", "Scored studies by model version and call", ["model_version", "call"]
)

_label = label  # bounded label values (see db.metrics)


# ----- functions the listener and the tasks call --------------------------------------------


def observe_queue_wait(seconds: float) -> None:
    """Time from ``Study.queued_at`` to the analysis task starting."""
    QUEUE_WAIT.observe(max(0.0, seconds))


def observe_inference(seconds: float, model_version: str | None) -> None:
    """Wall time of scoring one study (all its images and heatmaps)."""
    INFERENCE_LATENCY.labels(model_version=_label(model_version)).observe(max(0.0, seconds))


def prediction_made(model_version: str | None, positive: bool) -> None:
    """A study received a probability and a call."""
    PREDICTIONS.labels(model_version=_label(model_version),
                       call="positive" if positive else "negative").inc()


def delivery_outcome(kind: str, outcome: str) -> None:
    """One delivery attempt ended: ``outcome`` is ``delivered``, ``retry`` or ``failed``."""
    DELIVERIES.labels(kind=_label(kind), outcome=_label(outcome)).inc()


# ----- the database collector -------------------------------------------------------------


class DatabaseCollector(Collector):
    """Gauges read from the database at scrape time."""

    def __init__(self, db: Any) -> None:
        self.db = db

    def describe(self) -> Iterable[Metric]:
        # Returning no descriptions keeps registration from running a scrape at import.
        return []

    def collect(self) -> Iterator[Metric]:
        from worker.gauges import read_gauges

        try:
            gauges = read_gauges(self.db)
        except Exception as exc:  # noqa: BLE001 - a scrape must report, not crash
            log.warning("metrics: database unreadable error=%s", type(exc).__name__)
            up = GaugeMetricFamily("cxr_database_up", "1 when the database answered")
            up.add_metric([], 0.0)
            yield up
            return
        up = GaugeMetricFamily("cxr_database_up", "1 when the database answered")
        up.add_metric([], 1.0)
        yield up
        studies = GaugeMetricFamily("cxr_studies", "Studies by state", labels=["state"])
        for state, n in gauges.studies_by_state.items():
            studies.add_metric([state], float(n))
        yield studies
        deliveries = GaugeMetricFamily("cxr_deliveries", "Outbox rows by state",
                                       labels=["state"])
        for state, n in gauges.deliveries_by_state.items():
            deliveries.add_metric([state], float(n))
        yield deliveries
        oldest = GaugeMetricFamily("cxr_oldest_waiting_study_seconds",
                                   "Age of the oldest study not yet done, skipped or failed")
        oldest.add_metric([], gauges.oldest_waiting_seconds)
        yield oldest
        prod = GaugeMetricFamily("cxr_production_model_info",
                                 "The model version in production (value 1)",
                                 labels=["version"])
        if gauges.production_version:
            prod.add_metric([gauges.production_version], 1.0)
        yield prod
        rate = GaugeMetricFamily("cxr_positive_ratio",
                                 "Share of scored studies called positive, by model version",
                                 labels=["model_version"])
        scored = GaugeMetricFamily("cxr_scored_studies",
                                   "Scored analyses by model version", labels=["model_version"])
        for version, (n, positives) in gauges.calls_by_version.items():
            scored.add_metric([version], float(n))
            if n:
                rate.add_metric([version], positives / n)
        yield rate
        yield scored
        queued = GaugeMetricFamily("cxr_oldest_queued_study_seconds",
                                   "How long the oldest queued study has waited for a worker")
        queued.add_metric([], gauges.oldest_queued_seconds)
        yield queued
        last = GaugeMetricFamily("cxr_last_successful_retrain_timestamp_seconds",
                                 "When the last nightly run that trained finished (Unix time)")
        took = GaugeMetricFamily("cxr_last_successful_retrain_duration_seconds",
                                 "How long the last nightly run that trained took")
        if gauges.last_retrain is not None:
            last.add_metric([], gauges.last_retrain[0])
            took.add_metric([], gauges.last_retrain[1])
        yield last
        yield took


class BrokerCollector(Collector):
    """Messages waiting in each Celery queue, asked of the broker at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        from worker.probes import BrokerUnreachableError, queue_depths

        up = GaugeMetricFamily("cxr_broker_up", "1 when the broker answered")
        depth = GaugeMetricFamily("cxr_queue_depth",
                                  "Messages waiting in a Celery queue, not yet taken by a "
                                  "worker", labels=["queue"])
        try:
            depths = queue_depths(self.settings)
        except BrokerUnreachableError as exc:
            log.warning("metrics: broker unreachable error=%s", exc)
            up.add_metric([], 0.0)
            yield up
            return
        up.add_metric([], 1.0)
        for queue, n in sorted(depths.items()):
            depth.add_metric([queue], float(n))
        yield up
        yield depth


# ----- serving -------------------------------------------------------------------------------


@dataclass
class MetricsServer:
    """A running endpoint; ``stop()`` closes it (tests, clean shutdown)."""

    port: int
    server: Any
    thread: threading.Thread

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def start_metrics_server(port: int, addr: str = "0.0.0.0", db: Any = None,
                         registry: CollectorRegistry = REGISTRY) -> MetricsServer:
    """Serve ``/metrics`` on ``port`` in a daemon thread; with ``db``, add the database
    collector (once per registry)."""
    if db is not None:
        collector = DatabaseCollector(db)
        registry.register(collector)
    server, thread = start_http_server(port, addr=addr, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics endpoint listening port=%d database_collector=%s", bound, db is not None)
    return MetricsServer(bound, server, thread)


def worker_metrics_port(settings: Settings, process_index: int = 0) -> int:
    """The port of a worker process: ``metrics_port + 1 + index`` (the listener owns
    ``metrics_port`` itself).  0 means metrics are off."""
    if not settings.metrics_port:
        return 0
    return settings.metrics_port + 1 + process_index


_worker_server: MetricsServer | None = None


def install_celery_signals(settings: Settings) -> None:
    """Serve worker metrics from each Celery pool process.

    Call once from the Celery app module.  With ``--pool=solo`` the one process serves on
    ``metrics_port + 1``; with prefork, each child ``i`` serves on ``metrics_port + 1 + i``.
    """
    from celery.signals import worker_init, worker_process_init

    def _start(index: int) -> None:
        global _worker_server
        port = worker_metrics_port(settings, index)
        if port and _worker_server is None:
            try:
                _worker_server = start_metrics_server(port)
            except OSError as exc:
                log.warning("metrics endpoint not started port=%d error=%s", port, exc)

    def on_process_init(**_: Any) -> None:
        from billiard.process import current_process

        _start(int(getattr(current_process(), "index", 0) or 0))

    def on_worker_init(sender: Any = None, **_: Any) -> None:
        pool = getattr(getattr(sender, "pool_cls", None), "__name__", "") if sender else ""
        if "solo" in str(pool).lower() or "threads" in str(pool).lower():
            _start(0)

    worker_process_init.connect(on_process_init, weak=False)
    worker_init.connect(on_worker_init, weak=False)
