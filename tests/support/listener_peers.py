"""Helpers for listener tests: DCMTK peers, a pynetdicom SCU, and reading back the spool."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from pathlib import Path

from pydicom.filereader import read_preamble
from pynetdicom import AE
from pynetdicom.presentation import build_context
from sqlalchemy import func, select

from db.models import Instance, Study
from db.session import Database
from db.settings import Settings
from dicom_node.spool import MARKER_NAME, is_temp_name


def dcmtk(tool: str) -> str:
    """The DCMTK binary ``tool``; pynetdicom installs same-named Python apps that may come
    first on PATH (pyenv shims), so DCMTK's own directory is preferred."""
    for candidate in (f"/usr/bin/{tool}", f"/usr/local/bin/{tool}"):
        if Path(candidate).is_file():
            return candidate
    found = shutil.which(tool)
    if found is None:
        raise FileNotFoundError(tool)
    return found


def dcmtk_available() -> bool:
    try:
        out = subprocess.run([dcmtk("storescu"), "--version"], capture_output=True, text=True,
                             timeout=30, check=False).stdout
        dcmtk("echoscu")
    except (FileNotFoundError, subprocess.SubprocessError):
        return False
    return "dcmtk" in out.lower()


def storescu(port: int, files: Sequence[Path], calling: str = "STORESCU",
             called: str = "CXR_TRIAGE", extra: Sequence[str] = (),
             timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """DCMTK storescu proposing each file's own transfer syntax (``-R``)."""
    cmd = [dcmtk("storescu"), "-R", "-aet", calling, "-aec", called, *extra, "127.0.0.1", str(port),
           *(str(f) for f in files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)


def echoscu(port: int, calling: str = "STORESCU",
            called: str = "CXR_TRIAGE") -> subprocess.CompletedProcess[str]:
    cmd = [dcmtk("echoscu"), "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


def dataset_bytes(path: Path) -> bytes:
    """The bytes of a DICOM file after its preamble and File Meta Information."""
    with path.open("rb") as fh:
        read_preamble(fh, False)
        from pydicom.filereader import _read_file_meta_info

        _read_file_meta_info(fh)
        return fh.read()


def send_files_pynetdicom(port: int, files: Sequence[Path], transfer_syntax: str,
                          sop_class: str, calling: str = "STORESCU",
                          tls_args: object = None) -> list[int]:
    """Send files as stored (no decoding, even when broken) and return each C-STORE status."""
    from pynetdicom import _config

    ae = AE(ae_title=calling)
    ae.requested_contexts = [build_context(sop_class, [transfer_syntax])]
    assoc = ae.associate("127.0.0.1", port, ae_title="CXR_TRIAGE",
                         tls_args=tls_args)  # type: ignore[arg-type]
    assert assoc.is_established, "association was not established"
    statuses = []
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True  # stream the file's bytes as they are
    try:
        for f in files:
            rsp = assoc.send_c_store(f)
            statuses.append(int(rsp.Status) if "Status" in rsp else -1)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
        assoc.release()
    return statuses


def count_instances(db: Database) -> int:
    with db.session() as s:
        return int(s.scalar(select(func.count()).select_from(Instance)) or 0)


def instance_rows(db: Database) -> dict[str, Instance]:
    with db.session() as s:
        return {i.sop_instance_uid: i for i in s.scalars(select(Instance)).all()}


def study_by_uid(db: Database, study_uid: str) -> Study | None:
    with db.session() as s:
        return s.scalars(select(Study).where(Study.study_uid == study_uid)).one_or_none()


def spool_files(spool_dir: Path) -> list[Path]:
    """Every file in the spool except the listener's identity marker."""
    return sorted(p for p in spool_dir.rglob("*") if p.is_file() and p.name != MARKER_NAME)


def assert_acknowledged_intact(settings: Settings, acknowledged: Sequence[str]) -> None:
    """Every acknowledged instance has its row and its complete, readable file, and no
    half-written file is visible in the spool (the kill -9 tests' verdict)."""
    import pydicom

    db = Database(settings, migrate=False)
    try:
        rows = instance_rows(db)
        for sop in acknowledged:
            assert sop in rows, f"acknowledged {sop} has no row"
            path = Path(rows[sop].path)
            assert path.is_file() and path.stat().st_size == rows[sop].size_bytes
            pydicom.dcmread(path)  # complete and readable
        names = [p.name for p in spool_files(settings.spool_dir)]
        assert not [n for n in names if is_temp_name(n)], names
    finally:
        db.dispose()
