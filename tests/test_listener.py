"""The listener against real peers: DCMTK echoscu/storescu, pynetdicom as SCU, Orthanc."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.settings import Settings
from dicom_node import spool
from dicom_node.listener import NodeHandle, start_node
from tests.support.dicom_factory import CR_STORAGE, make_cxr, make_study_files, write
from tests.support.listener_peers import (
    count_instances,
    dataset_bytes,
    dcmtk_available,
    echoscu,
    instance_rows,
    send_files_pynetdicom,
    spool_files,
    storescu,
    study_by_uid,
)

pytestmark = pytest.mark.dcmtk
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture(autouse=True)
def _need_dcmtk() -> None:
    if not dcmtk_available():
        pytest.skip("DCMTK storescu/echoscu are not installed")


def _node_settings(settings: Settings, **overrides: object) -> Settings:
    base: dict[str, object] = dict(port=0, bind_address="127.0.0.1", min_free_mb=1)
    base.update(overrides)
    return settings.replace(**base)


@pytest.fixture
def node(settings: Settings) -> Iterator[NodeHandle]:
    handle = start_node(_node_settings(settings), run_stability=False)
    yield handle
    handle.stop()


def test_echo_and_store_synthetic_study(node: NodeHandle, tmp_path: Path) -> None:
    assert echoscu(node.port).returncode == 0
    files = make_study_files(tmp_path / "in", n=3)
    result = storescu(node.port, files)
    assert result.returncode == 0, result.stderr
    rows = instance_rows(node.db)
    assert len(rows) == 3
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        row = rows[ds.SOPInstanceUID]
        stored = Path(row.path)
        assert stored == node.settings.spool_dir / ds.StudyInstanceUID / f"{ds.SOPInstanceUID}.dcm"
        assert dataset_bytes(stored) == dataset_bytes(f)
        assert row.size_bytes == stored.stat().st_size
        assert row.calling_ae == "STORESCU"
        assert (row.modality, row.view_position, row.body_part) == ("DX", "PA", "CHEST")
        assert row.sop_class_uid == DX_STORAGE and row.series_uid == ds.SeriesInstanceUID
        import hashlib

        assert row.sha256 == hashlib.sha256(stored.read_bytes()).hexdigest()
    study = study_by_uid(node.db, str(pydicom.dcmread(files[0]).StudyInstanceUID))
    assert study is not None and study.state == "receiving" and study.generation == 1
    assert study.patient_id == "PHANTOM-1"
    assert not [p for p in spool_files(node.settings.spool_dir) if spool.is_temp_name(p.name)]


@pytest.mark.shared_data
def test_real_files_stored_byte_identical_in_their_own_syntax(node: NodeHandle,
                                                             shared_dicom: Path) -> None:
    files = sorted(shared_dicom.glob("*.dcm"))
    # Propose each file's own syntax so that storescu converts nothing: -xy adds JPEG
    # Baseline to the uncompressed syntaxes, -xi proposes Implicit VR Little Endian only.
    option = {"1.2.840.10008.1.2.4.50": "-xy", "1.2.840.10008.1.2": "-xi"}
    for f in files:
        ts = str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        result = storescu(node.port, [f], extra=[option[ts]])
        assert result.returncode == 0, result.stderr
    rows = instance_rows(node.db)
    assert len(rows) == len(files)
    for f in files:
        src = pydicom.dcmread(f, stop_before_pixels=True)
        row = rows[src.SOPInstanceUID]
        assert row.transfer_syntax == src.file_meta.TransferSyntaxUID
        assert dataset_bytes(Path(row.path)) == dataset_bytes(f)
    assert "1.2.840.10008.1.2.4.50" in {r.transfer_syntax for r in rows.values()}


@pytest.mark.orthanc
def test_orthanc_pushes_a_study(node: NodeHandle, orthanc_factory, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc = orthanc_factory(modalities={"CXR": ["CXR_TRIAGE", "127.0.0.1", node.port]})
    files = make_study_files(tmp_path / "in", n=2)
    study_id = [orthanc.upload(f) for f in files][0]["ParentStudy"]
    orthanc.post("/modalities/CXR/store", body=study_id)
    rows = instance_rows(node.db)
    assert len(rows) == 2
    assert {r.calling_ae for r in rows.values()} == {"ORTHANC"}
    for f in files:
        ds = pydicom.dcmread(f)
        stored = pydicom.dcmread(rows[ds.SOPInstanceUID].path)
        assert stored.PixelData == ds.PixelData


@pytest.mark.slow
def test_eight_parallel_senders(settings: Settings, tmp_path: Path) -> None:
    handle = start_node(_node_settings(settings, max_associations=8), run_stability=False)
    try:
        studies = [make_study_files(tmp_path / f"s{i}", n=3) for i in range(8)]
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda fs: storescu(handle.port, fs), studies))
        assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
        assert count_instances(handle.db) == 24
        for files in studies:
            study = study_by_uid(handle.db, str(pydicom.dcmread(files[0]).StudyInstanceUID))
            assert study is not None
        assert len(spool_files(handle.settings.spool_dir)) == 24
    finally:
        handle.stop()


def test_unknown_calling_ae_rejected(node: NodeHandle, tmp_path: Path,
                                     caplog: pytest.LogCaptureFixture) -> None:
    files = make_study_files(tmp_path / "in", n=1)
    result = storescu(node.port, files, calling="INTRUDER")
    assert result.returncode != 0
    assert "calling ae title not recognized" in (result.stderr + result.stdout).lower()
    assert count_instances(node.db) == 0
    assert spool_files(node.settings.spool_dir) == []
    assert any("association rejected calling_ae=INTRUDER" in r.getMessage()
               and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_wrong_called_ae_rejected(node: NodeHandle, tmp_path: Path) -> None:
    result = storescu(node.port, make_study_files(tmp_path / "in", n=1), called="SOMEONE_ELSE")
    assert result.returncode != 0
    assert "called ae title not recognized" in (result.stderr + result.stdout).lower()
    assert count_instances(node.db) == 0


def test_duplicate_is_accepted_once(node: NodeHandle, tmp_path: Path) -> None:
    files = make_study_files(tmp_path / "in", n=1)
    assert storescu(node.port, files).returncode == 0
    # Twice more, also from two associations at the same time.
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: storescu(node.port, files), range(2)))
    assert [r.returncode for r in results] == [0, 0]
    assert count_instances(node.db) == 1
    assert len(spool_files(node.settings.spool_dir)) == 1


def _truncated_and_garbage(tmp_path: Path) -> list[Path]:
    good = write(make_cxr(rows=64, cols=64), tmp_path / "good.dcm")
    raw = good.read_bytes()
    truncated = tmp_path / "truncated.dcm"
    truncated.write_bytes(raw[:-1000])
    meta_end = len(raw) - len(dataset_bytes(good))
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(raw[:meta_end] + bytes(range(256)) * 40)
    no_uids = make_cxr()
    del no_uids.StudyInstanceUID
    missing = write(no_uids, tmp_path / "missing.dcm")
    return [truncated, garbage, missing]


def test_unreadable_datasets_fail_and_leave_nothing(node: NodeHandle, tmp_path: Path) -> None:
    bad = _truncated_and_garbage(tmp_path)
    statuses = send_files_pynetdicom(node.port, bad, ExplicitVRLittleEndian, DX_STORAGE)
    assert all(0xC000 <= s <= 0xCFFF for s in statuses), [hex(s) for s in statuses]
    assert count_instances(node.db) == 0
    assert [p for p in spool_files(node.settings.spool_dir)] == []


def test_disk_below_minimum_answers_out_of_resources(settings: Settings, tmp_path: Path) -> None:
    handle = start_node(_node_settings(settings, min_free_mb=10**9), run_stability=False)
    try:
        files = make_study_files(tmp_path / "in", n=1)
        statuses = send_files_pynetdicom(handle.port, files, ExplicitVRLittleEndian, DX_STORAGE)
        assert statuses == [0xA700]
        assert count_instances(handle.db) == 0
        assert spool_files(handle.settings.spool_dir) == []
    finally:
        handle.stop()


def _make_database_read_only(settings: Settings) -> None:
    url = settings.effective_database_url
    if url.startswith("sqlite"):
        # Root ignores file modes, so hold the write lock from another connection instead
        # is too slow (busy timeout); replace the file by a directory-less path instead.
        raise AssertionError("handled by the caller")
    import psycopg

    name = url.rsplit("/", 1)[1]
    admin = url.rsplit("/", 1)[0] + "/postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'ALTER DATABASE "{name}" SET default_transaction_read_only = on')
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = %s AND pid <> pg_backend_pid()", (name,))


def test_failing_commit_answers_out_of_resources(settings: Settings, tmp_path: Path) -> None:
    from db.session import Database

    node_settings = _node_settings(settings)
    Database(node_settings).dispose()  # schema in place
    if node_settings.effective_database_url.startswith("sqlite"):
        db_path = node_settings.effective_database_url.removeprefix("sqlite:///")
        read_only = node_settings.replace(database_url=f"sqlite:///file:{db_path}?mode=ro&uri=true")
        db = Database(read_only, migrate=False)
    else:
        db = Database(node_settings)
    handle = start_node(node_settings, db=db, run_stability=False)
    try:
        if not node_settings.effective_database_url.startswith("sqlite"):
            _make_database_read_only(node_settings)
        files = make_study_files(tmp_path / "in", n=2)
        statuses = send_files_pynetdicom(handle.port, files, ExplicitVRLittleEndian, DX_STORAGE)
        assert statuses == [0xA700, 0xA700]
        assert spool_files(handle.settings.spool_dir) == []
    finally:
        handle.stop()
        db.dispose()


def test_tls_association(settings: Settings, tmp_path: Path) -> None:
    import ssl

    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key),
         "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True,
    )
    handle = start_node(_node_settings(settings, tls_cert=cert, tls_key=key),
                        run_stability=False)
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        files = make_study_files(tmp_path / "in", n=1)
        statuses = send_files_pynetdicom(handle.port, files, ExplicitVRLittleEndian, DX_STORAGE,
                                         tls_args=(client, "localhost"))
        assert statuses == [0]
        assert count_instances(handle.db) == 1
        # A plain TCP peer cannot talk to the TLS listener.
        assert storescu(handle.port, files).returncode != 0
    finally:
        handle.stop()


def test_hostile_uids_never_become_paths(node: NodeHandle, tmp_path: Path) -> None:
    ds = make_cxr(study_uid="../../etc", sop_uid=generate_uid())
    ds.SOPClassUID = CR_STORAGE
    ds.file_meta.MediaStorageSOPClassUID = CR_STORAGE
    f = write(ds, tmp_path / "hostile.dcm")
    statuses = send_files_pynetdicom(node.port, [f], ExplicitVRLittleEndian, CR_STORAGE)
    assert statuses == [0xC000]  # an invalid UID is refused at the boundary
    assert spool_files(node.settings.spool_dir) == []
    # Where such a value reaches a path anyway, it becomes a digest inside the folder.
    path = spool.instance_path(node.settings.spool_dir, "../../etc", "/some/dir")
    assert path.parent.parent == node.settings.spool_dir
    assert path.parent.name == spool.safe_uid_name("../../etc") != "../../etc"
