"""The one registry reader: the same production model on SQLite and PostgreSQL, for every
caller (worker, console, trainer)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from db.models import ModelStage, ModelVersion, utcnow
from db.session import Database
from db.settings import Settings
from trainer.registry import production_model


@pytest.fixture
def db(settings: Settings) -> Database:
    database = Database(settings)
    yield database  # type: ignore[misc]
    database.dispose()


def _row(version: str, promoted_at: object) -> ModelVersion:
    return ModelVersion(version=version, architecture="tiny_cnn", path=f"{version}.pt",
                        sha256="ab" * 32, threshold=0.5, input_size=64,
                        stage=ModelStage.PRODUCTION, promoted_at=promoted_at)


def test_newest_promotion_wins_and_a_row_without_a_time_sorts_last(db: Database) -> None:
    now = utcnow()
    with db.session() as s:
        # Inserted last, so it has the highest id: PostgreSQL's default (NULLS FIRST on
        # DESC) would pick it; the one query sorts NULLs last on both databases.
        s.add_all([_row("older", now - timedelta(days=1)), _row("newest", now),
                   _row("no-time", None)])
    info = production_model(db)
    assert info is not None and info.version == "newest"
    with db.session() as s:  # the same answer through an open session
        same = production_model(s)
        assert same is not None and same.version == "newest" and same.id == info.id


def test_relative_paths_resolve_under_the_models_dir(db: Database, settings: Settings) -> None:
    with db.session() as s:
        s.add(_row("rel", utcnow()))
    info = production_model(db)
    assert info is not None
    assert info.file(settings.models_dir) == settings.models_dir / "rel.pt"
    assert "id" not in info.as_dict()


def test_no_production_model_is_none(db: Database) -> None:
    assert production_model(db) is None
