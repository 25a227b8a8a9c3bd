"""The delivery outbox against a real Orthanc: backoff while the PACS is down, a deadline,
exactly-once, and redelivery on request."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from db.broker import ANALYSE_TASK, make_celery
from db.models import Delivery, DeliveryState, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_cxr, make_study_files, write
from tests.support.services import wait_until
from tests.support.worker_data import add_study, register_and_promote
from tests.support.worker_process import WorkerProcess
from worker.delivery import backoff_seconds, create_deliveries, deliver, redeliver
from worker.outputs import OutputFile


@pytest.fixture
def db(settings: Settings) -> Iterator[Database]:
    database = Database(settings)
    yield database
    database.dispose()


def _outbox_row(db: Database, settings: Settings, tmp_path: Path) -> tuple[int, str]:
    ds = make_cxr()
    path = write(ds, tmp_path / "obj.dcm")
    study_id = add_study(db, settings, [path], state=StudyState.DONE)
    with db.session() as s:
        rows = create_deliveries(s, settings, study_id, None,
                                 [OutputFile("sc", str(ds.SOPInstanceUID), path)], utcnow())
        return rows[0].id, str(ds.StudyInstanceUID)


def _row(db: Database, delivery_id: int) -> Delivery:
    with db.session() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        return row


@pytest.mark.orthanc
def test_backoff_until_pacs_returns_then_exactly_once(db: Database, settings: Settings,
                                                      orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc = orthanc_factory()
    settings = settings.replace(pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                                delivery_backoff_seconds=10, delivery_backoff_max_seconds=25)
    delivery_id, study_uid = _outbox_row(db, settings, tmp_path)
    orthanc.stop()
    t0 = utcnow()
    first = deliver(db, settings, delivery_id, t0)
    assert first.status == "retry" and first.countdown == pytest.approx(10, abs=1)
    row = _row(db, delivery_id)
    assert row.state == DeliveryState.PENDING and row.attempts == 1 and row.reason
    # Not yet due: a duplicate message does nothing.
    assert deliver(db, settings, delivery_id, t0).status == "noop"
    assert _row(db, delivery_id).attempts == 1
    second = deliver(db, settings, delivery_id, t0 + timedelta(seconds=11))
    assert second.status == "retry" and second.countdown == pytest.approx(20, abs=1)
    assert [backoff_seconds(settings, n) for n in (1, 2, 3, 4)] == [10, 20, 25, 25]
    orthanc.start()
    done = deliver(db, settings, delivery_id, t0 + timedelta(seconds=40))
    assert done.status == "delivered"
    row = _row(db, delivery_id)
    assert row.state == DeliveryState.DELIVERED and row.attempts == 3 and row.delivered_at
    # Delivered is final: further messages send nothing.
    assert deliver(db, settings, delivery_id, t0 + timedelta(days=1)).status == "noop"
    assert len(orthanc.get("/instances")) == 1
    # Except on the operator's request.
    ids = redeliver(db, settings, study_uid, app=make_celery(settings))
    assert ids == [delivery_id] and _row(db, delivery_id).state == DeliveryState.PENDING
    assert deliver(db, settings, delivery_id).status == "delivered"
    assert len(orthanc.get("/instances")) == 1  # same SOP Instance UID, stored once


def test_deadline_turns_pending_into_failed(db: Database, settings: Settings,
                                            tmp_path: Path, refused_port: int) -> None:
    settings = settings.replace(pacs=f"NOBODY@127.0.0.1:{refused_port}",
                                delivery_deadline_seconds=30)
    delivery_id, _ = _outbox_row(db, settings, tmp_path)
    t0 = utcnow()
    assert deliver(db, settings, delivery_id, t0).status == "retry"
    last = deliver(db, settings, delivery_id, t0 + timedelta(seconds=60))
    assert last.status == "failed"
    row = _row(db, delivery_id)
    assert row.state == DeliveryState.FAILED and row.reason and "deadline passed" in row.reason


@pytest.mark.slow
@pytest.mark.orthanc
def test_pacs_down_while_worker_delivers(make_settings, sqlite_url: str, orthanc_factory,  # type: ignore[no-untyped-def]
                                         tmp_path: Path) -> None:
    """Real worker on Redis: Orthanc is down when the results are ready, comes back, and
    holds exactly one SR and one SC for the study."""
    from tests.support.services import redis_reachable

    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    orthanc = orthanc_factory()
    tag = uuid.uuid4().hex[:10]
    settings = make_settings(
        database_url=sqlite_url, broker_url="redis://127.0.0.1:6379/0",
        inference_queue=f"inference-{tag}", delivery_queue=f"delivery-{tag}",
        pacs=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        delivery_backoff_seconds=1, delivery_backoff_max_seconds=2)
    db = Database(settings)
    register_and_promote(db, settings, "m1")
    files = make_study_files(tmp_path / "in", n=1)
    study_id = add_study(db, settings, files)
    orthanc.stop()
    worker = WorkerProcess(settings, [settings.inference_queue, settings.delivery_queue],
                           tmp_path / "logs").start()
    try:
        make_celery(settings).send_task(ANALYSE_TASK, args=[study_id, 1],
                                        queue=settings.inference_queue)

        def attempts() -> int:
            with db.session() as s:
                return min((d.attempts for d in s.scalars(select(Delivery))), default=0)

        wait_until(lambda: attempts() >= 2, 120,
                   what=f"failed delivery attempts\n{worker.log()[-3000:]}")
        orthanc.start()

        def delivered() -> bool:
            with db.session() as s:
                rows = s.scalars(select(Delivery)).all()
                return len(rows) == 2 and all(r.state == DeliveryState.DELIVERED for r in rows)

        wait_until(delivered, 60, what=f"deliveries after the PACS is back\n{worker.log()[-3000:]}")
    finally:
        worker.stop()
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None
        study_uid = study.study_uid
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query":
                                         {"StudyInstanceUID": study_uid}, "Expand": True})
    modalities = sorted(orthanc.get(f"/instances/{i['ID']}/simplified-tags")["Modality"]
                        for i in found)
    assert len(found) == 2 and "SR" in modalities
    db.dispose()


def test_missing_outbox_file_fails_at_once_with_its_reason(
        db: Database, settings: Settings, tmp_path: Path, refused_port: int) -> None:
    settings = settings.replace(pacs=f"PACS@127.0.0.1:{refused_port}")
    delivery_id, _ = _outbox_row(db, settings, tmp_path)
    Path(_row(db, delivery_id).path).unlink()
    outcome = deliver(db, settings, delivery_id)
    assert outcome.status == "failed"
    row = _row(db, delivery_id)
    assert row.state == DeliveryState.FAILED and row.attempts == 1
    assert row.reason is not None and "outbox file missing" in row.reason


def test_a_study_goes_over_one_association_and_a_refused_class_fails_at_once(
        db: Database, settings: Settings, tmp_path: Path) -> None:
    """SR and SC of a study share one association; a PACS without any SR class fails the
    SR at once and for good, while the SC is delivered."""
    from pydicom.uid import ExplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.events import Event

    from dicom_node.results import write_dataset
    from dicom_node.sc import build_heatmap_sc
    from dicom_node.sr import build_sr
    from tests.support.results_factory import make_model, make_result, scored

    associations: list[int] = []
    classes: list[str] = []

    def on_store(event: Event) -> int:
        associations.append(id(event.assoc))
        classes.append(str(event.context.abstract_syntax))
        return 0x0000

    ae = AE(ae_title="SC_ONLY")
    ae.add_supported_context("1.2.840.10008.5.1.4.1.1.7", [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False,
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
    port = server.server_address[1]
    try:
        settings = settings.replace(pacs=f"SC_ONLY@127.0.0.1:{port}")
        source = make_cxr(rows=64, cols=64)
        src_path = write(source, tmp_path / "src.dcm")
        study_id = add_study(db, settings, [src_path], state=StudyState.DONE)
        sr = write_dataset(build_sr(make_result([source])), tmp_path / "out")
        sc = write_dataset(build_heatmap_sc(scored(source, 0.8), make_model()),
                           tmp_path / "out")
        with db.session() as s:
            rows = create_deliveries(s, settings, study_id, None, [
                OutputFile("sr", sr.stem, sr), OutputFile("sc", sc.stem, sc)], utcnow())
            sr_id, sc_id = rows[0].id, rows[1].id
        outcome = deliver(db, settings, sr_id)
        assert outcome.status == "failed"
        assert outcome.reason == "PACS does not accept Comprehensive 3D SR Storage"
        assert _row(db, sr_id).attempts == 1
        assert _row(db, sc_id).state == DeliveryState.DELIVERED
        assert classes == ["1.2.840.10008.5.1.4.1.1.7"] and len(set(associations)) == 1
        # The SC's own message finds nothing left to do.
        assert deliver(db, settings, sc_id).status == "noop"
    finally:
        server.shutdown()
