"""Is the pipeline able to do its job?  Each check by name, as JSON.

- ``database``: reachable, schema version;
- ``broker``: reachable;
- ``disk``: free space above ``min_free_mb``;
- ``inference_worker`` / ``delivery_worker``: at least one worker consuming the inference
  (delivery) queue answers a broadcast through the broker within ``health_ping_timeout``;
- ``queue_age``: the oldest ``queued`` study has waited at most
  ``health_max_queue_age_seconds``;
- ``production_model``: a model is in production;
- ``nightly``: the last nightly run (dry runs aside) did not fail, and has not been
  "running" for more than a day.

Served at ``/healthz`` by the web page (200 healthy, 503 not) and printed by
``cxr-triage health`` (exit 1 when unhealthy), so that compose health checks, systemd
watchdogs and load balancers ask the same question.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from db.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "checks": {c.name: {"ok": c.ok, "detail": c.detail, "seconds": round(c.seconds, 4)}
                       for c in self.checks},
        }


def _timed(name: str, fn: Any) -> Check:
    t0 = time.perf_counter()
    try:
        detail = str(fn())
        ok = True
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported check
        detail = f"{type(exc).__name__}: {exc}"[:300]
        ok = False
    return Check(name, ok, detail, time.perf_counter() - t0)


def check_database(settings: Settings, db: Any = None) -> str:
    from sqlalchemy import text

    from db.session import make_engine

    engine = db.engine if db is not None else make_engine(settings)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        if db is None:
            engine.dispose()
    return f"reachable, schema {version}"


def check_broker(settings: Settings, timeout: float = 3.0) -> str:
    if settings.uses_embedded_broker:
        folder = settings.broker_dir / "in"
        if not folder.is_dir():
            raise FileNotFoundError(f"broker folder {folder} is missing")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"broker folder {folder} is not writable")
        return f"filesystem broker at {folder}"
    from kombu.connection import Connection

    with Connection(settings.effective_broker_url,  # type: ignore[no-untyped-call]
                    connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        return f"{conn.transport_cls} broker reachable"


def check_disk(settings: Settings) -> str:
    path = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < settings.min_free_mb:
        raise OSError(f"{free_mb:.0f} MB free under {path}, below min_free_mb "
                      f"{settings.min_free_mb}")
    return f"{free_mb:.0f} MB free"


#: A nightly run still "running" after this long was killed or is stuck.
STALE_RUN_SECONDS = 24 * 3600.0


class PipelineUnhealthyError(RuntimeError):
    """A part of the pipeline is missing or stuck: an operator's matter."""


def check_worker(settings: Settings, queue: str, answers: dict[str, list[str]]) -> str:
    workers = answers.get(queue, [])
    if not workers:
        raise PipelineUnhealthyError(
            f"no worker consuming queue {queue!r} answered a ping within "
            f"{settings.health_ping_timeout:g} s")
    return f"{len(workers)} answered: {', '.join(workers)}"


def _engine(settings: Settings, db: Any) -> Any:
    from db.session import make_engine

    return db.engine if db is not None else make_engine(settings)


def check_queue_age(settings: Settings, engine: Any) -> str:
    from sqlalchemy import func, select
    from sqlalchemy.orm import Session

    from db.models import Study, StudyState, as_utc, utcnow

    with Session(engine) as s:
        n, oldest = s.execute(
            select(func.count(), func.min(func.coalesce(Study.queued_at, Study.received_at)))
            .where(Study.state == StudyState.QUEUED)).one()
    since = as_utc(oldest)
    if since is None:
        return "no study queued"
    age = (utcnow() - since).total_seconds()
    limit = settings.health_max_queue_age_seconds
    if age > limit:
        raise PipelineUnhealthyError(
            f"oldest of {n} queued studies has waited {age:.0f} s, above "
            f"health_max_queue_age_seconds {limit:g}")
    return f"{n} queued, oldest {age:.0f} s"


def check_production_model(engine: Any) -> str:
    from sqlalchemy.orm import Session

    from trainer.registry import production_model

    with Session(engine) as s:
        model = production_model(s)
        if model is None:
            raise PipelineUnhealthyError("no model in production: studies cannot be scored")
        return f"{model.version} ({model.architecture}, threshold {model.threshold:.4f})"


def check_nightly(engine: Any) -> str:
    from sqlalchemy import select
    from sqlalchemy.orm import Session

    from db.models import RetrainRun, as_utc, utcnow

    with Session(engine) as s:
        run = s.scalars(select(RetrainRun).where(RetrainRun.dry_run.is_(False))
                        .order_by(RetrainRun.started_at.desc(), RetrainRun.id.desc())
                        .limit(1)).first()
        if run is None:
            return "no nightly run yet"
        started = as_utc(run.started_at)
        if run.status == "running" and started is not None \
                and (utcnow() - started).total_seconds() > STALE_RUN_SECONDS:
            raise PipelineUnhealthyError(
                f"nightly run {run.id} started at {started} and never finished "
                "(killed or stuck)")
        if run.status == "failed":
            reasons = "; ".join(str(r) for r in run.reasons or [])[:200]
            raise PipelineUnhealthyError(
                f"last nightly run {run.id} failed at {run.finished_at or run.started_at}: "
                f"{reasons or 'no reason recorded'}")
        return f"run {run.id} {run.status} at {run.finished_at or run.started_at}"


CHECK_NAMES = ("database", "broker", "disk", "inference_worker", "delivery_worker",
               "queue_age", "production_model", "nightly")
#: What one process needs to work at all (container liveness); the rest is the pipeline.
NODE_CHECKS = ("database", "broker", "disk")


def check_health(settings: Settings, db: Any = None,
                 only: Collection[str] | None = None) -> HealthReport:
    """Run every check (or those named in ``only``); none raises.  One broadcast answers
    both worker checks."""
    unknown = set(only or ()) - set(CHECK_NAMES)
    if unknown:
        raise ValueError(f"unknown health checks {sorted(unknown)}; known: {CHECK_NAMES}")
    if only and not set(only) - set(NODE_CHECKS):
        return HealthReport([c for c in _node_checks(settings, db) if c.name in only])
    report = _all_checks(settings, db)
    return HealthReport([c for c in report.checks if not only or c.name in only])


def _node_checks(settings: Settings, db: Any) -> list[Check]:
    return [
        _timed("database", lambda: check_database(settings, db)),
        _timed("broker", lambda: check_broker(settings)),
        _timed("disk", lambda: check_disk(settings)),
    ]


def _all_checks(settings: Settings, db: Any) -> HealthReport:
    checks = _node_checks(settings, db)
    from worker.probes import workers_by_queue

    t0 = time.perf_counter()
    answers: dict[str, list[str]] = {}
    ping_error: Exception | None = None
    try:
        answers = workers_by_queue(settings)
    except Exception as exc:  # noqa: BLE001 - reported as both worker checks
        ping_error = exc
    ping_seconds = time.perf_counter() - t0

    def worker(queue: str) -> str:
        if ping_error is not None:
            raise ping_error
        return check_worker(settings, queue, answers)

    for name, queue in (("inference_worker", settings.inference_queue),
                        ("delivery_worker", settings.delivery_queue)):
        check = _timed(name, lambda q=queue: worker(q))
        checks.append(Check(check.name, check.ok, check.detail, ping_seconds))
    engine = _engine(settings, db)
    try:
        checks += [
            _timed("queue_age", lambda: check_queue_age(settings, engine)),
            _timed("production_model", lambda: check_production_model(engine)),
            _timed("nightly", lambda: check_nightly(engine)),
        ]
    finally:
        if db is None:
            engine.dispose()
    return HealthReport(checks)
