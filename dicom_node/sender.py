"""C-STORE of our output files to a PACS: the Storage SCU role.

The objects of one study go over one association (:func:`send_files`); each gets its own
:class:`SendOutcome`, so a failure stays local to one object, and the worker's delivery
task decides about retries. Peer trouble (refused or aborted association, timeouts,
failure statuses) is returned, never raised. A warning status (0xB000, 0xB006, 0xB007
...) means the PACS stored the object, possibly coerced, so it counts as stored.

Negotiation with fallback (see ``docs/conformance.md``):

- an SR is proposed as Comprehensive 3D SR, Comprehensive SR and Enhanced SR, each in
  Explicit and Implicit VR Little Endian; it is sent in the first class the PACS accepted
  whose content rules it meets (our TID 1500 uses no 3D coordinates and no by-reference
  relationships, so all three hold it).  An object sent in another class than it was built
  in is a new object: its SOP Instance UID is derived from the original's and the class;
- a Secondary Capture is proposed in JPEG-LS Lossless, JPEG 2000 Lossless and RLE Lossless
  (each its own presentation context, so the PACS may accept all) and in Explicit and
  Implicit VR Little Endian; the best accepted is used;
- if the PACS accepts no context for an object's class, the object fails permanently with
  the reason "PACS does not accept <class>": no retry can change that.

The bytes sent under a UID are always the same: a file in its own transfer syntax goes as
it is on disk (chunked, never re-encoded); a transcoded or reclassed variant is written
once beside the original (first file kept) and sent from there.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import (
    UID,
    Comprehensive3DSRStorage,
    ComprehensiveSRStorage,
    EnhancedSRStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from db.errors import BadInputError
from db.settings import Destination
from dicom_node import socket_fix

log = logging.getLogger(__name__)

socket_fix.install()  # refused associations must not leak their socket

_CHUNKED_LOCK = threading.Lock()


@contextmanager
def _chunked_sends() -> Iterator[None]:
    """Make pynetdicom send a file path's data set in chunks straight from the file, as
    it is (a process-wide switch: set for our sends only, and restored)."""
    with _CHUNKED_LOCK:
        before = _config.STORE_SEND_CHUNKED_DATASET
        _config.STORE_SEND_CHUNKED_DATASET = True
        try:
            yield
        finally:
            _config.STORE_SEND_CHUNKED_DATASET = before

UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
#: Lossless syntaxes proposed for images, best first (each has an encoder here).
LOSSLESS = (JPEGLSLossless, JPEG2000Lossless, RLELossless)
#: SR classes, richest first; an SR may be sent in its own class or a later one.
SR_CLASSES = (Comprehensive3DSRStorage, ComprehensiveSRStorage, EnhancedSRStorage)
_SR_FORBIDDEN = {  # value types a class does not allow (PS3.3 A.35)
    ComprehensiveSRStorage: frozenset({"SCOORD3D"}),
    EnhancedSRStorage: frozenset({"SCOORD3D"}),
}


@dataclass(frozen=True)
class SendOutcome:
    """What the peer said: a DICOM status where one came back, and our reading of it.

    ``permanent``: no retry can help (the PACS accepts no context for the class).
    ``sent_sop_class`` / ``sent_uid`` / ``transfer_syntax``: what went over the wire.
    """

    status: int | None
    ok: bool
    warning: bool
    reason: str
    permanent: bool = False
    sent_sop_class: str | None = None
    sent_uid: str | None = None
    transfer_syntax: str | None = None


def _set_nodelay(event: Event) -> None:
    """Send each PDU at once: Nagle's delay only slows a request/response protocol."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def outcome_for_status(status: int) -> SendOutcome:
    """Classify a C-STORE response status (PS3.4 B.2.3, PS3.7 C)."""
    category = code_to_category(status)
    if category == "Success":
        return SendOutcome(status, True, False, "stored")
    if category == "Warning":
        return SendOutcome(status, True, True, f"stored with warning 0x{status:04X}")
    return SendOutcome(status, False, False, f"{category.lower()} status 0x{status:04X}")


def _is_image(ds: Dataset) -> bool:
    return "Rows" in ds and "Columns" in ds and "SOPClassUID" in ds \
        and UID(ds.SOPClassUID) not in SR_CLASSES


def proposals(headers: Sequence[Dataset]) -> list[tuple[UID, list[UID]]]:
    """The presentation contexts to propose for these objects, without duplicates."""
    out: list[tuple[UID, list[UID]]] = []

    def add(abstract: UID, syntaxes: list[UID]) -> None:
        if (abstract, syntaxes) not in out:
            out.append((abstract, syntaxes))

    for ds in headers:
        own_class = UID(ds.SOPClassUID)
        own_ts = UID(ds.file_meta.TransferSyntaxUID)
        if own_class in SR_CLASSES:
            for cls in SR_CLASSES[SR_CLASSES.index(own_class):]:
                add(cls, list(UNCOMPRESSED))
        elif _is_image(ds) and own_ts in UNCOMPRESSED:
            for ts in LOSSLESS:
                add(own_class, [ts])
            add(own_class, list(UNCOMPRESSED))
        elif own_ts in UNCOMPRESSED:
            add(own_class, list(UNCOMPRESSED))
        else:
            add(own_class, [own_ts])
    return out


def _value_types(items: Sequence[Dataset]) -> set[str]:
    found: set[str] = set()
    for item in items:
        if "ValueType" in item:
            found.add(str(item.ValueType))
        if "ContentSequence" in item:
            found |= _value_types(item.ContentSequence)
    return found


def _choose(ds: Dataset, accepted: list[PresentationContext]) -> tuple[UID, UID] | None:
    """(SOP class, transfer syntax) to send ``ds`` in, of the accepted contexts."""
    own_class = UID(ds.SOPClassUID)
    own_ts = UID(ds.file_meta.TransferSyntaxUID)
    by_class: dict[UID, list[UID]] = {}
    for cx in accepted:
        by_class.setdefault(UID(str(cx.abstract_syntax)), []).append(
            UID(str(cx.transfer_syntax[0])))
    classes = [own_class]
    if own_class in SR_CLASSES:
        used = _value_types([ds])
        classes = [c for c in SR_CLASSES[SR_CLASSES.index(own_class):]
                   if not (used & _SR_FORBIDDEN.get(c, frozenset()))]
    for cls in classes:
        syntaxes = by_class.get(cls, [])
        if not syntaxes:
            continue
        if _is_image(ds) and own_ts in UNCOMPRESSED:
            for ts in LOSSLESS:
                if ts in syntaxes:
                    return cls, ts
        if own_ts in syntaxes:
            return cls, own_ts
        if own_ts in UNCOMPRESSED:
            for ts in UNCOMPRESSED:
                if ts in syntaxes:
                    return cls, ts
    return None


def variant_path(path: Path, sop_class: UID, transfer_syntax: UID,
                 header: Dataset | None = None) -> Path:
    """Where the variant of ``path`` in another class or syntax is kept (``header``: the
    file's already parsed header, so that it is not read again)."""
    ds = dcmread(path, stop_before_pixels=True) if header is None else header
    if UID(ds.SOPClassUID) == sop_class and \
            UID(ds.file_meta.TransferSyntaxUID) == transfer_syntax:
        return path
    return path.with_name(f"{path.stem}.{sop_class}.{transfer_syntax}.dcm")


def _variant(path: Path, header: Dataset, sop_class: UID, transfer_syntax: UID,
             ) -> tuple[Path, str]:
    """The file to send and the SOP Instance UID it carries: ``path`` itself, or its
    variant, written once (first kept)."""
    from db.atomic import write_atomically
    from dicom_node import identity

    target = variant_path(path, sop_class, transfer_syntax, header)
    if target == path:
        return target, str(header.SOPInstanceUID)
    if target.is_file():
        return target, str(dcmread(target, stop_before_pixels=True).SOPInstanceUID)
    ds = dcmread(path)
    if UID(ds.SOPClassUID) != sop_class:
        # Another class is another object: a UID of its own, derived from the original's.
        new_uid = identity.uid_from("class-variant", str(ds.SOPInstanceUID), str(sop_class))
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = new_uid
        ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.file_meta.MediaStorageSOPInstanceUID = UID(new_uid)
    if transfer_syntax in LOSSLESS:
        ds.compress(transfer_syntax, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = transfer_syntax
    write_atomically(target, lambda fh: ds.save_as(fh, enforce_file_format=True))
    log.info("wrote %s variant of sop=%s as %s", transfer_syntax.name, path.stem,
             target.name)
    return target, str(ds.SOPInstanceUID)


def read_header(path: Path) -> Dataset:
    """The header of an outbox file to send, checked for what sending needs.

    Raises :class:`BadInputError` where the file cannot be read or lacks a UID or its
    Transfer Syntax UID: sending it again will not help."""
    try:
        ds = dcmread(path, stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:
        raise BadInputError(f"cannot read {path.name} for sending: {exc}") from exc
    for keyword in ("SOPClassUID", "SOPInstanceUID"):
        if keyword not in ds:
            raise BadInputError(f"{path.name} lacks {keyword}")
    if "TransferSyntaxUID" not in getattr(ds, "file_meta", Dataset()):
        raise BadInputError(f"{path.name} lacks a Transfer Syntax UID")
    return ds


def _refused(ds: Dataset) -> SendOutcome:
    name = UID(ds.SOPClassUID).name
    return SendOutcome(None, False, False, f"PACS does not accept {name}", permanent=True)


def _store(assoc: Association, path: Path, ds: Dataset,
           accepted: list[PresentationContext]) -> SendOutcome:
    choice = _choose(ds, accepted)
    if choice is None:
        return _refused(ds)
    sop_class, ts = choice
    target, sent_uid = _variant(path, ds, sop_class, ts)
    with _chunked_sends():
        response = assoc.send_c_store(target)
    status = response.get("Status") if response else None
    if status is None:
        outcome = SendOutcome(None, False, False,
                              "no response (association aborted or timed out)")
    else:
        outcome = outcome_for_status(int(status))
    return SendOutcome(outcome.status, outcome.ok, outcome.warning, outcome.reason,
                       False, str(sop_class), sent_uid, str(ts))


def send_files(paths: Sequence[Path], destination: Destination, calling_ae: str,
               timeout: float = 30.0, headers: Sequence[Dataset] | None = None,
               ) -> list[SendOutcome]:
    """Send ``paths`` to ``destination`` over one association; one outcome per path.

    ``headers`` are the files' headers from :func:`read_header` where the caller already
    read them (each file is then parsed once before it is streamed).  Raises
    :class:`BadInputError` only where a file itself cannot be read: that is not the
    peer's fault and sending it again will not help.
    """
    if headers is None:
        headers = [read_header(p) for p in paths]
    elif len(headers) != len(paths):
        raise ValueError("one header per path")
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    for abstract, syntaxes in proposals(headers):
        ae.add_requested_context(abstract, syntaxes)

    connected: list[bool] = []

    def on_open(event: Event) -> None:
        connected.append(True)
        _set_nodelay(event)

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    outcomes: list[SendOutcome] = []
    if not assoc.is_established:
        if not connected:
            reason = "connection refused or peer unreachable"
        elif assoc.is_rejected:
            reason = "association rejected"
        elif assoc.is_aborted:
            reason = "association aborted"
        else:
            reason = "association not established"
        outcomes = [SendOutcome(None, False, False, reason) for _ in paths]
        if connected and assoc.rejected_contexts and not assoc.accepted_contexts:
            # The peer answered and refused every context: it does not take these classes.
            outcomes = [_refused(ds) for ds in headers]
    else:
        try:
            accepted = list(assoc.accepted_contexts)
            for path, ds in zip(paths, headers, strict=True):
                if not assoc.is_established:
                    outcomes.append(SendOutcome(None, False, False,
                                                "association ended before this object"))
                    continue
                outcomes.append(_store(assoc, path, ds, accepted))
        finally:
            if assoc.is_established:
                assoc.release()
    for ds, outcome in zip(headers, outcomes, strict=True):
        level = logging.INFO if outcome.ok else logging.WARNING
        status_text = "none" if outcome.status is None else f"0x{outcome.status:04X}"
        log.log(level, "C-STORE sop=%s sent_as=%s ts=%s study=%s to %s: status=%s ok=%s "
                "permanent=%s (%s)", ds.SOPInstanceUID, outcome.sent_uid,
                outcome.transfer_syntax, ds.get("StudyInstanceUID", ""), destination,
                status_text, outcome.ok, outcome.permanent, outcome.reason)
    return outcomes


def send_file(path: Path, destination: Destination, calling_ae: str,
              timeout: float = 30.0) -> SendOutcome:
    """Send one DICOM file to ``destination`` and report what the peer answered."""
    return send_files([path], destination, calling_ae, timeout)[0]


__all__ = [
    "LOSSLESS",
    "SR_CLASSES",
    "UNCOMPRESSED",
    "SendOutcome",
    "outcome_for_status",
    "proposals",
    "read_header",
    "send_file",
    "send_files",
    "variant_path",
]
