"""Group commit: concurrent stores share one transaction, each is answered only after its
own row and file are durable, and one failing store does not fail its neighbours."""

from __future__ import annotations

import threading
from pathlib import Path

from pydicom.uid import generate_uid

from db.models import Instance, utcnow
from db.session import Database
from db.settings import Settings
from dicom_node import ingest, spool
from dicom_node.group_commit import GroupCommitter
from tests.support.listener_peers import instance_rows, spool_files
from tests.support.services import wait_until

DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


def _header(study_uid: str, sop_uid: str) -> ingest.Header:
    return ingest.Header(study_uid=study_uid, series_uid=None, sop_uid=sop_uid,
                         sop_class_uid=DX_STORAGE, transfer_syntax="1.2.840.10008.1.2.1",
                         modality="DX", view_position=None, body_part=None, patient_id=None,
                         accession_number=None)


def _record_all(committer: GroupCommitter, db: Database, spool_dir: Path,
                headers: list[ingest.Header]) -> dict[str, ingest.IngestOutcome | BaseException]:
    """Stage one file per header and record them from one thread each, all queued while
    no group may be committed, so that they form one group."""
    results: dict[str, ingest.IngestOutcome | BaseException] = {}
    lock = threading.Lock()

    def one(i: int, header: ingest.Header) -> None:
        final = spool.instance_path(spool_dir, header.study_uid, header.sop_uid)
        staged = spool.stage(final, [f"instance {i} {header.sop_uid}".encode()])
        try:
            outcome: ingest.IngestOutcome | BaseException = committer.record(
                db, header, staged, "STORESCU", utcnow())
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            outcome = exc
        with lock:
            results[f"{i}:{header.sop_uid}"] = outcome

    threads = [threading.Thread(target=one, args=(i, h)) for i, h in enumerate(headers)]
    with committer.held():
        for t in threads:
            t.start()
        wait_until(lambda: committer.waiting() == len(headers), timeout=30,
                   what="stores queued")
    for t in threads:
        t.join(60)
    return results


def test_concurrent_stores_share_one_transaction(settings: Settings) -> None:
    db = Database(settings)
    committer = GroupCommitter(db)
    try:
        study = generate_uid()
        headers = [_header(study if i % 2 else generate_uid(), generate_uid()) for i in range(10)]
        results = _record_all(committer, db, settings.spool_dir, headers)
        assert committer.largest_group == 10
        rows = instance_rows(db)
        for key, outcome in results.items():
            assert isinstance(outcome, ingest.IngestOutcome), outcome
            assert not outcome.duplicate
            sop = key.split(":", 1)[1]
            assert Path(rows[sop].path) == outcome.path
            assert outcome.path.read_bytes().startswith(b"instance ")
        assert len(rows) == 10
        assert not [p for p in spool_files(settings.spool_dir) if spool.is_temp_name(p.name)]
    finally:
        committer.stop()
        db.dispose()


def test_a_duplicate_in_the_same_group_is_stored_once(settings: Settings) -> None:
    db = Database(settings)
    committer = GroupCommitter(db)
    try:
        header = _header(generate_uid(), generate_uid())
        results = _record_all(committer, db, settings.spool_dir, [header, header, header])
        outcomes = list(results.values())
        assert all(isinstance(o, ingest.IngestOutcome) for o in outcomes), outcomes
        assert sorted(o.duplicate for o in outcomes  # type: ignore[union-attr]
                      ) == [False, True, True]
        rows = instance_rows(db)
        assert list(rows) == [header.sop_uid]
        files = spool_files(settings.spool_dir)
        assert [p.name for p in files] == [f"{header.sop_uid}.dcm"]
    finally:
        committer.stop()
        db.dispose()


def test_a_store_that_fails_the_group_does_not_fail_its_neighbours(settings: Settings) -> None:
    db = Database(settings)
    committer = GroupCommitter(db)
    try:
        # Another process recorded this SOP Instance UID under another path and its file is
        # not where ours goes: our insert hits the unique constraint inside the group.
        taken = _header(generate_uid(), generate_uid())
        elsewhere = settings.spool_dir / "elsewhere.dcm"
        elsewhere.write_bytes(b"theirs")
        with db.session() as session:
            study_id, _gen, _event = ingest._touch_study(session, taken, utcnow())
            session.add(Instance(study_id=study_id, sop_instance_uid=taken.sop_uid,
                                 sop_class_uid=DX_STORAGE, transfer_syntax="1.2.840.10008.1.2.1",
                                 path=str(elsewhere), size_bytes=6,
                                 sha256="0" * 64, received_at=utcnow()))
        others = [_header(generate_uid(), generate_uid()) for _ in range(4)]
        results = _record_all(committer, db, settings.spool_dir, [others[0], taken, *others[1:]])
        assert committer.largest_group == 0  # the group failed as one, recorded store by store
        rows = instance_rows(db)
        for key, outcome in results.items():
            assert isinstance(outcome, ingest.IngestOutcome), outcome
            sop = key.split(":", 1)[1]
            if sop == taken.sop_uid:
                assert outcome.duplicate and outcome.path == elsewhere
            else:
                assert not outcome.duplicate and Path(rows[sop].path).is_file()
        assert len(rows) == 5
        ours = spool.instance_path(settings.spool_dir, taken.study_uid, taken.sop_uid)
        assert not ours.exists()  # linked by the failed group, removed as a duplicate
        assert not [p for p in spool_files(settings.spool_dir) if spool.is_temp_name(p.name)]
    finally:
        committer.stop()
        db.dispose()
