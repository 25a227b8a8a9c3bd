"""The trainer picks its images from received studies with the worker's selection code."""

from __future__ import annotations

from sqlalchemy import select

from db.models import Instance, Label, Study
from db.session import Database
from tests.support.trainer_db import spool_study
from trainer.datasets import database_records

BASIC_TEXT_SR = "1.2.840.10008.5.1.4.1.1.88.11"


def test_training_images_are_the_ones_inference_scores(make_settings, database_url: str) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(database_url=database_url)
    db = Database(settings)
    # One view-less DX image plus an SR: a single-image study to the worker, so scored.
    with_sr = spool_study(db, settings, patient_id="P1", positive=True, seed=1)
    # Two view-less images: either may be the lateral, so neither is scored.
    two_views = spool_study(db, settings, patient_id="P2", positive=False, seed=2, n_images=2)
    with db.session() as s:
        for uid in (with_sr, two_views):
            study = s.scalars(select(Study).where(Study.study_uid == uid)).one()
            for inst in s.scalars(select(Instance).where(Instance.study_id == study.id)):
                inst.view_position = None
            s.add(Label(study_id=study.id, label=int(uid == with_sr), truth_source="RT-PCR"))
            if uid == with_sr:
                s.add(Instance(study_id=study.id, sop_instance_uid="1.2.826.0.1.99",
                               sop_class_uid=BASIC_TEXT_SR, transfer_syntax="1.2.840.10008.1.2.1",
                               modality="SR", path="/nonexistent", size_bytes=1))
    records = database_records(db, settings)
    assert [(r.study_uid, r.label) for r in records] == [(with_sr, 1)]
    db.dispose()
