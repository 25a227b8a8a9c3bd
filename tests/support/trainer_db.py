"""Database fixtures for trainer tests: studies as the listener records them, models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from db.models import Instance, Study
from db.session import Database
from db.settings import Settings
from tests.support.dicom_factory import make_cxr
from tests.support.trainer_synthetic import chest_like
from trainer.architectures import build_model
from trainer.checkpoint import ModelMeta, Preprocessing, save_checkpoint
from trainer.registry import promote, register_model


def spool_study(db: Database, settings: Settings, *, patient_id: str, positive: bool,
                seed: int, accession: str = "", calling_ae: str = "STORESCU",
                n_images: int = 1) -> str:
    """Write a study to the spool (``spool_dir/<study>/<sop>.dcm``) and record its rows as
    the listener does; returns the Study Instance UID."""
    rng = np.random.default_rng(seed)
    study_uid = generate_uid()
    series_uid = generate_uid()
    with db.session() as s:
        study = Study(study_uid=study_uid, patient_id=patient_id, accession_number=accession,
                      state="done")
        s.add(study)
        s.flush()
        for i in range(n_images):
            ds = make_cxr(study_uid=study_uid, series_uid=series_uid, bits_stored=8,
                          pixels=chest_like(rng, positive), patient_id=patient_id,
                          instance_number=i + 1)
            path = settings.spool_dir / study_uid / f"{ds.SOPInstanceUID}.dcm"
            path.parent.mkdir(parents=True, exist_ok=True)
            ds.save_as(path, enforce_file_format=True)
            s.add(Instance(study_id=study.id, sop_instance_uid=ds.SOPInstanceUID,
                           sop_class_uid=ds.SOPClassUID, series_uid=series_uid,
                           transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                           modality=ds.Modality, view_position="PA", body_part="CHEST",
                           path=str(path), size_bytes=path.stat().st_size,
                           calling_ae=calling_ae))
    return study_uid


def fake_production_model(db: Database, tmp_path: Path, input_size: int = 64) -> str:
    """An untrained EfficientNet-Lite0 checkpoint registered and promoted."""
    meta = ModelMeta(architecture="efficientnet_lite0", input_size=input_size,
                     preprocessing=Preprocessing.for_backbone("efficientnet_lite0"),
                     threshold=0.5)
    path = tmp_path / "seed-model.pt"
    save_checkpoint(path, build_model("efficientnet_lite0", pretrained=True), meta)
    info = register_model(db, path, version="seed-model")
    promote(db, info.version)
    return info.version
