"""The public collections' layouts, read into labelled candidates (see
:mod:`trainer.dataset_build` for the layouts and what becomes of each image).
"""

from __future__ import annotations

import csv
import hashlib
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

LABEL_NAMES = ("normal", "other_pneumonia", "covid")
FRONTAL_VIEWS = {"pa", "ap", "ap supine", "ap semi erect", "ap erect", "frontal"}
DEFAULT_MAX_SIDE = 1024
DEFAULT_NIH_LIMIT = 1000
# Findings of the ieee8023 collection that are pneumonias without "Pneumonia" in the name
# (its older, flat vocabulary).
_PNEUMONIA_WORDS = ("pneumonia", "sars", "mers", "ards", "legionella", "klebsiella",
                    "streptococcus", "staphylococcus", "pneumocystis", "chlamydophila",
                    "mycoplasma", "e.coli", "influenza", "varicella", "herpes", "aspergillosis",
                    "nocardia", "lipoid", "bacterial", "viral", "fungal")


class BuildError(ValueError):
    """A source folder is not in the layout it was named as (the operator's fault)."""


@dataclass(frozen=True)
class Candidate:
    """One image a source offers, before decoding."""

    source: str
    path: Path
    patient_id: str  # already prefixed with the source
    label_name: str
    view: str
    finding: str
    orig_path: str


@dataclass
class BuildReport:
    sources: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    duplicate_groups: list[dict[str, Any]] = field(default_factory=list)
    images: int = 0
    patients: int = 0
    per_class: dict[str, int] = field(default_factory=dict)

    def skip(self, reason: str) -> None:
        self.skipped[reason] = self.skipped.get(reason, 0) + 1


def label_from_finding(finding: str) -> str | None:
    """normal / other_pneumonia / covid for a free-text finding, or None (not used)."""
    text = finding.strip().lower()
    if not text or text in ("todo", "unknown", "nan"):
        return None
    if "covid" in text:
        return "covid"
    if text in ("no finding", "no findings", "normal"):
        return "normal"
    if any(word in text for word in _PNEUMONIA_WORDS):
        return "other_pneumonia"
    return None


def _read_csv(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        raise BuildError(f"{path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:  # the Figure 1 metadata is Latin-1
        text = raw.decode("latin-1")
    reader = csv.DictReader(text.splitlines())
    return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _require(rows: list[dict[str, str]], path: Path, columns: tuple[str, ...]) -> None:
    have = set(rows[0]) if rows else set()
    missing = [c for c in columns if c not in have]
    if rows and missing:
        raise BuildError(f"{path} lacks the columns {', '.join(missing)}")


def _inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` when it stays inside ``root`` and is a file; never follows ``..`` out."""
    if not rel or "\x00" in rel:
        return None
    path = (root / rel).resolve()
    try:
        path.relative_to(root.resolve())
    except ValueError:
        return None
    return path if path.is_file() else None


def _frontal(view: str) -> bool:
    return view.strip().lower() in FRONTAL_VIEWS


def ieee8023(root: Path, report: BuildReport) -> Iterator[Candidate]:
    rows = _read_csv(root / "metadata.csv")
    _require(rows, root / "metadata.csv", ("patientid", "finding", "view", "filename"))
    for row in rows:
        if row.get("modality", "X-ray").lower() not in ("x-ray", "xray", "cr", "dx", ""):
            report.skip("ieee8023: not an X-ray (CT)")
            continue
        if not _frontal(row["view"]):
            report.skip("ieee8023: not a frontal view")
            continue
        label = label_from_finding(row["finding"])
        if label is None:
            report.skip("ieee8023: finding neither normal nor pneumonia")
            continue
        rel = f"{row.get('folder') or 'images'}/{row['filename']}"
        path = _inside(root, rel)
        if path is None:
            report.skip("ieee8023: image file missing")
            continue
        yield Candidate("ieee8023", path, f"ieee8023:{row['patientid']}", label,
                        row["view"], row["finding"], rel)


def agchung(name: str) -> Callable[[Path, BuildReport], Iterator[Candidate]]:
    """Figure 1 and Actualmed: ``metadata.csv`` and ``images/``."""

    def parse(root: Path, report: BuildReport) -> Iterator[Candidate]:
        rows = _read_csv(root / "metadata.csv")
        _require(rows, root / "metadata.csv", ("patientid", "finding"))
        for row in rows:
            view = row.get("view", "")
            if view and not _frontal(view):
                report.skip(f"{name}: not a frontal view")
                continue
            # "COVID-19, ARDS" and the like: the first finding decides
            label = label_from_finding(row["finding"].split(",")[0])
            if label is None:
                report.skip(f"{name}: finding neither normal nor pneumonia")
                continue
            if row.get("imagename"):
                names = [row["imagename"]]
            else:
                names = [f"{row['patientid']}{ext}" for ext in (".jpg", ".png", ".jpeg")]
            found = [(n, p) for n in names if (p := _inside(root / "images", n)) is not None]
            if not found:
                report.skip(f"{name}: image file missing")
                continue
            rel, path = found[0]
            # "COVID-00039a" and "COVID-00039b" are two films of one case
            patient = re.sub(r"(?<=\d)[a-z]$", "", row["patientid"])
            yield Candidate(name, path, f"{name}:{patient}", label, view or "unknown",
                            row["finding"], f"images/{rel}")

    return parse


def hannover(root: Path, report: BuildReport) -> Iterator[Candidate]:
    rows = _read_csv(root / "data.csv")
    _require(rows, root / "data.csv", ("patient_id", "image_id"))
    for row in rows:
        view = row.get("projection", "")
        if view and not _frontal(view):
            report.skip("hannover: not a frontal view")
            continue
        rel = f"png/{row['image_id']}.png"
        path = _inside(root, rel)
        if path is None:
            report.skip("hannover: image file missing")
            continue
        yield Candidate("hannover", path, f"hannover:{row['patient_id']}", "covid",
                        view.upper() or "unknown", "COVID-19", rel)


def _nih_chosen(patient: str) -> float:
    digest = hashlib.sha256(f"nih-subset-v1:{patient}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def nih(limit: int) -> Callable[[Path, BuildReport], Iterator[Candidate]]:
    def parse(root: Path, report: BuildReport) -> Iterator[Candidate]:
        rows = _read_csv(root / "Data_Entry_2017.csv")
        _require(rows, root / "Data_Entry_2017.csv",
                 ("Image Index", "Finding Labels", "Patient ID", "View Position"))
        files = {p.name: p for p in root.rglob("*.png")}
        usable = []
        for row in rows:
            findings = row["Finding Labels"].split("|")
            if findings == ["No Finding"]:
                label = "normal"
            elif "Pneumonia" in findings:
                label = "other_pneumonia"
            else:
                report.skip("nih: finding neither normal nor pneumonia")
                continue
            if not _frontal(row["View Position"]):
                report.skip("nih: not a frontal view")
                continue
            path = files.get(row["Image Index"])
            if path is None or not path.resolve().is_relative_to(root.resolve()):
                report.skip("nih: image file missing")
                continue
            usable.append((row, label, path))
        # a reproducible subset by patient, pneumonias first (they are rare)
        usable.sort(key=lambda t: (t[1] != "other_pneumonia", _nih_chosen(t[0]["Patient ID"]),
                                   t[0]["Image Index"]))
        if len(usable) > limit:
            for _ in usable[limit:]:
                report.skip("nih: beyond --nih-limit")
            usable = usable[:limit]
        for row, label, path in usable:
            yield Candidate("nih", path, f"nih:{row['Patient ID']}", label,
                            row["View Position"], row["Finding Labels"],
                            str(path.resolve().relative_to(root.resolve())))

    return parse


def _dicom_label(value: str) -> str | None:
    text = value.strip().lower().replace("-", "_").replace(" ", "_")
    aliases = {"1": "covid", "positive": "covid", "covid_19": "covid", "covid": "covid",
               "0": "normal", "negative": "normal", "normal": "normal",
               "other_pneumonia": "other_pneumonia", "pneumonia": "other_pneumonia"}
    return aliases.get(text)


def dicom_folder(root: Path, report: BuildReport) -> Iterator[Candidate]:
    import pydicom
    from pydicom.errors import InvalidDicomError

    rows = _read_csv(root / "labels.csv")
    _require(rows, root / "labels.csv", ("path", "label"))
    default_source = re.sub(r"[^A-Za-z0-9_.-]+", "_", root.resolve().name) or "dicom"
    for row in rows:
        path = _inside(root, row["path"])
        if path is None:
            report.skip("dicom: file missing or outside the folder")
            continue
        label = _dicom_label(row["label"])
        if label is None:
            report.skip("dicom: label not covid, normal or other_pneumonia")
            continue
        patient = row.get("patient_id", "")
        view = ""
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            report.skip("dicom: not a DICOM file")
            continue
        patient = patient or str(ds.get("PatientID", "") or "")
        view = str(ds.get("ViewPosition", "") or "")
        if view and not _frontal(view):
            report.skip("dicom: not a frontal view")
            continue
        if not patient:
            report.skip("dicom: no patient id (neither in labels.csv nor in the file)")
            continue
        source = re.sub(r"[^A-Za-z0-9_.-]+", "_", row.get("source", "")) or default_source
        yield Candidate(source, path, f"{source}:{patient}", label, view or "unknown",
                        row["label"], row["path"])
