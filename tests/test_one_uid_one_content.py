"""One UID, one content, through the whole loop: Orthanc pushes a study to the real node, a
real Celery worker analyses it and delivers to Orthanc; then the finished study is pushed
again together with our own SR and SC (as a PACS routing everything back would), a late
image arrives, and the operator redelivers.  Every object Orthanc holds is compared, by
UID and by hash, with the first file written under that UID."""

from __future__ import annotations

import hashlib
import io
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID, JPEGLSLossless, generate_uid
from sqlalchemy import func, select

from db.models import Analysis, Delivery, DeliveryState, Study, utcnow
from db.session import Database
from dicom_node import identity
from dicom_node.sender import variant_path
from tests.support.dicom_factory import make_cxr, write
from tests.support.services import redis_reachable, wait_until
from tests.support.whole_loop import loop_settings, running_loop
from tests.support.worker_data import register_and_promote
from worker.delivery import redeliver

pytestmark = [pytest.mark.slow, pytest.mark.orthanc, pytest.mark.redis]


def dataset_sha256(data: bytes) -> str:
    """The hash of a Part 10 file's data set, after the file meta (which a PACS rewrites)."""
    assert data[128:132] == b"DICM"
    assert data[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) File Meta Group Length
    (meta_length,) = struct.unpack("<I", data[140:144])
    return hashlib.sha256(data[144 + meta_length:]).hexdigest()


def _study_counts(db: Database, study_uid: str) -> tuple[int, int]:
    with db.session() as s:
        study = s.scalars(select(Study).where(Study.study_uid == study_uid)).one()
        analyses = s.scalar(select(func.count(Analysis.id))
                            .where(Analysis.study_id == study.id))
        return int(study.generation), int(analyses or 0)


def test_repush_late_image_own_objects_and_redeliver_keep_one_content_per_uid(  # type: ignore[no-untyped-def]
        make_settings, sqlite_url: str, orthanc_factory, tmp_path: Path) -> None:
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    orthanc = orthanc_factory()
    settings = loop_settings(make_settings, sqlite_url, orthanc)
    db = Database(settings)
    register_and_promote(db, settings, "uid-lite0", architecture="efficientnet_lite0",
                         input_size=224)
    study_uid = generate_uid()
    first = make_cxr(rows=256, cols=200, patient_id="UID-1", study_uid=study_uid)
    late = make_cxr(rows=240, cols=200, patient_id="UID-1", study_uid=study_uid, seed=7)
    assert first.SOPInstanceUID != late.SOPInstanceUID
    orthanc.upload(write(first, tmp_path / "first.dcm"))

    orthanc_study = orthanc.get("/studies")[0]

    def instances() -> list[dict[str, Any]]:
        return list(orthanc.get(f"/studies/{orthanc_study}/instances"))

    with running_loop(settings, orthanc, tmp_path) as loop:
        node_log_path, log_tail = loop.node_log, loop.log_tail

        def push(resources: list[str]) -> None:
            orthanc.post("/modalities/NODE/store",
                         {"Resources": resources, "Synchronous": True})

        # 1. The study arrives and its SR and SC come back.
        push([orthanc_study])
        wait_until(lambda: len(instances()) == 3, 180, what=f"SR and SC\n{log_tail()}")
        assert _study_counts(db, study_uid) == (1, 1)

        # 2. The finished study comes back whole: the source (a duplicate) and our own
        # SR and SC.  Acknowledged, nothing re-opened, nothing analysed again.
        push([orthanc_study])
        wait_until(lambda: node_log_path.read_text(errors="replace")
                   .count("own object ignored") >= 2, 30, what="own objects logged")
        time.sleep(3 * settings.stable_seconds + 1)
        assert _study_counts(db, study_uid) == (1, 1), log_tail()

        # 3. A late image re-opens the study: a new SR naming the first, and one more SC.
        late_id = orthanc.upload(write(late, tmp_path / "late.dcm"))["ID"]
        push([late_id])
        wait_until(lambda: len(instances()) == 6, 240,
                   what=f"the second SR and the late image's SC\n{log_tail()}")
        assert _study_counts(db, study_uid) == (2, 2)

        def settled() -> bool:
            with db.session() as s:
                return all(r.state == DeliveryState.DELIVERED
                           for r in s.scalars(select(Delivery)).all())

        wait_until(settled, 60, what="every delivery recorded")

        # 4. The operator redelivers: only the current results, same bytes.
        before = utcnow()
        ids = redeliver(db, settings, study_uid)
        # The current results: the new SR, the late image's SC and the first image's SC,
        # whose content (and so UID) the re-analysis did not change.  Not the first SR.
        assert len(ids) == 3

        def redelivered() -> bool:
            with db.session() as s:
                rows = s.scalars(select(Delivery).where(Delivery.id.in_(ids))).all()
                return all(r.state == DeliveryState.DELIVERED and r.delivered_at is not None
                           and r.delivered_at.replace(tzinfo=before.tzinfo) >= before
                           for r in rows)

        wait_until(redelivered, 120, what=f"redelivery\n{log_tail()}")

    with db.session() as s:
        rows = s.scalars(select(Delivery).order_by(Delivery.id)).all()
        outbox = {r.sop_instance_uid: (r.kind, Path(r.path)) for r in rows}
    # Every object we produced is a distinct UID carrying our marker, delivered once each.
    assert len(rows) == len(outbox) == 4  # SR1, SC(first), SR2, SC(late)
    held: dict[str, pydicom.Dataset] = {}
    for inst in instances():
        data = orthanc.get(f"/instances/{inst['ID']}/file")
        ds = pydicom.dcmread(io.BytesIO(data))
        uid = str(ds.SOPInstanceUID)
        assert uid not in held, f"Orthanc holds {uid} twice"
        held[uid] = ds
        if uid in (first.SOPInstanceUID, late.SOPInstanceUID):
            continue
        assert identity.is_own_uid(uid)
        kind, path = outbox[uid]
        # What was sent: the outbox file itself, or its variant in the syntax Orthanc
        # accepted (written once, beside it); never other bytes.
        sent = variant_path(path, UID(ds.SOPClassUID), UID(ds.file_meta.TransferSyntaxUID))
        assert dataset_sha256(data) == dataset_sha256(sent.read_bytes()), \
            f"{kind} {uid}: Orthanc holds other bytes than the first file sent"
        if kind == "sc":
            # Orthanc takes JPEG-LS: the heatmap travels compressed, losslessly.
            assert ds.file_meta.TransferSyntaxUID == JPEGLSLossless
            assert np.array_equal(ds.pixel_array, pydicom.dcmread(path).pixel_array)
    assert set(held) == set(outbox) | {first.SOPInstanceUID, late.SOPInstanceUID}

    srs = sorted((held[u] for u, (k, _) in outbox.items() if k == "sr"),
                 key=lambda d: len(d.CurrentRequestedProcedureEvidenceSequence[0]
                                   .ReferencedSeriesSequence))
    srs = sorted(srs, key=lambda d: "PredecessorDocumentsSequence" in d)
    sr1, sr2 = srs
    assert "PredecessorDocumentsSequence" not in sr1
    named = [i.ReferencedSOPInstanceUID
             for st in sr2.PredecessorDocumentsSequence
             for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence]
    assert named == [sr1.SOPInstanceUID] and sr2.SOPInstanceUID not in named
    db.dispose()
