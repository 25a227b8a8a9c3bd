"""Close the socket of an association that never connected.

pynetdicom's ``AssociationSocket._shutdown_socket`` calls ``shutdown()`` before
``close()`` in one ``try``: on a socket whose ``connect()`` was refused, ``shutdown()``
raises ``ENOTCONN`` and ``close()`` never runs, so every refused association leaks a file
descriptor until the garbage collector finds it.  A delivery worker retrying a PACS that
is down would leak one per attempt.  :func:`install` replaces that method with one that
always closes; it is idempotent and applied when the sender is imported.
"""

from __future__ import annotations

import socket
from typing import Any

from pynetdicom.transport import AssociationSocket


def _shutdown_then_close(self: Any) -> None:
    sock = self.socket
    if sock is None:
        return
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:  # never connected, or the peer already went away
        pass
    sock.close()


def install() -> None:
    AssociationSocket._shutdown_socket = _shutdown_then_close  # type: ignore[method-assign]
