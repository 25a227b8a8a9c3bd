"""A real ``celery -A worker worker`` subprocess on each broker: Redis (unique queue names
per test) and the embedded filesystem transport."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.broker import ANALYSE_TASK, make_celery
from db.models import Study, StudyState
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_study_files
from tests.support.services import wait_until
from tests.support.worker_data import add_study
from tests.support.worker_process import WorkerProcess
from worker.model_cache import NO_PRODUCTION_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(params=["redis", "filesystem"])
def broker_settings(request: pytest.FixtureRequest, make_settings, sqlite_url: str) -> Settings:  # type: ignore[no-untyped-def]
    tag = uuid.uuid4().hex[:10]
    overrides: dict[str, object] = dict(
        database_url=sqlite_url, inference_queue=f"inference-{tag}",
        delivery_queue=f"delivery-{tag}")
    if request.param == "redis":
        from tests.support.services import redis_reachable

        if not redis_reachable():
            pytest.skip("Redis is not reachable at 127.0.0.1:6379")
        overrides["broker_url"] = "redis://127.0.0.1:6379/0"
    return make_settings(**overrides)  # type: ignore[no-any-return]


@pytest.fixture
def worker_factory(tmp_path: Path) -> Iterator:  # type: ignore[type-arg]
    started: list[WorkerProcess] = []

    def start(settings: Settings, queues: list[str] | None = None, **kw: object) -> WorkerProcess:
        w = WorkerProcess(settings, queues or [settings.inference_queue, settings.delivery_queue],
                          tmp_path / "logs", **kw)  # type: ignore[arg-type]
        started.append(w)
        return w.start()

    yield start
    for w in started:
        w.stop()


def test_worker_consumes_from_broker_and_waits_without_model(
        broker_settings: Settings, worker_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = broker_settings
    db = Database(settings)
    study_id = add_study(db, settings, make_study_files(tmp_path / "in", n=1))
    worker = worker_factory(settings)
    make_celery(settings).send_task(ANALYSE_TASK, args=[study_id, 1],
                                    queue=settings.inference_queue)

    def waited() -> bool:
        with db.session() as s:
            st = s.get(Study, study_id)
            return st is not None and st.reason == NO_PRODUCTION_MODEL

    wait_until(waited, 60, what=f"worker to mark the study waiting\n{worker.log()[-3000:]}")
    with db.session() as s:
        st = s.get(Study, study_id)
        assert st is not None and st.state == StudyState.QUEUED and st.attempts == 0
    assert "no production model registered" in worker.log()
    db.dispose()


# ------------------------------------------------------------------ with a real model
def _analyses(db: Database, study_id: int) -> list[tuple[str, str | None]]:
    from sqlalchemy import select

    from db.models import Analysis, ModelVersion

    with db.session() as s:
        return [(a, v) for a, v in s.execute(
            select(Analysis.state, ModelVersion.version)
            .join(ModelVersion, ModelVersion.id == Analysis.model_version_id, isouter=True)
            .where(Analysis.study_id == study_id).order_by(Analysis.id)).all()]


def _study_state(db: Database, study_id: int) -> str:
    with db.session() as s:
        st = s.get(Study, study_id)
        assert st is not None
        return st.state


def _redis_settings(make_settings, database_url: str, **kw: object) -> Settings:  # type: ignore[no-untyped-def]
    from tests.support.services import redis_reachable

    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    tag = uuid.uuid4().hex[:10]
    return make_settings(database_url=database_url, broker_url="redis://127.0.0.1:6379/0",  # type: ignore[no-any-return]
                         inference_queue=f"inference-{tag}", delivery_queue=f"delivery-{tag}",
                         **kw)


def test_model_hot_reload(make_settings, sqlite_url: str, worker_factory,  # type: ignore[no-untyped-def]
                          tmp_path: Path) -> None:
    from tests.support.worker_data import register_and_promote

    settings = _redis_settings(make_settings, sqlite_url)
    db = Database(settings)
    register_and_promote(db, settings, "m-one")
    worker = worker_factory(settings, [settings.inference_queue])
    app = make_celery(settings)
    first = add_study(db, settings, make_study_files(tmp_path / "a", n=1))
    app.send_task(ANALYSE_TASK, args=[first, 1], queue=settings.inference_queue)
    wait_until(lambda: _study_state(db, first) == StudyState.DONE, 90,
               what=f"first study analysed\n{worker.log()[-3000:]}")
    register_and_promote(db, settings, "m-two", seed=3)  # while the worker runs
    second = add_study(db, settings, make_study_files(tmp_path / "b", n=1))
    app.send_task(ANALYSE_TASK, args=[second, 1], queue=settings.inference_queue)
    wait_until(lambda: _study_state(db, second) == StudyState.DONE, 90,
               what=f"second study analysed\n{worker.log()[-3000:]}")
    assert _analyses(db, first) == [("done", "m-one")]
    assert _analyses(db, second) == [("done", "m-two")]
    assert "model loaded version=m-two" in worker.log()
    assert worker.alive()  # no restart
    db.dispose()


def test_sigkill_mid_task_still_analysed_exactly_once(make_settings, database_url: str,  # type: ignore[no-untyped-def]
                                                      worker_factory, tmp_path: Path) -> None:
    """A worker is SIGKILLed while it computes a slow occlusion map; the unacked message
    comes back from Redis to a new worker, and the study ends with one analysis, one set
    of predictions and one set of outbox rows."""
    from sqlalchemy import func, select

    from db.models import Analysis, Delivery, Prediction
    from tests.support.worker_data import register_and_promote

    settings = _redis_settings(make_settings, database_url, pacs="PACS@127.0.0.1:1",
                               heatmap_method="occlusion", occlusion_size=16,
                               occlusion_stride=2, occlusion_batch=16)
    db = Database(settings)
    register_and_promote(db, settings, "m-slow", input_size=256)
    study_id = add_study(db, settings, make_study_files(tmp_path / "a", n=1, rows=256, cols=256))
    slow = worker_factory(settings, [settings.inference_queue])
    make_celery(settings).send_task(ANALYSE_TASK, args=[study_id, 1],
                                    queue=settings.inference_queue)
    wait_until(lambda: _study_state(db, study_id) == StudyState.ANALYSING, 60,
               what=f"the worker to claim the study\n{slow.log()[-3000:]}")
    slow.wait_for_log("model loaded", 60)  # well into the task
    slow.kill()
    assert _study_state(db, study_id) == StudyState.ANALYSING
    # The replacement restores unacked messages older than its visibility timeout.
    fast = worker_factory(settings.replace(heatmap_method="gradcam", visibility_timeout=1),
                          [settings.inference_queue])
    wait_until(lambda: _study_state(db, study_id) == StudyState.DONE, 120,
               what=f"the study analysed after the kill\n{fast.log()[-3000:]}")
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Analysis)) == 1
        assert s.scalar(select(func.count()).select_from(Prediction)) == 1
        assert s.scalar(select(func.count()).select_from(Delivery)) == 2
        study = s.get(Study, study_id)
        assert study is not None and study.attempts == 0
    db.dispose()


def test_broker_outage_studies_wait_then_analysed(make_settings, sqlite_url: str,  # type: ignore[no-untyped-def]
                                                  worker_factory, tmp_path: Path) -> None:
    from datetime import timedelta

    from db.models import utcnow
    from tests.support.worker_data import register_and_promote
    from tests.support.worker_process import RedisServer
    from worker.reconciler import reconcile_once

    redis = RedisServer(tmp_path / "redis")
    redis.start()
    try:
        settings = make_settings(database_url=sqlite_url, broker_url=redis.url,
                                 reconcile_after_seconds=1)
        db = Database(settings)
        register_and_promote(db, settings, "m1")
        worker = worker_factory(settings, [settings.inference_queue])
        redis.stop()
        study_id = add_study(db, settings, make_study_files(tmp_path / "a", n=1))
        app = make_celery(settings)
        app.conf.update(task_publish_retry=False, broker_connection_retry=False,
                        broker_connection_max_retries=0)
        later = utcnow() + timedelta(seconds=5)
        report = reconcile_once(db, settings, app, later)
        assert report.publish_errors == 1 and report.studies == []
        assert _study_state(db, study_id) == StudyState.QUEUED  # waits, nothing lost
        redis.start()  # same port: the worker reconnects by itself
        app = make_celery(settings)
        report = reconcile_once(db, settings, app, later)
        assert report.studies == [study_id]
        wait_until(lambda: _study_state(db, study_id) == StudyState.DONE, 120,
                   what=f"study analysed after the outage\n{worker.log()[-3000:]}")
        assert _analyses(db, study_id) == [("done", "m1")]
        db.dispose()
    finally:
        redis.stop()


def test_an_internal_error_fails_the_study_with_its_reason(make_settings, sqlite_url: str,  # type: ignore[no-untyped-def]
                                                           worker_factory,
                                                           tmp_path: Path) -> None:
    """A fault that is neither bad input nor transient (here the outbox cannot be written)
    is recorded on the study at once, with the error, instead of waiting for the
    reconciler to give up."""
    from sqlalchemy import select

    from db.models import Study
    from tests.support.worker_data import register_and_promote

    settings = _redis_settings(make_settings, sqlite_url)
    db = Database(settings)
    register_and_promote(db, settings, "m-internal")
    settings.outbox_dir.rmdir()
    settings.outbox_dir.write_text("not a directory")
    worker = worker_factory(settings, [settings.inference_queue])
    study_id = add_study(db, settings, make_study_files(tmp_path / "a", n=1))
    make_celery(settings).send_task(ANALYSE_TASK, args=[study_id, 1],
                                    queue=settings.inference_queue)
    wait_until(lambda: _study_state(db, study_id) == StudyState.FAILED, 90,
               what=f"study failed\n{worker.log()[-3000:]}")
    with db.session() as s:
        reason = s.scalars(select(Study.reason).where(Study.id == study_id)).one()
    assert reason is not None and reason.startswith("internal error: ")
    assert worker.alive()
    db.dispose()
