"""`cxr-triage status` against databases filled by direct inserts (SQLite and PostgreSQL)."""

from __future__ import annotations

import json

import pytest

from db.session import Database
from db.settings import Settings
from tests.support.ops_populate import SECRET_ACCESSION, SECRET_PATIENT_ID, populate
from worker.console.cli import main


@pytest.fixture
def env_for(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def apply(settings: Settings) -> None:
        monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv("CXR_DATABASE_URL", settings.effective_database_url)

    return apply


def test_status_json_lists_studies_predictions_deliveries_and_summary(
    settings: Settings, env_for, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    db.dispose()
    env_for(settings)

    assert main(["status", "--json"]) == 0
    out = capsys.readouterr().out
    data = json.loads(out)
    by_uid = {s["study_uid"]: s for s in data["studies"]}
    assert set(by_uid) == {pop.done_uid, pop.queued_uid, pop.failed_uid}

    done = by_uid[pop.done_uid]
    assert done["state"] == "done"
    assert done["instances"] == 2
    assert done["received_at"] and done["updated_at"]
    assert done["prediction"]["probability"] == pytest.approx(0.87)
    assert done["prediction"]["positive"] is True
    assert done["prediction"]["model_version"] == pop.model_version
    assert done["prediction"]["heatmap_method"] == "gradcam"
    # the second finding of a three-class model: the pneumonia pattern
    assert (done["pneumonia_probability"], done["pneumonia_positive"]) == (
        pytest.approx(0.91), True)
    assert done["prediction"]["pneumonia_threshold"] == pytest.approx(0.5)
    assert by_uid[pop.queued_uid]["pneumonia_probability"] is None
    assert (done["probability"], done["positive"], done["model_version"],
            done["heatmap_method"]) == (pytest.approx(0.87), True, pop.model_version, "gradcam")
    kinds = {(d["kind"], d["state"], d["attempts"]) for d in done["deliveries"]}
    assert kinds == {("sr", "delivered", 1), ("sc", "failed", 7)}
    assert by_uid[pop.failed_uid]["reason"] == "no scorable image: abdomen OT"
    assert by_uid[pop.queued_uid]["prediction"] is None
    assert {k: by_uid[pop.queued_uid][k] for k in
            ("probability", "positive", "model_version", "heatmap_method")} == dict.fromkeys(
        ("probability", "positive", "model_version", "heatmap_method"))

    summ = data["summary"]
    assert summ["studies_by_state"]["done"] == 1
    assert summ["studies_by_state"]["queued"] == 1
    assert summ["studies_by_state"]["failed"] == 1
    assert summ["studies_by_state"]["receiving"] == 0
    assert summ["oldest_waiting"]["study_uid"] == pop.queued_uid
    assert summ["oldest_waiting"]["waiting_seconds"] > 1700
    [failed] = summ["failed_deliveries"]
    assert failed["study_uid"] == pop.done_uid
    assert "called AE title" in failed["reason"]
    prod = summ["production_model"]
    assert prod["version"] == pop.model_version
    assert prod["last_evaluation"]["auc"] == pytest.approx(0.91)

    assert SECRET_PATIENT_ID not in out and SECRET_ACCESSION not in out


def test_status_table_for_humans_hides_patient_identity(
    settings: Settings, env_for, capsys: pytest.CaptureFixture[str]  # type: ignore[no-untyped-def]
) -> None:
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    db.dispose()
    env_for(settings)

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert pop.done_uid in out and "POSITIVE" in out and "0.870" in out
    # both findings of the three-class model: COVID-19, then the pneumonia pattern
    header = out.splitlines()[0].split()
    assert header[5:10] == ["PROB", "CALL", "PNEU", "PNEU", "CALL"]  # "STUDY UID" is two
    [done_row] = [line for line in out.splitlines() if line.startswith(pop.done_uid)]
    assert done_row.split()[4:8] == ["0.870", "POSITIVE", "0.910", "POSITIVE"]
    [queued_row] = [line for line in out.splitlines() if line.startswith(pop.queued_uid)]
    assert queued_row.split()[4:8] == ["-", "-", "-", "-"]
    assert "sr:delivered, sc:failed" in out
    assert f"production model: {pop.model_version}" in out
    assert "failed delivery:" in out and "called AE title" in out
    assert SECRET_PATIENT_ID not in out and SECRET_ACCESSION not in out


def test_status_on_an_empty_database(make_settings, env_for,  # type: ignore[no-untyped-def]
                                     capsys: pytest.CaptureFixture[str]) -> None:
    env_for(make_settings())
    assert main(["status", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["studies"] == []
    assert data["summary"]["total_studies"] == 0
    assert data["summary"]["production_model"] is None
    assert main(["status"]) == 0
    assert "(no studies)" in capsys.readouterr().out


def test_status_filters_by_state(settings: Settings, env_for,  # type: ignore[no-untyped-def]
                                 capsys: pytest.CaptureFixture[str]) -> None:
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    db.dispose()
    env_for(settings)
    assert main(["status", "--json", "--state", "queued"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [s["study_uid"] for s in data["studies"]] == [pop.queued_uid]




def test_status_table_shows_no_pneumonia_call_for_a_two_class_model() -> None:
    """An analysis by a two-class model has only the COVID-19 finding: its pneumonia
    columns read "-", not a call."""
    import io

    from worker.console.render import render_status_table

    prediction = {"probability": 0.42, "positive": False, "pneumonia_probability": None,
                  "pneumonia_positive": None, "model_version": "tiny-2class"}
    data = {"studies": [{"study_uid": "1.2.3", "state": "done", "instances": 1,
                         "received_at": "2026-01-01T00:00:00+00:00", "reason": None,
                         "prediction": prediction, "deliveries": []}],
            "summary": {"studies_by_state": {"done": 1}, "total_studies": 1,
                        "oldest_waiting": None, "failed_deliveries": [],
                        "production_model": None, "newest_model_not_promoted": None}}
    out = io.StringIO()
    render_status_table(data, out)
    [row] = [line for line in out.getvalue().splitlines() if line.startswith("1.2.3")]
    assert row.split()[4:9] == ["0.420", "negative", "-", "-", "tiny-2class"]
