"""Exit codes and outputs of the `cxr-triage` subcommands, run against real databases."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import inspect, select

from db.models import Label
from db.session import Database, make_engine
from db.settings import Settings, setting_names
from tests.support.ops_populate import populate
from worker.console.cli import (
    EXIT_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    build_parser,
    main,
    subcommand_names,
)


@pytest.fixture
def use(monkeypatch: pytest.MonkeyPatch):  # type: ignore[no-untyped-def]
    def apply(settings: Settings) -> Settings:
        monkeypatch.setenv("CXR_DATA_DIR", str(settings.data_dir))
        monkeypatch.setenv("CXR_DATABASE_URL", settings.effective_database_url)
        return settings

    return apply


def test_console_script_runs_and_lists_subcommands() -> None:
    r = subprocess.run([sys.executable, "-m", "worker.console.cli", "--help"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0
    for name in ("status", "db", "model", "models", "labels", "redeliver", "up", "demo", "web",
                 "settings", "health"):
        assert name in r.stdout
    assert set(subcommand_names()) >= {"status", "db", "model", "models", "labels", "redeliver",
                                       "up", "demo", "web", "settings", "health"}
    r = subprocess.run([sys.executable, "-m", "worker.console.cli"], capture_output=True,
                       timeout=60)
    assert r.returncode == EXIT_USAGE


def test_bad_settings_are_a_usage_error(monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXR_HEATMAP_METHOD", "magic")
    assert main(["settings"]) == EXIT_USAGE
    assert "heatmap_method" in capsys.readouterr().err


def test_settings_are_printed_with_secrets_masked(monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("CXR_BROKER_URL", "redis://:hunter2@redis.internal:6379/0")
    monkeypatch.setenv("CXR_DATABASE_URL", "postgresql://cxr:s3cret@db.internal/cxr")
    assert main(["settings", "--json"]) == EXIT_OK
    out = capsys.readouterr().out
    data = json.loads(out)
    assert set(data) == set(setting_names())
    assert "hunter2" not in out and "s3cret" not in out
    assert data["database_url"] == "postgresql://***@db.internal/cxr"
    assert main(["settings"]) == EXIT_OK
    text = capsys.readouterr().out
    assert "s3cret" not in text and "heatmap_method" in text


def test_db_upgrade_creates_the_schema(settings: Settings, use) -> None:  # type: ignore[no-untyped-def]
    use(settings)
    assert main(["db", "upgrade"]) == EXIT_OK
    engine = make_engine(settings)
    try:
        tables = set(inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"studies", "instances", "predictions", "deliveries", "model_versions"} <= tables
    assert main(["db", "upgrade"]) == EXIT_OK  # a second run finds nothing to do


def test_models_lists_versions_metrics_and_production(settings: Settings, use,  # type: ignore[no-untyped-def]
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    use(settings)
    assert main(["models"]) == EXIT_OK
    assert "no models registered" in capsys.readouterr().out
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    db.dispose()
    assert main(["models"]) == EXIT_OK
    out = capsys.readouterr().out
    assert out.startswith("* " + pop.model_version) and "AUC=0.910" in out
    assert main(["models", "--json"]) == EXIT_OK
    [model] = json.loads(capsys.readouterr().out)
    assert model["stage"] == "production" and model["last_evaluation"]["sensitivity"] == 0.98


def test_model_register_refuses_a_missing_or_bad_file(make_settings, use, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    use(make_settings())
    assert main(["model", "register", str(tmp_path / "missing.pt")]) == EXIT_FAILED
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    rc = main(["model", "register", str(junk), "--promote"])
    assert rc != EXIT_OK
    assert "error" in capsys.readouterr().err.lower()


def test_model_register_and_promote_a_checkpoint(settings: Settings, use, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tests.support.model_synthetic import tiny_meta
    from trainer.architectures import build_model
    from trainer.checkpoint import save_checkpoint

    use(settings)
    ckpt = tmp_path / "tiny.pt"
    save_checkpoint(ckpt, build_model("tiny_cnn", pretrained=False), tiny_meta(threshold=0.3))
    assert main(["model", "register", str(ckpt), "--promote"]) == EXIT_OK
    assert "promoted model" in capsys.readouterr().out
    assert main(["models", "--json"]) == EXIT_OK
    [model] = json.loads(capsys.readouterr().out)
    assert model["stage"] == "production" and model["architecture"] == "tiny_cnn"
    assert model["threshold"] == pytest.approx(0.3)


def test_labels_import_exit_codes(settings: Settings, use, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    use(settings)
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    good = tmp_path / "good.csv"
    good.write_text("study_uid,accession_number,label,source,date\n"
                    f"{pop.done_uid},,1,RT-PCR,2024-01-02\n")
    assert main(["labels", "import", str(good)]) == EXIT_OK
    bad = tmp_path / "bad.csv"
    bad.write_text("study_uid,accession_number,label,source,date\n"
                   f"{pop.queued_uid},,0,RT-PCR,2024-01-02\n"
                   "1.2.3.404,,1,RT-PCR,2024-01-02\n")
    assert main(["labels", "import", str(bad)]) == EXIT_FAILED
    assert main(["labels", "import", str(tmp_path / "absent.csv")]) == EXIT_FAILED
    with db.session() as s:
        labels = s.scalars(select(Label).where(Label.current.is_(True))).all()
        assert sorted(lab.label for lab in labels) == [0, 1]  # valid rows of both files kept
    db.dispose()


def test_redeliver_unknown_study_fails(make_settings, use,  # type: ignore[no-untyped-def]
                                       capsys: pytest.CaptureFixture[str]) -> None:
    use(make_settings())
    assert main(["redeliver", "1.2.3.4.5.6"]) == EXIT_FAILED
    assert "no study 1.2.3.4.5.6" in capsys.readouterr().err


def test_redeliver_resets_failed_deliveries(make_settings, use) -> None:  # type: ignore[no-untyped-def]
    from db.models import Delivery

    settings = use(make_settings())
    db = Database(settings)
    pop = populate(db, settings.data_dir)
    assert main(["redeliver", pop.done_uid]) == EXIT_OK
    with db.session() as s:
        states = sorted((d.kind, d.state, d.attempts) for d in s.scalars(select(Delivery)))
    db.dispose()
    assert states == [("sc", "pending", 0), ("sr", "pending", 0)]
    queued = list((settings.broker_dir / "in").iterdir())
    assert len(queued) == 2  # two delivery messages in the embedded broker


def test_health_command_exit_codes(make_settings, use, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                   capsys: pytest.CaptureFixture[str]) -> None:
    settings = use(make_settings())
    Database(settings).dispose()
    # Database, broker and disk are fine; no worker runs and no model is in production.
    assert main(["health"]) == EXIT_FAILED
    checks = json.loads(capsys.readouterr().out)["checks"]
    assert {n for n, c in checks.items() if not c["ok"]} == {
        "inference_worker", "delivery_worker", "production_model"}
    # A container's liveness asks for its own checks only.
    assert main(["health", "--check", "database,broker", "--check", "disk"]) == EXIT_OK
    assert set(json.loads(capsys.readouterr().out)["checks"]) == {"database", "broker", "disk"}
    assert main(["health", "--check", "databse"]) == EXIT_USAGE
    monkeypatch.setenv("CXR_MIN_FREE_MB", str(10**9))
    assert main(["health"]) == EXIT_FAILED
    assert not json.loads(capsys.readouterr().out)["checks"]["disk"]["ok"]


def test_every_subcommand_has_help() -> None:
    parser = build_parser()
    for name in subcommand_names():
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0
