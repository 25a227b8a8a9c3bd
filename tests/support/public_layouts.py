"""Small synthetic copies of public chest X-ray collections, each in its published layout.

Images are generated here (never copied from shared data): a smooth random field per film,
so that different films differ in their perceptual hash, plus a bright lower-zone blob for
the positive classes so that a model can learn something from them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from tests.support.dicom_factory import make_cxr, write


def film(seed: int, label_name: str = "normal", size: int = 96) -> np.ndarray:
    rng = np.random.default_rng(seed)
    field = gaussian_filter(rng.normal(size=(size, size)), sigma=size / 16)
    field = (field - field.min()) / (field.max() - field.min() + 1e-9)
    if label_name != "normal":
        yy, xx = np.mgrid[0:size, 0:size] / size
        strength = 1.2 if label_name == "covid" else 0.7
        field = field + strength * np.exp(-(((yy - 0.7) / 0.12) ** 2 + ((xx - 0.3) / 0.12) ** 2))
    field = (field - field.min()) / (field.max() - field.min())
    return (field * 255).astype(np.uint8)


def _csv(path: Path, rows: list[dict[str, str]], encoding: str = "utf-8") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding=encoding) as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _save(arr: np.ndarray, path: Path, rgb: bool = False, size: tuple[int, int] | None = None,
          mode16: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(arr)
    if size is not None:
        img = img.resize(size)
    if mode16:
        img = Image.fromarray(np.asarray(img).astype(np.uint16) * 257)
    elif rgb:
        img = img.convert("RGB")
    img.save(path)


IEEE_COLUMNS = ["patientid", "offset", "sex", "age", "finding", "RT_PCR_positive", "view",
                "modality", "date", "location", "folder", "filename", "doi", "url", "license",
                "clinical_notes", "other_notes"]


def ieee8023(root: Path, seed: int = 100, n_patients: int = 10) -> Path:
    rows = []

    def row(pid: str, finding: str, view: str, filename: str, modality: str = "X-ray",
            folder: str = "images") -> None:
        r = dict.fromkeys(IEEE_COLUMNS, "")
        r.update(patientid=pid, finding=finding, view=view, modality=modality, folder=folder,
                 filename=filename)
        rows.append(r)

    findings = ["Pneumonia/Viral/COVID-19", "Pneumonia/Bacterial/Streptococcus", "No Finding"]
    for p in range(n_patients):
        finding = findings[p % 3]
        label = ["covid", "other_pneumonia", "normal"][p % 3]
        for i in range(2):
            name = f"p{p}-{i}.jpeg"
            _save(film(seed + 10 * p + i, label), root / "images" / name, rgb=True,
                  size=(120, 100))
            row(str(p + 1), finding, "PA" if i == 0 else "AP Supine", name)
    _save(film(seed + 999), root / "images" / "lateral.jpg")
    row("1", findings[0], "L", "lateral.jpg")
    row("2", findings[0], "Axial", "ct.nii.gz", modality="CT", folder="volumes")
    row("3", "todo", "PA", "lateral.jpg")
    row("4", "Tuberculosis", "PA", "lateral.jpg")
    row("5", findings[0], "PA", "missing.jpg")
    row("6", findings[0], "PA", "../../etc/passwd")
    _csv(root / "metadata.csv", rows)
    return root


def agchung(root: Path, name: str, seed: int, n_patients: int = 8,
            with_imagename: bool = False) -> Path:
    """Figure 1 (images named after the patient id, Latin-1 CSV) or Actualmed (imagename)."""
    rows = []
    findings = ["COVID-19", "Pneumonia", "No finding"]
    labels = ["covid", "other_pneumonia", "normal"]
    for p in range(n_patients):
        pid = f"{name.upper()}-{p:05d}"
        films = [pid] if p % 4 else [f"{pid}a", f"{pid}b"]  # two films of one case
        for j, fid in enumerate(films):
            fname = f"{fid}.jpg" if p % 2 else f"{fid}.png"
            _save(film(seed + 10 * p + j, labels[p % 3]), root / "images" / fname)
            r = {"patientid": fid, "offset": "", "sex": "M", "age": "50",
                 "finding": findings[p % 3] + (", ARDS" if p % 3 == 0 else ""), "view": "PA",
                 "modality": "X-ray", "notes": "température élevée"}
            if with_imagename:
                r["imagename"] = fname
            rows.append(r)
    rows.append({**rows[0], "patientid": f"{name.upper()}-LAT", "view": "lateral",
                 **({"imagename": "x.jpg"} if with_imagename else {})})
    _csv(root / "metadata.csv", rows, encoding="latin-1")
    return root


def hannover(root: Path, seed: int = 300, n_patients: int = 6) -> Path:
    rows = []
    for p in range(n_patients):
        for i in range(2):
            image_id = f"{p:04x}{i:04x}"
            _save(film(seed + 10 * p + i, "covid"), root / "png" / f"{image_id}.png",
                  mode16=(p == 0))
            rows.append({"patient_id": f"{p:08x}", "image_id": image_id, "sex": "m",
                         "age": "", "modality": "CR", "projection": "ap" if i else "pa"})
    rows.append({**rows[0], "image_id": "lateral1", "projection": "lateral"})
    _csv(root / "data.csv", rows)
    return root


def nih(root: Path, seed: int = 400, n_patients: int = 14) -> Path:
    rows = []
    for p in range(n_patients):
        findings = ["No Finding", "Pneumonia|Infiltration", "Effusion"][p % 3]
        label = {"No Finding": "normal", "Effusion": "normal"}.get(findings, "other_pneumonia")
        name = f"{p + 1:08d}_000.png"
        folder = root / ("images_001" if p < n_patients // 2 else "images_002") / "images"
        _save(film(seed + p, label), folder / name)
        rows.append({"Image Index": name, "Finding Labels": findings, "Follow-up #": "0",
                     "Patient ID": str(p + 1), "Patient Age": "60", "Patient Gender": "F",
                     "View Position": "PA" if p % 5 else "AP",
                     "OriginalImage[Width": "96", "Height]": "96"})
    _csv(root / "Data_Entry_2017.csv", rows)
    return root


def dicom_folder(root: Path, seed: int = 500, n_patients: int = 8,
                 duplicate_of: np.ndarray | None = None) -> Path:
    rows = []
    for p in range(n_patients):
        label = ["covid", "normal"][p % 2]
        ds = make_cxr(pixels=film(seed + p, label), bits_stored=8, patient_id=f"DCM{p}",
                      modality="CR")
        rel = f"study{p}/image.dcm"
        write(ds, root / rel)
        rows.append({"path": rel, "label": label if p % 4 else str(int(label == "covid")),
                     "patient_id": "" if p % 3 == 0 else f"site-{p}"})
    if duplicate_of is not None:
        write(make_cxr(pixels=duplicate_of, bits_stored=8, patient_id="DCM-DUP",
                       modality="CR"), root / "dup/image.dcm")
        rows.append({"path": "dup/image.dcm", "label": "covid", "patient_id": "dup-patient"})
    rows.append({"path": "../outside.dcm", "label": "covid", "patient_id": "x"})
    rows.append({"path": "study0/image.dcm", "label": "maybe", "patient_id": "x"})
    _csv(root / "labels.csv", rows)
    return root
