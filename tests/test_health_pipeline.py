"""Health sees the pipeline: a real Redis broker, real Celery workers, and each failure
turning `cxr-triage health` and `/healthz` red by name."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from db.models import RetrainRun, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings
from tests.support.worker_data import register_and_promote
from tests.support.worker_process import RedisServer, WorkerProcess, settings_env
from worker.console.health import check_health
from worker.console.web import start_web

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def pipeline(make_settings, tmp_path: Path) -> Iterator[tuple[Settings, Database]]:  # type: ignore[no-untyped-def]
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = RedisServer(tmp_path / "redis")
    redis.start()
    tag = uuid.uuid4().hex[:6]
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'cxr.db'}",
                             broker_url=redis.url, inference_queue=f"inference-{tag}",
                             delivery_queue=f"delivery-{tag}", health_ping_timeout=1.5)
    db = Database(settings)
    yield settings, db
    db.dispose()
    redis.stop()


def _cli_health(settings: Settings) -> tuple[int, dict[str, Any]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(settings_env(settings))
    r = subprocess.run([sys.executable, "-m", "worker.console.cli", "health"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    return r.returncode, json.loads(r.stdout)


def _healthz(settings: Settings) -> tuple[int, dict[str, Any]]:
    server = start_web(settings, "127.0.0.1", 0)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())
    finally:
        server.close()


def _failing(report: dict[str, Any]) -> set[str]:
    return {name for name, c in report["checks"].items() if not c["ok"]}


def test_health_goes_red_for_each_missing_or_stuck_part(
        pipeline: tuple[Settings, Database], tmp_path: Path) -> None:
    settings, db = pipeline
    # Nothing running and no model: both workers and the model are named.
    report = check_health(settings, db).as_dict()
    assert report["status"] == "unhealthy"
    assert _failing(report) == {"inference_worker", "delivery_worker", "production_model"}
    assert "answered a ping" in report["checks"]["inference_worker"]["detail"]

    register_and_promote(db, settings, "m-health")
    inference = WorkerProcess(settings, [settings.inference_queue], tmp_path).start()
    delivery = WorkerProcess(settings, [settings.delivery_queue], tmp_path).start()
    try:
        code, report = _cli_health(settings)
        assert code == 0 and report["status"] == "ok", report
        assert inference.name in report["checks"]["inference_worker"]["detail"]
        assert delivery.name in report["checks"]["delivery_worker"]["detail"]
        assert "m-health" in report["checks"]["production_model"]["detail"]
        status, report = _healthz(settings)
        assert status == 200 and _failing(report) == set(), report

        # A study queued for longer than the setting.
        with db.session() as s:
            s.add(Study(study_uid="1.2.3.4", state=StudyState.QUEUED,
                        queued_at=utcnow() - timedelta(hours=2)))
        code, report = _cli_health(settings)
        assert code == 1 and _failing(report) == {"queue_age"}, report
        assert re.search(r"oldest of 1 queued studies has waited 72\d\d s",
                         report["checks"]["queue_age"]["detail"]), report
        assert _failing(check_health(settings.replace(health_max_queue_age_seconds=3 * 3600),
                                     db).as_dict()) == set()
        status, report = _healthz(settings)
        assert status == 503 and _failing(report) == {"queue_age"}
        with db.session() as s:
            s.query(Study).delete()

        # The last nightly run failed; a later successful run turns it green again.
        with db.session() as s:
            s.add(RetrainRun(status="done", finished_at=utcnow() - timedelta(days=1),
                             started_at=utcnow() - timedelta(days=1)))
            s.add(RetrainRun(status="failed", reasons=["TrainingError: too few labels"],
                             started_at=utcnow(), finished_at=utcnow()))
        status, report = _healthz(settings)
        assert status == 503 and _failing(report) == {"nightly"}, report
        assert "too few labels" in report["checks"]["nightly"]["detail"]
        with db.session() as s:
            s.add(RetrainRun(status="failed", dry_run=True, started_at=utcnow()
                             + timedelta(seconds=5)))
        assert _failing(check_health(settings, db).as_dict()) == {"nightly"}
        with db.session() as s:
            s.add(RetrainRun(status="done", started_at=utcnow() + timedelta(seconds=10)))
        assert _failing(check_health(settings, db).as_dict()) == set()

        # The inference worker dies: only its check goes red.
        inference.kill()
        code, report = _cli_health(settings)
        assert code == 1 and _failing(report) == {"inference_worker"}, report
        # Then the delivery worker stops too.
        delivery.stop()
        status, report = _healthz(settings)
        assert status == 503
        assert _failing(report) == {"inference_worker", "delivery_worker"}
    finally:
        inference.kill()
        delivery.kill()


def test_health_reports_a_dead_broker_in_every_check_that_needs_it(
        pipeline: tuple[Settings, Database], refused_port: int) -> None:
    settings, db = pipeline
    register_and_promote(db, settings, "m-broker")
    dead = settings.replace(broker_url=f"redis://127.0.0.1:{refused_port}/0")
    report = check_health(dead, db).as_dict()
    assert {"broker", "inference_worker", "delivery_worker"} <= _failing(report)
    assert "production_model" not in _failing(report)


def test_nightly_check_names_a_failed_and_a_stuck_run(tmp_path: Path, make_settings) -> None:  # type: ignore[no-untyped-def]
    from worker.console.health import PipelineUnhealthyError, check_nightly

    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'n.db'}")
    db = Database(settings)
    try:
        assert check_nightly(db.engine) == "no nightly run yet"
        with db.session() as s:
            s.add(RetrainRun(status="running", started_at=utcnow() - timedelta(hours=2)))
        assert "running" in check_nightly(db.engine)
        with db.session() as s:
            s.add(RetrainRun(status="running", started_at=utcnow() - timedelta(hours=1),
                             dry_run=True))
            s.add(RetrainRun(status="running", started_at=utcnow() - timedelta(hours=1)))
            s.query(RetrainRun).filter(RetrainRun.dry_run.is_(False)).update(
                {"started_at": utcnow() - timedelta(hours=30)})
        with pytest.raises(PipelineUnhealthyError, match="never finished"):
            check_nightly(db.engine)
    finally:
        db.dispose()
