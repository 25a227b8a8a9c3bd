"""Several listener processes may share one spool: a store that fails to record must never
delete a file another process put at the same path."""

from __future__ import annotations

import pytest
from pynetdicom.dsutils import encode, encode_file_meta

from db.session import Database
from dicom_node import ingest, spool
from tests.support.dicom_factory import make_cxr


def test_failed_record_leaves_a_file_it_did_not_create(make_settings, sqlite_url: str) -> None:  # type: ignore[no-untyped-def]
    settings = make_settings(database_url=sqlite_url)
    Database(settings).dispose()  # the schema, then a connection that cannot write
    read_only = Database(settings.replace(
        database_url=f"sqlite:///file:{sqlite_url.removeprefix('sqlite:///')}?mode=ro&uri=true"),
        migrate=False)
    ds = make_cxr()
    body = encode(ds, False, True)
    assert body is not None
    header = ingest.parse_header(body, str(ds.file_meta.TransferSyntaxUID))
    chunks = (b"\x00" * 128 + b"DICM" + encode_file_meta(ds.file_meta), body)
    final = spool.instance_path(settings.spool_dir, header.study_uid, header.sop_uid)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(b"".join(chunks))  # another process's copy, its row not yet visible

    with pytest.raises(ingest.RecordError):
        ingest.ingest(read_only, settings.spool_dir, header, chunks, "STORESCU", 0)
    assert final.is_file() and final.read_bytes() == b"".join(chunks)
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temp file left

    # A file this store created itself is still removed when recording fails.
    other = make_cxr(study_uid=ds.StudyInstanceUID)
    body2 = encode(other, False, True)
    assert body2 is not None
    header2 = ingest.parse_header(body2, str(other.file_meta.TransferSyntaxUID))
    with pytest.raises(ingest.RecordError):
        ingest.ingest(read_only, settings.spool_dir, header2,
                      (b"\x00" * 128 + b"DICM" + encode_file_meta(other.file_meta), body2),
                      "STORESCU", 0)
    assert sorted(p.name for p in final.parent.iterdir()) == [final.name]
    read_only.dispose()


def test_known_sop_under_another_study_leaves_no_stray_file(  # type: ignore[no-untyped-def]
        make_settings, database_url: str) -> None:
    settings = make_settings(database_url=database_url)
    db = Database(settings)

    def store(study_uid: str) -> ingest.IngestOutcome:
        ds = make_cxr(study_uid=study_uid, sop_uid="1.2.826.0.1.3680043.77.1")
        body = encode(ds, False, True)
        assert body is not None
        header = ingest.parse_header(body, str(ds.file_meta.TransferSyntaxUID))
        chunks = (b"\x00" * 128 + b"DICM" + encode_file_meta(ds.file_meta), body)
        return ingest.ingest(db, settings.spool_dir, header, chunks, "STORESCU", 0)

    first = store("1.2.826.0.1.3680043.77.10")
    again = store("1.2.826.0.1.3680043.77.20")
    assert not first.duplicate and again.duplicate
    files = sorted(p.relative_to(settings.spool_dir) for p in settings.spool_dir.rglob("*")
                   if p.is_file())
    assert files == [first.path.relative_to(settings.spool_dir)]
    db.dispose()
