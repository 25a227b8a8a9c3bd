"""`cxr-triage up` as a real process group, its supervisor, and the demo end to end."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.services import wait_until
from worker.console import up

DCMTK_ECHOSCU = "/usr/bin/echoscu"  # DCMTK's, not pynetdicom's script of the same name


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # a zombie still answers kill(0); it has exited all the same
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"
    except OSError:
        return True


def test_supervisor_restarts_a_crashed_child_with_backoff(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setattr(up, "BACKOFF_START", 0.2)
    crasher = up.Child("crasher", [sys.executable, "-c", "raise SystemExit(3)"])
    sleeper = up.Child("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    sup = up.Supervisor([crasher, sleeper], dict(os.environ))

    def restarted_twice() -> bool:
        sup.tick()
        return len(crasher.pids) >= 3

    wait_until(restarted_twice, timeout=30, interval=0.05, what="two restarts of the crasher")
    assert len(sleeper.pids) == 1  # the healthy child was left alone
    assert sup.backoff(crasher) >= 0.4  # backoff grows with consecutive crashes
    sup.shutdown()
    assert all(_gone(pid) for pid in crasher.pids + sleeper.pids)
    assert sleeper.process is not None and sleeper.process.returncode == -signal.SIGTERM


def test_supervisor_gives_up_on_a_crash_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """A child that can never start (a configuration fault) stops the group with a reason,
    rather than restarting forever while the operator waits."""
    monkeypatch.setattr(up, "BACKOFF_START", 0.05)
    monkeypatch.setattr(up, "BACKOFF_MAX", 0.05)
    crasher = up.Child("crasher", [sys.executable, "-c", "raise SystemExit(2)"])
    sleeper = up.Child("sleeper", [sys.executable, "-c", "import time; time.sleep(600)"])
    sup = up.Supervisor([crasher, sleeper], dict(os.environ))

    def stopped() -> bool:
        sup.tick()
        return sup.stopping.is_set()

    wait_until(stopped, timeout=60, interval=0.05, what="the supervisor to give up")
    assert sup.gave_up is not None and "crasher" in sup.gave_up and "status 2" in sup.gave_up
    assert len(crasher.pids) == up.START_LIMIT
    sup.shutdown()
    assert all(_gone(pid) for pid in crasher.pids + sleeper.pids)


@pytest.mark.dcmtk
@pytest.mark.slow
def test_up_starts_every_process_answers_echo_and_stops_on_sigint(tmp_path: Path) -> None:
    if not Path(DCMTK_ECHOSCU).exists():
        pytest.skip("DCMTK echoscu is not installed (apt install dcmtk)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    # Port 0 for the listener and the web page; each child announces the port it got.
    env.update(CXR_DATA_DIR=str(tmp_path / "data"), CXR_PORT="0",
               CXR_BIND_ADDRESS="127.0.0.1", CXR_WEB_PORT="0",
               CXR_STABLE_SECONDS="1", CXR_LOG_LEVEL="INFO")
    log_path = tmp_path / "up.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "worker.console.cli", "up"], env=env,
                                stdout=log, stderr=subprocess.STDOUT)

    def announced(pattern: str) -> int | None:
        found = re.search(pattern, log_path.read_text(errors="replace"))
        return int(found.group(1)) if found else None

    try:
        port = wait_until(lambda: announced(r"(?m)^LISTENING port=(\d+)$"), timeout=90,
                          interval=0.5, what="the listener's LISTENING line")
        web_port = wait_until(lambda: announced(r"web page on http://127\.0\.0\.1:(\d+)/"),
                              timeout=90, interval=0.5, what="the web page's port")

        def echo_ok() -> bool:
            r = subprocess.run([DCMTK_ECHOSCU, "-aet", "STORESCU", "-aec", "CXR_TRIAGE",
                                "127.0.0.1", str(port)], capture_output=True, timeout=30)
            return r.returncode == 0

        wait_until(echo_ok, timeout=90, interval=0.5, what="C-ECHO to the listener under up")

        def health() -> dict[str, Any] | None:
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/healthz",
                                            timeout=30) as r:
                    return json.loads(r.read())  # type: ignore[no-any-return]
            except urllib.error.HTTPError as exc:  # 503: unhealthy, still an answer
                return json.loads(exc.read())  # type: ignore[no-any-return]
            except OSError:
                return None

        wait_until(health, timeout=60, interval=0.5, what="the web page under up")
        wait_until(lambda: " ready." in log_path.read_text(), timeout=90, interval=0.5,
                   what="the Celery worker to report ready")
        # The embedded worker answers pings for both queues; only the model is missing.
        report = wait_until(lambda: (h := health()) and h["checks"]["inference_worker"]["ok"]
                            and h, timeout=60, interval=1, what="workers answering under up")
        assert {n for n, c in report["checks"].items() if not c["ok"]} == {"production_model"}
        text = log_path.read_text()
        pids = {line.split()[1]: int(line.split("pid=")[1])
                for line in text.splitlines() if line.startswith("CHILD ")}
        assert set(pids) == {"listener", "worker", "scheduler", "web"}, text[-3000:]
        assert "No production model is registered" in text
        assert "cxr-triage up --bootstrap" in text
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    assert "all processes stopped" in text
    stopped = {line.split("name=")[1].split()[0]: line.rsplit("rc=", 1)[1]
               for line in text.splitlines() if "child stopped name=" in line}
    assert stopped == dict.fromkeys(["listener", "worker", "scheduler", "web"], "0"), stopped
    for name, pid in pids.items():
        assert _gone(pid), f"{name} (pid {pid}) still running"
    assert "restarting in" not in text, text[-3000:]


def _run_demo(tmp_path: Path, *args: str,
              extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    # Where the operator's installation would be: an empty data dir unless a test sets one.
    env["CXR_DATA_DIR"] = str(tmp_path / "installation")
    env.update(extra_env or {})
    return subprocess.run([sys.executable, "-m", "worker.console.cli", "demo", "--workdir",
                           str(tmp_path / "demo"), "--timeout", "150", *args],
                          cwd=Path(__file__).resolve().parents[1], env=env,
                          capture_output=True, text=True, timeout=240)


@pytest.mark.slow
def test_demo_with_phantoms_delivers_sr_and_heatmap_to_a_folder_pacs(tmp_path: Path) -> None:
    import pydicom

    empty = tmp_path / "no-data"
    empty.mkdir()
    r = _run_demo(tmp_path, "--data", str(empty), "--no-orthanc", "--studies", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "SYNTHETIC PHANTOMS" in r.stdout and "UNTRAINED" in r.stdout
    # Waiting for its own listener is silent: no ERROR line anywhere.
    assert "ERROR" not in r.stdout + r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    received = [pydicom.dcmread(p) for p in (tmp_path / "demo" / "pacs").glob("*.dcm")]
    modalities = sorted(ds.Modality for ds in received)
    assert modalities.count("SR") == 2 and len(received) == 4, modalities
    sent = [pydicom.dcmread(p) for p in (tmp_path / "demo" / "phantoms").glob("*.dcm")]
    assert all(ds.PatientName == "PHANTOM^SYNTHETIC" for ds in sent)
    assert all(ds.SeriesDescription == "SYNTHETIC PHANTOM" for ds in sent)
    assert {ds.StudyInstanceUID for ds in received} == {ds.StudyInstanceUID for ds in sent}
    assert "PHANTOM-00" not in r.stdout  # patient IDs never printed
    for line in r.stdout.splitlines():
        if " heatmap map: " in line:
            assert Path(line.split(" heatmap map: ")[1]).is_file()


@pytest.mark.slow
@pytest.mark.orthanc
@pytest.mark.shared_data
def test_demo_with_real_dicom_files_into_orthanc(tmp_path: Path, shared_data: Path) -> None:
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (apt install orthanc)")
    r = _run_demo(tmp_path, "--data", str(shared_data), "--studies", "2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "real DICOM files" in r.stdout
    assert "skipped" in r.stdout and "not a chest image" in r.stdout  # the abdomen film
    assert r.stdout.count("sr:delivered, sc:delivered") == 2
    assert "receiving PACS holds 4 object(s): Orthanc" in r.stdout
    assert (tmp_path / "demo" / "pacs" / "orthanc.json").is_file()


@pytest.mark.slow
def test_demo_stopped_by_sigterm_leaves_no_process_behind(tmp_path: Path) -> None:
    """`timeout` or a supervisor ends the demo with SIGTERM: its children, which run in
    their own sessions, must not be orphaned."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    log_path = tmp_path / "demo.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.console.cli", "demo", "--no-orthanc", "--data",
             str(tmp_path / "no-data"), "--workdir", str(tmp_path / "demo")],
            cwd=Path(__file__).resolve().parents[1], env=env, stdout=log,
            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: log_path.read_text().count("CHILD ") >= 2, 120, interval=0.2,
                   what="the demo's listener and worker to start")
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log_path.read_text()
    pids = [int(line.split("pid=")[1].split()[0]) for line in text.splitlines()
            if line.startswith("CHILD ")]
    assert pids and proc.returncode == 128 + signal.SIGTERM
    wait_until(lambda: all(_gone(pid) for pid in pids), 30, what=f"children gone: {pids}")


@pytest.mark.slow
def test_demo_uses_the_installation_production_model_and_stops_its_orthanc(
        tmp_path: Path, make_settings) -> None:  # type: ignore[no-untyped-def]
    """With a production model in the operator's installation the demo scores with it and
    says so; the Orthanc it starts is gone afterwards unless --keep-pacs asks."""
    if shutil.which("Orthanc") is None:
        pytest.skip("Orthanc is not installed (apt install orthanc)")
    from db.session import Database
    from tests.support.services import port_open
    from tests.support.worker_data import register_and_promote

    installation = make_settings(data_dir=tmp_path / "installation")
    db = Database(installation)
    register_and_promote(db, installation, "m-site-2026")
    db.dispose()
    empty = tmp_path / "no-data"
    empty.mkdir()
    r = _run_demo(tmp_path, "--data", str(empty), "--studies", "1")
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "model in production: m-site-2026 (the installation's production model)" in out
    assert "UNTRAINED" not in out and "ERROR" not in out, out[-3000:]
    http_port = int(re.search(r"Orthanc http://127.0.0.1:(\d+)/", out).group(1))  # type: ignore[union-attr]
    assert not port_open("127.0.0.1", http_port), "the demo's Orthanc is still running"

    r = _run_demo(tmp_path / "kept", "--data", str(empty), "--studies", "1", "--keep-pacs",
                  extra_env={"CXR_DATA_DIR": str(tmp_path / "installation")})
    out = r.stdout + r.stderr
    pid = int(re.search(r"left running \(--keep-pacs\): .*, pid (\d+);", out).group(1))  # type: ignore[union-attr]
    try:
        assert r.returncode == 0, out[-3000:]
        http_port = int(re.search(r"Orthanc http://127.0.0.1:(\d+)/", out).group(1))  # type: ignore[union-attr]
        assert port_open("127.0.0.1", http_port)
        assert not _gone(pid)
    finally:
        os.kill(pid, signal.SIGTERM)
    wait_until(lambda: _gone(pid), 30, what="the kept Orthanc to stop")
