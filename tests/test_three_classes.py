"""Three classes (normal / other pneumonia / COVID-19): labels, the masked loss, model
files, the two findings and their way into the SR and the SC caption."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import generate_uid
from sqlalchemy import select

from db.models import Label, Study
from db.session import Database
from db.settings import Settings
from dicom_node.burnin import Caption
from dicom_node.results import write_dataset
from dicom_node.sr import build_sr, read_result
from tests.support.dicom_factory import make_cxr
from tests.support.results_factory import dciodvfy, make_model, make_result, unexpected_warnings
from tests.support.trainer_synthetic import write_folder
from trainer.architectures import build_model
from trainer.checkpoint import (
    THREE_CLASSES,
    TWO_CLASSES,
    ModelMeta,
    Preprocessing,
    findings,
    load_checkpoint,
    save_checkpoint,
)
from trainer.datasets import DatasetError, ImageRecord, folder_records
from trainer.labels import import_labels
from trainer.targets import allowed_classes, masked_loss, pneumonia_truth, sample_weights


def _meta(classes: tuple[str, ...]) -> ModelMeta:
    return ModelMeta("tiny_cnn", 64, Preprocessing.for_backbone("tiny_cnn"), threshold=0.3,
                     classes=classes, pneumonia_threshold=0.6 if classes == THREE_CLASSES
                     else None)


def _record(label: int, name: str | None, source: str = "s") -> ImageRecord:
    return ImageRecord(key=f"k{label}{name}", path=Path("x"), label=label, patient_key="p",
                       source=source, label_name=name)


def test_findings_are_covid_and_covid_plus_other_pneumonia() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, -1.0, 0.0]])
    covid, pneu = findings(logits, _meta(THREE_CLASSES))
    p = torch.softmax(logits, 1)
    assert torch.allclose(covid, p[:, 2])
    assert pneu is not None and torch.allclose(pneu, p[:, 1] + p[:, 2])
    covid2, none = findings(torch.tensor([[0.0], [2.0]]), _meta(TWO_CLASSES))
    assert none is None
    assert torch.allclose(covid2, torch.sigmoid(torch.tensor([0.0, 2.0])))


def test_not_covid_trains_covid_and_not_pneumonia() -> None:
    """A bare 0 label: the loss is -log(P(normal) + P(other pneumonia)); moving mass between
    normal and other pneumonia changes nothing, moving it to COVID-19 costs."""
    records = [_record(0, None), _record(0, "normal"), _record(1, None)]
    allowed = allowed_classes(records, THREE_CLASSES)
    assert allowed.tolist() == [[1, 1, 0], [1, 0, 0], [0, 0, 1]]
    not_covid = allowed[:1]
    a = masked_loss(torch.tensor([[2.0, 0.0, 0.0]]), not_covid)
    b = masked_loss(torch.tensor([[0.0, 2.0, 0.0]]), not_covid)
    c = masked_loss(torch.tensor([[0.0, 0.0, 2.0]]), not_covid)
    assert float(a) == pytest.approx(float(b))
    assert float(c) > float(a) + 1.0
    # gradient: nothing pushes normal against other pneumonia for a bare 0 label
    logits = torch.tensor([[0.5, 0.5, 0.0]], requires_grad=True)
    masked_loss(logits, not_covid).sum().backward()
    assert logits.grad is not None
    assert float(logits.grad[0, 0]) == pytest.approx(float(logits.grad[0, 1]))
    assert pneumonia_truth(records).tolist() == [-1, 0, 1]
    weights = sample_weights(records, "class", three=True)
    assert weights is not None and float(weights.mean()) == pytest.approx(1.0)


def test_model_file_records_its_classes_and_old_files_stay_two_class(tmp_path: Path) -> None:
    three = build_model("tiny_cnn", pretrained=False, outputs=3).eval()
    save_checkpoint(tmp_path / "three.pt", three, _meta(THREE_CLASSES))
    loaded = load_checkpoint(tmp_path / "three.pt")
    assert loaded.meta.classes == THREE_CLASSES
    assert loaded.meta.pneumonia_threshold == pytest.approx(0.6)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        assert loaded.model(x).shape == (2, 3)
    # a file written before three classes: no "classes" key, one logit
    two = build_model("tiny_cnn", pretrained=False).eval()
    old = _meta(TWO_CLASSES).to_dict()
    del old["classes"], old["pneumonia_threshold"]
    payload = {"format": "cxr-triage-checkpoint/1", "meta": old,
               "state_dict": {k: v.clone() for k, v in two.state_dict().items()}}
    torch.save(payload, tmp_path / "old.pt")
    legacy = load_checkpoint(tmp_path / "old.pt")
    assert legacy.meta.classes == TWO_CLASSES and legacy.meta.pneumonia_threshold is None
    with torch.no_grad():
        assert legacy.model(x).shape == (2, 1)


def test_label_name_in_a_folder_and_its_disagreement_is_refused(tmp_path: Path) -> None:
    root = write_folder(tmp_path / "ds", n_patients=6, images_per_patient=1, three_class=True)
    records = folder_records(root)
    assert [r.label_name for r in records] == ["normal", "other_pneumonia", "covid"] * 2
    assert [r.label for r in records] == [0, 0, 1] * 2
    text = (root / "labels.csv").read_text().splitlines()
    # covid with label 0 disagrees
    bad = text[0] + "\n" + text[3].replace(",1,", ",0,") + "\n"
    (root / "labels.csv").write_text(bad)
    with pytest.raises(DatasetError, match="disagrees"):
        folder_records(root)
    # an old folder without label_name reads as before
    old = write_folder(tmp_path / "old", n_patients=4, images_per_patient=1)
    assert all(r.label_name is None for r in folder_records(old))


def test_labels_import_accepts_label_name(settings: Settings, tmp_path: Path) -> None:
    db = Database(settings)
    with db.session() as s:
        for i in range(1, 5):
            s.add(Study(study_uid=f"1.2.3.{i}", accession_number=f"A{i}", patient_id=f"P{i}"))
    path = tmp_path / "l.csv"
    path.write_text("study_uid,accession_number,label,label_name,source,date\n"
                    "1.2.3.1,,,other_pneumonia,radiologist,\n"
                    "1.2.3.2,,1,covid,RT-PCR,\n"
                    "1.2.3.3,,0,,RT-PCR,\n"
                    "1.2.3.4,,1,normal,RT-PCR,\n")
    report = import_labels(db, path)
    assert (report.imported, report.failed) == (3, 1)
    assert "disagrees" in str(report.errors[0]) and report.errors[0].line == 5
    with db.session() as s:
        rows = s.execute(select(Study.study_uid, Label.label, Label.label_name)
                         .join(Study, Study.id == Label.study_id).order_by(Study.id)).all()
    assert [tuple(r) for r in rows] == [("1.2.3.1", 0, "other_pneumonia"),
                                        ("1.2.3.2", 1, "covid"), ("1.2.3.3", 0, None)]
    # a changed label_name supersedes
    path.write_text("study_uid,label_name,source,date\n1.2.3.1,normal,radiologist,\n")
    again = import_labels(db, path)
    assert (again.changed, again.failed) == (1, 0)
    db.dispose()


def test_sr_carries_both_findings_and_sc_caption_both_lines(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    sources = [make_cxr(study_uid=study, series_uid=series, rows=256, cols=256, seed=i,
                        instance_number=i + 1) for i in range(2)]
    model = dataclasses.replace(make_model(threshold=0.5), pneumonia_threshold=0.4)
    result = dataclasses.replace(make_result(sources, [0.2, 0.3], model=model),
                                 pneumonia_probability=0.65, pneumonia_positive=True)
    path = write_dataset(build_sr(result), tmp_path)
    errors, warnings = dciodvfy(path)
    assert errors == [] and unexpected_warnings(warnings) == []
    back = read_result(pydicom.dcmread(path))
    assert back.finding_present is False and back.probability == pytest.approx(0.3)
    assert back.pneumonia_present is True
    assert back.pneumonia_probability == pytest.approx(0.65)
    assert back.pneumonia_threshold == pytest.approx(0.4)
    assert "233604007" in str(pydicom.dcmread(path))
    # a two-class result has no pneumonia group
    plain = write_dataset(build_sr(make_result(sources, [0.2, 0.3], model=make_model())),
                          tmp_path / "plain")
    assert read_result(pydicom.dcmread(plain)).pneumonia_probability is None
    caption = Caption(0.3, 0.5, "m", "v1", "gradcam", pneumonia_probability=0.65,
                      pneumonia_threshold=0.4)
    lines = caption.lines()
    assert lines[0].startswith("COVID-19 probability 0.30: NEGATIVE")
    assert lines[1] == "Pneumonia pattern probability 0.65: POSITIVE (threshold 0.40)"
    assert len(Caption(0.3, 0.5, "m", "v1", "gradcam").lines()) == 3


@pytest.mark.slow
def test_three_class_training_scores_both_findings_and_evaluate_reports_them(
    tmp_path: Path,
) -> None:
    from trainer.evaluate import evaluate_records
    from trainer.splits import Split, split_records
    from trainer.train import TrainConfig, train_model

    root = write_folder(tmp_path / "ds", n_patients=90, signal=1.2, three_class=True)
    parts = split_records(folder_records(root), "k", (0.6, 0.2, 0.2))
    cfg = TrainConfig(input_size=64, contrast="clahe", views=2, head_epochs=4, epochs=4,
                      device="cpu", target_sensitivity=0.9)
    result = train_model(parts[Split.TRAIN], parts[Split.VALIDATION], cfg,
                         cache_root=tmp_path / "cache")
    assert result.meta.classes == THREE_CLASSES
    assert result.meta.pneumonia_threshold is not None
    save_checkpoint(tmp_path / "m.pt", result.model, result.meta)
    loaded = load_checkpoint(tmp_path / "m.pt")
    test = parts[Split.TEST]
    figures, scores = evaluate_records(loaded.model, loaded.meta, test)
    assert figures["auc"] > 0.85 and figures["pneumonia_auc"] > 0.85
    assert set(figures["class_auc"]) == set(THREE_CLASSES)
    matrix = np.array(figures["confusion_3x3"]["matrix"])
    assert matrix.shape == (3, 3) and matrix.sum() == len(test)
    assert "pneumonia_auc" in figures["per_source"]["synthetic"]
    assert {"auc", "auc_ci", "threshold", "sensitivity", "specificity"} <= set(figures)
    # the HTML report shows them
    from trainer.report import ModelScores, write_report

    y = np.array([r.label for r in test])
    index = write_report(tmp_path / "report", "t", [ModelScores(
        "challenger", y, scores, [r.source for r in test], loaded.meta.threshold, figures)])
    page = index.read_text()
    assert "pneumonia pattern AUC" in page and "call other_pneumonia" in page
    # old 0/1 labels still train: the same folder with label_name dropped
    old = [dataclasses.replace(r, label_name=None) for r in parts[Split.TRAIN]]
    again = train_model(old, parts[Split.VALIDATION], dataclasses.replace(cfg, epochs=0),
                        cache_root=tmp_path / "cache")
    assert again.meta.classes == THREE_CLASSES
    assert again.val_metrics["auc"] > 0.8


def test_sc_of_a_three_class_result_renders_both_findings(tmp_path: Path) -> None:
    """The SC builder with a pneumonia-pattern probability: four caption lines, each
    finding in the colour of its call, and an object dciodvfy accepts."""
    from dicom_node.burnin import NEGATIVE_RGB, POSITIVE_RGB
    from dicom_node.sc import build_heatmap_sc

    study, series = generate_uid(), generate_uid()
    source = make_cxr(study_uid=study, series_uid=series, rows=256, cols=256, seed=3)
    model = dataclasses.replace(make_model(threshold=0.5), pneumonia_threshold=0.4)
    result = make_result([source], [0.3], model=model)
    image = dataclasses.replace(result.scored[0], pneumonia_probability=0.65)
    three = build_heatmap_sc(image, model)
    two = build_heatmap_sc(result.scored[0], make_model(threshold=0.5))
    assert three.Rows > two.Rows  # one more caption line in the banner
    path = write_dataset(three, tmp_path)
    errors, warnings = dciodvfy(path)
    assert errors == [] and unexpected_warnings(warnings) == []
    caption = Caption(0.3, 0.5, "m", "v1", "gradcam", pneumonia_probability=0.65,
                      pneumonia_threshold=0.4)
    colours = [colour for _line, colour in caption.coloured_lines()]
    assert colours[:2] == [NEGATIVE_RGB, POSITIVE_RGB] and len(colours) == 4
