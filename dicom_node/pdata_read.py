"""P-DATA-TF PDUs read from the socket and split into their values without copies.

For every PDU pynetdicom's DUL appends the received bytes to a ``bytearray`` (a copy),
converts that to ``bytes`` for ``EVT_DATA_RECV`` (a second copy) and slices each
presentation data value out of it (a third): three copies of every byte of a 10 MB image
before the DIMSE layer sees it.  :func:`install` replaces one association's
``_read_pdu_data`` with a reader that keeps the PDU body in the buffer it was received in
and hands each value on as a ``memoryview`` of it.  It emits the same FSM events, checks
the same lengths (an item that does not fit is an invalid PDU, Evt19, as in pynetdicom)
and leaves every other PDU type, and P-DATA where someone listens for the raw bytes
(``EVT_DATA_RECV``), to pynetdicom's own decoding.
"""

from __future__ import annotations

import logging
import struct
from typing import Any

from pynetdicom import evt
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.pdu_items import PresentationDataValueItem

log = logging.getLogger(__name__)

_P_DATA_TF = 0x04
_PDU_TYPES = frozenset(range(0x01, 0x08))


def split_values(body: bytearray | bytes) -> P_DATA_TF:
    """A P-DATA-TF PDU whose values are views of ``body`` (the PDU after its 6-byte
    header); raises ``ValueError`` where an item does not fit."""
    pdu = P_DATA_TF()
    view = memoryview(body)
    offset, end = 0, len(view)
    while offset < end:
        if end - offset < 5:
            raise ValueError(f"PDV item header cut at byte {offset}")
        (length,) = struct.unpack_from(">L", view, offset)
        if length < 1 or offset + 4 + length > end:
            raise ValueError(f"PDV item of {length} bytes at byte {offset} does not fit")
        item = PresentationDataValueItem()
        item.presentation_context_id = view[offset + 4]
        item.presentation_data_value = view[offset + 5:offset + 4 + length]  # type: ignore[assignment]
        pdu.presentation_data_value_items.append(item)
        offset += 4 + length
    return pdu


def install(dul: Any) -> None:
    """Read ``dul``'s P-DATA-TF PDUs without copies (an instance attribute: only this
    association's DUL changes)."""
    assoc = dul.assoc

    def read_pdu_data() -> None:
        try:
            header = dul.socket.recv(6)
            if len(header) == 6:
                pdu_type, _, length = struct.unpack(">BBL", header)
                if pdu_type not in _PDU_TYPES:
                    log.error("unknown PDU type received 0x%02X", pdu_type)
                    dul.event_queue.put("Evt19")
                    return
                body = dul.socket.recv(length)
        except (OSError, TimeoutError) as exc:
            log.error("connection closed before the entire PDU was received: %s", exc)
            dul.event_queue.put("Evt17")
            return
        if len(header) != 6 or len(body) != length:
            dul.event_queue.put("Evt17")  # closed mid-PDU
            return
        try:
            if pdu_type == _P_DATA_TF and not assoc.get_handlers(evt.EVT_DATA_RECV):
                pdu, event = split_values(body), "Evt10"
                evt.trigger(assoc, evt.EVT_PDU_RECV, {"pdu": pdu})
            else:
                pdu, event = dul._decode_pdu(header + body)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an invalid PDU, Evt19
            log.error("unable to decode the received PDU: %s", exc)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    dul._read_pdu_data = read_pdu_data
