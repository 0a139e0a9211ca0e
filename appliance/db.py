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
