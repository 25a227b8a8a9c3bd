"""C-STORE data sets written to the spool while they are received, hashed while written.

pynetdicom assembles each received data set in memory: every P-DATA value is sliced and
appended to a ``BytesIO`` that grows by reallocation, and the listener then writes that
buffer to the spool and hashes it: several copies of every byte, and a fresh 10 MB buffer
(about 2,500 page faults) per 2500x2048 image.  pynetdicom's own chunked mode
(``STORE_RECV_CHUNKED_DATASET``) is a process-wide switch that writes to the global temp
directory with a flush per fragment and offers no hook for the hash or the directory.

:func:`install` instead replaces one association's ``dimse.receive_primitive``: once
pynetdicom has decoded a C-STORE request's command set, every data set fragment is
appended to a temporary file under ``spool_dir/.incoming`` (named like the spool's other
half-written files, so start-up and the supervisor clean it after a crash) and fed to an
incremental SHA-256; nothing of the data set stays in memory.  The completed request
reaches the handler as pynetdicom would deliver it, with an empty ``DataSet``; the handler
gets the file with :func:`take` and still checks everything before acknowledging: the
header is read (and the tail walked for truncated elements) from a read-only memory map
of the file, the UIDs and the SOP class against the context are validated, the spool
marker is checked, and the file is fsync'ed and linked into place and its row committed
before Success (:meth:`ReceivedFile.ingest`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import mmap
import os
import tempfile
import threading
from datetime import datetime
from io import BytesIO
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dsutils import create_file_meta, encode_file_meta
from pynetdicom.pdu_primitives import P_DATA

from db.errors import TransientError
from db.session import Database
from dicom_node import ingest, pdata_read, spool

log = logging.getLogger(__name__)

#: Where data sets are written while they arrive (inside the spool: same file system).
INCOMING_DIR = ".incoming"
_ATTR = "_cxr_received"  # the ReceivedFile of a delivered C-STORE primitive


class ReceivedFile:
    """One C-STORE data set in a spool temporary file: preamble, file meta, data set."""

    def __init__(self, prefix: bytes, error: Exception | None = None) -> None:
        self.prefix = prefix
        self.size = 0
        self.error = error
        self.temp: Path | None = None
        self._digest = hashlib.sha256()
        self._fd: int | None = None
        self._map: mmap.mmap | None = None
        self._view: memoryview | None = None  # the whole file, mapped
        self._data_set: memoryview | None = None  # the data set part of it
        self._handed_over = False

    @classmethod
    def create(cls, spool_dir: Path, prefix: bytes, min_free_mb: int,
               marker: spool.SpoolMarker | None) -> ReceivedFile:
        """A new temporary file holding ``prefix``; on a full, missing or replaced spool,
        one that holds nothing and answers with that error."""
        try:
            if marker is not None:
                marker.check()
            spool.check_free_space(spool_dir, min_free_mb)
            incoming = spool_dir / INCOMING_DIR
            try:
                fd, name = _mkstemp(incoming)
            except FileNotFoundError:  # the first store into this spool
                incoming.mkdir(exist_ok=True)
                fd, name = _mkstemp(incoming)
        except TransientError as exc:
            return cls(prefix, exc)
        except OSError as exc:
            return cls(prefix, spool.SpoolWriteError(
                f"cannot create a file under {spool_dir}: {exc}"))
        received = cls(prefix)
        received._fd, received.temp = fd, Path(name)
        received.write(memoryview(prefix))
        return received

    def write(self, data: memoryview) -> None:
        """Append ``data`` to the file and the hash (nothing once writing failed)."""
        if self._fd is None or self.error is not None:
            return
        self._digest.update(data)  # releases the interpreter lock, as the write does
        self.size += len(data)
        try:
            _write_all(self._fd, data)
        except OSError as exc:
            self.fail(spool.SpoolWriteError(f"cannot write {self.temp}: {exc}"))

    def fail(self, error: Exception) -> None:
        """Stop writing: the store will be answered with ``error``; the file goes."""
        if self.error is None:
            self.error = error
        self._remove()

    def view(self) -> memoryview:
        """The received data set (without preamble and file meta), read-only and mapped,
        not copied; raises the error that stopped the writing, if any."""
        if self.error is not None:
            raise self.error
        assert self._fd is not None
        if self._data_set is None:
            self._map = mmap.mmap(self._fd, 0, access=mmap.ACCESS_READ)
            self._view = memoryview(self._map)
            self._data_set = self._view[len(self.prefix):]
        return self._data_set

    def ingest(self, db: Database, spool_dir: Path, header: ingest.Header, prefix: bytes,
               calling_ae: str | None, min_free_mb: int, *,
               recorder: ingest.Recorder | None = None,
               now: datetime | None = None) -> ingest.IngestOutcome:
        """Make the file durable under its final name and record it, as
        :func:`dicom_node.ingest.ingest` does for bytes in memory.  ``prefix``: preamble
        and file meta as the handler encodes them; where they differ from what was written
        first (never seen), the data set is copied behind them instead."""
        if self.error is not None:
            raise self.error
        assert self._fd is not None and self.temp is not None
        if prefix != self.prefix:
            return ingest.ingest(db, spool_dir, header, (prefix, self.view()), calling_ae,
                                 min_free_mb, now=now, recorder=recorder)
        final = spool.instance_path(spool_dir, header.study_uid, header.sop_uid)
        try:
            spool.check_free_space(spool_dir, min_free_mb)  # the data is already written
            os.fsync(self._fd)
            spool.ensure_dir(final.parent)
        except TransientError as exc:
            self.fail(exc)
            raise
        except OSError as exc:
            error = spool.SpoolWriteError(f"cannot write {final.name}: {exc}")
            self.fail(error)
            raise error from exc
        self._close_file()
        self._handed_over = True  # from here ingest.record_staged removes what fails
        staged = spool.StagedFile(temp=self.temp, final=final, size=self.size,
                                  sha256=self._digest.hexdigest())
        return ingest.record_staged(db, header, staged, calling_ae, now=now, recorder=recorder)

    def close(self) -> None:
        """Unmap and close; the temporary file goes unless it was handed over."""
        if not self._handed_over:
            self._remove()
        else:
            self._close_file()

    def _close_file(self) -> None:
        if self._view is not None and self._data_set is not None:
            with contextlib.suppress(BufferError):  # a view may live on in a traceback
                self._data_set.release()
                self._view.release()
                self._map.close()  # type: ignore[union-attr]
            self._view = self._data_set = self._map = None
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None

    def _remove(self) -> None:
        self._close_file()
        if self.temp is not None and not self._handed_over:
            with contextlib.suppress(OSError):
                self.temp.unlink(missing_ok=True)


def _mkstemp(directory: Path) -> tuple[int, str]:
    return tempfile.mkstemp(prefix=spool.temp_prefix(), suffix=spool.TEMP_SUFFIX,
                            dir=directory)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        written = os.write(fd, data)
        if not written:
            raise OSError("short write")
        data = data[written:]


class StreamingReceiver:
    """Streams the C-STORE data sets of one association (see the module docstring)."""

    def __init__(self, assoc: Any, spool_dir: Path, min_free_mb: int,
                 marker: spool.SpoolMarker | None) -> None:
        self._assoc = assoc
        self._dimse = assoc.dimse
        self._spool_dir = spool_dir
        self._min_free_mb = min_free_mb
        self._marker = marker
        self._pynetdicom_receive = self._dimse.receive_primitive
        self._current: ReceivedFile | None = None  # the data set being received
        self._unclaimed: set[ReceivedFile] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._dimse.receive_primitive = self.receive_primitive

    def receive_primitive(self, primitive: P_DATA) -> None:
        """Called by the DUL thread for each P-DATA primitive, in order."""
        if self._current is None:
            self._pynetdicom_receive(primitive)
            self._start_if_store()
            return
        values = list(primitive.presentation_data_value_list)
        for index, (_context_id, data) in enumerate(values):
            control = data[0]
            if control & 1:  # a command: the data set was cut short, a new message begins
                self._current.fail(ingest.UnreadableDatasetError(
                    "the data set ended without its last fragment"))
                self._deliver()
                self._continue_with(values[index:])
                return
            self._current.write(memoryview(data)[1:])
            if control & 2:  # the last fragment of the data set
                self._deliver()
                self._continue_with(values[index + 1:])
                return

    def _continue_with(self, values: list[Any]) -> None:
        if values:  # the next message began in the same P-DATA primitive
            following = P_DATA()
            following.presentation_data_value_list.extend(values)
            self.receive_primitive(following)

    def close(self) -> None:
        """The connection closed: files of requests never handled are removed."""
        with self._lock:
            self._closed = True
            leftover = list(self._unclaimed)
            self._unclaimed.clear()
            if self._current is not None:
                leftover.append(self._current)
                self._current = None
        for received in leftover:
            received.close()

    def claim(self, received: ReceivedFile) -> bool:
        with self._lock:
            if received not in self._unclaimed:
                return False
            self._unclaimed.remove(received)
            return True

    def _start_if_store(self) -> None:
        message = self._dimse.message
        if (not isinstance(message, C_STORE_RQ) or message.context_id is None
                or message._data_set_file is not None):
            return  # not a C-STORE data set in progress (or pynetdicom's chunked mode)
        command = message.command_set
        context = self._assoc._accepted_cx.get(message.context_id)
        if context is None:
            return  # pynetdicom answers an unknown context itself
        try:
            meta = create_file_meta(sop_class_uid=command.AffectedSOPClassUID,
                                    sop_instance_uid=command.AffectedSOPInstanceUID,
                                    transfer_syntax=context.transfer_syntax[0])
            prefix = b"\x00" * 128 + b"DICM" + encode_file_meta(meta)
        except (ValueError, TypeError, AttributeError) as exc:
            log.debug("not streaming a C-STORE data set: %s", exc)
            return  # left to pynetdicom; the handler checks it as before
        received = ReceivedFile.create(self._spool_dir, prefix, self._min_free_mb,
                                       self._marker)
        with self._lock:
            if self._closed:
                received.close()
                return
            self._current = received
        buffered = message.data_set
        if buffered is not None and buffered.tell():  # fragments in the command's P-DATA
            with buffered.getbuffer() as view:
                received.write(view)
        message.data_set = BytesIO()

    def _deliver(self) -> None:
        """Hand the complete request to pynetdicom's queue, as its own decoder does."""
        message, received = self._dimse.message, self._current
        assert received is not None
        self._current = None
        evt.trigger(self._assoc, evt.EVT_DIMSE_RECV, {"message": message})
        try:
            request = message.message_to_primitive()
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an invalid message aborts
            log.error("received an invalid DIMSE message: %s", exc)
            received.close()
            self._dul_abort()
            return
        setattr(request, _ATTR, (self, received))
        with self._lock:
            if self._closed:
                received.close()
            else:
                self._unclaimed.add(received)
        self._dimse.msg_queue.put((message.context_id, request))
        message.encoded_command_set = BytesIO()
        message.data_set = BytesIO()
        self._dimse.message = None

    def _dul_abort(self) -> None:
        self._dimse.dul.event_queue.put("Evt19")


class InMemoryDataSet:
    """A data set pynetdicom assembled in memory (not streamed): the same three calls."""

    def __init__(self, request: Any) -> None:
        self._data_set: BytesIO = request.DataSet
        self._view: memoryview | None = None

    def view(self) -> memoryview:
        if self._view is None:
            self._view = self._data_set.getbuffer()
        return self._view

    def ingest(self, db: Database, spool_dir: Path, header: ingest.Header, prefix: bytes,
               calling_ae: str | None, min_free_mb: int, *,
               recorder: ingest.Recorder | None = None,
               now: datetime | None = None) -> ingest.IngestOutcome:
        return ingest.ingest(db, spool_dir, header, (prefix, self.view()), calling_ae,
                             min_free_mb, now=now, recorder=recorder)

    def close(self) -> None:
        """Free the buffer now (before the response goes out), not once the reactor
        takes the next request."""
        if self._view is not None:
            self._view.release()
        with contextlib.suppress(BufferError):  # a view may live on in a traceback
            self._data_set.close()


def install(assoc: Any, spool_dir: Path, min_free_mb: int,
            marker: spool.SpoolMarker | None = None) -> StreamingReceiver:
    """Stream ``assoc``'s C-STORE data sets to the spool (from ``EVT_CONN_OPEN``); files
    of requests never handled are removed when the connection closes."""
    pdata_read.install(assoc.dul)  # P-DATA values as views of the received PDU
    receiver = StreamingReceiver(assoc, spool_dir, min_free_mb, marker)
    assoc.bind(evt.EVT_CONN_CLOSE, lambda _event: receiver.close())
    return receiver


def received(request: Any) -> ReceivedFile | InMemoryDataSet:
    """The data set of a C-STORE request: its streamed file, or pynetdicom's buffer.
    The caller must ``close()`` it."""
    owner = request.__dict__.pop(_ATTR, None)
    if owner is None:
        return InMemoryDataSet(request)
    receiver, streamed = owner
    if not receiver.claim(streamed):  # the connection closed meanwhile
        return ReceivedFile(b"", spool.SpoolWriteError("the association closed"))
    return streamed  # type: ignore[no-any-return]
