"""Training and evaluation data: labelled studies in the database and labelled folders.

Both become :class:`ImageRecord` rows, read later through the same pixel pipeline as
inference (:func:`dicom_node.pixels.load_image_file`, then :mod:`trainer.transforms`).

Database: every study with a current label contributes its instances that the selection
rules would score (the same rules the worker applies, ``settings.selection_rules``), from
the received spool files.  The patient is ``Study.patient_id`` (or the study itself where
none was sent); the source is the sending AE (``pacs:<calling AE>``).

Folder (``--dataset DIR``): ``DIR/labels.csv`` with columns ``path,label,patient_id`` and
optionally ``source`` and ``label_name`` (normal / other_pneumonia / covid; where given,
``label`` may be empty and must otherwise agree); paths are relative to ``DIR``; DICOM,
PNG or JPEG files.
"""

from __future__ import annotations

import csv
import hashlib
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from db.errors import BadInputError
from db.models import Instance, Label, Study
from db.session import Database
from db.settings import Settings
from dicom_node.pixels import load_image_file
from dicom_node.selection import select_instances
from trainer.labels import parse_label, parse_label_name, reconcile

log = logging.getLogger(__name__)


class DatasetError(ValueError):
    """A dataset folder or its labels.csv is unusable (the operator's fault)."""


@dataclass(frozen=True)
class ImageRecord:
    """One labelled image."""

    key: str  # stable identity: "db:<SOP Instance UID>" or "dir:<folder name>/<path>"
    path: Path
    label: int
    patient_key: str
    source: str
    study_uid: str | None = None
    study_id: int | None = None
    # normal, other_pneumonia or covid; None where only COVID-19 or not is known
    label_name: str | None = None


def folder_records(root: Path) -> list[ImageRecord]:
    """Records of a labelled folder; any bad row stops with its line number."""
    root = Path(root)
    labels = root / "labels.csv"
    if not labels.is_file():
        raise DatasetError(f"dataset {root} has no labels.csv")
    problems: list[str] = []
    out: list[ImageRecord] = []
    with labels.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        header = set(reader.fieldnames or [])
        if not {"path", "label", "patient_id"} <= header:
            raise DatasetError(f"{labels} needs the columns path,label,patient_id")
        for row in reader:
            line = reader.line_num
            rel = (row.get("path") or "").strip()
            patient = (row.get("patient_id") or "").strip()
            try:
                name = parse_label_name(row.get("label_name") or "")
                raw = (row.get("label") or "").strip()
                label = reconcile(parse_label(raw) if raw or name is None else None, name)
            except ValueError as exc:
                problems.append(f"line {line}: {exc}")
                continue
            path = (root / rel).resolve()
            if not rel or not path.is_file():
                problems.append(f"line {line}: image {rel!r} not found")
                continue
            if not patient:
                problems.append(f"line {line}: patient_id is empty")
                continue
            source = (row.get("source") or "").strip() or root.name
            out.append(ImageRecord(key=f"dir:{root.name}/{rel}", path=path, label=label,
                                   patient_key=patient, source=source, label_name=name))
    if problems:
        shown = "; ".join(problems[:10])
        raise DatasetError(f"{labels}: {len(problems)} bad rows: {shown}")
    return out


def database_records(db: Database, settings: Settings) -> list[ImageRecord]:
    """Images of every study with a current label, as the worker would select them."""
    out: list[ImageRecord] = []
    with db.session() as s:
        rows = s.execute(
            select(Study, Label.label, Label.label_name)
            .join(Label, Label.study_id == Study.id)
            .where(Label.current.is_(True))
            .order_by(Study.id)
        ).all()
        for study, label, label_name in rows:
            instances = s.scalars(
                select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)
            ).all()
            # The worker's own selection code, so training sees the images inference scores.
            headers = [{"Modality": i.modality, "ViewPosition": i.view_position,
                        "BodyPartExamined": i.body_part, "SOPClassUID": i.sop_class_uid}
                       for i in instances]
            chosen = {sel.index for sel in select_instances(headers, settings.selection_rules)
                      if sel.scored}
            for index, inst in enumerate(instances):
                if index not in chosen:
                    continue
                path = Path(inst.path)
                if not path.is_absolute():
                    path = settings.spool_dir / path
                out.append(ImageRecord(
                    key=f"db:{inst.sop_instance_uid}", path=path, label=int(label),
                    patient_key=study.patient_id or f"study:{study.study_uid}",
                    source=f"pacs:{inst.calling_ae or 'unknown'}",
                    study_uid=study.study_uid, study_id=study.id, label_name=label_name,
                ))
    return out


def load_records(db: Database | None, settings: Settings,
                 datasets: Sequence[Path] = ()) -> list[ImageRecord]:
    """All records: the database's (when given) and every dataset folder's."""
    records: list[ImageRecord] = []
    if db is not None:
        records += [r for r in database_records(db, settings) if r.path.is_file()]
    for root in datasets:
        records += folder_records(root)
    return records


def data_digest(records: Iterable[ImageRecord]) -> str:
    """A digest of which images with which labels a model was trained on."""
    h = hashlib.sha256()
    for r in sorted(records, key=lambda r: r.key):
        name = f"\t{r.label_name}" if r.label_name is not None else ""
        h.update(f"{r.key}\t{r.label}\t{r.patient_key}{name}\n".encode())
    return h.hexdigest()


def describe(records: Sequence[ImageRecord]) -> dict[str, Any]:
    """Counts per source and class, and patient counts, for logs and reports."""
    per: dict[str, dict[str, int]] = {}
    for r in records:
        d = per.setdefault(r.source, {"positive": 0, "negative": 0})
        d["positive" if r.label else "negative"] += 1
        if r.label_name is not None:
            d[r.label_name] = d.get(r.label_name, 0) + 1
    return {"images": len(records), "patients": len({r.patient_key for r in records}),
            "positive": sum(r.label for r in records), "per_source": per}


__all__ = [
    "DatasetError",
    "ImageRecord",
    "data_digest",
    "database_records",
    "describe",
    "folder_records",
    "load_records",
    "drop_unreadable",
]


def drop_unreadable(records: Sequence[ImageRecord]) -> tuple[list[ImageRecord], list[str]]:
    """The records whose image decodes, and one ``"<key>: <reason>"`` line for each one
    that does not.  A damaged file or an undecodable study must not stop every later
    night's training; it is left out, logged and reported instead."""
    usable: list[ImageRecord] = []
    skipped: list[str] = []
    for record in records:
        try:
            load_image_file(record.path)
        except (BadInputError, OSError) as exc:
            skipped.append(f"{record.key}: {exc}")
            log.warning("training image left out key=%s reason=%s", record.key, exc)
            continue
        usable.append(record)
    return usable, skipped


def main(argv: list[str] | None = None) -> int:
    """``python -m trainer.datasets build ...``: see :mod:`trainer.dataset_build`."""
    from trainer.dataset_build import main as build_main

    return build_main(argv)


if __name__ == "__main__":
    import sys

    sys.exit(main())
