"""The promotion floor: a model below it, the first included, stays a candidate with the
reason recorded, and `models`, `status` and the web page say why; with approval required,
nothing reaches production without `cxr-triage model approve`, which records who and when."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import ModelStage, ModelVersion, RetrainRun
from db.session import Database
from db.settings import Settings
from tests.support.trainer_synthetic import write_folder
from trainer.promotion import AWAITING_APPROVAL, floor_reasons, metrics_line
from trainer.registry import production_model
from trainer.retrain import EXIT_OK, run_nightly
from trainer.retrain import main as retrain_main
from worker.console.cli import EXIT_FAILED
from worker.console.cli import main as cli_main
from worker.console.web import load_page_data, render_page

TINY = {"input_size": 64, "epochs": 3, "batch_size": 16, "min_new_labels": 5,
        "split_fractions": (0.5, 0.25, 0.25)}
FAST = {"head_epochs": 3, "views": 2, "contrast": "none"}
FLOOR = {"promotion_min_test_per_class": 20, "promotion_min_auc_lower": 0.75,
         "promotion_min_specificity": 0.25}


def _env(monkeypatch: pytest.MonkeyPatch, s: Settings) -> None:
    monkeypatch.setenv("CXR_DATA_DIR", str(s.data_dir))
    monkeypatch.setenv("CXR_DATABASE_URL", s.effective_database_url)
    for name, value in FLOOR.items():
        monkeypatch.setenv(f"CXR_{name.upper()}", str(getattr(s, name, value)))
    monkeypatch.setenv("CXR_INPUT_SIZE", str(s.input_size))
    monkeypatch.setenv("CXR_EPOCHS", str(s.epochs))
    monkeypatch.setenv("CXR_SPLIT_FRACTIONS", ",".join(str(f) for f in s.split_fractions))
    monkeypatch.setenv("CXR_PROMOTION_REQUIRES_APPROVAL",
                       "true" if s.promotion_requires_approval else "false")


def _metrics(**overrides: object) -> dict[str, object]:
    base: dict[str, object] = {"n": 100, "n_positive": 50, "n_negative": 50, "auc": 0.93,
                               "auc_ci": (0.88, 0.98), "sensitivity": 0.98,
                               "sensitivity_ci": (0.9, 1.0), "specificity": 0.6,
                               "specificity_ci": (0.46, 0.73)}
    base.update(overrides)
    return base


def test_floor_reasons_name_each_failed_condition(make_settings) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(**FLOOR)
    assert floor_reasons(_metrics(), s) == []
    few = floor_reasons(_metrics(n=30, n_positive=27, n_negative=3), s)
    assert len(few) == 1 and "3 negative" in few[0] and "at least 20" in few[0]
    low_auc = floor_reasons(_metrics(auc=0.8, auc_ci=(0.7, 0.9)), s)
    assert len(low_auc) == 1 and "lower bound 0.700 is below 0.75" in low_auc[0]
    zero_spec = floor_reasons(_metrics(specificity=0.0), s)
    assert len(zero_spec) == 1 and "specificity 0.000" in zero_spec[0]
    # the case: 13 test images, specificity 0.000, an undefined interval
    bad = floor_reasons(_metrics(n=13, n_positive=10, n_negative=3, auc_ci=None,
                                 specificity=0.0), s)
    assert len(bad) == 3
    # a floor of zero checks nothing
    assert floor_reasons(_metrics(n=2, n_positive=1, n_negative=1, auc_ci=None,
                                  specificity=None), make_settings()) == []


def test_metrics_line_gives_intervals() -> None:
    line = metrics_line(_metrics())
    assert line.startswith("AUC 0.930 [0.880, 0.980], sensitivity 0.980 [0.900, 1.000], "
                           "specificity 0.600 [0.460, 0.730]")
    assert "n=100" in line


def test_floor_settings_are_validated(make_settings) -> None:  # type: ignore[no-untyped-def]
    from db.settings import SettingsError

    with pytest.raises(SettingsError):
        make_settings(promotion_min_auc_lower=1.5)
    with pytest.raises(SettingsError):
        make_settings(promotion_min_test_per_class=-1)


@pytest.mark.slow
def test_first_model_below_the_floor_stays_a_candidate_and_every_view_says_why(  # type: ignore[no-untyped-def]
    make_settings, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = make_settings(database_url=sqlite_url, **TINY, **FLOOR)
    data = write_folder(tmp_path / "small", n_patients=24, signal=1.0, seed=3)
    _env(monkeypatch, s)
    assert retrain_main(["--dataset", str(data)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "decision: held" in out
    assert "test: AUC " in out and "specificity" in out and "[" in out
    assert "below the promotion floor: too few test images" in out

    db = Database(s)
    assert production_model(db) is None
    with db.session() as ses:
        row = ses.scalars(select(ModelVersion)).one()
        assert row.stage == ModelStage.CANDIDATE
        assert "too few test images" in row.metadata_json["hold_reason"]
        version = row.version
        run = ses.scalars(select(RetrainRun)).one()
        assert run.decision == "held"
        assert any("below the promotion floor" in r for r in run.reasons)

    assert cli_main(["models"]) == EXIT_OK
    models_out = capsys.readouterr().out
    assert version in models_out and "candidate" in models_out
    assert "not promoted: below the promotion floor: too few test images" in models_out
    assert cli_main(["models", "--json"]) == EXIT_OK
    listed = json.loads(capsys.readouterr().out)
    assert "too few test images" in listed[0]["not_promoted_reason"]

    assert cli_main(["status"]) == EXIT_OK
    status_out = capsys.readouterr().out
    assert "production model: none" in status_out
    assert f"newest model {version} is candidate, not promoted: below the promotion floor" \
        in status_out

    page = render_page(load_page_data(db, s))
    assert "not promoted: below the promotion floor: too few test images" in page
    assert "Why not in production" in page

    # a model below the floor cannot be approved into production either
    assert cli_main(["model", "approve", version, "--by", "dr-who"]) == EXIT_FAILED
    assert "not awaiting approval" in capsys.readouterr().err
    assert production_model(db) is None
    db.dispose()


@pytest.mark.slow
def test_with_approval_required_nothing_reaches_production_until_approved(  # type: ignore[no-untyped-def]
    make_settings, sqlite_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s = make_settings(database_url=sqlite_url, promotion_requires_approval=True, **TINY)
    data = write_folder(tmp_path / "data", n_patients=24, signal=1.0, seed=4)
    out = run_nightly(s, [data], train_overrides=FAST)
    assert out.exit_code == EXIT_OK and out.decision == "needs approval", out.reasons
    db = Database(s)
    assert production_model(db) is None
    version = out.challenger
    assert version is not None
    with db.session() as ses:
        row = ses.scalars(select(ModelVersion)).one()
        assert row.stage == ModelStage.CANDIDATE
        assert row.metadata_json["hold_reason"] == AWAITING_APPROVAL

    _env(monkeypatch, s)
    assert cli_main(["models"]) == EXIT_OK
    assert "not promoted: awaiting approval" in capsys.readouterr().out
    assert cli_main(["model", "approve", "no-such-version"]) == EXIT_FAILED
    assert cli_main(["model", "approve", version, "--by", "dr-house"]) == EXIT_OK
    assert "approved by dr-house" in capsys.readouterr().out
    prod = production_model(db)
    assert prod is not None and prod.version == version
    with db.session() as ses:
        meta = ses.scalars(select(ModelVersion)).one().metadata_json
        assert meta["approved_by"] == "dr-house" and meta["approved_at"]
        assert "hold_reason" not in meta
    assert cli_main(["models"]) == EXIT_OK
    models_out = capsys.readouterr().out
    assert "approved by dr-house at" in models_out and "not promoted" not in models_out
    # approving twice is refused: it is no longer a candidate
    assert cli_main(["model", "approve", version]) == EXIT_FAILED
    db.dispose()
