"""The one owner of study and delivery state: the tables, the named transitions, and that
nobody else writes ``state``."""

from __future__ import annotations

import ast
import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db import lifecycle
from db.lifecycle import (
    DELIVERY_TRANSITIONS,
    STUDY_TRANSITIONS,
    AnalyseStatus,
    DeliveryStatus,
    IllegalTransitionError,
)
from db.models import Delivery, DeliveryState, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def db(settings: Settings) -> Database:
    database = Database(settings)
    yield database  # type: ignore[misc]
    database.dispose()


def test_every_state_has_a_row_in_its_table() -> None:
    assert set(STUDY_TRANSITIONS) == set(StudyState)
    assert set(DELIVERY_TRANSITIONS) == set(DeliveryState)
    # Finished studies only reopen; a delivered row goes back only on request.
    for done in (StudyState.DONE, StudyState.SKIPPED, StudyState.FAILED):
        assert STUDY_TRANSITIONS[done] == {StudyState.RECEIVING}
    assert DELIVERY_TRANSITIONS[DeliveryState.DELIVERED] == {DeliveryState.PENDING}


def test_statuses_are_str_enums_with_the_stored_values() -> None:
    assert AnalyseStatus.WAITING == "waiting" and DeliveryStatus.RETRY == "retry"
    assert json.dumps({"status": AnalyseStatus.GAVE_UP}) == '{"status": "gave_up"}'
    assert StudyState("skipped") is StudyState.SKIPPED


def _study(s, state: StudyState = StudyState.RECEIVING) -> Study:  # type: ignore[no-untyped-def]
    now = utcnow()
    study = Study(study_uid="1.2.3.4", state=state, received_at=now, updated_at=now,
                  last_instance_at=now, generation=1)
    s.add(study)
    s.flush()
    return study


def test_an_illegal_move_is_refused_and_leaves_the_row(db: Database) -> None:
    with db.session() as s:
        study = _study(s)
        with pytest.raises(IllegalTransitionError, match="receiving -> analysing"):
            lifecycle.start_analysis(study, utcnow())
        assert study.state == StudyState.RECEIVING
        with pytest.raises(IllegalTransitionError):
            lifecycle.finish_study(study, StudyState.QUEUED, None, utcnow())


def test_queueing_is_compare_and_set(db: Database) -> None:
    with db.session() as s:
        study = _study(s)
        study_id, last = study.id, study.last_instance_at
    now = utcnow()
    with db.session() as s:
        # An instance arrived meanwhile: the stale last_instance_at loses.
        assert not lifecycle.queue_quiet_study(s, study_id, 1, last - timedelta(seconds=1), now)
        assert lifecycle.queue_quiet_study(s, study_id, 1, last, now)
        assert not lifecycle.queue_quiet_study(s, study_id, 1, last, now)  # already queued
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state == StudyState.QUEUED
        assert lifecycle.reopen_study(study) == StudyState.QUEUED
        assert study.state == StudyState.RECEIVING and study.generation == 2


def test_a_delivery_is_claimed_once(db: Database) -> None:
    now = utcnow()
    with db.session() as s:
        study = _study(s, StudyState.DONE)
        row = Delivery(study_id=study.id, kind="sr", sop_instance_uid="1.2.3.4.5",
                       destination="PACS@127.0.0.1:104", path="/x.dcm",
                       state=lifecycle.DELIVERY_INITIAL, attempts=0, next_attempt_at=now,
                       deadline_at=now + timedelta(hours=1), created_at=now, updated_at=now)
        s.add(row)
        s.flush()
        delivery_id = row.id
    with db.session() as s:
        assert lifecycle.claim_delivery(s, delivery_id, now, now)
        assert not lifecycle.claim_delivery(s, delivery_id, now, now)
    with db.session() as s:
        row = s.scalars(select(Delivery)).one()
        assert row.state == DeliveryState.SENDING and row.attempts == 1
        lifecycle.delivery_sent(row, now)
        with pytest.raises(IllegalTransitionError):
            lifecycle.delivery_failed(row, "late")
        lifecycle.redeliver(row, now, now + timedelta(hours=1))
        assert row.state == DeliveryState.PENDING and row.attempts == 0


def test_nobody_else_writes_state() -> None:
    """No assignment to ``<x>.state`` and no ``state=`` in an UPDATE outside db.lifecycle
    (analyses, which have their own small life, aside)."""
    offenders = []
    for package in ("db", "dicom_node", "trainer", "worker"):
        for path in (REPO / package).rglob("*.py"):
            if path.name == "lifecycle.py" or "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        if (isinstance(target, ast.Attribute) and target.attr == "state"
                                and "AnalysisState" not in ast.unparse(node.value)):
                            offenders.append(f"{path.name}:{node.lineno}")
                if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                        and node.func.attr == "values"
                        and any(k.arg == "state" for k in node.keywords)):
                    offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []
