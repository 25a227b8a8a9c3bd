"""Flower, Celery's monitoring UI, works against the same broker as the workers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.services import candidate_port, redis_reachable, wait_until
from tests.support.worker_process import REPO_ROOT, WorkerProcess, settings_env


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


def _start_flower(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen[bytes], str]:
    """Flower and its base URL.  ``--port=0`` would never say which port it got, so it
    starts on a port the OS had free, and again on a new one where that was taken since."""
    for _ in range(5):
        port = candidate_port()
        before = log_path.stat().st_size if log_path.exists() else 0
        with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            flower = subprocess.Popen(
                [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}",
                 "--address=127.0.0.1"], cwd=REPO_ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"

        def up_or_gone(proc: subprocess.Popen[bytes] = flower, url: str = base) -> bool:
            return proc.poll() is not None or _get(f"{url}/healthcheck") == "OK"

        wait_until(up_or_gone, 60, interval=0.5,
                   what=f"flower up\n{log_path.read_text()[-2000:]}")
        if flower.poll() is None:
            return flower, base
        text = log_path.read_bytes()[before:].decode(errors="replace")
        if "Address already in use" not in text:
            raise AssertionError(f"flower exited:\n{text[-2000:]}")
    raise AssertionError("flower found no free port in 5 attempts")


@pytest.mark.slow
def test_flower_sees_a_worker_on_the_shared_broker(make_settings, sqlite_url: str,  # type: ignore[no-untyped-def]
                                                   tmp_path: Path) -> None:
    pytest.importorskip("flower", reason="flower is not installed (pip install flower)")
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    tag = uuid.uuid4().hex[:10]
    settings = make_settings(database_url=sqlite_url, broker_url="redis://127.0.0.1:6379/0",
                             inference_queue=f"inference-{tag}",
                             delivery_queue=f"delivery-{tag}")
    worker = WorkerProcess(settings, [settings.inference_queue], tmp_path / "logs").start()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(settings_env(settings), FLOWER_UNAUTHENTICATED_API="true")
    try:
        flower, base = _start_flower(env, tmp_path / "flower.log")
    except BaseException:
        worker.stop()
        raise
    try:
        def lists_our_worker() -> bool:
            body = _get(f"{base}/api/workers?refresh=1")
            return body is not None and worker.name in json.loads(body)

        wait_until(lists_our_worker, 60, interval=1.0, what="flower listing the worker")
        queues = json.loads(_get(f"{base}/api/workers?refresh=1") or "{}")[worker.name]
        names = {q["name"] for q in queues.get("active_queues", [])}
        assert settings.inference_queue in names
    finally:
        flower.terminate()
        try:
            flower.wait(timeout=20)
        except subprocess.TimeoutExpired:
            flower.kill()
            flower.wait()
        worker.stop()
