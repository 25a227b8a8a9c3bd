"""C-STORE of our output files to a PACS: the Storage SCU role.

One association per file keeps a failure local to one object, and the worker's delivery
task decides about retries. Peer trouble (refused or aborted association, timeouts,
failure statuses) is returned as a :class:`SendOutcome` with ``ok=False`` and a reason,
never raised. A warning status (0xB000, 0xB006, 0xB007 ...) means the PACS stored the
object, possibly coerced, so it counts as stored.
"""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.events import Event
from pynetdicom.status import code_to_category

from db.settings import Destination
from dicom_node.errors import BadInputError

log = logging.getLogger(__name__)

_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class SendOutcome:
    """What the peer said: a DICOM status where one came back, and our reading of it."""

    status: int | None
    ok: bool
    warning: bool
    reason: str


def _set_nodelay(event: Event) -> None:
    """Send each PDU at once: Nagle's delay only slows a request/response protocol."""
    sock = event.assoc.dul.socket.socket if event.assoc.dul.socket else None
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _transfer_syntaxes(own: UID) -> list[UID]:
    """The file's own syntax first; an uncompressed file may also go the other way."""
    if own in _UNCOMPRESSED:
        return [own, *(ts for ts in _UNCOMPRESSED if ts != own)]
    return [own]


def outcome_for_status(status: int) -> SendOutcome:
    """Classify a C-STORE response status (PS3.4 B.2.3, PS3.7 C)."""
    category = code_to_category(status)
    if category == "Success":
        return SendOutcome(status, True, False, "stored")
    if category == "Warning":
        return SendOutcome(status, True, True, f"stored with warning 0x{status:04X}")
    return SendOutcome(status, False, False, f"{category.lower()} status 0x{status:04X}")


def send_file(path: Path, destination: Destination, calling_ae: str,
              timeout: float = 30.0) -> SendOutcome:
    """Send one DICOM file to ``destination`` and report what the peer answered.

    Raises :class:`BadInputError` only where the file itself cannot be read: that is
    not the peer's fault and sending it again will not help.
    """
    try:
        ds = dcmread(path)
    except (OSError, InvalidDicomError) as exc:
        raise BadInputError(f"cannot read {path.name} for sending: {exc}") from exc
    sop_class = UID(ds.SOPClassUID)
    sop_uid = str(ds.SOPInstanceUID)
    study_uid = str(ds.get("StudyInstanceUID", ""))
    own_ts = UID(ds.file_meta.TransferSyntaxUID)

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    ae.connection_timeout = timeout
    ae.add_requested_context(sop_class, _transfer_syntaxes(own_ts))

    connected: list[bool] = []

    def on_open(event: Event) -> None:
        connected.append(True)
        _set_nodelay(event)

    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title,
                         evt_handlers=[(evt.EVT_CONN_OPEN, on_open)])
    if not assoc.is_established:
        if not connected:
            reason = "connection refused or peer unreachable"
        elif assoc.is_rejected:
            reason = "association rejected"
        elif assoc.rejected_contexts and not assoc.accepted_contexts:
            reason = f"peer accepted no presentation context for {sop_class.name}"
        elif assoc.is_aborted:
            reason = "association aborted"
        else:
            reason = "association not established"
        outcome = SendOutcome(None, False, False, reason)
    else:
        try:
            if not assoc.accepted_contexts:
                outcome = SendOutcome(
                    None, False, False,
                    f"peer accepted no presentation context for {sop_class.name}",
                )
            else:
                response = assoc.send_c_store(ds)
                status = response.get("Status") if response else None
                if status is None:
                    outcome = SendOutcome(
                        None, False, False, "no response (association aborted or timed out)"
                    )
                else:
                    outcome = outcome_for_status(int(status))
        finally:
            if assoc.is_established:
                assoc.release()
    level = logging.INFO if outcome.ok else logging.WARNING
    status_text = "none" if outcome.status is None else f"0x{outcome.status:04X}"
    log.log(level, "C-STORE sop=%s study=%s to %s: status=%s ok=%s (%s)",
            sop_uid, study_uid, destination, status_text, outcome.ok, outcome.reason)
    return outcome


__all__ = ["SendOutcome", "outcome_for_status", "send_file"]
