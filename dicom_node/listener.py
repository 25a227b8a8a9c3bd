"""The C-STORE listener: a pynetdicom AE that answers C-ECHO and stores every storage class.

The store handler is small on purpose: it reads only the indexed header, writes the
received bytes durably (no transcoding), records one row, and answers.  Success is sent
only after the file is fsync'ed and the row committed; a write, disk or database failure
answers 0xA700 (Out of Resources) and an unreadable data set 0xC000, leaving no file.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import (
    JPEG2000,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import encode_file_meta
from pynetdicom.events import Event
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from db import metrics
from db.errors import TransientError
from db.session import Database
from db.settings import Settings
from dicom_node import ingest, peer_socket, reactor, socket_fix, spool, store_checks, stream_store
from dicom_node.group_commit import GroupCommitter
from dicom_node.publisher import CeleryPublisher, Publisher
from dicom_node.reuseport import start_reuseport_server
from dicom_node.stability import StabilityLoop

log = logging.getLogger(__name__)

socket_fix.install()  # a peer that dies mid-association must not leak its socket

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC000
#: Metric reasons for refusals that are our infrastructure's fault (answered 0xA700).
_REJECT_REASONS = {"SpoolFullError": "disk_full", "SpoolWriteError": "write_failed",
                   "RecordError": "record_failed", "SpoolIdentityError": "spool_missing"}
STATUS_PROCESSING_FAILURE = 0x0110
STATUS_SOP_CLASS_MISMATCH = 0xA900

STORE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)


def storage_sop_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows, not only the 128 of its default list."""
    return sorted({str(cx.abstract_syntax) for cx in AllStoragePresentationContexts})


def build_ae(settings: Settings) -> AE:
    """An AE configured from settings: contexts, AE-title checks, limits and PDU size."""
    ae = AE(ae_title=settings.ae_title)
    ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    for uid in storage_sop_classes():
        ae.add_supported_context(uid, list(STORE_TRANSFER_SYNTAXES))
    # "*" (explicit, warned about at start) accepts any caller; an empty list is refused
    # by the settings, so the check never fails open.
    ae.require_calling_aet = [] if settings.any_caller else list(settings.allowed_callers)
    ae.require_called_aet = True
    ae.maximum_associations = settings.max_associations
    ae.maximum_pdu_size = settings.max_pdu
    # Each read of a PDU is bounded by network_timeout (see peer_socket.recv_exactly), so a
    # peer that stalls mid-PDU loses its slot; an idle association is closed by pynetdicom.
    ae.network_timeout = settings.network_timeout
    ae.dimse_timeout = settings.dimse_timeout
    ae.acse_timeout = settings.acse_timeout
    return ae


def make_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """A server TLS context from tls_cert/tls_key, requiring client certs when tls_ca is set."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key))
    if settings.tls_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


@dataclass
class _AssocStats:
    calling_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    stored: int = 0
    duplicates: int = 0
    failed: int = 0


class StoreService:
    """Event handlers of one running node; holds the database and per-association counters."""

    def __init__(self, settings: Settings, db: Database,
                 marker: spool.SpoolMarker | None = None) -> None:
        self.settings = settings
        self.db = db
        self.marker = marker
        self._stats: dict[int, _AssocStats] = {}
        self._wakeups: dict[int, reactor.Wakeup] = {}
        self._lock = threading.Lock()
        # Concurrent stores share one commit and one directory fsync (group commit).
        self.committer = GroupCommitter(db)

    # ----- association events -------------------------------------------------------
    @staticmethod
    def _peer(event: Event) -> str:
        requestor = event.assoc.requestor
        return f"{requestor.address}:{requestor.port}"

    def on_conn_open(self, event: Event) -> None:
        # Nagle's algorithm delays the small C-STORE responses and PDUs by up to 40 ms.
        assoc_socket = event.assoc.dul.socket
        sock = getattr(assoc_socket, "socket", None)
        if sock is None:
            return
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            log.debug("cannot set TCP_NODELAY: %s", exc)
        peer_socket.set_keepalive(sock, self.settings.tcp_keepalive_seconds)
        # pynetdicom reads a PDU in 4 KiB recv() calls appended to a bytearray; reading
        # straight into one buffer of the PDU's size halves the receive cost of large images.
        # Each PDU read ends within network_timeout, so a stalled peer cannot hold a slot.
        assoc_socket.recv = peer_socket.recv_exactly(  # type: ignore[union-attr,method-assign]
            assoc_socket, self.settings.network_timeout)
        # C-STORE data sets go to the spool as they arrive, hashed while written.
        stream_store.install(event.assoc, self.settings.spool_dir, self.settings.min_free_mb,
                             self.marker)
        # pynetdicom's reactors poll every millisecond; make them wait instead.
        wakeup = reactor.quiet_reactors(event.assoc)
        with self._lock:
            self._wakeups[id(event.assoc)] = wakeup

    def on_accepted(self, event: Event) -> None:
        stats = _AssocStats(calling_ae=event.assoc.requestor.ae_title.strip(),
                            peer=self._peer(event))
        with self._lock:
            self._stats[id(event.assoc)] = stats
        log.debug("association accepted calling_ae=%s peer=%s", stats.calling_ae, stats.peer)

    def on_rejected(self, event: Event) -> None:
        calling = event.assoc.requestor.ae_title.strip()
        primitive = event.assoc.requestor.primitive
        called = str(getattr(primitive, "called_ae_title", "") or "").strip()
        if not self.settings.any_caller and calling not in self.settings.allowed_callers:
            reason = "calling AE title not allowed"
        elif called != self.settings.ae_title:
            reason = f"called AE title {called!r} is not ours"
        else:
            reason = "too many associations or unacceptable request"
        metrics.instance_rejected("association")
        log.warning("association rejected calling_ae=%s called_ae=%s peer=%s reason=%s",
                    calling, called, self._peer(event), reason)

    def _finish(self, event: Event, how: str) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        log.info(
            "association %s calling_ae=%s peer=%s instances=%d duplicates=%d failed=%d "
            "seconds=%.2f", how, stats.calling_ae, stats.peer, stats.stored, stats.duplicates,
            stats.failed, time.monotonic() - stats.started,
        )

    def on_released(self, event: Event) -> None:
        self._finish(event, "released")

    def on_aborted(self, event: Event) -> None:
        self._finish(event, "aborted")

    def on_conn_close(self, event: Event) -> None:
        # A peer that drops the connection without release or abort still gets its line.
        self._finish(event, "closed")
        with self._lock:
            wakeup = self._wakeups.pop(id(event.assoc), None)
        if wakeup is not None:
            wakeup.close()

    def _count(self, event: Event, attr: str) -> None:
        with self._lock:
            stats = self._stats.get(id(event.assoc))
            if stats is not None:
                setattr(stats, attr, getattr(stats, attr) + 1)

    # ----- DIMSE services -----------------------------------------------------------
    def on_echo(self, _event: Event) -> int:
        return STATUS_SUCCESS

    def on_store(self, event: Event) -> int:
        calling_ae = event.assoc.requestor.ae_title.strip()
        request = event.request
        affected = str(getattr(request, "AffectedSOPInstanceUID", "") or "")
        data_set = stream_store.received(request)  # streamed to the spool, or in memory
        try:
            header = ingest.parse_header(data_set.view(), event.context.transfer_syntax)
            header = store_checks.validate(header, event.context.abstract_syntax)
            if ingest.own_object(header):
                self._count(event, "duplicates")
                log.info("own object ignored sop=%s series=%s study=%s calling_ae=%s "
                         "status=0x0000", header.sop_uid, header.series_uid,
                         header.study_uid, calling_ae)
                return STATUS_SUCCESS
            if self.marker is not None:
                self.marker.check()
            preamble = b"\x00" * 128 + b"DICM" + encode_file_meta(event.file_meta)
            outcome = data_set.ingest(self.db, self.settings.spool_dir, header, preamble,
                                      calling_ae, self.settings.min_free_mb,
                                      recorder=self.committer.record)
        except ingest.UnreadableDatasetError as exc:
            self._count(event, "failed")
            metrics.instance_rejected("unreadable")
            log.warning("store refused sop=%s calling_ae=%s status=0xC000 reason=%s",
                        affected, calling_ae, exc)
            return STATUS_CANNOT_UNDERSTAND
        except store_checks.RefusedInstanceError as exc:
            self._count(event, "failed")
            metrics.instance_rejected("invalid")
            log.warning("store refused sop=%s calling_ae=%s status=0x%04X reason=%s",
                        affected[:80], calling_ae, exc.status, exc)
            return exc.status
        except TransientError as exc:
            self._count(event, "failed")
            metrics.instance_rejected(_REJECT_REASONS.get(type(exc).__name__, "write_failed"))
            log.error("store failed sop=%s calling_ae=%s status=0xA700 reason=%s", affected,
                      calling_ae, exc)
            return STATUS_OUT_OF_RESOURCES
        finally:
            data_set.close()  # freed (or removed) before the response goes out
        self._count(event, "duplicates" if outcome.duplicate else "stored")
        if not outcome.duplicate:
            metrics.instance_received(header.modality)
        log.debug("stored sop=%s study=%s duplicate=%s", header.sop_uid, header.study_uid,
                  outcome.duplicate)
        return STATUS_SUCCESS

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_CONN_OPEN, self.on_conn_open),
            (evt.EVT_ACCEPTED, self.on_accepted),
            (evt.EVT_REJECTED, self.on_rejected),
            (evt.EVT_RELEASED, self.on_released),
            (evt.EVT_ABORTED, self.on_aborted),
            (evt.EVT_CONN_CLOSE, self.on_conn_close),
            (evt.EVT_C_ECHO, self.on_echo),
            (evt.EVT_C_STORE, self.on_store),
        ]


@dataclass
class NodeHandle:
    """A running listener; ``stop()`` closes the server, the loop and the database."""

    settings: Settings
    ae: AE
    server: ThreadedAssociationServer
    db: Database
    service: StoreService
    stability: StabilityLoop | None
    publisher: Publisher | None
    owns_db: bool

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.stability is not None:
            self.stability.stop()
        self.server.shutdown()
        self.ae.shutdown()
        self.service.committer.stop()
        if self.publisher is not None:
            self.publisher.close()
        if self.owns_db:
            self.db.dispose()
        log.info("listener stopped ae_title=%s port=%d", self.settings.ae_title, self.port)


def start_node(
    settings: Settings,
    *,
    db: Database | None = None,
    publisher: Publisher | None = None,
    run_stability: bool = True,
    supervised: bool = False,
) -> NodeHandle:
    """Start the listener in this process (non-blocking) and, optionally, the stability loop.

    Port 0 picks a free port (see ``NodeHandle.port``).  Half-written files of a previous
    run are removed before the first association is accepted.  ``supervised``: one of
    several processes of :mod:`dicom_node.supervisor` (the port is shared with
    ``SO_REUSEPORT``; the supervisor cleans the spool, since siblings are writing).
    """
    settings.ensure_dirs()
    owns_db = db is None
    database = db or Database(settings, migrate=not supervised)
    if not supervised:
        removed = spool.remove_stale_temp_files(settings.spool_dir)
        if removed:
            log.warning("removed %d half-written spool files from a previous run",
                        len(removed))
    marker = spool.SpoolMarker(settings.spool_dir)
    service = StoreService(settings, database, marker)
    ae = build_ae(settings)
    address = (settings.bind_address, settings.port)
    server: ThreadedAssociationServer | None
    if supervised:
        server = start_reuseport_server(ae, address, service.handlers(),
                                        make_ssl_context(settings))
    else:
        server = ae.start_server(address, block=False, evt_handlers=service.handlers(),
                                 ssl_context=make_ssl_context(settings))
    if server is None:  # only None when block=True
        raise RuntimeError("pynetdicom did not return a server")
    server.contexts = reactor.ContextList(server.contexts)  # cheap per-association copies
    loop: StabilityLoop | None = None
    if run_stability:
        publisher = publisher or CeleryPublisher(settings)
        loop = StabilityLoop(database, settings, publisher)
        loop.start()
    handle = NodeHandle(settings, ae, server, database, service, loop, publisher, owns_db)
    if settings.any_caller:
        log.warning("allowed_callers is '*': any calling AE title may store")
    log.info("listener started ae_title=%s address=%s port=%d tls=%s allowed_callers=%s",
             settings.ae_title, settings.bind_address, handle.port,
             settings.tls_cert is not None, ",".join(settings.allowed_callers))
    return handle
