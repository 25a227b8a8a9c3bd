"""Prometheus endpoint: event counters and the database collector, scraped over HTTP."""

from __future__ import annotations

import urllib.request
import uuid
from datetime import timedelta
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from db.models import RetrainRun, utcnow
from db.session import Database
from db.settings import Settings
from tests.support.ops_populate import populate
from tests.support.services import redis_reachable
from worker import metrics
from worker.console.health import check_health


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_database_collector_exports_states_model_and_positive_ratio(settings: Settings) -> None:
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    finished = utcnow() - timedelta(hours=3)
    with db.session() as s:
        s.add(RetrainRun(status="done", started_at=finished - timedelta(seconds=1500),
                         finished_at=finished))
        s.add(RetrainRun(status="failed", started_at=utcnow(), finished_at=utcnow()))
        s.add(RetrainRun(status="done", dry_run=True, started_at=utcnow(),
                         finished_at=utcnow()))
    registry = CollectorRegistry()
    server = metrics.start_metrics_server(0, addr="127.0.0.1", db=db, registry=registry)
    try:
        got = _scrape(server.port)
    finally:
        server.stop()
        db.dispose()
    assert got[("cxr_database_up", ())] == 1.0
    assert got[("cxr_studies", (("state", "done"),))] == 1.0
    assert got[("cxr_studies", (("state", "queued"),))] == 1.0
    assert got[("cxr_studies", (("state", "receiving"),))] == 0.0
    assert got[("cxr_deliveries", (("state", "failed"),))] == 1.0
    assert got[("cxr_production_model_info", (("version", pop.model_version),))] == 1.0
    assert got[("cxr_positive_ratio", (("model_version", pop.model_version),))] == 1.0
    assert not any(name == "cxr_positive_rate" for name, _ in got)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    undocumented = {name for name, _ in got if f"| `{name}` |" not in readme}
    assert not undocumented, f"metrics missing from the README table: {undocumented}"
    assert got[("cxr_scored_studies", (("model_version", pop.model_version),))] == 1.0
    assert got[("cxr_oldest_waiting_study_seconds", ())] > 1700
    assert 1700 < got[("cxr_oldest_queued_study_seconds", ())] < 4000  # the populated one
    assert got[("cxr_last_successful_retrain_duration_seconds", ())] == pytest.approx(1500)
    assert got[("cxr_last_successful_retrain_timestamp_seconds", ())] == pytest.approx(
        finished.timestamp(), abs=1)


def test_event_counters_and_histograms_are_served() -> None:
    before = metrics.INSTANCES_REJECTED.labels(reason="sop_class")._value.get()
    metrics.instance_received("DX")
    metrics.instance_rejected("sop_class")
    metrics.instance_rejected("sop_class")
    metrics.observe_queue_wait(3.0)
    metrics.observe_inference(0.7, "m-test")
    metrics.prediction_made("m-test", positive=False)
    metrics.delivery_outcome("sr", "delivered")
    metrics.delivery_outcome("sc", "retry")
    server = metrics.start_metrics_server(0, addr="127.0.0.1")
    try:
        got = _scrape(server.port)
    finally:
        server.stop()
    assert got[("cxr_instances_rejected_total", (("reason", "sop_class"),))] == before + 2
    assert got[("cxr_instances_received_total", (("modality", "DX"),))] >= 1
    assert got[("cxr_queue_wait_seconds_count", ())] >= 1
    assert got[("cxr_inference_seconds_bucket", (("le", "1.0"), ("model_version", "m-test")))] >= 1
    assert got[("cxr_predictions_total", (("call", "negative"), ("model_version", "m-test")))] >= 1
    assert got[("cxr_delivery_attempts_total", (("kind", "sc"), ("outcome", "retry")))] >= 1


def test_database_down_is_reported_not_raised(make_settings) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(database_url="postgresql://postgres@127.0.0.1:1/nothing")
    registry = CollectorRegistry()

    class Unreachable:
        def session(self):  # type: ignore[no-untyped-def]
            from sqlalchemy import create_engine
            from sqlalchemy.orm import Session

            return Session(create_engine(s.database_url.replace(
                "postgresql://", "postgresql+psycopg://"))).begin()

    registry.register(metrics.DatabaseCollector(Unreachable()))
    assert registry.get_sample_value("cxr_database_up") == 0.0


def test_worker_ports_do_not_collide(make_settings) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(metrics_port=9400)
    assert metrics.worker_metrics_port(s, 0) == 9401
    assert metrics.worker_metrics_port(s, 3) == 9404
    assert metrics.worker_metrics_port(make_settings(), 0) == 0


@pytest.mark.redis
def test_health_checks_a_real_redis_broker(make_settings) -> None:  # type: ignore[no-untyped-def]
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    s = make_settings(broker_url="redis://127.0.0.1:6379/0")
    Database(s).dispose()  # schema at head
    report = check_health(s).as_dict()
    assert report["checks"]["broker"]["ok"] and report["checks"]["database"]["ok"], report
    bad = check_health(make_settings(broker_url="redis://127.0.0.1:1/0"))
    assert not bad.ok and not bad.as_dict()["checks"]["broker"]["ok"]


@pytest.mark.redis
def test_queue_depth_per_celery_queue_from_a_real_redis(make_settings) -> None:  # type: ignore[no-untyped-def]
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    from db.broker import make_celery

    tag = uuid.uuid4().hex[:8]
    s = make_settings(broker_url="redis://127.0.0.1:6379/0", inference_queue=f"inf-{tag}",
                      delivery_queue=f"del-{tag}")
    app = make_celery(s, main="test-publisher")
    try:
        for _ in range(3):
            app.send_task("worker.tasks.analyse_study", args=[0], queue=s.inference_queue)
        app.send_task("worker.tasks.deliver", args=[0], queue=s.delivery_queue)
        registry = CollectorRegistry()
        registry.register(metrics.BrokerCollector(s))
        server = metrics.start_metrics_server(0, addr="127.0.0.1", registry=registry)
        try:
            got = _scrape(server.port)
        finally:
            server.stop()
        assert got[("cxr_broker_up", ())] == 1.0
        assert got[("cxr_queue_depth", (("queue", s.inference_queue),))] == 3.0
        assert got[("cxr_queue_depth", (("queue", s.delivery_queue),))] == 1.0
    finally:
        with app.connection_for_write() as conn:
            for q in (s.inference_queue, s.delivery_queue):
                conn.default_channel.queue_purge(q)
        app.close()
    registry = CollectorRegistry()
    registry.register(metrics.BrokerCollector(s.replace(broker_url="redis://127.0.0.1:1/0")))
    server = metrics.start_metrics_server(0, addr="127.0.0.1", registry=registry)
    try:
        got = _scrape(server.port)
    finally:
        server.stop()
    assert got[("cxr_broker_up", ())] == 0.0
