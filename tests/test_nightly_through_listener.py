"""The nightly run learns from studies that really came in through the DICOM listener and
were labelled through the `cxr-triage labels import` command, and never trains on a test
patient."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import select

from db.models import Evaluation, Instance, ModelVersion, Study
from db.session import Database
from db.settings import Settings
from dicom_node.listener import start_node
from tests.support.dicom_factory import make_cxr
from tests.support.trainer_synthetic import chest_like
from tests.support.worker_process import settings_env
from trainer.retrain import EXIT_OK, run_nightly
from trainer.splits import Split, assign_split

REPO = Path(__file__).resolve().parents[1]
FAST = {"head_epochs": 3, "views": 2, "contrast": "none"}


def _send_studies(port: int, ae_title: str, n_patients: int) -> list[tuple[str, str, bool]]:
    """C-STORE one or two one-image studies per patient; returns (study uid, patient, label)."""
    ae = AE(ae_title="STORESCU")
    sample = make_cxr(bits_stored=8, pixels=np.zeros((64, 64), np.uint8))
    ae.add_requested_context(sample.SOPClassUID, sample.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established
    sent = []
    try:
        for p in range(n_patients):
            positive = p % 2 == 0
            for k in range(1 + p % 3 // 2):  # a third of the patients have two studies
                rng = np.random.default_rng(100 * p + k)
                study_uid = generate_uid()
                ds = make_cxr(study_uid=study_uid, bits_stored=8,
                              pixels=chest_like(rng, positive), patient_id=f"MRN{p:04d}")
                assert assoc.send_c_store(ds).Status == 0x0000
                sent.append((study_uid, f"MRN{p:04d}", positive))
    finally:
        assoc.release()
    return sent


@pytest.mark.slow
def test_nightly_learns_from_listener_studies_labelled_by_the_cli(  # type: ignore[no-untyped-def]
    make_settings, database_url: str, tmp_path: Path
) -> None:
    settings: Settings = make_settings(
        database_url=database_url, port=0, bind_address="127.0.0.1", min_new_labels=5,
        split_fractions=(0.5, 0.25, 0.25), input_size=64, epochs=3, batch_size=16)
    node = start_node(settings, run_stability=False)
    try:
        sent = _send_studies(node.port, settings.ae_title, n_patients=64)
    finally:
        node.stop()
    db = Database(settings)
    with db.session() as s:
        assert s.query(Instance).count() == len(sent)
        assert all(Path(p).is_file() for p in s.scalars(select(Instance.path)))

    labels = tmp_path / "labels.csv"
    labels.write_text("study_uid,accession_number,label,source,date\n" + "".join(
        f"{uid},,{'covid' if pos else 'not-covid'},RT-PCR,2024-03-01\n" for uid, _, pos in sent))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
           **settings_env(settings)}
    cli = subprocess.run([sys.executable, "-m", "worker.console.cli", "labels", "import",
                          str(labels)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert cli.returncode == 0, cli.stdout + cli.stderr

    out = run_nightly(settings, train_overrides=FAST)
    assert out.exit_code == EXIT_OK and out.decision == "promoted", out.reasons
    test_patients = {pid for _, pid, _ in sent
                     if assign_split(pid, settings.split_key, settings.split_fractions)
                     is Split.TEST}
    with db.session() as s:
        model = s.scalars(select(ModelVersion)).one()
        trained_on = set(model.metadata_json["provenance"]["extra"]["train_study_uids"])
        trained_patients = set(s.scalars(select(Study.patient_id)
                                         .where(Study.study_uid.in_(trained_on))))
        evaluation = s.scalars(select(Evaluation).where(Evaluation.kind == "test")).one()
        tested_on = set(evaluation.metrics_json["test_study_uids"])
    assert test_patients and trained_patients and not trained_patients & test_patients
    assert tested_on == {uid for uid, pid, _ in sent if pid in test_patients}
    assert evaluation.auc is not None and evaluation.auc > 0.8
    db.dispose()
