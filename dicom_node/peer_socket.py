"""The socket of one peer's association: TCP keepalive, and PDU reads into one buffer
that must finish within the network timeout, acknowledged at once.

Each read re-arms ``TCP_QUICKACK`` (Linux clears it by itself): a sender whose last small
segment of a C-STORE waits under Nagle's algorithm for the previous one to be acknowledged
would otherwise wait for the kernel's delayed ACK, up to 40 ms, before the node can answer
(seen as a p99 of 53 ms per store with one sender, against 10 ms with quick ACKs).

Applied by :class:`dicom_node.listener.StoreService` when a connection opens.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

log = logging.getLogger(__name__)

#: Linux only; elsewhere reads are acknowledged as the kernel sees fit.
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)


def set_keepalive(sock: socket.socket, idle_seconds: int) -> None:
    """TCP keepalive, so a peer that vanished without a FIN is noticed by the kernel."""
    if idle_seconds <= 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        options = (("TCP_KEEPIDLE", idle_seconds),
                   ("TCP_KEEPINTVL", max(1, idle_seconds // 4)), ("TCP_KEEPCNT", 4))
        for name, value in options:
            if hasattr(socket, name):
                sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
    except OSError as exc:
        log.debug("cannot set TCP keepalive: %s", exc)


def recv_exactly(assoc_socket: Any, timeout: float | None = None) -> Any:
    """A drop-in for ``AssociationSocket.recv``: same contract, one buffer, ``recv_into``.

    With ``timeout``, the whole read must finish within that many seconds: a peer that
    stalls (or trickles) mid-PDU gets ``TimeoutError``, which pynetdicom turns into a
    closed connection, and its association slot comes back."""

    def recv(nr_bytes: int) -> bytearray:
        sock = assoc_socket.socket
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        read = 0
        deadline = None if timeout is None else time.monotonic() + timeout
        while read < nr_bytes:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    del view
                    raise TimeoutError(f"peer sent {read} of {nr_bytes} bytes within "
                                       f"{timeout} s")
                sock.settimeout(left)
            got = sock.recv_into(view[read:], nr_bytes - read)
            if _QUICKACK is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
                except OSError:  # closed meanwhile: the next read says so
                    pass
            if not got:  # connection closed: return what we have, as pynetdicom does
                del view
                return buffer[:read]
            read += got
        return buffer

    return recv
