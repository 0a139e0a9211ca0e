"""How the appliance opens its SQLite databases: WAL, synchronous=FULL, trusted_schema
off, and BEGIN issued by us (IMMEDIATE for writers) so that a read-then-write is one
transaction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event


def open_engine(path: Path, *, read_only: bool = False, immediate: bool = True) -> Engine:
    """An engine on the audit database with the pragmas every connection needs."""
    if read_only:
        url = f"sqlite:///file:{path}?mode=ro&uri=true"
    else:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        url = f"sqlite:///{path}"
    engine = create_engine(url, connect_args={"timeout": 10, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection: Any, _: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA trusted_schema=OFF")
        cursor.execute("PRAGMA busy_timeout=10000")
        if not read_only:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate and not read_only else "BEGIN")

    return engine


def schema_versions(engine: Engine) -> set[str]:
    """The versions Alembic recorded in the database (none for a new one)."""
    from sqlalchemy.exc import OperationalError

    with engine.connect() as conn:
        try:
            rows = conn.exec_driver_sql("SELECT version_num FROM alembic_version").all()
        except OperationalError:  # a new database: no table yet
            return set()
    return {str(row[0]) for row in rows}


def upgrade(engine: Engine, migrations: Path, head: str) -> None:
    """Bring the schema to ``head`` with the Alembic scripts in ``migrations``; an upgrade
    keeps every row. A database already at ``head`` is not handed to Alembic, whose
    import costs the service ~11 MiB."""
    if schema_versions(engine) == {head}:
        return
    from alembic import command
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(migrations))
    with engine.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")
