"""The shipped Orthanc routing (deploy/orthanc) in a real Orthanc: chest images go to
cxr-triage once; our results arriving do not send the originals again; a late image
goes alone."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.events import Event

from dicom_node.results import write_dataset
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr, write
from tests.support.results_factory import make_result
from tests.support.services import make_orthanc, orthanc_available, wait_until

pytestmark = pytest.mark.orthanc

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "orthanc"


class _Node:
    """Stands in for the cxr-triage listener: a Storage SCP that records what arrives."""

    def __init__(self) -> None:
        self.received: list[str] = []
        ae = AE(ae_title="CXR_TRIAGE")
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax,
                                     [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.port = int(self.server.server_address[1])

    def _on_store(self, event: Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return 0x0000


@pytest.fixture
def routed(tmp_path: Path) -> Iterator[tuple[object, _Node]]:
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt install orthanc)")
    node = _Node()
    shipped = json.loads((DEPLOY / "orthanc.json").read_text())
    orthanc = make_orthanc(tmp_path / "orthanc",
                           {"CXR_TRIAGE": ["CXR_TRIAGE", "127.0.0.1", node.port]})
    config = json.loads((orthanc.workdir / "orthanc.json").read_text())
    config["LuaScripts"] = [str(DEPLOY / "cxr-autoroute.lua")]
    config["UserMetadata"] = shipped["UserMetadata"]
    config["StableAge"] = 1
    (orthanc.workdir / "orthanc.json").write_text(json.dumps(config))
    orthanc.start()
    yield orthanc, node
    orthanc.stop(graceful=False)
    node.server.shutdown()


def _quiet(orthanc: object, seconds: float = 4.0) -> None:
    """Wait until the study was stable and the Lua callback had its chance."""
    time.sleep(seconds)


def test_results_arriving_do_not_resend_the_originals(routed, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    orthanc, node = routed
    study = generate_uid()
    first = make_cxr(rows=64, cols=64, study_uid=study, modality="CR")
    orthanc.upload(write(first, tmp_path / "first.dcm"))  # type: ignore[attr-defined]
    wait_until(lambda: node.received == [first.SOPInstanceUID], 30,
               what="the chest image routed to cxr-triage")

    # Our SR arrives in the study: the study settles again, nothing is re-sent.
    sr_path = write_dataset(build_sr(make_result([first], [0.3])), tmp_path / "out")
    orthanc.upload(sr_path)  # type: ignore[attr-defined]
    _quiet(orthanc)
    assert node.received == [first.SOPInstanceUID]

    # A late image: only it goes.
    late = make_cxr(rows=64, cols=64, study_uid=study, modality="CR", seed=5)
    orthanc.upload(write(late, tmp_path / "late.dcm"))  # type: ignore[attr-defined]
    wait_until(lambda: len(node.received) == 2, 30, what="the late image routed")
    _quiet(orthanc, 2.0)
    assert node.received == [first.SOPInstanceUID, late.SOPInstanceUID]
