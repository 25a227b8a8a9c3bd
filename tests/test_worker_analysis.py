"""Analysis end to end as plain function calls, with a real (tiny, randomly initialised)
registered model: what is stored, what is skipped and why, idempotency, re-analysis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from sqlalchemy import func, select

from db.models import Analysis, Delivery, Prediction, Study, StudyState
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_cxr, write
from tests.support.worker_data import add_study, register_and_promote
from worker.analysis import analyse_study
from worker.model_cache import ModelCache

PACS = "PACS@127.0.0.1:1"


@pytest.fixture
def wsettings(settings: Settings) -> Settings:
    return settings.replace(pacs=PACS, delivery_backoff_seconds=1)


@pytest.fixture
def db(wsettings: Settings) -> Iterator[Database]:
    database = Database(wsettings)
    yield database
    database.dispose()


def _counts(db: Database, study_id: int) -> tuple[int, int, int]:
    with db.session() as s:
        a = s.scalar(select(func.count()).select_from(Analysis)
                     .where(Analysis.study_id == study_id))
        p = s.scalar(select(func.count()).select_from(Prediction).join(Analysis)
                     .where(Analysis.study_id == study_id))
        d = s.scalar(select(func.count()).select_from(Delivery)
                     .where(Delivery.study_id == study_id))
        return int(a or 0), int(p or 0), int(d or 0)


@pytest.mark.parametrize("three_class", [True, False], ids=["three-class", "two-class"])
def test_analysis_stores_everything_once(db: Database, wsettings: Settings, tmp_path: Path,
                                         three_class: bool) -> None:
    register_and_promote(db, wsettings, "m1", three_class=three_class)
    frontal = make_cxr(rows=80, cols=64, view_position="PA", seed=1)
    lateral = make_cxr(study_uid=frontal.StudyInstanceUID, rows=64, cols=64,
                       view_position="LL", seed=2, instance_number=2)
    files = [write(frontal, tmp_path / "f.dcm"), write(lateral, tmp_path / "l.dcm")]
    study_id = add_study(db, wsettings, files)
    cache = ModelCache(wsettings)

    out = analyse_study(db, wsettings, cache, study_id, 1)
    assert out.status == "done", out
    assert len(out.delivery_ids) == 2  # one SR + one SC, one destination
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state == StudyState.DONE and study.reason is None
        analysis = s.scalars(select(Analysis).where(Analysis.study_id == study_id)).one()
        preds = {p.instance.sop_instance_uid: p for p in analysis.predictions}
        assert analysis.heatmap_method == "gradcam" and analysis.threshold == 0.5
        assert analysis.model_version is not None and analysis.model_version.version == "m1"
        front = preds[frontal.SOPInstanceUID]
        side = preds[lateral.SOPInstanceUID]
        assert front.scored and 0.0 <= float(front.probability) <= 1.0  # type: ignore[arg-type]
        assert analysis.probability == pytest.approx(front.probability)
        assert analysis.positive == (float(front.probability) >= 0.5)  # type: ignore[arg-type]
        if three_class:  # the pneumonia-pattern finding beside COVID-19
            assert analysis.pneumonia_probability is not None
            assert float(analysis.pneumonia_probability) >= float(analysis.probability)
        else:
            assert analysis.pneumonia_probability is None
        assert not side.scored and side.skip_reason and side.probability is None
        heat = np.load(front.heatmap_path)  # type: ignore[arg-type]
        assert heat.shape == (80, 64)  # source resolution
        deliveries = s.scalars(select(Delivery).where(Delivery.study_id == study_id)).all()
        assert sorted(d.kind for d in deliveries) == ["sc", "sr"]
        assert {d.destination for d in deliveries} == {PACS}
        assert {d.state for d in deliveries} == {"pending"}
        sr = pydicom.dcmread(next(d.path for d in deliveries if d.kind == "sr"))
        assert sr.SOPInstanceUID == analysis.sr_sop_instance_uid
        assert sr.StudyInstanceUID == frontal.StudyInstanceUID
    # The same message again (redelivery) stores nothing new.
    assert analyse_study(db, wsettings, cache, study_id, 1).status == "duplicate"
    assert _counts(db, study_id) == (1, 2, 2)


def test_bad_input_fails_with_reason(db: Database, wsettings: Settings, tmp_path: Path) -> None:
    register_and_promote(db, wsettings, "m1")
    ds = make_cxr()
    del ds.PixelData
    study_id = add_study(db, wsettings, [write(ds, tmp_path / "nopix.dcm")])
    out = analyse_study(db, wsettings, ModelCache(wsettings), study_id, 1)
    assert out.status == "failed"
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state == StudyState.FAILED
        assert study.reason and "bad input" in study.reason
        pred = s.scalars(select(Prediction)).one()
        assert not pred.scored and "bad input" in (pred.skip_reason or "")
    assert _counts(db, study_id)[2] == 0  # no SR for a failed study by default


@pytest.mark.shared_data
def test_abdominal_radiograph_is_skipped(db: Database, wsettings: Settings,
                                         shared_dicom: Path) -> None:
    register_and_promote(db, wsettings, "m1")
    study_id = add_study(db, wsettings, [shared_dicom / "nonchest_abdomen_OT_sample.dcm"])
    out = analyse_study(db, wsettings, ModelCache(wsettings), study_id, 1)
    assert out.status == "skipped"
    with db.session() as s:
        study = s.get(Study, study_id)
        assert study is not None and study.state == StudyState.SKIPPED
        assert study.reason and study.reason.startswith("no scorable image")
        pred = s.scalars(select(Prediction)).one()
        assert not pred.scored and pred.skip_reason and pred.probability is None
    assert _counts(db, study_id) == (1, 1, 0)


def test_not_analysed_report_when_asked(db: Database, wsettings: Settings,
                                        tmp_path: Path) -> None:
    wsettings = wsettings.replace(not_analysed_report=True)
    register_and_promote(db, wsettings, "m1")
    ds = make_cxr(view_position="LL", body_part="ABDOMEN", modality="CR")
    study_id = add_study(db, wsettings, [write(ds, tmp_path / "abd.dcm")])
    out = analyse_study(db, wsettings, ModelCache(wsettings), study_id, 1)
    assert out.status == "skipped" and len(out.delivery_ids) == 1
    with db.session() as s:
        d = s.scalars(select(Delivery)).one()
        assert d.kind == "sr"
        sr = pydicom.dcmread(d.path)
        assert sr.StudyInstanceUID == ds.StudyInstanceUID


def test_reanalysis_with_promoted_model_references_previous_sr(
        db: Database, wsettings: Settings, tmp_path: Path) -> None:
    register_and_promote(db, wsettings, "m1")
    ds = make_cxr(rows=64, cols=64)
    study_id = add_study(db, wsettings, [write(ds, tmp_path / "a.dcm")])
    cache = ModelCache(wsettings)
    assert analyse_study(db, wsettings, cache, study_id, 1).status == "done"
    with db.session() as s:
        first = s.scalars(select(Analysis)).one()
        first_sr = first.sr_sop_instance_uid
        study = s.get(Study, study_id)
        assert study is not None
        study.state = StudyState.QUEUED  # what a re-analysis request does
    register_and_promote(db, wsettings, "m2", seed=7)
    out = analyse_study(db, wsettings, cache, study_id, 1)
    assert out.status == "done" and cache.held_version == "m2"
    with db.session() as s:
        rows = s.scalars(select(Analysis).order_by(Analysis.id)).all()
        assert [a.state for a in rows] == ["superseded", "done"]
        assert rows[1].model_version is not None and rows[1].model_version.version == "m2"
        new_sr = s.scalars(select(Delivery.path).where(
            Delivery.kind == "sr", Delivery.analysis_id == rows[1].id)).one()
    sr = pydicom.dcmread(new_sr)
    assert sr.SOPInstanceUID != first_sr
    refs = [inst.ReferencedSOPInstanceUID
            for study in sr.PredecessorDocumentsSequence
            for series in study.ReferencedSeriesSequence
            for inst in series.ReferencedSOPSequence]
    assert refs == [first_sr]
    # Redelivery on request sends the current results only, not the superseded ones.
    from db.broker import make_celery
    from worker.delivery import redeliver

    with db.session() as s:
        current = set(s.scalars(select(Delivery.id).where(Delivery.analysis_id == rows[1].id)))
        study_uid = s.scalars(select(Study.study_uid).where(Study.id == study_id)).one()
        assert s.scalars(select(Delivery.id).where(Delivery.analysis_id == rows[0].id)).all()
    assert current and set(redeliver(db, wsettings, study_uid, app=make_celery(wsettings))) \
        == current


@pytest.mark.parametrize("first_state", ["delivered-as-comprehensive", "failed"])
def test_predecessor_is_what_the_pacs_holds(db: Database, wsettings: Settings,
                                            tmp_path: Path, first_state: str) -> None:
    """The next SR names the SR the PACS received (in the class it was sent as); a
    delivery that failed reached no PACS and is not named."""
    from db.models import DeliveryState
    from dicom_node import identity

    register_and_promote(db, wsettings, "m1")
    ds = make_cxr(rows=64, cols=64)
    study_id = add_study(db, wsettings, [write(ds, tmp_path / "a.dcm")])
    cache = ModelCache(wsettings)
    assert analyse_study(db, wsettings, cache, study_id, 1).status == "done"
    comprehensive = "1.2.840.10008.5.1.4.1.1.88.33"
    with db.session() as s:
        row = s.scalars(select(Delivery).where(Delivery.kind == "sr")).one()
        first_sr = row.sop_instance_uid
        variant = identity.uid_from("class-variant", first_sr, comprehensive)
        if first_state == "failed":
            row.state = DeliveryState.FAILED
            row.reason = "PACS does not accept Comprehensive 3D SR Storage"
        else:
            row.state = DeliveryState.DELIVERED
            row.reason = f"sent as {comprehensive} {variant}"
        study = s.get(Study, study_id)
        assert study is not None
        study.state = StudyState.QUEUED
    register_and_promote(db, wsettings, "m2", seed=7)
    assert analyse_study(db, wsettings, cache, study_id, 1).status == "done"
    with db.session() as s:
        new_path = s.scalars(select(Delivery.path).where(Delivery.kind == "sr")
                             .order_by(Delivery.id.desc())).first()
    sr = pydicom.dcmread(new_path)
    if first_state == "failed":
        assert "PredecessorDocumentsSequence" not in sr
        return
    [named] = [inst for study in sr.PredecessorDocumentsSequence
               for series in study.ReferencedSeriesSequence
               for inst in series.ReferencedSOPSequence]
    assert (named.ReferencedSOPClassUID, named.ReferencedSOPInstanceUID) == \
        (comprehensive, variant)
    assert sr.SOPInstanceUID not in (first_sr, variant)
