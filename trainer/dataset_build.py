"""``python -m trainer.datasets build``: public chest X-ray collections, as published, into
the labelled folder the trainer reads (``labels.csv`` + images).

Each ``--LAYOUT DIR`` names the root of a clone or download, exactly as its publisher lays
it out:

``--ieee8023 DIR``
    github.com/ieee8023/covid-chestxray-dataset: ``metadata.csv`` (``patientid``,
    ``finding``, ``view``, ``modality``, ``folder``, ``filename``) and ``images/``.
``--figure1 DIR`` / ``--actualmed DIR``
    github.com/agchung/Figure1-COVID-chestxray-dataset and
    github.com/agchung/Actualmed-COVID-chestxray-dataset: ``metadata.csv`` (``patientid``,
    ``finding``, optional ``view``, optional ``imagename``) and ``images/``.
``--hannover DIR``
    github.com/ml-workgroup/covid-19-image-repository: ``data.csv`` (``patient_id``,
    ``image_id``, ``projection``) and ``png/<image_id>.png``; every patient there had
    COVID-19.
``--nih DIR``
    NIH ChestX-ray14 (nihcc.app.box.com/v/ChestXray-NIHCC): ``Data_Entry_2017.csv``
    (``Image Index``, ``Finding Labels``, ``Patient ID``, ``View Position``) and the PNGs
    anywhere below DIR (``images/`` or ``images_001/images/`` ...).  Only "No Finding"
    (normal) and findings that include Pneumonia (other_pneumonia) are used, and at most
    ``--nih-limit`` images, chosen by a hash of the patient id (reproducible).
``--dicom DIR``
    any folder of DICOM files with ``DIR/labels.csv``: ``path`` (relative to DIR),
    ``label`` (covid, normal or other_pneumonia; also 1/0, positive/negative), optional
    ``patient_id`` (else the file's PatientID), optional ``source``.

Every image becomes an 8-bit grayscale PNG (long side at most ``--max-side``) through the
same pixel pipeline as inference, so that format and resolution say less about the class.
``labels.csv`` keeps the patient id (prefixed by the source), the source, the view, the
original finding and path, and writes ``label`` (1 = COVID-19) and the three-class
``label_name`` (normal / other_pneumonia / covid).  Lateral views, CT, and findings that
are neither normal nor pneumonia are left out, each counted with its reason.

Near-duplicates: every image gets a perceptual hash (:mod:`trainer.near_duplicates`); a
group of near-identical images that spans more than one patient (the same film published
twice, in one collection or across two) keeps only its first image, or none where the
copies disagree on the label.  Films of one patient stay: the split keeps a patient on
one side.  ``build.json`` beside ``labels.csv`` records every count, reason and group.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from db.logs import configure_logging
from trainer.dataset_sources import (
    DEFAULT_MAX_SIDE,
    DEFAULT_NIH_LIMIT,
    LABEL_NAMES,
    BuildError,
    BuildReport,
    Candidate,
    agchung,
    dicom_folder,
    hannover,
    ieee8023,
    label_from_finding,
    nih,
)
from trainer.near_duplicates import DEFAULT_MAX_DISTANCE, near_duplicate_groups, perceptual_hash

log = logging.getLogger(__name__)

def _to_png(candidate: Candidate, out: Path, max_side: int) -> np.ndarray:
    from dicom_node.pixels import load_image_file

    img = load_image_file(candidate.path)  # float32 [0, 1], MONOCHROME2, any input format
    arr = np.clip(np.rint(np.asarray(img, dtype=np.float64) * 255.0), 0, 255).astype(np.uint8)
    pil = Image.fromarray(arr)
    if max(pil.size) > max_side:
        scale = max_side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))),
                         Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    pil.save(tmp, format="PNG")
    tmp.replace(out)
    return np.asarray(pil)


def _safe_stem(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).stem)[:80] or "image"


def build(sources: list[tuple[str, Path, Callable[[Path, BuildReport], Iterator[Candidate]]]],
          out: Path, *, max_side: int = DEFAULT_MAX_SIDE,
          max_distance: int = DEFAULT_MAX_DISTANCE) -> BuildReport:
    """Write ``out/labels.csv``, ``out/images/<source>/*.png`` and ``out/build.json``."""
    from db.errors import BadInputError

    out = Path(out)
    if (out / "labels.csv").exists():
        raise BuildError(f"{out} already holds a labels.csv; choose an empty folder")
    report = BuildReport()
    rows: dict[str, dict[str, str]] = {}
    hashes: dict[str, int] = {}
    counter = 0
    for name, root, parse in sources:
        if not root.is_dir():
            raise BuildError(f"{name}: {root} is not a folder")
        per = report.sources.setdefault(name, {"offered": 0, "written": 0})
        for cand in parse(root, report):
            per["offered"] += 1
            counter += 1
            rel = f"images/{cand.source}/{counter:06d}_{_safe_stem(cand.orig_path)}.png"
            try:
                pixels = _to_png(cand, out / rel, max_side)
            except (BadInputError, OSError, ValueError) as exc:
                report.skip(f"{name}: image unreadable")
                log.warning("dataset image unreadable source=%s file=%s reason=%s", name,
                            cand.orig_path, exc)
                continue
            per["written"] += 1
            hashes[rel] = perceptual_hash(pixels)
            rows[rel] = {"path": rel, "label": str(int(cand.label_name == "covid")),
                         "patient_id": cand.patient_id, "source": cand.source,
                         "view": cand.view, "label_name": cand.label_name,
                         "finding": cand.finding, "orig_path": cand.orig_path,
                         "phash": f"{hashes[rel]:064x}"}
    for group in near_duplicate_groups(hashes, max_distance):
        members = sorted(group)
        patients = {rows[m]["patient_id"] for m in members}
        if len(patients) < 2:
            continue  # films of one patient: the split keeps them together
        labels = {rows[m]["label_name"] for m in members}
        keep = [] if len(labels) > 1 else members[:1]
        drop = [m for m in members if m not in keep]
        report.duplicate_groups.append({
            "kept": keep, "dropped": drop, "patients": sorted(patients),
            "reason": "copies disagree on the label: all dropped" if not keep
            else "one film under several patients or datasets: first kept"})
        for m in drop:
            report.skip("near-duplicate of an image of another patient")
            (out / m).unlink(missing_ok=True)
            del rows[m]
    out.mkdir(parents=True, exist_ok=True)
    fields = ["path", "label", "patient_id", "source", "view", "label_name", "finding",
              "orig_path", "phash"]
    tmp = out / "labels.csv.tmp"
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows[k] for k in sorted(rows))
    tmp.replace(out / "labels.csv")
    report.images = len(rows)
    report.patients = len({r["patient_id"] for r in rows.values()})
    report.per_class = dict(Counter(r["label_name"] for r in rows.values()))
    (out / "build.json").write_text(json.dumps(asdict(report), indent=2, sort_keys=True))
    log.info("dataset built out=%s images=%d patients=%d duplicate_groups=%d", out,
             report.images, report.patients, len(report.duplicate_groups))
    return report


def add_build_parser(sub: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = sub.add_parser(
        "build", help="turn public collections, as published, into a labelled folder",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="new folder to write")
    for name, what in (("ieee8023", "ieee8023/covid-chestxray-dataset clone"),
                       ("figure1", "agchung/Figure1-COVID-chestxray-dataset clone"),
                       ("actualmed", "agchung/Actualmed-COVID-chestxray-dataset clone"),
                       ("hannover", "ml-workgroup/covid-19-image-repository clone"),
                       ("nih", "NIH ChestX-ray14 folder with Data_Entry_2017.csv")):
        p.add_argument(f"--{name}", type=Path, metavar="DIR", help=what)
    p.add_argument("--dicom", type=Path, action="append", default=[], metavar="DIR",
                   help="folder of DICOM files with labels.csv (path,label[,patient_id,"
                        "source]); repeatable")
    p.add_argument("--nih-limit", type=int, default=DEFAULT_NIH_LIMIT,
                   help=f"at most this many NIH images (default {DEFAULT_NIH_LIMIT})")
    p.add_argument("--max-side", type=int, default=DEFAULT_MAX_SIDE,
                   help=f"long side of the written images (default {DEFAULT_MAX_SIDE})")
    p.add_argument("--max-distance", type=int, default=DEFAULT_MAX_DISTANCE,
                   help="perceptual-hash bits within which two images are near-duplicates "
                        f"(default {DEFAULT_MAX_DISTANCE} of 256)")
    return p


def run_build(args: argparse.Namespace) -> int:
    sources: list[tuple[str, Path, Callable[[Path, BuildReport], Iterator[Candidate]]]] = []
    if args.ieee8023:
        sources.append(("ieee8023", args.ieee8023, ieee8023))
    if args.figure1:
        sources.append(("figure1", args.figure1, agchung("figure1")))
    if args.actualmed:
        sources.append(("actualmed", args.actualmed, agchung("actualmed")))
    if args.hannover:
        sources.append(("hannover", args.hannover, hannover))
    if args.nih:
        sources.append(("nih", args.nih, nih(args.nih_limit)))
    for folder in args.dicom:
        sources.append(("dicom", folder, dicom_folder))
    if not sources:
        print("error: name at least one source (--ieee8023, --figure1, --actualmed, "
              "--hannover, --nih, --dicom)", file=sys.stderr)
        return 2
    if args.max_side < 64 or args.nih_limit < 0 or args.max_distance < 0:
        print("error: --max-side must be >= 64, --nih-limit and --max-distance >= 0",
              file=sys.stderr)
        return 2
    try:
        report = build(sources, args.out, max_side=args.max_side,
                       max_distance=args.max_distance)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out / 'labels.csv'}: {report.images} images of {report.patients} "
          f"patients; per class: {json.dumps(report.per_class, sort_keys=True)}")
    for name, counts in report.sources.items():
        print(f"  {name}: {counts['written']} of {counts['offered']} images written")
    for reason, n in sorted(report.skipped.items()):
        print(f"  left out: {n} x {reason}")
    print(f"  near-duplicate groups across patients: {len(report.duplicate_groups)} "
          f"(details in {args.out / 'build.json'})")
    if report.images == 0:
        print("error: no usable image in the named sources", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m trainer.datasets",
        description="Labelled folders for the trainer (see `build --help`).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    add_build_parser(sub)
    args = parser.parse_args(argv)
    configure_logging(logging.INFO)
    return run_build(args)


__all__ = ["BuildError", "LABEL_NAMES", "build", "label_from_finding", "main"]
