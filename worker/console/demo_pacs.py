"""The demo's receiving PACS: Orthanc when installed, else a small pynetdicom storage SCP
writing to a folder.  Split from :mod:`worker.console.demo` to keep each module small.
"""

from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

PACS_AE = "DEMO_PACS"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ----- receiving PACS ---------------------------------------------------------------------


class Receiver:
    port: int
    where: str

    def received(self) -> int:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class OrthancReceiver(Receiver):
    """A real Orthanc with a temporary configuration on free ports."""

    def __init__(self, workdir: Path, detach: bool = False) -> None:
        self.port, self.http_port = free_port(), free_port()
        workdir.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "cxr-demo-pacs", "DicomAet": PACS_AE, "DicomPort": self.port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False, "StorageDirectory": str(workdir / "db"),
            "IndexDirectory": str(workdir / "db"), "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True, "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True, "Plugins": [], "SaveJobs": False,
        }
        (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
        log = open(workdir / "orthanc.log", "ab")  # noqa: SIM115 - kept open for the child
        # detach: its own session, so that Ctrl-C on the demo leaves a kept PACS running
        self.process = subprocess.Popen(["Orthanc", str(workdir / "orthanc.json")],
                                        stdout=log, stderr=log, cwd=workdir,
                                        start_new_session=detach)
        log.close()
        self.where = f"Orthanc http://127.0.0.1:{self.http_port}/app/explorer.html"
        deadline = time.monotonic() + 60
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited; see {workdir / 'orthanc.log'}")
            try:
                self._get("/system")
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError("Orthanc did not start within 60 s") from None
                time.sleep(0.2)

    def _get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def received(self) -> int:
        return len(self._get("/instances"))

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FolderReceiver(Receiver):
    """A pynetdicom storage SCP that writes every object it receives to a folder."""

    def __init__(self, folder: Path) -> None:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.where = f"folder {folder}"
        ae = AE(ae_title=PACS_AE)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:
                ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        self._count = 0
        self._lock = threading.Lock()

        def on_store(event: Any) -> int:
            uid = event.request.AffectedSOPInstanceUID
            path = folder / f"{uid}.dcm"
            with open(path, "wb") as f:
                f.write(event.encoded_dataset())
            with self._lock:
                self._count += 1
            return 0x0000

        server = ae.start_server(("127.0.0.1", self.port), block=False,
                                 evt_handlers=[(evt.EVT_C_STORE, on_store)])
        if server is None:  # block=False always returns one; guard the type
            raise RuntimeError("the demo storage SCP did not start")
        self.server = server

    def received(self) -> int:
        with self._lock:
            return self._count

    def stop(self) -> None:
        self.server.shutdown()


ALL_TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
]


# ----- inputs and model ---------------------------------------------------------------------
