"""One scoring path: the scores that chose a model's thresholds are the scores the worker
and ``trainer.evaluate`` give the same images.

A three-class model is trained with ``train_model`` on DICOM files; its validation images
then go through the worker as one study (``worker.analysis.compute`` with the model loaded
by the worker's :class:`ModelCache`, Grad-CAM and occlusion) and through
``trainer.evaluate``.  Each threshold is the k-th positive validation score itself, so a
single bit of difference flips that image's call: the calls at both thresholds must be the
same, and the probabilities equal (to the bit on the CPU).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from pydicom.uid import generate_uid

from db.settings import Settings
from tests.support.dicom_factory import make_cxr, write
from tests.support.trainer_synthetic import chest_like, pneumonia_like
from trainer.checkpoint import THREE_CLASSES, save_checkpoint
from trainer.datasets import ImageRecord, folder_records
from trainer.evaluate import evaluate_records, predict_findings_records
from trainer.registry import ModelInfo
from trainer.train import TrainConfig, TrainResult, train_model
from worker.analysis import compute
from worker.model_cache import ModelCache
from worker.records import Claim, InstanceRef, StudyResult

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))]


def write_dicom_folder(root: Path, n_patients: int = 30, size: int = 64) -> Path:
    """A labelled folder of 8-bit DICOM chest phantoms cycling normal / other pneumonia /
    COVID-19, one image per patient."""
    rng = np.random.default_rng(13)
    rows = []
    for p in range(n_patients):
        name = THREE_CLASSES[p % 3]
        pixels = (pneumonia_like(rng, size) if name == "other_pneumonia"
                  else chest_like(rng, name == "covid", size))
        rel = f"images/p{p}.dcm"
        write(make_cxr(pixels=pixels, bits_stored=8, patient_id=f"P{p}", seed=p), root / rel)
        rows.append({"path": rel, "label": int(name == "covid"), "patient_id": f"s:{p}",
                     "source": "synthetic", "label_name": name})
    with (root / "labels.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return root


def through_the_worker(result: TrainResult, val: list[ImageRecord], settings: Settings,
                       ) -> StudyResult:
    """The validation images as one study, scored as the worker scores a study."""
    path = settings.models_dir / "parity.pt"
    digest = save_checkpoint(path, result.model, result.meta)
    info = ModelInfo(id=1, version="parity", stage="production",
                     architecture=result.meta.architecture, input_size=result.meta.input_size,
                     threshold=result.meta.threshold, path=path.name, sha256=digest,
                     parent_version=None, created_at=None, promoted_at=None, test_auc=None,
                     test_sensitivity=None, test_specificity=None)
    model = ModelCache(settings).get(info)
    refs = tuple(InstanceRef(i, str(generate_uid()), r.path) for i, r in enumerate(val))
    claim = Claim(study_id=1, study_uid=str(generate_uid()), generation=1, attempt=1,
                  model=info, instances=refs)
    return compute(claim, model, settings)


@pytest.mark.parametrize("device", DEVICES)
def test_validation_scores_are_the_workers_and_evaluations(tmp_path: Path, make_settings,  # type: ignore[no-untyped-def]
                                                           device: str) -> None:
    records = folder_records(write_dicom_folder(tmp_path / "ds"))
    train, val = records[:18], records[18:]
    cfg = TrainConfig(input_size=64, views=1, head_epochs=1, epochs=1, device=device,
                      target_sensitivity=0.75)
    result = train_model(train, val, cfg)
    meta = result.meta
    assert meta.precision == "float32" and meta.pneumonia_threshold is not None
    val_p, val_pneu = result.val_scores, result.val_pneumonia_scores
    assert val_pneu is not None and len(val_p) == len(val) == 12
    # the thresholds are validation scores themselves: one bit off flips a call
    assert meta.threshold in val_p.tolist()
    known = np.array([r.label_name is not None for r in val])
    assert meta.pneumonia_threshold in val_pneu[known].tolist()

    def same(p: np.ndarray, pneu: np.ndarray | None) -> None:
        assert pneu is not None
        assert ((p >= meta.threshold) == (val_p >= meta.threshold)).all()
        assert (((pneu >= meta.pneumonia_threshold) == (val_pneu >= meta.pneumonia_threshold))
                .all())
        if device == "cpu":
            np.testing.assert_array_equal(p, val_p)
            np.testing.assert_array_equal(pneu, val_pneu)
        else:
            np.testing.assert_allclose(p, val_p, rtol=0, atol=1e-6)
            np.testing.assert_allclose(pneu, val_pneu, rtol=0, atol=1e-6)

    for method in ("gradcam", "occlusion"):
        settings = make_settings(device=device, heatmap_method=method, occlusion_size=32,
                                 occlusion_stride=32)
        study = through_the_worker(result, val, settings)
        assert [img.scored for img in study.images] == [True] * len(val)
        same(np.array([img.probability for img in study.images]),
             np.array([img.pneumonia_probability for img in study.images]))
        assert all(img.heatmap_path is not None and img.heatmap_path.is_file()
                   for img in study.images)
    figures, scores = evaluate_records(result.model, meta, val, device=device)
    same(scores, predict_findings_records(result.model, meta, val, device)[1])
    assert figures["threshold"] == meta.threshold
