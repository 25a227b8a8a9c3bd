"""The analysis state machine and the reconciler, called as plain functions on SQLite and
PostgreSQL: which messages have work to do, attempt budgets, waiting for a model."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from kombu import Connection
from sqlalchemy import func, select

from db.broker import ANALYSE_TASK, DELIVER_TASK, make_celery
from db.models import Analysis, Delivery, DeliveryState, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_study_files
from tests.support.worker_data import add_study
from worker.analysis import Claim, Outcome, claim, mark_failed
from worker.model_cache import NO_PRODUCTION_MODEL, ModelCache
from worker.reconciler import reconcile_once


@pytest.fixture
def db(settings: Settings) -> Database:
    database = Database(settings)
    yield database  # type: ignore[misc]
    database.dispose()


def _study(db: Database, settings: Settings, tmp_path: Path, **kw: object) -> int:
    return add_study(db, settings, make_study_files(tmp_path / "in", n=1), **kw)  # type: ignore[arg-type]


def _state(db: Database, study_id: int) -> tuple[str, str | None, int]:
    with db.session() as s:
        st = s.get(Study, study_id)
        assert st is not None
        return st.state, st.reason, st.attempts


def test_no_production_model_leaves_study_waiting(db: Database, settings: Settings,
                                                  tmp_path: Path) -> None:
    study_id = _study(db, settings, tmp_path)
    out = claim(db, settings, ModelCache(settings), study_id, 1)
    assert isinstance(out, Outcome) and out.status == "waiting"
    assert _state(db, study_id) == (StudyState.QUEUED, NO_PRODUCTION_MODEL, 0)


def test_messages_with_nothing_to_do(db: Database, settings: Settings, tmp_path: Path) -> None:
    cache = ModelCache(settings)
    assert claim(db, settings, cache, 999_999, 1).status == "missing"  # type: ignore[union-attr]
    stale = _study(db, settings, tmp_path / "a", generation=2)
    assert claim(db, settings, cache, stale, 1).status == "stale"  # type: ignore[union-attr]
    receiving = _study(db, settings, tmp_path / "b", state=StudyState.RECEIVING)
    assert claim(db, settings, cache, receiving, 1).status == "not_ready"  # type: ignore[union-attr]
    done = _study(db, settings, tmp_path / "c", state=StudyState.DONE)
    assert claim(db, settings, cache, done, 1).status == "duplicate"  # type: ignore[union-attr]
    # None of them was touched.
    assert _state(db, stale)[0] == StudyState.QUEUED
    assert _state(db, receiving)[0] == StudyState.RECEIVING
    assert _state(db, done)[0] == StudyState.DONE


def test_attempt_budget_stops_redelivery_loops(db: Database, settings: Settings,
                                               tmp_path: Path) -> None:
    from tests.support.worker_data import register_and_promote

    settings = settings.replace(max_analysis_attempts=2)
    register_and_promote(db, settings, "m-attempts")
    study_id = _study(db, settings, tmp_path)
    cache = ModelCache(settings)
    # Two claims that never finish (as when a worker is SIGKILLed each time) ...
    for attempt in (1, 2):
        got = claim(db, settings, cache, study_id, 1)
        assert isinstance(got, Claim) and got.attempt == attempt
        assert _state(db, study_id)[0] == StudyState.ANALYSING
    # ... and the third delivery of the message gives up with a reason.
    out = claim(db, settings, cache, study_id, 1)
    assert isinstance(out, Outcome) and out.status == "gave_up"
    state, reason, _ = _state(db, study_id)
    assert state == StudyState.FAILED and reason and "gave up after 2 attempts" in reason
    with db.session() as s:
        rows = s.scalars(select(Analysis).where(Analysis.study_id == study_id)).all()
        assert [(a.state, a.reason) for a in rows] == [("failed", reason)]
    # A late duplicate is a no-op.
    assert claim(db, settings, cache, study_id, 1).status == "duplicate"  # type: ignore[union-attr]


def test_transient_retries_keep_their_budget_and_record_the_error(
        db: Database, settings: Settings, tmp_path: Path) -> None:
    """Celery's retries after a transient fault claim the study again and spend the one
    budget; Celery's last retry is the budget's last try and must still run, so the study
    fails with the real error, not as a lost redelivery."""
    from tests.support.worker_data import register_and_promote
    from worker.analysis import mark_failed

    settings = settings.replace(max_analysis_attempts=6)
    register_and_promote(db, settings, "m-transient")
    study_id = _study(db, settings, tmp_path)
    cache = ModelCache(settings)
    for attempt in range(1, settings.max_analysis_attempts + 1):  # the first try and 5 retries
        got = claim(db, settings, cache, study_id, 1)
        assert isinstance(got, Claim) and got.attempt == attempt
    assert mark_failed(db, study_id, 1, "transient failure after 6 tries: OperationalError")
    state, reason, _ = _state(db, study_id)
    assert state == StudyState.FAILED and reason == (
        "transient failure after 6 tries: OperationalError")


def test_mark_failed_ignores_stale_generation(db: Database, settings: Settings,
                                              tmp_path: Path) -> None:
    study_id = _study(db, settings, tmp_path, generation=3)
    assert mark_failed(db, study_id, 2, "broker unavailable") is False
    assert _state(db, study_id)[0] == StudyState.QUEUED
    assert mark_failed(db, study_id, 3, "broker unavailable") is True
    assert _state(db, study_id)[:2] == (StudyState.FAILED, "broker unavailable")


def _drain(settings: Settings, queue: str) -> list[tuple[str, list[int]]]:
    """Every message waiting on ``queue`` as (task name, args), consumed from the broker."""
    app = make_celery(settings)
    out: list[tuple[str, list[int]]] = []
    with Connection(app.conf.broker_url,
                    transport_options=app.conf.broker_transport_options) as conn:
        q = conn.SimpleQueue(queue)
        try:
            while True:
                try:
                    msg = q.get(block=True, timeout=1)
                except q.Empty:
                    break
                out.append((msg.headers["task"], list(msg.decode()[0])))
                msg.ack()
        finally:
            q.close()
    return out


def test_reconciler_republishes_lost_work(db: Database, settings: Settings,
                                          tmp_path: Path) -> None:
    """Runs on the embedded filesystem broker: the messages are real files a worker reads."""
    settings = settings.replace(reconcile_after_seconds=60, visibility_timeout=100)
    app = make_celery(settings)
    now = utcnow()
    old = now - timedelta(seconds=120)
    queued = _study(db, settings, tmp_path / "q")
    analysing = _study(db, settings, tmp_path / "a", state=StudyState.ANALYSING, generation=2)
    # Older than reconcile_after but within the visibility timeout: may still be running.
    running = _study(db, settings, tmp_path / "r", state=StudyState.ANALYSING)
    fresh = _study(db, settings, tmp_path / "f")
    done = _study(db, settings, tmp_path / "d", state=StudyState.DONE)
    with db.session() as s:
        for sid in (queued, analysing, done):
            st = s.get(Study, sid)
            assert st is not None
            st.updated_at = old
            st.published_at = old
        st = s.get(Study, running)
        assert st is not None
        st.updated_at = st.published_at = now - timedelta(seconds=80)
        common = dict(study_id=done, kind="sr", path="/x", deadline_at=now + timedelta(days=1))
        s.add_all([
            Delivery(sop_instance_uid="1.2.3.1", destination="A@h:1", updated_at=old,
                     next_attempt_at=old, **common),  # lost: republish
            Delivery(sop_instance_uid="1.2.3.2", destination="A@h:1", updated_at=old,
                     next_attempt_at=now + timedelta(seconds=30), **common),  # not yet due
            Delivery(sop_instance_uid="1.2.3.3", destination="A@h:1", updated_at=old,
                     next_attempt_at=old, state=DeliveryState.SENDING, **common),  # died
            Delivery(sop_instance_uid="1.2.3.4", destination="A@h:1", updated_at=old,
                     next_attempt_at=old, state=DeliveryState.DELIVERED, **common),
        ])
    report = reconcile_once(db, settings, app, now)
    assert sorted(report.studies) == sorted([queued, analysing])
    assert fresh not in report.studies and running not in report.studies
    with db.session() as s:
        ids = dict(s.execute(select(Delivery.sop_instance_uid, Delivery.id)).all())
        states = dict(s.execute(select(Delivery.sop_instance_uid, Delivery.state)).all())
    assert sorted(report.deliveries) == sorted([ids["1.2.3.1"], ids["1.2.3.3"]])
    assert states["1.2.3.3"] == DeliveryState.PENDING
    assert sorted(_drain(settings, settings.inference_queue)) == sorted(
        [(ANALYSE_TASK, [queued, 1]), (ANALYSE_TASK, [analysing, 2])])
    assert sorted(_drain(settings, settings.delivery_queue)) == sorted(
        [(DELIVER_TASK, [ids["1.2.3.1"]]), (DELIVER_TASK, [ids["1.2.3.3"]])])
    # A second pass right away publishes nothing again (no flood while a worker is down).
    again = reconcile_once(db, settings, app, now + timedelta(seconds=1))
    assert again.studies == [] and again.deliveries == []
    with db.session() as s:
        assert s.scalar(select(func.count()).select_from(Delivery)) == 4
