"""Stable-study queueing and first publication to a real Redis broker."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from db.broker import ANALYSE_TASK
from db.models import utcnow
from db.settings import Settings
from dicom_node.listener import start_node
from dicom_node.publisher import CeleryPublisher
from dicom_node.stability import run_stability_pass
from tests.support.dicom_factory import make_study_files
from tests.support.listener_peers import send_files_pynetdicom, study_by_uid
from tests.support.services import REDIS_HOST, REDIS_PORT, wait_until

pytestmark = pytest.mark.redis
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture
def queue(require_redis: None) -> Iterator[str]:
    name = f"inference-test-{uuid.uuid4().hex}"
    yield name
    redis.Redis(REDIS_HOST, REDIS_PORT).delete(name)


@pytest.fixture
def node_settings(settings: Settings, queue: str) -> Settings:
    return settings.replace(
        port=0, bind_address="127.0.0.1", min_free_mb=1, stable_seconds=0.5,
        scheduler_interval=0.2, broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
        inference_queue=queue,
    )


def _messages(queue: str) -> list[tuple[str, list[Any]]]:
    """(task name, args) of every message waiting in the Redis list of ``queue``."""
    out = []
    for raw in redis.Redis(REDIS_HOST, REDIS_PORT).lrange(queue, 0, -1):
        message = json.loads(raw)
        body = json.loads(base64.b64decode(message["body"]))
        out.append((message["headers"]["task"], body[0]))
    return sorted(out, key=lambda m: m[1])


def _send_study(port: int, tmp_path: Path, n: int = 2, study_uid: str | None = None) -> str:
    study_uid = study_uid or generate_uid()
    files = make_study_files(tmp_path / uuid.uuid4().hex, n=n, study_uid=study_uid)
    assert send_files_pynetdicom(port, files, ExplicitVRLittleEndian, DX_STORAGE) == [0] * n
    return study_uid


def test_quiet_study_is_queued_and_published(node_settings: Settings, queue: str,
                                             tmp_path: Path) -> None:
    node = start_node(node_settings)
    try:
        study_uid = _send_study(node.port, tmp_path)
        study = study_by_uid(node.db, study_uid)
        assert study is not None and study.state == "receiving"
        study = wait_until(lambda: (s := study_by_uid(node.db, study_uid)) and
                           s.published_at is not None and s, timeout=20, what="publication")
        assert study.state == "queued" and study.queued_at is not None
        assert _messages(queue) == [(ANALYSE_TASK, [study.id, 1])]
    finally:
        node.stop()


def test_broker_down_keeps_study_queued_until_it_is_back(node_settings: Settings, queue: str,
                                                         tmp_path: Path,
                                                         refused_port: int) -> None:
    node = start_node(node_settings, run_stability=False)
    down = CeleryPublisher(node_settings.replace(broker_url=f"redis://127.0.0.1:{refused_port}/0"),
                           timeout=0.5)
    up = CeleryPublisher(node_settings)
    try:
        study_uid = _send_study(node.port, tmp_path)
        later = utcnow() + timedelta(seconds=5)
        report = run_stability_pass(node.db, node_settings, down, now=later)
        study = study_by_uid(node.db, study_uid)
        assert study is not None and report.queued == [study.id]
        assert report.unpublished == [study.id]
        assert study.state == "queued" and study.published_at is None
        assert _messages(queue) == []

        report = run_stability_pass(node.db, node_settings, up, now=later)
        assert report.published == [study.id]
        study = study_by_uid(node.db, study_uid)
        assert study is not None and study.published_at is not None
        assert _messages(queue) == [(ANALYSE_TASK, [study.id, 1])]
        # Published once: another pass sends nothing more.
        assert run_stability_pass(node.db, node_settings, up, now=later).published == []
    finally:
        down.close()
        up.close()
        node.stop()


def test_late_instance_reopens_the_study(node_settings: Settings, queue: str,
                                         tmp_path: Path) -> None:
    node = start_node(node_settings, run_stability=False)
    publisher = CeleryPublisher(node_settings)
    try:
        study_uid = _send_study(node.port, tmp_path)
        run_stability_pass(node.db, node_settings, publisher, now=utcnow() + timedelta(seconds=5))
        _send_study(node.port, tmp_path, n=1, study_uid=study_uid)
        study = study_by_uid(node.db, study_uid)
        assert study is not None
        assert (study.state, study.generation, study.published_at) == ("receiving", 2, None)
        assert study.reason is None
        # Not quiet yet: stays receiving.
        assert run_stability_pass(node.db, node_settings, publisher).queued == []
        run_stability_pass(node.db, node_settings, publisher, now=utcnow() + timedelta(seconds=5))
        assert _messages(queue) == [(ANALYSE_TASK, [study.id, 1]), (ANALYSE_TASK, [study.id, 2])]
    finally:
        publisher.close()
        node.stop()


def test_restart_picks_up_receiving_and_unpublished_studies(node_settings: Settings, queue: str,
                                                            tmp_path: Path,
                                                            refused_port: int) -> None:
    first = start_node(node_settings, run_stability=False)
    down = CeleryPublisher(node_settings.replace(broker_url=f"redis://127.0.0.1:{refused_port}/0"),
                           timeout=0.5)
    try:
        queued_uid = _send_study(first.port, tmp_path)
        run_stability_pass(first.db, node_settings, down, now=utcnow() + timedelta(seconds=5))
        receiving_uid = _send_study(first.port, tmp_path)
    finally:
        down.close()
        first.stop()
    second = start_node(node_settings)
    try:
        def both_published() -> bool:
            studies = [study_by_uid(second.db, uid) for uid in (queued_uid, receiving_uid)]
            return all(s is not None and s.published_at is not None for s in studies)

        wait_until(both_published, timeout=20, what="both studies published after restart")
        ids = sorted(s.id for uid in (queued_uid, receiving_uid)
                     if (s := study_by_uid(second.db, uid)) is not None)
        assert _messages(queue) == [(ANALYSE_TASK, [i, 1]) for i in ids]
    finally:
        second.stop()


class _FlakyPublisher:
    """Publishes through a real Celery client, after failing once in an unexpected way."""

    def __init__(self, real: CeleryPublisher) -> None:
        self.real = real
        self.calls = 0

    def publish(self, study_id: int, generation: int) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("unexpected fault in the first pass")
        self.real.publish(study_id, generation)

    def close(self) -> None:
        self.real.close()


def test_loop_survives_an_unexpected_error(make_settings, sqlite_url: str,  # type: ignore[no-untyped-def]
                                           tmp_path: Path) -> None:
    from db.session import Database
    from dicom_node.stability import StabilityLoop

    tag = uuid.uuid4().hex[:10]
    settings = make_settings(database_url=sqlite_url, stable_seconds=0, scheduler_interval=0.1,
                             broker_url=f"redis://{REDIS_HOST}:{REDIS_PORT}/0",
                             inference_queue=f"inference-{tag}")
    db = Database(settings)
    node = start_node(settings.replace(port=0), db=db, run_stability=False)
    try:
        files = make_study_files(tmp_path / "in", n=1)
        assert send_files_pynetdicom(node.port, files, ExplicitVRLittleEndian,
                                     "1.2.840.10008.5.1.4.1.1.1.1") == [0]
    finally:
        node.stop()
    publisher = _FlakyPublisher(CeleryPublisher(settings))
    loop = StabilityLoop(db, settings, publisher)
    loop.start()
    try:
        wait_until(lambda: publisher.calls >= 2, 30, what="a second pass after the failure")
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        wait_until(lambda: client.llen(settings.inference_queue) == 1, 30,
                   what="the study published")
        client.delete(settings.inference_queue)
    finally:
        loop.stop()
        db.dispose()
