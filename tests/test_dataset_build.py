"""`python -m trainer.datasets build`: each public layout, as published, becomes the
labelled folder the trainer reads; near-duplicates across patients and datasets go."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.support import public_layouts as layouts
from trainer.dataset_build import label_from_finding, main
from trainer.datasets import folder_records

REPO = Path(__file__).resolve().parents[1]


def _rows(out: Path) -> list[dict[str, str]]:
    with (out / "labels.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize(("finding", "expected"), [
    ("Pneumonia/Viral/COVID-19", "covid"), ("COVID-19", "covid"), ("No Finding", "normal"),
    ("No finding", "normal"), ("Pneumonia/Bacterial/Streptococcus", "other_pneumonia"),
    ("Pneumonia", "other_pneumonia"), ("SARS", "other_pneumonia"), ("ARDS", "other_pneumonia"),
    ("todo", None), ("Tuberculosis", None), ("", None),
])
def test_findings_map_to_three_classes(finding: str, expected: str | None) -> None:
    assert label_from_finding(finding) == expected


def _sources(tmp_path: Path) -> list[str]:
    src = tmp_path / "src"
    return [
        "--ieee8023", str(layouts.ieee8023(src / "covid-chestxray-dataset")),
        "--figure1", str(layouts.agchung(src / "Figure1-COVID-chestxray-dataset", "figure1",
                                         seed=200)),
        "--actualmed", str(layouts.agchung(src / "Actualmed-COVID-chestxray-dataset",
                                           "actualmed", seed=600, with_imagename=True)),
        "--hannover", str(layouts.hannover(src / "covid-19-image-repository")),
        "--nih", str(layouts.nih(src / "ChestX-ray14")),
        "--dicom", str(layouts.dicom_folder(src / "hospital")),
    ]


def test_every_layout_becomes_one_labelled_folder(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "built"
    assert main(["build", "--out", str(out), "--nih-limit", "6", *_sources(tmp_path)]) == 0
    printed = capsys.readouterr().out
    rows = _rows(out)
    by_source: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    # ieee8023: 10 patients x 2 frontal films; lateral, CT, todo, tuberculosis, missing and
    # a path out of the folder are left out
    assert len(by_source["ieee8023"]) == 20
    assert {r["label_name"] for r in by_source["ieee8023"]} == set(
        ("covid", "other_pneumonia", "normal"))
    assert "ieee8023: not a frontal view" in printed and "ieee8023: image file missing" in printed
    assert "ieee8023: not an X-ray (CT)" in printed
    # Figure 1: 8 cases, two of them with films a and b of one patient; Latin-1 CSV
    assert len(by_source["figure1"]) == 10
    assert sum(r["patient_id"] == "figure1:FIGURE1-00000" for r in by_source["figure1"]) == 2
    assert len(by_source["actualmed"]) == 10
    # Hannover: all COVID-19, 6 patients x 2 films (one patient's PNGs are 16-bit)
    assert len(by_source["hannover"]) == 12
    assert {r["label_name"] for r in by_source["hannover"]} == {"covid"}
    assert len({r["patient_id"] for r in by_source["hannover"]}) == 6
    # NIH: No Finding and Pneumonia only (Effusion left out), at most --nih-limit
    assert len(by_source["nih"]) == 6
    assert {r["label_name"] for r in by_source["nih"]} <= {"normal", "other_pneumonia"}
    assert "nih: finding neither normal nor pneumonia" in printed
    assert "nih: beyond --nih-limit" in printed
    # DICOM + CSV: 8 files; an escaping path and an unknown label left out; patient ids
    # from the CSV or, where empty, from the file's PatientID
    assert len(by_source["hospital"]) == 8
    assert {r["patient_id"] for r in by_source["hospital"]} >= {"hospital:DCM0", "hospital:site-1"}
    assert "dicom: file missing or outside the folder" in printed

    for r in rows:
        assert r["label"] == str(int(r["label_name"] == "covid"))
        assert r["patient_id"].startswith(r["source"] + ":")
        path = (out / r["path"]).resolve()
        assert path.is_relative_to(out.resolve()) and path.suffix == ".png"
        with Image.open(path) as img:
            assert img.mode == "L"
    # the trainer reads the folder as it is
    records = folder_records(out)
    assert len(records) == len(rows)
    assert {r.source for r in records} == {"ieee8023", "figure1", "actualmed", "hannover",
                                           "nih", "hospital"}
    assert (out / "build.json").is_file()


@pytest.mark.parametrize("dup_label", ["covid", "normal"])
def test_a_film_published_twice_is_kept_once_or_dropped_when_labels_disagree(
    tmp_path: Path, dup_label: str
) -> None:
    ieee = layouts.ieee8023(tmp_path / "ieee", n_patients=3)
    # patient 1's first film (covid), re-published elsewhere: 16-bit DICOM, other size
    copy = np.asarray(Image.fromarray(layouts.film(100, "covid")).resize((90, 110)))
    hospital = layouts.dicom_folder(tmp_path / "hospital", n_patients=2)
    with (hospital / "labels.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    from tests.support.dicom_factory import make_cxr, write

    write(make_cxr(pixels=copy, bits_stored=8, patient_id="X", modality="CR"),
          hospital / "dup/image.dcm")
    rows.append({"path": "dup/image.dcm", "label": dup_label, "patient_id": "other"})
    layouts._csv(hospital / "labels.csv", rows)

    out = tmp_path / "built"
    assert main(["build", "--out", str(out), "--ieee8023", str(ieee),
                 "--dicom", str(hospital)]) == 0
    built = _rows(out)
    originals = [r for r in built if r["orig_path"] == "images/p0-0.jpeg"]
    copies = [r for r in built if r["orig_path"] == "dup/image.dcm"]
    if dup_label == "covid":
        assert len(originals) + len(copies) == 1
    else:
        assert originals == [] and copies == []
    # the patient's second film stays: films of one patient are not duplicates
    assert any(r["orig_path"] == "images/p0-1.jpeg" for r in built)
    written = {p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")}
    assert written == {r["path"] for r in built}


def test_operator_errors_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "not-a-clone"
    empty.mkdir()
    assert main(["build", "--out", str(tmp_path / "o1"), "--ieee8023", str(empty)]) == 2
    assert "metadata.csv does not exist" in capsys.readouterr().err
    nih = tmp_path / "nih"
    layouts._csv(nih / "Data_Entry_2017.csv", [{"Image Index": "a.png", "Labels": "x"}])
    assert main(["build", "--out", str(tmp_path / "o2"), "--nih", str(nih)]) == 2
    assert "lacks the columns" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build"])  # --out is required
    assert main(["build", "--out", str(tmp_path / "o3")]) == 2
    assert "name at least one source" in capsys.readouterr().err
    hannover = layouts.hannover(tmp_path / "h", n_patients=2)
    assert main(["build", "--out", str(tmp_path / "o4"), "--hannover", str(hannover)]) == 0
    assert main(["build", "--out", str(tmp_path / "o4"), "--hannover", str(hannover)]) == 2
    assert "already holds a labels.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_build_then_retrain_on_the_output_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "built"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    build = subprocess.run([sys.executable, "-m", "trainer.datasets", "build", "--out",
                            str(out), *_sources(tmp_path)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stdout + build.stderr
    assert "wrote" in build.stdout
    env.update({
        "CXR_DATA_DIR": str(tmp_path / "data"),
        "CXR_DATABASE_URL": f"sqlite:///{tmp_path / 'cxr.db'}",
        "CXR_INPUT_SIZE": "64", "CXR_EPOCHS": "3", "CXR_TRAIN_VIEWS": "1",
        "CXR_TRAIN_CONTRAST": "none", "CXR_SPLIT_FRACTIONS": "0.5,0.25,0.25",
        # a few dozen synthetic films: the floor is tested in test_promotion_floor.py
        "CXR_PROMOTION_MIN_TEST_PER_CLASS": "0", "CXR_PROMOTION_MIN_AUC_LOWER": "0",
        "CXR_PROMOTION_MIN_SPECIFICITY": "0",
    })
    retrain = subprocess.run([sys.executable, "-m", "trainer.retrain", "--dataset", str(out)],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert retrain.returncode == 0, retrain.stdout + retrain.stderr
    assert "status: done" in retrain.stdout
    assert "decision: promoted" in retrain.stdout
    assert "test: AUC " in retrain.stdout
