"""On the real shared chest X-rays: bootstrap a model with the offline backbone on a small
subset (small input, frozen features) and check the evaluation's per-source figures."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from db.session import Database
from trainer.evaluate import main as evaluate_main
from trainer.registry import production_model
from trainer.retrain import EXIT_OK, run_nightly

PER_SOURCE = 40


def _subset(shared: Path, out: Path, names: bool = True) -> Path:
    """labels.csv naming up to PER_SOURCE images of each source by absolute path (no copies);
    ``names=False`` leaves out the label_name column (a two-class folder)."""
    with (shared / "labels.csv").open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    by_source: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        by_source.setdefault(r["source"], []).append(r)
    chosen = []
    for items in by_source.values():
        step = max(1, len(items) // PER_SOURCE)
        chosen += items[::step][:PER_SOURCE]
    out.mkdir(parents=True, exist_ok=True)
    with (out / "labels.csv").open("w", newline="") as fh:
        fields = ["path", "label", "patient_id", "source"] + (["label_name"] if names else [])
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        for r in chosen:
            row = {"path": str((shared / r["path"]).resolve()), "label": r["label"],
                   "patient_id": r["patient_id"], "source": r["source"]}
            if names:
                row["label_name"] = r["label_name"]
            w.writerow(row)
    return out


@pytest.mark.slow
@pytest.mark.shared_data
def test_bootstrap_on_shared_data_and_per_source_evaluation(  # type: ignore[no-untyped-def]
    shared_data: Path, make_settings, sqlite_url: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    subset = _subset(shared_data, tmp_path / "subset")
    s = make_settings(database_url=sqlite_url, input_size=128, epochs=30,
                      split_fractions=(0.5, 0.2, 0.3))
    out = run_nightly(s, [subset], train_overrides={"cutoff": "head", "views": 1,
                                                    "head_epochs": 0, "lr_head": 3e-3})
    assert out.exit_code == EXIT_OK and out.decision == "promoted", out.reasons
    db = Database(s)
    champion = production_model(db)
    assert champion is not None
    db.dispose()

    monkeypatch.setenv("CXR_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("CXR_DATABASE_URL", sqlite_url)
    monkeypatch.setenv("CXR_INPUT_SIZE", "128")
    monkeypatch.setenv("CXR_SPLIT_FRACTIONS", "0.5,0.2,0.3")
    capsys.readouterr()
    assert evaluate_main(["--dataset", str(subset), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"auc", "auc_ci", "threshold", "sensitivity", "specificity", "per_source"} <= set(result)
    assert result["model"] == champion.version
    assert "test split" in result["patients_used"]
    assert result["threshold"] == pytest.approx(champion.threshold)
    # the source/class confounding makes the overall figure easy; it must still be real
    assert result["auc"] > 0.75 and result["auc_ci"][0] < result["auc"] < result["auc_ci"][1]
    per = result["per_source"]
    assert sum(v["n"] for v in per.values()) == result["n"]
    assert set(per) <= {"ieee8023", "hannover", "actualmed", "figure1", "nih"}
    for name, v in per.items():
        if v["n_positive"] in (0, v["n"]):
            assert v["auc"] is None, name  # one class: AUC undefined, never invented
        if v["n_positive"]:
            assert 0.0 <= v["sensitivity"] <= 1.0
        if v["n"] - v["n_positive"]:
            assert 0.0 <= v["specificity"] <= 1.0
    # --patients all is refused: the model was trained on this folder
    # three classes: the pneumonia finding, one-vs-rest AUCs and the 3x3 confusion matrix
    assert result["classes"] == ["normal", "other_pneumonia", "covid"]
    assert 0.0 <= result["pneumonia_auc"] <= 1.0
    assert set(result["class_auc"]) == {"normal", "other_pneumonia", "covid"}
    matrix = result["confusion_3x3"]["matrix"]
    assert sum(map(sum, matrix)) == result["n"]
    assert "pneumonia_auc" in per["nih"]  # NIH holds normal and other pneumonia
    # the same images without label_name are evaluated as before
    plain = _subset(shared_data, tmp_path / "plain", names=False)
    assert evaluate_main(["--dataset", str(plain), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert before["auc"] == pytest.approx(result["auc"])
    assert "pneumonia_auc" not in before and "confusion_3x3" not in before
    assert evaluate_main(["--dataset", str(subset), "--patients", "all"]) == 2
    # the text form names the patients used and each source
    assert evaluate_main(["--dataset", str(subset)]) == 0
    text = capsys.readouterr().out
    assert "test split" in text and "per source:" in text
