"""Task policy in process: the app factory builds an app from the settings it is given (no
environment), the retry policy is the one declared on the tasks, and the tasks run their
real code against a real database.  ``tests/test_worker_celery.py`` covers real workers."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery.utils.time import get_exponential_backoff_interval
from sqlalchemy.exc import OperationalError

from db.broker import ANALYSE_TASK, DELIVER_TASK, RECONCILE_TASK
from db.models import Study, StudyState
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_study_files
from tests.support.worker_data import add_study
from worker.app import create_app
from worker.tasks import RETRY_POLICY, TRANSIENT, app_settings, runtime


@pytest.fixture
def db(settings: Settings) -> Database:
    database = Database(settings)
    yield database  # type: ignore[misc]
    database.dispose()


@pytest.fixture
def app(settings: Settings) -> Iterator[Any]:
    """An app for ``settings``; the database its tasks opened is closed afterwards."""
    celery_app = create_app(settings)
    yield celery_app
    runtime(celery_app).db.dispose()


def test_the_factory_builds_from_the_settings_it_is_given(make_settings) -> None:  # type: ignore[no-untyped-def]
    a = create_app(make_settings(max_analysis_attempts=4))
    b = create_app(make_settings(max_analysis_attempts=8))
    assert app_settings(a).max_analysis_attempts == 4
    assert app_settings(b).max_analysis_attempts == 8
    # One budget: the first try and Celery's retries together make the study's attempts.
    assert a.tasks[ANALYSE_TASK].max_retries == 3
    assert b.tasks[ANALYSE_TASK].max_retries == 7
    assert set(a.tasks) >= {ANALYSE_TASK, DELIVER_TASK, RECONCILE_TASK}


def test_retry_policy_is_declared_on_the_tasks(make_settings) -> None:  # type: ignore[no-untyped-def]
    app = create_app(make_settings(max_analysis_attempts=6))
    analyse, deliver = app.tasks[ANALYSE_TASK], app.tasks[DELIVER_TASK]
    for task in (analyse, deliver):
        assert task.autoretry_for == TRANSIENT
        assert task.retry_backoff == RETRY_POLICY["retry_backoff"] and task.retry_jitter is False
        assert task.acks_late and task.reject_on_worker_lost
    assert deliver.max_retries is None  # bounded by the delivery deadline, not a count
    assert app.tasks[RECONCILE_TASK].max_retries == 0
    # Celery's own backoff for this policy: 2 s, 4 s, 8 s, ... capped at 300 s.
    waits = [get_exponential_backoff_interval(factor=2, retries=n, maximum=300,
                                              full_jitter=False) for n in range(9)]
    assert waits == [2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_tasks_run_in_process_against_the_database(db: Database, app: Any) -> None:
    missing = app.tasks[ANALYSE_TASK].apply(args=[999_999, 1]).get()
    assert missing["status"] == "missing"
    noop = app.tasks[DELIVER_TASK].apply(args=[999_999]).get()
    assert noop["status"] == "noop"


def test_spent_retries_record_the_real_error_on_the_study(db: Database, settings: Settings,
                                                         app: Any, tmp_path: Path) -> None:
    from tests.support.worker_data import register_and_promote

    register_and_promote(db, settings, "m-policy")
    study_id = add_study(db, settings, make_study_files(tmp_path / "in", n=1))
    task = app.tasks[ANALYSE_TASK]
    exc = OperationalError("SELECT 1", {}, ConnectionError("database went away"))
    task.on_failure(exc, "task-1", (study_id, 1), {}, None)
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state == StudyState.FAILED
        assert study.reason is not None
        assert study.reason.startswith("transient failure after 1 tries: OperationalError")
    # Bad input is not infrastructure trouble: the hook leaves such failures alone.
    other = add_study(db, settings, make_study_files(tmp_path / "b", n=1))
    task.on_failure(ValueError("ours"), "task-2", (other, 1), {}, None)
    with db.session() as s:
        assert s.get(Study, other).state == StudyState.QUEUED  # type: ignore[union-attr]
