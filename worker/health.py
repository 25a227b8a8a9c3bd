"""Is this node able to do its job?  Database, broker and free disk, as JSON.

Served at ``/healthz`` by the web page (200 healthy, 503 not) and printed by
``cxr-triage health`` (exit 1 when unhealthy), so that compose health checks, systemd
watchdogs and load balancers ask the same question.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from db.settings import Settings


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class HealthReport:
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.ok else "unhealthy",
            "checks": {c.name: {"ok": c.ok, "detail": c.detail, "seconds": round(c.seconds, 4)}
                       for c in self.checks},
        }


def _timed(name: str, fn: Any) -> Check:
    t0 = time.perf_counter()
    try:
        detail = str(fn())
        ok = True
    except Exception as exc:  # noqa: BLE001 - every failure becomes a reported check
        detail = f"{type(exc).__name__}: {exc}"[:300]
        ok = False
    return Check(name, ok, detail, time.perf_counter() - t0)


def check_database(settings: Settings, db: Any = None) -> str:
    from sqlalchemy import text

    from db.session import make_engine

    engine = db.engine if db is not None else make_engine(settings)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        if db is None:
            engine.dispose()
    return f"reachable, schema {version}"


def check_broker(settings: Settings, timeout: float = 3.0) -> str:
    if settings.uses_embedded_broker:
        folder = settings.broker_dir / "in"
        if not folder.is_dir():
            raise FileNotFoundError(f"broker folder {folder} is missing")
        if not os.access(folder, os.W_OK):
            raise PermissionError(f"broker folder {folder} is not writable")
        return f"filesystem broker at {folder}"
    from kombu.connection import Connection

    with Connection(settings.effective_broker_url,  # type: ignore[no-untyped-call]
                    connect_timeout=timeout) as conn:
        conn.ensure_connection(max_retries=1, timeout=timeout)
        return f"{conn.transport_cls} broker reachable"


def check_disk(settings: Settings) -> str:
    path = settings.data_dir if settings.data_dir.exists() else settings.data_dir.parent
    free_mb = shutil.disk_usage(path).free / 2**20
    if free_mb < settings.min_free_mb:
        raise OSError(f"{free_mb:.0f} MB free under {path}, below min_free_mb "
                      f"{settings.min_free_mb}")
    return f"{free_mb:.0f} MB free"


def check_health(settings: Settings, db: Any = None) -> HealthReport:
    """Run every check; none raises."""
    return HealthReport([
        _timed("database", lambda: check_database(settings, db)),
        _timed("broker", lambda: check_broker(settings)),
        _timed("disk", lambda: check_disk(settings)),
    ])
