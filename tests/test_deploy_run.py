"""The deployment files run as shipped: the Orthanc Lua rule in a real Orthanc routing to a
real listener, and the cron line under /bin/sh reaching the trainer."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from db.session import Database
from db.settings import Settings
from dicom_node.sc import build_heatmap_sc
from dicom_node.sr import build_sr
from tests.support.dicom_factory import make_cxr, write
from tests.support.listener_peers import instance_rows
from tests.support.node_process import start_listening
from tests.support.results_factory import make_model, make_result, scored
from tests.support.services import Orthanc, orthanc_available, wait_until
from trainer.retrain import EXIT_FAILED, EXIT_LOCKED

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"


class Listener:
    """``python -m dicom_node`` on a free port (``LISTENING port=`` handshake)."""

    def __init__(self, settings: Settings, log: Path) -> None:
        cmd = [sys.executable, "-m", "dicom_node", "--port", "0", "--bind-address", "127.0.0.1",
               "--data-dir", str(settings.data_dir), "--database-url",
               settings.effective_database_url, "--min-free-mb", "1", "--no-stability"]
        self.proc, self.port = start_listening(cmd, log)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@pytest.fixture
def listener(make_settings, tmp_path: Path) -> Iterator[tuple[Listener, Database]]:  # type: ignore[no-untyped-def]
    settings = make_settings(database_url=f"sqlite:///{tmp_path / 'node.db'}")
    db = Database(settings)
    node = Listener(settings, tmp_path / "node.log")
    yield node, db
    node.stop()
    db.dispose()


def shipped_orthanc(workdir: Path, listener_port: int) -> Orthanc:
    """deploy/orthanc/orthanc.json with only ports, storage, auth and the peer's address
    changed; the Lua script is the shipped file itself."""
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    orthanc = Orthanc(aet=config["DicomAet"], workdir=workdir)  # ports: Orthanc.start
    workdir.mkdir(parents=True, exist_ok=True)
    config.update({
        "StorageDirectory": str(workdir / "db"), "IndexDirectory": str(workdir / "db"),
        "AuthenticationEnabled": False, "StableAge": 1, "SaveJobs": False,
        "LuaScripts": [str(DEPLOY / "orthanc" / "cxr-autoroute.lua")],
    })
    config["DicomModalities"]["CXR_TRIAGE"].update({"Host": "127.0.0.1", "Port": listener_port})
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    return orthanc


def _lua_lines(orthanc: Orthanc) -> list[str]:
    text = (orthanc.workdir / "orthanc.log").read_text(errors="replace")
    return re.findall(r"cxr-triage: .*", text)


def _study_id(orthanc: Orthanc, study_uid: str) -> str:
    found = orthanc.post("/tools/lookup", raw=study_uid.encode())
    return str(next(f["ID"] for f in found if f["Type"] == "Study"))


def _wait_for_lua_line(orthanc: Orthanc, study_id: str, count: int) -> list[str]:
    def lines() -> list[str]:
        return [ln for ln in _lua_lines(orthanc) if study_id in ln]
    wait_until(lambda: len(lines()) >= count, 60, 0.2,
               f"Lua line {count} for study {study_id}: {_lua_lines(orthanc)}")
    return lines()


@pytest.mark.skipif(not orthanc_available(), reason="Orthanc is not installed")
def test_shipped_lua_rule_routes_chest_cr_and_dx_once(
        listener: tuple[Listener, Database], tmp_path: Path) -> None:
    node, db = listener
    orthanc = shipped_orthanc(tmp_path / "orthanc", node.port)
    orthanc.start()
    try:
        cr_study, dx_study, knee_study = generate_uid(), generate_uid(), generate_uid()
        cr_series = generate_uid()
        cr = [make_cxr(modality="CR", study_uid=cr_study, seed=i, instance_number=i + 1,
                       series_uid=cr_series) for i in range(2)]
        # DX without BodyPartExamined; only the protocol says chest.
        dx = make_cxr(modality="DX", study_uid=dx_study, body_part=None)
        dx.ProtocolName = "Thorax PA standing"
        knee = make_cxr(modality="DX", study_uid=knee_study, body_part="KNEE")
        for ds in [*cr, dx, knee]:
            orthanc.upload(write(ds, tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm"))
        routed = {ds.SOPInstanceUID for ds in [*cr, dx]}
        wait_until(lambda: routed <= set(instance_rows(db)), 90, 0.3,
                   "CR and DX chest instances at the listener")
        cr_id, dx_id, knee_id = (_study_id(orthanc, u) for u in (cr_study, dx_study, knee_study))
        assert "routing 1 chest series" in _wait_for_lua_line(orthanc, cr_id, 1)[0]
        assert "routing 1 chest series" in _wait_for_lua_line(orthanc, dx_id, 1)[0]
        assert "nothing to route" in _wait_for_lua_line(orthanc, knee_id, 1)[0]
        assert knee.SOPInstanceUID not in instance_rows(db)
        jobs_before = len(orthanc.get("/jobs"))

        # Our results arrive back in the CR study: the study becomes stable again.
        sources = [pydicom.dcmread(tmp_path / "in" / f"{ds.SOPInstanceUID}.dcm") for ds in cr]
        result = make_result(sources)
        sr = build_sr(result)
        sc = build_heatmap_sc(scored(sources[0], 0.8), make_model())
        for ds in (sr, sc):
            orthanc.upload(write(ds, tmp_path / "out" / f"{ds.SOPInstanceUID}.dcm"))
        lines = _wait_for_lua_line(orthanc, cr_id, 2)
        assert "nothing to route" in lines[1] and "1 chest series already routed" in lines[1]
        assert "2 result series" in lines[1], lines
        assert len(orthanc.get("/jobs")) == jobs_before  # no store job re-sends originals
        assert set(instance_rows(db)) == routed

        # A further image of the CR series is new work: the series goes again.
        extra = make_cxr(modality="CR", study_uid=cr_study, series_uid=cr_series, seed=9,
                         instance_number=3)
        orthanc.upload(write(extra, tmp_path / "in" / f"{extra.SOPInstanceUID}.dcm"))
        wait_until(lambda: extra.SOPInstanceUID in instance_rows(db), 90, 0.3,
                   "the late CR instance at the listener")
        assert "routing 1 chest series" in _wait_for_lua_line(orthanc, cr_id, 3)[2]
    finally:
        orthanc.stop(graceful=False)
    # Priority went as an integer: no REST error in Orthanc's log.
    log = (orthanc.workdir / "orthanc.log").read_text(errors="replace")
    assert "Integer value expected" not in log
    assert not re.search(r"^E.*(Lua|lua|Priority)", log, flags=re.M), log[-3000:]


# ---------------------------------------------------------------- the cron line

def _cron_command(substitute: dict[str, str]) -> tuple[dict[str, str], str]:
    """(environment variables, command) of the one job line in deploy/crontab."""
    env: dict[str, str] = {}
    command = ""
    for line in (DEPLOY / "crontab").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, eq, value = line.partition("=")
        if eq and re.fullmatch(r"[A-Z_]+", name):
            env[name] = value
            continue
        fields = line.split(None, 6)
        assert fields[5] == "cxr-triage"
        command = fields[6]
    for old, new in substitute.items():
        command = command.replace(old, new)
        env = {k: v.replace(old, new) for k, v in env.items()}
    return env, command


def _cron_paths(tmp_path: Path) -> tuple[dict[str, str], Path, Path, Path]:
    etc, lib, log = tmp_path / "etc", tmp_path / "lib", tmp_path / "log"
    for d in (etc, lib, log):
        d.mkdir()
    venv_bin = str(Path(sys.executable).parent)
    substitute = {"/etc/cxr-triage": str(etc), "/var/lib/cxr-triage": str(lib),
                  "/var/log/cxr-triage": str(log), "/opt/cxr-triage/venv/bin": venv_bin}
    return substitute, etc, lib, log


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) is not installed")
def test_cron_line_as_written_reaches_the_trainer(tmp_path: Path) -> None:
    substitute, etc, lib, log = _cron_paths(tmp_path)
    db_url = f"sqlite:///{lib / 'cxr.db'}"
    (etc / "cxr-triage.env").write_text(
        f"CXR_DATA_DIR={lib}\nCXR_DATABASE_URL={db_url}\nCXR_BROKER_URL=memory://\n")
    env, command = _cron_command(substitute)
    # cron runs the line with SHELL and PATH from the file, HOME of the user, nothing else.
    run_env = {**env, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT), "LOGNAME": "cxr-triage"}
    r = subprocess.run([env["SHELL"], "-c", command], env=run_env, cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    text = (log / "retrain.log").read_text()
    outcome = json.loads(text.strip().splitlines()[-1])
    # An empty database: the trainer runs, gathers nothing, and says what is missing
    # (before the fix every night ended "locked", exit 3, without reaching this point).
    assert outcome["status"] == "failed" and outcome["run"] == 1, text[-3000:]
    assert "label more studies" in outcome["reasons"][0]
    assert "retrain data run=1 images=0" in text
    assert r.returncode == EXIT_FAILED != EXIT_LOCKED, text[-3000:]
    # The trainer took its own lock under the data dir; cron's lock is a different file.
    assert (lib / "retrain.lock").exists()
    cron_locks = re.findall(r"flock -n (\S+)", command)
    assert cron_locks and cron_locks[0] != str(lib / "retrain.lock")


@pytest.mark.skipif(shutil.which("flock") is None, reason="flock(1) is not installed")
def test_cron_line_skips_a_night_while_the_last_run_holds_the_lock(tmp_path: Path) -> None:
    substitute, etc, lib, log = _cron_paths(tmp_path)
    (etc / "cxr-triage.env").write_text(f"CXR_DATA_DIR={lib}\n")
    env, command = _cron_command(substitute)
    [cron_lock] = re.findall(r"flock -n (\S+)", command)
    holder = subprocess.Popen(["flock", cron_lock, "sleep", "60"])
    try:
        wait_until(lambda: Path(cron_lock).exists(), 10, what="lock held")
        r = subprocess.run([env["SHELL"], "-c", command],
                           env={**env, "HOME": str(tmp_path), "PYTHONPATH": str(ROOT)},
                           capture_output=True, text=True, timeout=60)
    finally:
        holder.terminate()
        holder.wait(timeout=10)
    assert r.returncode == 1  # flock -n: busy, the trainer never started
    assert not (log / "retrain.log").exists() or not (log / "retrain.log").read_text()



def test_shipped_env_file_loads_as_valid_settings() -> None:
    """deploy/cxr-triage.env.example, read the way `set -a; . FILE` and systemd's
    EnvironmentFile= read it, gives settings that pass validation."""
    from db.settings import load_settings

    env = {}
    for line in (DEPLOY / "cxr-triage.env.example").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name] = value
    settings = load_settings(env=env)
    assert str(settings.data_dir) == "/var/lib/cxr-triage"
    assert settings.pacs and settings.port == int(env["CXR_PORT"])
