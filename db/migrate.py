"""Apply Alembic migrations: at process start-up, or by ``cxr-triage db upgrade``."""

from __future__ import annotations

import logging
from pathlib import Path

from sqlalchemy import Engine

# Alembic logs a dozen "setup plugin" lines at INFO when it is first imported, on every
# command that opens the database: silence them before that import, whoever imports it.
logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)

from alembic import command  # noqa: E402
from alembic.config import Config  # noqa: E402

log = logging.getLogger(__name__)
MIGRATIONS_DIR = Path(__file__).parent / "migrations"


def alembic_config(url: str | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if url:
        cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(engine: Engine) -> None:
    """Bring the schema to the newest revision.  Safe to call from several processes:
    migrations run in one transaction, and a second caller finds nothing to do."""
    alembic_log = logging.getLogger("alembic")
    level = alembic_log.level
    alembic_log.setLevel(logging.WARNING)  # its plugin set-up is a dozen lines per start
    try:
        with engine.begin() as conn:
            cfg = alembic_config()
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        alembic_log.setLevel(level)
    log.info("database schema at head url=%s", engine.url.render_as_string(hide_password=True))
