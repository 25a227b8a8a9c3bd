"""The durable spool: received bytes on disk before anyone is told "Success".

Layout: ``spool_dir/<StudyInstanceUID>/<SOPInstanceUID>.dcm``.  UIDs come from the sender,
so they are checked against the UID grammar and replaced by a digest when they do not fit:
a UID is never trusted as a path.

A write goes to a temporary file in the final directory (``.incoming-*.tmp``), is
fsync'ed, renamed into place, and the directory is fsync'ed, so that after a crash a
file under its final name is always complete.  Temporary names are recognisable so that
:func:`remove_stale_temp_files` can clean them on start.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from db import paths
from db.atomic import fsync_dir
from db.errors import TransientError

TEMP_PREFIX = ".incoming-"
TEMP_SUFFIX = ".tmp"
_MIB = 1024 * 1024
_THREADED_HASH_BYTES = 2 * _MIB


class SpoolFullError(TransientError):
    """Free disk space under the spool is below the configured minimum."""


class SpoolWriteError(TransientError):
    """The spool could not write or sync a file (disk, permissions, I/O)."""


class SpoolIdentityError(SpoolWriteError):
    """The spool folder is not the one we started with (unmounted, replaced, renamed)."""


MARKER_NAME = ".cxr-spool-id"


class SpoolMarker:
    """The spool's identity: a marker file written at start, checked before each store.

    Where the spool's volume is unmounted, or the folder is replaced or renamed while the
    listener runs, the marker is gone or is another file, and a store is refused instead
    of being written to whatever lies underneath.  The check is one ``stat``.
    """

    def __init__(self, spool_dir: Path) -> None:
        self.path = spool_dir / MARKER_NAME
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            pass  # another listener sharing this spool wrote it, or an earlier run
        except OSError as exc:
            raise SpoolWriteError(f"cannot write the spool marker {self.path}: {exc}") from exc
        else:
            with os.fdopen(fd, "w") as fh:
                fh.write(f"cxr-triage spool {os.urandom(16).hex()}\n")
                fh.flush()
                os.fsync(fh.fileno())
            fsync_dir(spool_dir)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)

    def check(self) -> None:
        """Raise :class:`SpoolIdentityError` unless the marker is the one seen at start."""
        try:
            st = os.stat(self.path)
        except OSError as exc:
            raise SpoolIdentityError(
                f"spool marker {self.path} is missing: the spool folder is not the one "
                "this listener started with") from exc
        if (st.st_dev, st.st_ino) != self._identity:
            raise SpoolIdentityError(
                f"spool marker {self.path} changed: the spool folder was replaced")


#: A file-system name for a UID: the UID itself if well-formed, else a digest.
safe_uid_name = paths.uid_name


def instance_path(spool_dir: Path, study_uid: str, sop_uid: str) -> Path:
    """Where an instance lives, through the safe-path helper (never a raw header value)."""
    return paths.under(spool_dir, paths.uid_name(study_uid), f"{paths.uid_name(sop_uid)}.dcm")


def check_free_space(spool_dir: Path, min_free_mb: int, incoming_bytes: int = 0) -> None:
    """Raise :class:`SpoolFullError` when writing ``incoming_bytes`` would leave too little."""
    try:
        free = shutil.disk_usage(spool_dir).free
    except OSError as exc:  # missing or unmounted spool: refuse rather than write elsewhere
        raise SpoolWriteError(f"cannot read free space of {spool_dir}: {exc}") from exc
    if free - incoming_bytes < min_free_mb * _MIB:
        raise SpoolFullError(
            f"free space {free // _MIB} MiB under {spool_dir} is below min_free_mb={min_free_mb}"
        )


@dataclass
class StagedFile:
    """A complete, fsync'ed temporary file waiting to be published under ``final``."""

    temp: Path
    final: Path
    size: int
    sha256: str
    #: True once :meth:`publish` created ``final``; False where a file was already there
    #: (another listener process sharing the spool, or an unrecorded leftover of a crash).
    created_final: bool = False

    def publish(self, sync_dir: bool = True) -> None:
        """Move into place and fsync the directory: from here the file survives a crash
        (``sync_dir=False``: the caller fsyncs the directory, once for several files).

        ``final`` is created with a hard link where it is absent, so we know whether the
        file there is ours: a failed ingest removes only a file it created, never one that
        another process may already have acknowledged."""
        try:
            try:
                os.link(self.temp, self.final)
                self.created_final = True
                os.unlink(self.temp)
            except FileExistsError:
                os.replace(self.temp, self.final)
            if sync_dir:
                fsync_dir(self.final.parent)
        except OSError as exc:
            self.discard()
            raise SpoolWriteError(f"cannot publish {self.final.name}: {exc}") from exc

    def discard(self) -> None:
        try:
            self.temp.unlink(missing_ok=True)
        except OSError:
            pass


def ensure_dir(directory: Path) -> None:
    """Create ``directory`` (and its entry durably) where it is missing."""
    if directory.is_dir():
        return
    directory.mkdir(parents=True, exist_ok=True)
    # The new directory entry itself must survive a crash, so sync its parent.
    fsync_dir(directory.parent)


def stage(final: Path, chunks: Iterable[bytes | memoryview]) -> StagedFile:
    """Write ``chunks`` to a temporary file beside ``final`` and fsync it.

    The SHA-256 is computed in a helper thread while the main thread writes and syncs
    (hashlib and file I/O both release the GIL), so hashing costs almost no latency.
    On any error the temporary file is removed and :class:`SpoolWriteError` is raised.
    """
    try:
        parts = [memoryview(c) for c in chunks]
        ensure_dir(final.parent)
        fd, name = tempfile.mkstemp(prefix=temp_prefix(), suffix=TEMP_SUFFIX, dir=final.parent)
    except OSError as exc:
        raise SpoolWriteError(f"cannot create a file under {final.parent}: {exc}") from exc
    temp = Path(name)
    digest = hashlib.sha256()
    hasher = threading.Thread(target=_hash_into, args=(digest, parts), daemon=True)
    if sum(len(p) for p in parts) >= _THREADED_HASH_BYTES:
        hasher.start()
    else:
        hasher.run()  # small files: a thread costs more than it saves
    size = 0
    try:
        with os.fdopen(fd, "wb", buffering=0) as fh:
            for view in parts:
                size += len(view)
                while view:
                    written = fh.write(view)
                    if not written:
                        raise OSError("short write")
                    view = view[written:]
            os.fsync(fh.fileno())
    except OSError as exc:
        _join(hasher)
        temp.unlink(missing_ok=True)
        raise SpoolWriteError(f"cannot write {final.name}: {exc}") from exc
    except BaseException:
        _join(hasher)
        temp.unlink(missing_ok=True)
        raise
    _join(hasher)
    return StagedFile(temp=temp, final=final, size=size, sha256=digest.hexdigest())


def _join(thread: threading.Thread) -> None:
    if thread.ident is not None:
        thread.join()


def _hash_into(digest: Any, parts: list[memoryview]) -> None:
    for view in parts:
        digest.update(view)


def is_temp_name(name: str) -> bool:
    return name.startswith(TEMP_PREFIX) and name.endswith(TEMP_SUFFIX)


def temp_prefix(pid: int | None = None) -> str:
    """Temporary names carry the writer's pid, so that a supervisor can remove a dead
    listener process's half-written files while the other processes keep writing."""
    return f"{TEMP_PREFIX}{os.getpid() if pid is None else pid}-"


def _remove_temp_files(spool_dir: Path, prefix: str) -> list[Path]:
    """Delete the half-written files whose names start with ``prefix``."""
    removed: list[Path] = []
    if not spool_dir.is_dir():
        return removed
    for study_dir in spool_dir.iterdir():
        if not study_dir.is_dir():
            continue
        for entry in study_dir.iterdir():
            if entry.name.startswith(prefix) and is_temp_name(entry.name):
                entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def remove_temp_files_of(spool_dir: Path, pid: int) -> list[Path]:
    """Delete the half-written files of the dead process ``pid``; returns what was removed."""
    return _remove_temp_files(spool_dir, temp_prefix(pid))


def remove_stale_temp_files(spool_dir: Path) -> list[Path]:
    """Delete half-written files left by a crash; returns what was removed.

    Only call this before the listener accepts associations: a running handler's
    temporary file looks the same.
    """
    return _remove_temp_files(spool_dir, "")
