"""Quieter pynetdicom reactors for the listener's associations.

pynetdicom runs two threads per association that poll: the DUL reactor checks the socket
with a zero-timeout ``select`` and sleeps 1 ms, the association reactor sleeps 1 ms and
looks at its DIMSE queue.  Each wake-up takes the interpreter lock, so four idle
associations cost about 13 % of a core and, under load, interrupt the threads that decode
PDUs and write files (measured in benchmarks/README-ingest.md).

:func:`quiet_reactors` makes both wait instead of poll, without changing what they do:

- the DUL waits in ``select`` on its socket **and** on a wake-up socket that is written
  whenever a primitive is queued for it to send (a C-STORE response), so neither incoming
  data nor an outgoing response waits for the timeout; a response it was woken for is
  handed to its state machine at once (pynetdicom's loop would first sleep 1 ms);
- the association reactor blocks on its DIMSE message queue for up to ``idle_wait``
  seconds, so a complete message is served as soon as it is queued.

The timeout bounds only how late the reactors notice a release, an abort or a timer.
"""

from __future__ import annotations

import copy
import queue
import select
import socket
import ssl
from typing import Any

#: Longest wait of an idle reactor; only release, abort and timer checks wait this long.
IDLE_WAIT_S = 0.02


class Wakeup:
    """The socket pair that wakes one association's DUL reactor."""

    def __init__(self) -> None:
        self.reader, self.writer = socket.socketpair()
        self.reader.setblocking(False)
        self.writer.setblocking(False)

    def close(self) -> None:
        """Close both ends; later waits and wakes fail quietly."""
        self.reader.close()
        self.writer.close()


def quiet_reactors(assoc: Any, idle_wait: float = IDLE_WAIT_S) -> Wakeup:
    """Patch ``assoc``'s DUL and DIMSE providers (instance attributes only); returns the
    wake-up pair, to be closed when the connection closes."""
    dul = assoc.dul
    dimse = assoc.dimse
    wakeup = Wakeup()
    wake_r, wake_w = wakeup.reader, wakeup.writer
    send_pdu = dul.send_pdu
    is_transport_event = dul._is_transport_event
    process_recv_primitive = dul._process_recv_primitive

    def send_pdu_and_wake(primitive: Any) -> None:
        send_pdu(primitive)
        try:
            wake_w.send(b"\0")
        except OSError:  # full (the DUL is awake anyway) or closed
            pass

    def wait_then_check_transport() -> bool:
        assoc_socket = dul.socket
        sock = getattr(assoc_socket, "socket", None)
        if (sock is not None and dul.to_provider_queue.empty() and dul.event_queue.empty()
                and not (isinstance(sock, ssl.SSLSocket) and sock.pending())):
            try:
                select.select([sock, wake_r], [], [], idle_wait)
                while wake_r.recv(4096):
                    pass
            except (OSError, ValueError):  # closed meanwhile, or nothing to drain
                pass
        if process_recv_primitive():  # woken to send (a response): now, not after a sleep
            return True
        return bool(is_transport_event())

    def get_msg(block: bool = False) -> Any:
        try:
            return dimse.msg_queue.get(block=True,
                                       timeout=dimse.dimse_timeout if block else idle_wait)
        except queue.Empty:
            return None, None

    dul.send_pdu = send_pdu_and_wake
    dul._is_transport_event = wait_then_check_transport
    dimse.get_msg = get_msg
    return wakeup


class ContextList(list):  # type: ignore[type-arg]
    """The server's presentation contexts, copied per association without ``deepcopy``.

    pynetdicom deep-copies the server's contexts for every association; with every storage
    SOP class and twelve transfer syntaxes that is about 33 ms of CPU under the
    interpreter lock per association.  A context holds only immutable UIDs besides its
    transfer syntax list, so a shallow copy of each context plus a copy of that list is
    an independent copy at about 1 ms."""

    def __deepcopy__(self, _memo: dict[int, Any]) -> list[Any]:
        copies = []
        for context in self:
            duplicate = copy.copy(context)
            duplicate._transfer_syntax = list(context._transfer_syntax)
            copies.append(duplicate)
        return copies
