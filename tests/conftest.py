"""Shared fixtures: clean environment, settings on a temporary data dir, a fresh database
per test on SQLite and on PostgreSQL, Orthanc, and the shared real data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from db.settings import Settings, load_settings
from dicom_node import socket_fix
from tests.support.services import (
    SHARED_DATA,
    drop_postgres_template,
    fresh_postgres_database,
    make_orthanc,
    orthanc_available,
    postgres_reachable,
    redis_reachable,
    refusing_port,
)

# The test side's own pynetdicom peers close refused or broken sockets as the product's do.
socket_fix.install()


@pytest.fixture(autouse=True)
def _clean_cxr_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test sees the developer's CXR_* variables."""
    for key in list(os.environ):
        if key.startswith("CXR_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture(scope="session", autouse=True)
def _postgres_template() -> Iterator[None]:
    """Drop the migrated PostgreSQL template (made on first use) when the session ends."""
    yield
    drop_postgres_template()


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database per test: an empty SQLite file in tmp (migrated on first use), or
    a PostgreSQL database cloned from the template migrated once per session."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'test.db'}"
        return
    if not postgres_reachable():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432")
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A local port where every connection is refused, held for the whole test."""
    with refusing_port() as port:
        yield port


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'test.db'}"


# Tests of other things train on a few dozen images, far below any real floor.
NO_PROMOTION_FLOOR = {"promotion_min_test_per_class": 0, "promotion_min_auc_lower": 0.0,
                      "promotion_min_specificity": 0.0}


@pytest.fixture
def make_settings(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Build settings on a temporary data dir, with overrides (Flask's test_config idea)."""

    def build(**overrides: object) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        for name, value in NO_PROMOTION_FLOOR.items():  # tiny synthetic sets; see
            overrides.setdefault(name, value)  # tests/test_promotion_floor.py for the floor
        s = load_settings(env={}, overrides=overrides)
        s.ensure_dirs()
        return s

    return build


@pytest.fixture
def settings(make_settings, database_url: str) -> Settings:  # type: ignore[no-untyped-def]
    return make_settings(database_url=database_url)  # type: ignore[no-any-return]


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared chest X-ray data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def shared_dicom(shared_data: Path) -> Path:
    return shared_data / "dicom"


@pytest.fixture
def require_redis() -> None:
    if not redis_reachable():
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")


@pytest.fixture
def orthanc_factory(tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start real Orthanc servers on free ports; all are stopped at teardown."""
    if not orthanc_available():
        pytest.skip("Orthanc is not installed (apt install orthanc)")
    started = []

    def start(modalities: dict[str, list[object]] | None = None, aet: str = "ORTHANC"):  # type: ignore[no-untyped-def]
        o = make_orthanc(tmp_path / f"orthanc{len(started)}", modalities, aet)
        o.start()
        started.append(o)
        return o

    yield start
    for o in started:
        o.stop(graceful=False)
