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

from tests.support.services import free_port, redis_reachable, wait_until
from tests.support.worker_process import REPO_ROOT, WorkerProcess, settings_env


def _get(url: str) -> str | None:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None


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
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env.update(settings_env(settings), FLOWER_UNAUTHENTICATED_API="true")
    log = open(tmp_path / "flower.log", "ab")  # noqa: SIM115
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "worker", "flower", f"--port={port}",
         "--address=127.0.0.1"], cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _get(f"{base}/healthcheck") == "OK", 60, interval=0.5,
                   what=f"flower up\n{(tmp_path / 'flower.log').read_text()[-2000:]}")

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
