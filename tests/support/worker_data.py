"""Rows and files the worker tests start from: studies already received and queued, and a
real registered model file."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom

from db.models import Instance, Study, StudyState, utcnow
from db.session import Database
from db.settings import Settings


def add_study(db: Database, settings: Settings, files: list[Path],
              state: StudyState = StudyState.QUEUED, generation: int = 1) -> int:
    """Spool ``files`` and record them as one study in ``state``; returns the study id.

    This is what the listener and the stability loop leave behind for the worker."""
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    study_uid = str(first.StudyInstanceUID)
    now = utcnow()
    with db.session() as s:
        study = Study(study_uid=study_uid, state=state, generation=generation,
                      patient_id=str(first.get("PatientID", "")) or None,
                      queued_at=now, updated_at=now, last_instance_at=now)
        s.add(study)
        s.flush()
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            target = settings.spool_dir / study_uid / f"{ds.SOPInstanceUID}.dcm"
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
            s.add(Instance(
                study_id=study.id, sop_instance_uid=str(ds.SOPInstanceUID),
                sop_class_uid=str(ds.SOPClassUID), series_uid=str(ds.SeriesInstanceUID),
                transfer_syntax=str(ds.file_meta.TransferSyntaxUID),
                modality=ds.get("Modality"), view_position=ds.get("ViewPosition") or None,
                body_part=ds.get("BodyPartExamined") or None, path=str(target),
                size_bytes=target.stat().st_size,
            ))
        return study.id


def make_model_file(settings: Settings, name: str, architecture: str = "tiny_cnn",
                    input_size: int = 64, threshold: float = 0.5, seed: int = 0,
                    three_class: bool = True) -> Path:
    """A randomly initialised model saved with trainer.checkpoint (no download needed).

    Three-class by default, like the models the trainer now writes; ``three_class=False``
    gives a file of the older two-class kind, which workers must still score."""
    import torch

    from trainer.architectures import build_model
    from trainer.checkpoint import THREE_CLASSES, ModelMeta, Preprocessing, save_checkpoint

    torch.manual_seed(seed)
    pretrained = architecture == "efficientnet_lite0"
    model = build_model(architecture, pretrained=pretrained,
                        outputs=len(THREE_CLASSES) if three_class else 1)
    extra: dict[str, object] = (
        {"classes": THREE_CLASSES, "pneumonia_threshold": threshold} if three_class else {})
    meta = ModelMeta(architecture=architecture, input_size=input_size,
                     preprocessing=Preprocessing.for_backbone(architecture),
                     threshold=threshold, version=name, **extra)  # type: ignore[arg-type]
    path = settings.models_dir / f"{name}.pt"
    save_checkpoint(path, model, meta)
    return path


def register_and_promote(db: Database, settings: Settings, name: str,
                         architecture: str = "tiny_cnn", input_size: int = 64,
                         threshold: float = 0.5, seed: int = 0,
                         three_class: bool = True) -> str:
    """Register a fresh model file as ``name`` and make it the production model."""
    from trainer.registry import promote, register_model

    path = make_model_file(settings, name, architecture, input_size, threshold, seed,
                           three_class)
    register_model(db, path, version=name)
    promote(db, name)
    return name
