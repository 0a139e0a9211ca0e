"""Reading the audit log with the key: show, export (JSON lines or CSV), and backup
through SQLite's backup API (never a file copy of a live database)."""

from __future__ import annotations

import csv
import json
import os
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from appliance.audit import crypto
from appliance.audit.records import FIELDS, aad
from appliance.audit.store import AuditStore

COLUMNS = (*FIELDS, "hash")
EXPORT_FIELDS = [c for c in COLUMNS if c not in ("nonce", "ciphertext")] + ["content"]


class ReadError(ValueError):
    """A reading request cannot be answered; the message says why."""


def parse_time(text: str) -> str:
    """An ISO date or time (UTC unless it says otherwise) in the records' format."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ReadError(f"{text!r} is not an ISO date or time (e.g. 2026-11-24)") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _content(store: AuditStore, conn: Any, row: dict[str, Any]) -> Any:
    if row["ciphertext"] is None:
        digest = row["content_digest"]
        if digest is None:
            return None
        keyed, _, mac = digest.partition("hmac-sha256:")
        return {"hmac_sha256": mac} if not keyed and mac else {"sha256": digest}
    key = store.data_key(conn, row["key_id"])
    plain = crypto.open_sealed(
        key, row["nonce"], row["ciphertext"], aad(row["seq"], row["ts"], row["key_id"])
    )
    return json.loads(plain)


def records(
    store: AuditStore,
    since: str | None = None,
    until: str | None = None,
    actor: str | None = None,
    model: str | None = None,
    seq: int | None = None,
) -> Iterator[dict[str, Any]]:
    """Records in order, their content opened (a record that does not open says so)."""
    where, args = [], []
    for clause, value in (
        ("ts >= ?", since),
        ("ts < ?", until),
        ("seq = ?", seq),
        ("(actor_name = ? OR actor_id = ?)", actor),
        ("model = ?", model),
    ):
        if value is not None:
            where.append(clause)
            args.extend([value] * clause.count("?"))
    sql = f"SELECT {', '.join(COLUMNS)} FROM audit_records"
    if where:
        sql += " WHERE " + " AND ".join(where)
    with store.reader.connect() as conn:
        for values in conn.exec_driver_sql(sql + " ORDER BY seq", tuple(args)):
            row = dict(zip(COLUMNS, values, strict=True))
            try:
                row["content"] = _content(store, conn, row)
            except (crypto.DecryptionFailed, crypto.AuditKeyError) as exc:
                row["content"] = {"error": str(exc)}
            row.pop("nonce")
            row.pop("ciphertext")
            yield row


def export(rows: Iterator[dict[str, Any]], fmt: str, out: IO[str]) -> int:
    count = 0
    if fmt == "jsonl":
        for row in rows:
            out.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
        return count
    writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS)
    writer.writeheader()
    for row in rows:
        writer.writerow({**row, "content": json.dumps(row["content"], ensure_ascii=False)})
        count += 1
    return count


def backup(store: AuditStore, dest: Path) -> int:
    """A consistent copy through the backup API; returns the number of pages copied."""
    if dest.exists():
        raise ReadError(f"{dest} exists; choose a new file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.close(os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    raw = store.reader.raw_connection()
    try:
        source: sqlite3.Connection = raw.driver_connection  # type: ignore[assignment]
        target = sqlite3.connect(dest)
        try:
            source.backup(target)
            pages = int(target.execute("PRAGMA page_count").fetchone()[0])
        finally:
            target.close()
    finally:
        raw.close()
    return pages
