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
