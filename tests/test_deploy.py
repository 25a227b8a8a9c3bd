"""Deployment files agree with the code: settings exist, commands exist, files parse."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from db.settings import setting_names
from worker.console.cli import subcommand_names

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
DOCS = ROOT / "README.md"
UNITS = sorted((DEPLOY / "systemd").glob("*.service"))
VENV_BIN = "/opt/cxr-triage/venv/bin"
# CXR_ words that are AE titles or the config-file variable, not settings.
NOT_SETTINGS = {"CONFIG", "TRIAGE", "DEMO"}


def _texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file()] + [DOCS, ROOT / "docs" / "operations.md"]
    return {str(p.relative_to(ROOT)): p.read_text() for p in files}


def _compose() -> dict:  # type: ignore[type-arg]
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # type: ignore[no-any-return]


def _commands() -> list[tuple[str, list[str]]]:
    """Every command line the deployment files and the docs run, as argv lists."""
    out: list[tuple[str, list[str]]] = []
    for name, svc in _compose()["services"].items():
        if isinstance(svc.get("command"), list):
            out.append((f"compose:{name}", [str(c) for c in svc["command"]]))
    for unit in UNITS:
        for line in unit.read_text().splitlines():
            key, _, value = line.partition("=")
            if key in ("ExecStart", "ExecStartPre"):
                out.append((unit.name, shlex.split(value.replace("%%", "%"))))
    for where, text in _texts().items():
        if where.endswith(".md"):
            # commands in code: fenced blocks and `inline spans`
            code = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
            code += re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
            for chunk in code:
                for line in chunk.splitlines():
                    line = line.split("#", 1)[0].strip()
                    if line.startswith(("python -m ", "cxr-triage ", "celery -A")):
                        out.append((where, line.split()))
        else:
            for m in re.finditer(r"python -m [\w.]+", text):
                out.append((where, m.group(0).split()))
    return out


def test_every_cxr_setting_named_in_deploy_files_and_docs_exists() -> None:
    names = set(setting_names())
    unknown = []
    for where, text in _texts().items():
        for m in re.finditer(r"\bCXR_([A-Z][A-Z0-9_]*)", text):
            if m.group(1) not in NOT_SETTINGS and m.group(1).lower() not in names:
                unknown.append(f"{where}: CXR_{m.group(1)}")
    assert not unknown, unknown


def test_every_command_the_files_run_exists() -> None:
    subcommands = set(subcommand_names())
    problems = []
    commands = _commands()
    assert len(commands) > 25
    for where, argv in commands:
        prog = os.path.basename(argv[0])
        if prog.startswith("python") and argv[1:2] == ["-m"]:
            module = argv[2]
            if module != "celery" and importlib.util.find_spec(module) is None:
                problems.append(f"{where}: no module {module}")
            if module == "celery":
                argv = argv[2:]
                prog = "celery"
        if prog == "cxr-triage":
            sub = next((a for a in argv[1:] if not a.startswith("-")), None)
            if sub not in subcommands:
                problems.append(f"{where}: no subcommand {sub!r} in {argv}")
        if prog == "celery" and argv[1:3] != ["-A", "worker"]:
            problems.append(f"{where}: celery without -A worker: {argv}")
    assert not problems, problems


@pytest.mark.slow
def test_celery_app_named_by_the_files_loads(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_DATA_DIR"] = str(tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "celery", "-A", "worker", "report"], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "broker_url" in r.stdout.lower() or "software" in r.stdout.lower()


def test_compose_has_every_process_on_an_internal_backend() -> None:
    compose = _compose()
    services = compose["services"]
    assert {"postgres", "redis", "dicom-node", "gpu-worker", "delivery-worker", "scheduler",
            "trainer", "web"} <= set(services)
    assert compose["networks"]["backend"]["internal"] is True
    assert services["postgres"]["networks"] == ["backend"]
    assert services["redis"]["networks"] == ["backend"]
    for name in ("postgres", "redis", "dicom-node", "gpu-worker", "delivery-worker",
                 "scheduler", "web"):
        assert "healthcheck" in services[name], name
    devices = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "inference" in services["gpu-worker"]["command"]
    assert "delivery" in services["delivery-worker"]["command"]
    assert {"cxr-data", "pg-data", "redis-data"} <= set(compose["volumes"])
    assert "postgres" not in json.dumps(services["postgres"].get("ports", []))
    # Everything published beyond the host asks for credentials.
    assert "CXR_WEB_AUTH_TOKEN" in services["web"]["environment"]
    assert any(str(c).startswith("--basic-auth=") for c in services["flower"]["command"])


def test_docker_compose_config_accepts_the_file() -> None:
    """`docker compose config` (v2 plugin) or `docker-compose config` (v1 client) parses
    and validates the file; no engine is needed."""
    docker = shutil.which("docker")
    command: list[str] | None = None
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True,
                                 timeout=30).returncode == 0:
        command = [docker, "compose"]
    elif shutil.which("docker-compose"):
        command = [str(shutil.which("docker-compose"))]
    if command is None:
        pytest.skip("neither the docker compose plugin nor docker-compose is installed")
    r = subprocess.run([*command, "-f", str(DEPLOY / "compose.yaml"), "config"],
                       capture_output=True, text=True, timeout=60, cwd=DEPLOY,
                       env={**os.environ, "POSTGRES_PASSWORD": "test",
                            "CXR_WEB_AUTH_TOKEN": "t", "FLOWER_BASIC_AUTH": "u:p"})
    assert r.returncode == 0, r.stderr
    assert "services:" in r.stdout and "dicom-node:" in r.stdout, r.stdout[:2000]


def test_systemd_units_restart_on_failure_as_a_dedicated_user() -> None:
    assert {u.name for u in UNITS} >= {"cxr-triage-listener.service",
                                      "cxr-triage-inference.service",
                                      "cxr-triage-delivery.service",
                                      "cxr-triage-beat.service", "cxr-triage-web.service"}
    for unit in UNITS:
        text = unit.read_text()
        assert "Restart=on-failure" in text, unit.name
        assert "User=cxr-triage" in text, unit.name
        assert "EnvironmentFile=/etc/cxr-triage/cxr-triage.env" in text, unit.name


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    tool = shutil.which("systemd-analyze")
    if tool is None:
        pytest.skip("systemd-analyze is not installed")
    # The units name the production venv; point each program at the one on this PATH (the
    # same entry points), so that verify checks everything else for real.
    programs = set(re.findall(re.escape(VENV_BIN) + r"/([\w.-]+)",
                              "".join(u.read_text() for u in UNITS)))
    found = {name: shutil.which(name) for name in programs}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        pytest.skip(f"{missing} not installed on PATH")
    copies = []
    for unit in UNITS:
        text = unit.read_text()
        for name, path in found.items():
            text = text.replace(f"{VENV_BIN}/{name}", str(path))
        copy = tmp_path / unit.name
        copy.write_text(text)
        copies.append(str(copy))
    r = subprocess.run([tool, "verify", *copies], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_systemd_documentation_points_at_a_shipped_page() -> None:
    for unit in UNITS:
        [doc] = re.findall(r"^Documentation=file://(\S+)$", unit.read_text(), flags=re.M)
        assert doc.startswith("/opt/cxr-triage/"), (unit.name, doc)
        assert (ROOT / doc.removeprefix("/opt/cxr-triage/")).is_file(), (unit.name, doc)


def test_crontab_locks_and_logs_the_nightly_trainer() -> None:
    lines = [ln for ln in (DEPLOY / "crontab").read_text().splitlines()
             if ln and not ln.startswith("#") and "=" not in ln.split()[0]]
    [line] = lines
    fields = line.split(None, 6)
    assert len(fields) == 7 and fields[5] == "cxr-triage"  # cron.d format: user column
    assert "flock -n" in line and "python -m trainer.retrain" in line
    assert ">> /var/log/cxr-triage/retrain.log 2>&1" in line


def test_orthanc_example_routes_chest_cr_dx_to_cxr_triage() -> None:
    config = json.loads((DEPLOY / "orthanc" / "orthanc.json").read_text())
    assert config["DicomModalities"]["CXR_TRIAGE"]["AllowStore"] is True
    script = DEPLOY / "orthanc" / Path(config["LuaScripts"][0]).name
    lua = script.read_text()
    assert "function OnStableStudy" in lua
    assert "CR = true" in lua and "DX = true" in lua and "CHEST = true" in lua
    assert '"/modalities/" .. TARGET .. "/store"' in lua


def test_every_setting_is_documented_in_the_settings_table() -> None:
    rows = {m.group(1): m.group(2) for m in
            re.finditer(r"^\| `([a-z_]+)` \| `(CXR_[A-Z_]+)` \|", DOCS.read_text(), flags=re.M)}
    missing = [n for n in setting_names() if n not in rows]
    assert not missing, f"settings missing from the README: {missing}"
    assert all(env == f"CXR_{name.upper()}" for name, env in rows.items())
    assert set(rows) <= set(setting_names()), set(rows) - set(setting_names())
