"""Direct inserts of a small, known set of rows, for tests of status, web and metrics."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np

from db.models import (
    Analysis,
    AnalysisState,
    Delivery,
    DeliveryState,
    Evaluation,
    Instance,
    ModelStage,
    ModelVersion,
    Prediction,
    Study,
    StudyState,
    utcnow,
)
from db.session import Database

SECRET_PATIENT_ID = "PATIENT-SECRET-4711"
SECRET_ACCESSION = "ACC-SECRET-0815"


@dataclass
class Populated:
    done_uid: str
    queued_uid: str
    failed_uid: str
    model_version: str
    heatmap_path: Path
    report_path: Path


def populate(db: Database, data_dir: Path) -> Populated:
    """Three studies (done with deliveries, queued, failed), one production model with an
    evaluation and its report plot, and a float heatmap stored as .npy."""
    now = utcnow()
    heatmap = data_dir / "heatmaps" / "done.npy"
    heatmap.parent.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:64, 0:64]
    np.save(heatmap, np.exp(-((xx - 40) ** 2 + (yy - 24) ** 2) / 200.0).astype(np.float32))
    report = data_dir / "reports" / "roc.png"
    report.parent.mkdir(parents=True, exist_ok=True)
    _write_plot(report)
    with db.session() as s:
        model = ModelVersion(version="m-20240101-abc123", architecture="efficientnet_lite0",
                             path="/models/m.pt", sha256="0" * 64, threshold=0.42,
                             input_size=320, stage=ModelStage.PRODUCTION, promoted_at=now)
        s.add(model)
        s.flush()
        s.add(Evaluation(model_version_id=model.id, kind="test", dataset="shared-cxr test split",
                         n_images=150, auc=0.91, sensitivity=0.98, specificity=0.55,
                         report_path=str(report), created_at=now))
        done = Study(study_uid="1.2.826.0.1.3680043.8.498.1", state=StudyState.DONE,
                     patient_id=SECRET_PATIENT_ID, accession_number=SECRET_ACCESSION,
                     received_at=now - timedelta(minutes=10), updated_at=now)
        queued = Study(study_uid="1.2.826.0.1.3680043.8.498.2", state=StudyState.QUEUED,
                       patient_id=SECRET_PATIENT_ID, received_at=now - timedelta(minutes=30),
                       updated_at=now)
        failed = Study(study_uid="1.2.826.0.1.3680043.8.498.3", state=StudyState.FAILED,
                       reason="no scorable image: abdomen OT",
                       received_at=now - timedelta(minutes=5), updated_at=now)
        s.add_all([done, queued, failed])
        s.flush()
        insts = []
        for i, st in enumerate([done, done, queued, failed]):
            inst = Instance(study_id=st.id, sop_instance_uid=f"1.2.826.0.1.3680043.8.498.9{i}",
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                            transfer_syntax="1.2.840.10008.1.2.1", modality="CR",
                            path=f"/spool/{i}.dcm", size_bytes=1000)
            s.add(inst)
            insts.append(inst)
        s.flush()
        analysis = Analysis(study_id=done.id, model_version_id=model.id, generation=1,
                            state=AnalysisState.DONE, probability=0.87, positive=True,
                            threshold=0.42, heatmap_method="gradcam", finished_at=now,
                            pneumonia_probability=0.91, pneumonia_positive=True,
                            pneumonia_threshold=0.5,
                            timings={"queue_wait_s": 1.5, "inference_s": 0.8})
        s.add(analysis)
        s.flush()
        s.add(Prediction(analysis_id=analysis.id, instance_id=insts[0].id, probability=0.87,
                         pneumonia_probability=0.91, heatmap_path=str(heatmap)))
        s.add(Prediction(analysis_id=analysis.id, instance_id=insts[1].id, scored=False,
                         skip_reason="lateral view"))
        s.add(Delivery(analysis_id=analysis.id, study_id=done.id, kind="sr",
                       sop_instance_uid="1.2.826.0.1.3680043.8.498.71",
                       destination="PACS@127.0.0.1:4242",
                       path="/outbox/sr.dcm", state=DeliveryState.DELIVERED, attempts=1,
                       deadline_at=now + timedelta(days=3), delivered_at=now))
        s.add(Delivery(analysis_id=analysis.id, study_id=done.id, kind="sc",
                       sop_instance_uid="1.2.826.0.1.3680043.8.498.72",
                       destination="PACS@127.0.0.1:4242",
                       path="/outbox/sc.dcm", state=DeliveryState.FAILED, attempts=7,
                       reason="association rejected: called AE title not recognised",
                       deadline_at=now))
    return Populated(done.study_uid, queued.study_uid, failed.study_uid, "m-20240101-abc123",
                     heatmap, report)


def _write_plot(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 3), dpi=60)
    ax.plot([0, 0.1, 0.3, 1], [0, 0.8, 0.95, 1], color="tab:blue")
    ax.plot([0, 1], [0, 1], "--", color="grey")
    ax.set_title("ROC (test)")
    fig.savefig(path)
    plt.close(fig)
