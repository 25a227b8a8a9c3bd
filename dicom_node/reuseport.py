"""A pynetdicom association server that shares its port with sibling processes.

``AE.start_server`` always binds with ``SO_REUSEADDR`` only; a listener child of
:mod:`dicom_node.supervisor` needs ``SO_REUSEPORT`` as well, so that every child can bind
the supervisor's port and the kernel spreads incoming connections over them.
"""

from __future__ import annotations

import socket
import ssl
import threading
from typing import Any

from pynetdicom import AE
from pynetdicom.transport import ThreadedAssociationServer


class ReusePortAssociationServer(ThreadedAssociationServer):
    """``ThreadedAssociationServer`` that sets ``SO_REUSEPORT`` before binding."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()


def start_reuseport_server(ae: AE, address: tuple[str, int], evt_handlers: list[Any],
                           ssl_context: ssl.SSLContext | None) -> ThreadedAssociationServer:
    """What ``ae.start_server(address, block=False, ...)`` does, with the class above."""
    server = ae.make_server(address, ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=ReusePortAssociationServer)
    thread = threading.Thread(target=server.serve_forever, name="AcceptorServer-reuseport",
                              daemon=True)
    thread.start()
    ae._servers.append(server)  # so that ae.shutdown() stops it like its own servers
    return server
