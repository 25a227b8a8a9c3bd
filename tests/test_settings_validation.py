"""Settings are checked at load: nonsense is one line and exit code 2, never a traceback
later; selection rules are typed; one precedence (defaults < file < environment < command
line), as the README says."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from db.settings import SelectionRule, SettingsError, load_settings
from dicom_node.__main__ import main as listener_main
from dicom_node.listener import start_node
from worker.console.cli import main as cli_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def not_a_dir(tmp_path: Path) -> Path:
    f = tmp_path / "plain-file"
    f.write_text("x")
    return f


BAD_ENV: dict[str, tuple[str, str]] = {
    "unparsable database URL": ("CXR_DATABASE_URL", "not a url at all"),
    "unknown log level": ("CXR_LOG_LEVEL", "CHATTY"),
    "negative stable seconds": ("CXR_STABLE_SECONDS", "-5"),
    "negative delivery deadline": ("CXR_DELIVERY_DEADLINE_SECONDS", "-1"),
    "negative network timeout": ("CXR_NETWORK_TIMEOUT", "-1"),
    "zero network timeout": ("CXR_NETWORK_TIMEOUT", "0"),
    "NaN seconds": ("CXR_SCHEDULER_INTERVAL", "nan"),
    "device gpu7": ("CXR_DEVICE", "gpu7"),
    "port 70000": ("CXR_PORT", "70000"),
    "negative port": ("CXR_PORT", "-1"),
    "web port 65536": ("CXR_WEB_PORT", "65536"),
    "metrics port 99999": ("CXR_METRICS_PORT", "99999"),
    "pacs port 0": ("CXR_PACS", "PACS@host:0"),
    "empty caller list": ("CXR_ALLOWED_CALLERS", ""),
    "blank caller list": ("CXR_ALLOWED_CALLERS", " , "),
    "star mixed with titles": ("CXR_ALLOWED_CALLERS", "*,STORESCU"),
    "caller title of 17 characters": ("CXR_ALLOWED_CALLERS", "A" * 17),
    "rule with a misspelt key": ("CXR_SELECTION_RULES",
                                 '[{"name": "x", "ViewPositon": ["PA"]}]'),
    "rule with a string value": ("CXR_SELECTION_RULES", '[{"name": "x", "Modality": "CR"}]'),
    "rule that is not an object": ("CXR_SELECTION_RULES", '["CR"]'),
    "rule with an empty list": ("CXR_SELECTION_RULES", '[{"name": "x", "Modality": []}]'),
    "acse timeout above network timeout": ("CXR_ACSE_TIMEOUT", "500"),
    "zero analysis attempts": ("CXR_MAX_ANALYSIS_ATTEMPTS", "0"),
}


@pytest.mark.parametrize("name", sorted(BAD_ENV))
def test_nonsense_is_refused_at_load(name: str, tmp_path: Path) -> None:
    key, value = BAD_ENV[name]
    with pytest.raises(SettingsError):
        load_settings(env={key: value, "CXR_DATA_DIR": str(tmp_path / "d")})


def test_a_retired_setting_names_its_successor(tmp_path: Path) -> None:
    """The one retry budget replaced task_max_retries: an old deployment learns where to."""
    env = {"CXR_TASK_MAX_RETRIES": "5", "CXR_DATA_DIR": str(tmp_path / "d")}
    with pytest.raises(SettingsError, match="CXR_TASK_MAX_RETRIES was retired: use "
                                            "max_analysis_attempts"):
        load_settings(env=env)
    config = tmp_path / "cxr.toml"
    config.write_text("task_max_retries = 5\n")
    with pytest.raises(SettingsError, match="'task_max_retries' was retired"):
        load_settings(config_file=config, env={"CXR_DATA_DIR": str(tmp_path / "d")})


def test_a_data_dir_that_cannot_be_a_folder_is_refused(not_a_dir: Path) -> None:
    with pytest.raises(SettingsError, match="not a directory"):
        load_settings(env={"CXR_DATA_DIR": str(not_a_dir / "data")})


@pytest.mark.parametrize("name", ["unparsable database URL", "device gpu7", "empty caller list",
                                  "rule with a misspelt key", "port 70000"])
def test_entry_points_print_one_line_and_exit_2(name: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    key, value = BAD_ENV[name]
    monkeypatch.setenv("CXR_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv(key, value)
    assert cli_main(["settings"]) == 2
    assert listener_main([]) == 2
    out = capsys.readouterr()
    lines = [line for line in (out.out + out.err).splitlines() if line.strip()]
    assert len(lines) == 2 and all("Traceback" not in line for line in lines), lines


def test_the_celery_app_refuses_bad_settings_with_one_line(tmp_path: Path) -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "CXR_DEVICE": "gpu7",
           "CXR_DATA_DIR": str(tmp_path / "d")}
    proc = subprocess.run([sys.executable, "-c", "from worker import app"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "configuration error: device 'gpu7' must be auto, cpu, mps, cuda or cuda:N"]


def test_selection_rules_are_typed_objects() -> None:
    s = load_settings(env={"CXR_SELECTION_RULES": '[{"name": "dx pa", "Modality": ["DX"], '
                                                   '"ViewPosition": ["PA"]}]'})
    (rule,) = s.selection_rules
    assert isinstance(rule, SelectionRule)
    assert rule.name == "dx pa" and rule["Modality"] == ["DX"] and "BodyPartExamined" not in rule
    with pytest.raises(SettingsError, match="'ViewPositon'"):
        load_settings(env={"CXR_SELECTION_RULES": '[{"ViewPositon": ["PA"]}]'})
    with pytest.raises(SettingsError, match="Modality must be a non-empty list"):
        load_settings(env={"CXR_SELECTION_RULES": '[{"Modality": "CR"}]'})


def test_precedence_defaults_file_environment_command_line(tmp_path: Path) -> None:
    config = tmp_path / "cxr.toml"
    config.write_text('port = 1001\nae_title = "FROM_FILE"\nstable_seconds = 5.0\n')
    env = {"CXR_PORT": "1002", "CXR_AE_TITLE": "FROM_ENV"}
    assert load_settings(env={}).port == 11112  # default
    assert load_settings(env={}, config_file=config).port == 1001  # file over default
    s = load_settings(env=env, config_file=config)
    assert (s.port, s.ae_title, s.stable_seconds) == (1002, "FROM_ENV", 5.0)  # env over file
    s = load_settings(env=env, config_file=config, overrides={"port": 1003})
    assert (s.port, s.ae_title) == (1003, "FROM_ENV")  # command line over everything
    # CXR_CONFIG names the file the same way --config does.
    assert load_settings(env={"CXR_CONFIG": str(config)}).ae_title == "FROM_FILE"


def test_readme_states_the_same_precedence() -> None:
    text = " ".join((REPO / "README.md").read_text().split())
    assert "defaults < config file < environment < command line" in text


def test_star_accepts_any_caller_with_a_warning(make_settings,  # type: ignore[no-untyped-def]
                                                caplog: pytest.LogCaptureFixture) -> None:
    s = make_settings(allowed_callers="*", port=0, bind_address="127.0.0.1", min_free_mb=1)
    assert s.any_caller
    with caplog.at_level(logging.WARNING, logger="dicom_node.listener"):
        node = start_node(s, run_stability=False)
    try:
        assert "any calling AE title may store" in caplog.text
        ae = AE(ae_title="SOMEONE_ELSE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_TRIAGE")
        assert assoc.is_established
        assoc.release()
    finally:
        node.stop()


def test_a_named_caller_list_still_refuses_others(make_settings) -> None:  # type: ignore[no-untyped-def]
    s = make_settings(allowed_callers="STORESCU", port=0, bind_address="127.0.0.1",
                      min_free_mb=1)
    node = start_node(s, run_stability=False)
    try:
        ae = AE(ae_title="SOMEONE_ELSE")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="CXR_TRIAGE")
        assert not assoc.is_established
    finally:
        node.stop()
