"""``cxr-triage demo``: sample studies through the whole loop to a local receiving PACS.

Everything runs for real on a private data directory: a receiving PACS (Orthanc when
installed, else a small pynetdicom storage SCP writing to a folder), the listener and a
worker as subprocesses, SR and heatmap delivery back to that PACS.  The model is, in this
order: one the operator names with ``--model``; the production model of the installation
(the settings' database), copied by reference with its version; or else an untrained
network registered as ``demo-untrained`` whose scores mean nothing.  The demo says which.

It waits for its own listener by connecting to the port (no DICOM association, so no
error lines while the listener starts), then checks it once with C-ECHO.  The Orthanc it
starts as the receiving PACS stops with the demo unless ``--keep-pacs`` asks otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from db.settings import Settings, load_settings
from worker.console.demo_pacs import PACS_AE, FolderReceiver, OrthancReceiver, Receiver, free_port

DEMO_CALLING_AE = "CXR_DEMO"
DEFAULT_DATA = Path("../shared/data/cxr")


@dataclass(frozen=True)
class DemoOptions:
    data: Path | None = None
    workdir: Path | None = None
    use_orthanc: bool = True
    timeout: float = 600.0
    studies: int = 3
    model: Path | None = None
    keep_pacs: bool = False


def demo_inputs(options: DemoOptions, workdir: Path) -> tuple[list[Path], str]:
    """Real DICOM files when a data folder exists, otherwise labelled phantoms."""
    data = options.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() else None)
    if data is not None and (data / "dicom").is_dir():
        files = sorted((data / "dicom").glob("*.dcm"))
        if files:
            chest = [f for f in files if "nonchest" not in f.name]
            other = [f for f in files if "nonchest" in f.name]
            return (chest[: options.studies] + other[:1]), f"real DICOM files from {data}"
    from worker.console.phantoms import write_phantoms

    return (write_phantoms(workdir / "phantoms", options.studies),
            "SYNTHETIC PHANTOMS (PatientName PHANTOM^SYNTHETIC): no real data found")


@dataclass(frozen=True)
class DemoModel:
    path: Path | None  # None: build the untrained network
    version: str | None
    origin: str  # said to the operator


def installation_model(base: Settings | None) -> DemoModel | None:
    """The production model of the installation ``base`` points at, when one exists and
    its file is readable; never creates a database."""
    if base is None:
        return None
    url = base.effective_database_url
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///"):]).is_file():
        return None
    from db.session import Database
    from trainer.registry import production_model

    try:
        db = Database(base, migrate=False)
    except Exception:  # noqa: BLE001 - no installation database: the demo goes without
        return None
    try:
        with db.session() as s:
            row = production_model(s)
            found = (Path(row.path), row.version) if row is not None else None
    except Exception:  # noqa: BLE001 - unreachable or unmigrated: as if none
        return None
    finally:
        db.dispose()
    if found is None or not found[0].is_file():
        return None
    return DemoModel(found[0], found[1], "the installation's production model")


def choose_demo_model(options: DemoOptions, base: Settings | None) -> DemoModel:
    if options.model is not None:
        return DemoModel(options.model, None, "the model named with --model")
    return installation_model(base) or DemoModel(
        None, None, "UNTRAINED: no production model found, scores are meaningless")


def register_demo_model(settings: Settings, model: Path | None,
                        version: str | None = None) -> str:
    """Register and promote ``model``, or an untrained small network labelled as such."""
    from db.session import Database
    from trainer.registry import promote, register_model

    db = Database(settings)
    try:
        if model is None:
            from trainer.architectures import build_model
            from trainer.checkpoint import ModelMeta, Preprocessing, save_checkpoint

            model = settings.models_dir / "demo-untrained.pt"
            meta = ModelMeta(architecture="tiny_cnn", input_size=128,
                             preprocessing=Preprocessing.for_backbone("tiny_cnn"),
                             threshold=0.5, version="demo-untrained")
            save_checkpoint(model, build_model("tiny_cnn", pretrained=False), meta)
        info = register_model(db, model, version=version)
        promote(db, info.version)
        return str(info.version)
    finally:
        db.dispose()


def send_files(files: list[Path], settings: Settings) -> list[str]:
    """C-STORE each file to the listener as CXR_DEMO; returns the Study Instance UIDs."""
    import pydicom
    from pynetdicom import AE

    datasets = [pydicom.dcmread(f) for f in files]
    ae = AE(ae_title=DEMO_CALLING_AE)
    for ds in datasets:
        ts = str(ds.file_meta.TransferSyntaxUID)
        ae.add_requested_context(ds.SOPClassUID, [ts])
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    if not assoc.is_established:
        raise RuntimeError("the listener refused the demo association")
    try:
        for f, ds in zip(files, datasets, strict=True):
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise RuntimeError(f"the listener answered {code!r} for {f.name}")
    finally:
        assoc.release()
    return sorted({str(ds.StudyInstanceUID) for ds in datasets})


def port_accepts(port: int) -> bool:
    """A TCP connection is accepted (closed at once): no DICOM, nothing logged."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def echo_ok(settings: Settings) -> bool:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

    ae = AE(ae_title=DEMO_CALLING_AE)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", settings.port, ae_title=settings.ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


# ----- the run -------------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


def write_config(path: Path, values: dict[str, Any]) -> None:
    """A TOML settings file for the demo's children (they read it through CXR_CONFIG)."""
    path.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in values.items()))


@dataclass
class Progress:
    finished: set[str] = field(default_factory=set)


def _finished(settings: Settings, study_uids: list[str]) -> set[str]:
    from sqlalchemy import select

    from db.models import Delivery, DeliveryState, Study, StudyState
    from db.session import Database

    db = Database(settings, migrate=False)
    try:
        with db.session() as s:
            done: set[str] = set()
            for st in s.scalars(select(Study).where(Study.study_uid.in_(study_uids))):
                if st.state in (StudyState.SKIPPED, StudyState.FAILED):
                    done.add(st.study_uid)
                elif st.state == StudyState.DONE:
                    states = [d.state for d in s.scalars(
                        select(Delivery).where(Delivery.study_id == st.id))]
                    if states and all(x in (DeliveryState.DELIVERED, DeliveryState.FAILED)
                                      for x in states):
                        done.add(st.study_uid)
            return done
    finally:
        db.dispose()


def run_demo(options: DemoOptions, base: Settings | None = None) -> int:
    from tqdm import tqdm

    from worker.console.up import Child, Supervisor

    workdir = (options.workdir or Path(tempfile.mkdtemp(prefix="cxr-demo-"))).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    print(f"demo files under {workdir}", flush=True)
    use_orthanc = options.use_orthanc and shutil.which("Orthanc") is not None
    receiver: Receiver = (OrthancReceiver(workdir / "pacs", detach=options.keep_pacs)
                          if use_orthanc
                          else FolderReceiver(workdir / "pacs"))
    print(f"receiving PACS: {PACS_AE}@127.0.0.1:{receiver.port} ({receiver.where})", flush=True)
    values: dict[str, Any] = {
        "data_dir": str(workdir / "data"), "port": free_port(), "bind_address": "127.0.0.1",
        "allowed_callers": [DEMO_CALLING_AE], "stable_seconds": 2.0,
        "scheduler_interval": 0.5, "pacs": [f"{PACS_AE}@127.0.0.1:{receiver.port}"],
        "device": base.device if base else "auto", "log_level": "WARNING",
        "delivery_backoff_seconds": 1.0, "reconcile_after_seconds": 60.0,
    }
    config = workdir / "demo.toml"
    write_config(config, values)
    settings = load_settings(env={}, config_file=config)
    settings.ensure_dirs()
    supervisor: Supervisor | None = None
    # SIGTERM (a supervisor, `timeout`) must still stop the children, which run in their
    # own sessions: turn it into an exit that runs the `finally` below.
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        chosen = choose_demo_model(options, base)
        version = register_demo_model(settings, chosen.path, chosen.version)
        print(f"model in production: {version} ({chosen.origin})", flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
        env.update(CXR_CONFIG=str(config), PYTHONUNBUFFERED="1")
        py = sys.executable
        supervisor = Supervisor([
            Child("listener", [py, "-m", "dicom_node"]),
            Child("worker", [py, "-m", "celery", "-A", "worker", "worker", "-Q",
                             f"{settings.inference_queue},{settings.delivery_queue}",
                             "--pool=solo", "-n", f"cxr-demo-{os.getpid()}@%h",
                             "--loglevel=WARNING", "--without-gossip", "--without-mingle"]),
        ], env)
        supervisor.tick()
        deadline = time.monotonic() + min(options.timeout, 120)
        while not port_accepts(settings.port):
            if time.monotonic() > deadline:
                raise RuntimeError("the listener did not open its port within 120 s")
            supervisor.tick()
            if supervisor.gave_up:
                raise RuntimeError(supervisor.gave_up)
            time.sleep(0.2)
        if not echo_ok(settings):
            raise RuntimeError("the listener accepted a connection but refused C-ECHO")
        files, source = demo_inputs(options, workdir)
        print(f"sending {len(files)} file(s): {source}", flush=True)
        study_uids = send_files(files, settings)
        finished: set[str] = set()
        deadline = time.monotonic() + options.timeout
        with tqdm(total=len(study_uids), desc="studies through the loop", unit="study") as bar:
            while len(finished) < len(study_uids) and time.monotonic() < deadline:
                supervisor.tick()
                if supervisor.gave_up:
                    raise RuntimeError(supervisor.gave_up)
                now = _finished(settings, study_uids)
                bar.update(len(now) - len(finished))
                finished = now
                time.sleep(0.5)
        report(settings, study_uids, receiver)
        if len(finished) < len(study_uids):
            print(f"error: {len(study_uids) - len(finished)} study(ies) did not finish within "
                  f"{options.timeout:.0f} s", file=sys.stderr)
            return 1
        return 0
    finally:
        if supervisor is not None:
            supervisor.shutdown()
        if options.keep_pacs and isinstance(receiver, OrthancReceiver) \
                and receiver.process.poll() is None:
            print(f"receiving PACS left running (--keep-pacs): {receiver.where}, "
                  f"pid {receiver.process.pid}; stop it with: kill {receiver.process.pid}",
                  flush=True)
        else:
            receiver.stop()
        signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def report(settings: Settings, study_uids: list[str], receiver: Receiver) -> None:
    """The results table, then where the SR and heatmap files are."""
    from db.session import Database
    from worker.console.render import render_status_table
    from worker.console.status import collect_status

    db = Database(settings, migrate=False)
    try:
        with db.session() as s:
            data = collect_status(s)
    finally:
        db.dispose()
    data["studies"] = [st for st in data["studies"] if st["study_uid"] in study_uids]
    print()
    render_status_table(data, sys.stdout)
    print("\nfiles:")
    for st in data["studies"]:
        for h in st["heatmaps"]:
            print(f"  {st['study_uid']} heatmap map: {h['path']}")
        for d in st["deliveries"]:
            print(f"  {st['study_uid']} {d['kind'].upper()} ({d['state']}): "
                  f"{_delivery_path(settings, d['id'])}")
    print(f"\nreceiving PACS holds {receiver.received()} object(s): {receiver.where}")


def _delivery_path(settings: Settings, delivery_id: int) -> str:
    from db.models import Delivery
    from db.session import Database

    db = Database(settings, migrate=False)
    try:
        with db.session() as s:
            row = s.get(Delivery, delivery_id)
            return row.path if row is not None else "?"
    finally:
        db.dispose()
