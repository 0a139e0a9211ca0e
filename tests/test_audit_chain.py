"""Tamper evidence on real SQLite files: each attack is caught, at the right sequence
number, by a verifier that holds no decryption key."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from appliance.audit import chain, crypto
from appliance.audit.chain import Checkpoint, Report
from appliance.audit.records import FIELDS, Entry, record_hash
from appliance.audit.store import AuditStore
from appliance.config import Settings, load_settings

N = 20


def make_settings(root: Path, **overrides: object) -> Settings:
    return load_settings(
        env={}, overrides={"state_dir": root, "checkpoint_records": 5, **overrides}
    )


def fill(settings: Settings, start: int, count: int) -> None:
    store = AuditStore(settings)
    for i in range(start, start + count):
        store.append(
            Entry(
                kind="event",
                request_id=f"r{i}",
                status=200,
                route="/v1/x",
                content={"input": f"question {i}"},
            )
        )
    store.close()


@pytest.fixture
def log(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path / "state")
    fill(settings, 1, N)
    return settings


def public(settings: Settings) -> Ed25519PublicKey:
    return crypto.load_public_key(settings.signing_public_key_path)


def verify(settings: Settings) -> Report:
    return chain.verify(settings.audit_db_path, public(settings), settings.checkpoint_path)


def db(settings: Settings) -> sqlite3.Connection:
    return sqlite3.connect(settings.audit_db_path, isolation_level=None)


def row(conn: sqlite3.Connection, seq: int) -> dict[str, object]:
    cols = (*FIELDS, "hash")
    values = conn.execute(
        f"SELECT {', '.join(cols)} FROM audit_records WHERE seq=?", (seq,)
    ).fetchone()
    return dict(zip(cols, values, strict=True))


def assert_caught(report: Report, seq: int | None, kind: str) -> None:
    assert not report.ok
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (seq, kind), report.problem


def test_untouched_log_verifies(log: Settings) -> None:
    report = verify(log)
    assert report.ok, report.problem
    assert report.records == N and report.head_seq == N
    assert report.checkpoints >= N // 5 and report.external_checkpoints == report.checkpoints


def test_changed_field(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("UPDATE audit_records SET status = 500 WHERE seq = 7")
    assert_caught(verify(log), 7, "modified")


def test_swapped_ciphertexts(log: Settings) -> None:
    with db(log) as conn:
        a, b = row(conn, 4), row(conn, 9)
        conn.execute(
            "UPDATE audit_records SET nonce=?, ciphertext=? WHERE seq=4",
            (b["nonce"], b["ciphertext"]),
        )
        conn.execute(
            "UPDATE audit_records SET nonce=?, ciphertext=? WHERE seq=9",
            (a["nonce"], a["ciphertext"]),
        )
    assert_caught(verify(log), 4, "modified")


def test_moved_ciphertext_does_not_decrypt(log: Settings) -> None:
    from appliance.audit.reader import records

    with db(log) as conn:
        b = row(conn, 9)
        conn.execute(
            "UPDATE audit_records SET nonce=?, ciphertext=? WHERE seq=4",
            (b["nonce"], b["ciphertext"]),
        )
    store = AuditStore(log)
    try:
        contents = {r["seq"]: r["content"] for r in records(store)}
    finally:
        store.close()
    assert contents[9] == {"input": "question 9"}
    assert "error" in contents[4]  # bound to row 9 by its associated data


def test_deleted_middle_row(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq = 8")
    assert_caught(verify(log), 8, "deleted")


def test_deleted_row_with_renumbering(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq = 8")
        for seq in range(9, N + 1):
            conn.execute("UPDATE audit_records SET seq = ? WHERE seq = ?", (seq - 1, seq))
    assert_caught(verify(log), 8, "deleted")


def test_inserted_forged_row(log: Settings) -> None:
    with db(log) as conn:
        for seq in range(N, 7, -1):
            conn.execute("UPDATE audit_records SET seq = ? WHERE seq = ?", (seq + 1, seq))
        forged = row(conn, 7) | {
            "seq": 8,
            "request_id": "forged",
            "nonce": None,
            "ciphertext": None,
            "key_id": None,
        }
        forged["prev_hash"] = row(conn, 7)["hash"]
        forged["hash"] = record_hash(forged)  # the forger knows the format
        cols = ", ".join(forged)
        conn.execute(
            f"INSERT INTO audit_records ({cols}) VALUES ({', '.join('?' for _ in forged)})",
            tuple(forged.values()),
        )
    assert_caught(verify(log), 8, "inserted")


def test_appended_row_that_does_not_link(log: Settings) -> None:
    with db(log) as conn:
        forged = row(conn, N) | {"seq": N + 1, "request_id": "forged", "prev_hash": "f" * 64}
        forged["hash"] = record_hash(forged)
        conn.execute(
            f"INSERT INTO audit_records ({', '.join(forged)}) VALUES "
            f"({', '.join('?' for _ in forged)})",
            tuple(forged.values()),
        )
    assert_caught(verify(log), N + 1, "inserted")


@pytest.mark.parametrize("batch", [1000, 6, 5])  # verify reads in batches: across them too
def test_reordered_rows(log: Settings, batch: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chain, "WALK_BATCH", batch)
    with db(log) as conn:
        conn.execute("UPDATE audit_records SET seq = -1 WHERE seq = 6")
        conn.execute("UPDATE audit_records SET seq = 6 WHERE seq = 7")
        conn.execute("UPDATE audit_records SET seq = 7 WHERE seq = -1")
    assert_caught(verify(log), 6, "reordered")


def test_truncated_tail(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq > 15")
    assert_caught(verify(log), 16, "truncated")


def test_database_replaced_by_an_older_copy(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    fill(settings, 1, 10)
    old = tmp_path / "old.db"
    shutil.copyfile(settings.audit_db_path, old)  # closed database: a plain copy is safe
    fill(settings, 11, 10)
    assert verify(settings).ok
    for suffix in ("-wal", "-shm"):
        Path(str(settings.audit_db_path) + suffix).unlink(missing_ok=True)
    shutil.copyfile(old, settings.audit_db_path)
    report = verify(settings)
    assert_caught(report, 11, "rolled back")
    # Without the external file the older copy is self-consistent: that is what the
    # file is for.
    key = crypto.load_public_key(settings.signing_public_key_path)
    assert chain.verify(settings.audit_db_path, key, None, without_external=True).ok
    assert not chain.verify(settings.audit_db_path, key, None).ok  # and it says so


def test_resigned_with_a_foreign_key(log: Settings) -> None:
    foreign = Ed25519PrivateKey.generate()
    with db(log) as conn:
        conn.execute("UPDATE audit_records SET status = 500 WHERE seq = 7")
        prev = row(conn, 6)["hash"]
        for seq in range(7, N + 1):  # rebuild the chain after the change
            r = row(conn, seq) | {"prev_hash": prev}
            r["hash"] = prev = record_hash(r)
            conn.execute(
                "UPDATE audit_records SET prev_hash=?, hash=? WHERE seq=?",
                (r["prev_hash"], r["hash"], seq),
            )
        for cid, origin, size, _, ts in conn.execute(
            "SELECT id, origin, size, head, ts FROM audit_checkpoints"
        ).fetchall():
            head = row(conn, size)["hash"]
            cp = Checkpoint(origin, size, head, ts, crypto.fingerprint(foreign.public_key()))
            cp = cp.signed(foreign)
            conn.execute(
                "UPDATE audit_checkpoints SET head=?, key=?, signature=? WHERE id=?",
                (cp.head, cp.key, cp.signature, cid),
            )
    assert_caught(verify(log), 5, "bad signature")


def test_purge_keeps_the_rest_verifiable(log: Settings) -> None:
    with db(log) as conn:
        cut_ts = row(conn, 11)["ts"]
    store = AuditStore(log)
    try:
        preview = store.purge_preview(str(cut_ts))  # what would go, before it goes
        assert (preview["records"], preview["through"], preview["by_kind"]) == (
            10,
            10,
            {"event": 10},
        )
        assert preview["unknown_refusals"] == 0 and verify(log).records == N
        assert store.purge_before(str(cut_ts), "os:it-admin") == 10
        store.append(Entry(kind="event", request_id="after", status=200))
    finally:
        store.close()
    report = verify(log)
    assert report.ok, report.problem
    assert report.first_seq == 11 and report.head_seq == N + 1
    assert report.purged is not None
    assert (report.purged["through"], report.purged["by"]) == (10, "os:it-admin")
    with db(log) as conn:
        conn.execute("UPDATE audit_meta SET value = '9' WHERE name = 'anchor_seq'")
    assert not verify(log).ok


def test_a_wipe_cannot_pass_for_a_purge(log: Settings) -> None:
    """Anyone who can write the database can move its anchor (audit_meta) to a valid
    checkpoint and delete every record before it: for each checkpoint K, and for all
    records, verify fails and says so, since only a signed purge checkpoint, also in
    the external file, may start a log."""
    with db(log) as conn:
        sealed = conn.execute("SELECT size, head FROM audit_checkpoints ORDER BY id").fetchall()
        last = row(conn, N)["hash"]
    assert len(sealed) >= 4
    original = log.audit_db_path.read_bytes()
    for size, head in [*sealed, (N, last)]:
        log.audit_db_path.write_bytes(original)
        with db(log) as conn:
            for name, value in (("anchor_seq", str(size)), ("anchor_head", head)):
                conn.execute("DELETE FROM audit_meta WHERE name = ?", (name,))
                conn.execute("INSERT INTO audit_meta (name, value) VALUES (?, ?)", (name, value))
            conn.execute("DELETE FROM audit_records WHERE seq <= ?", (size,))
        report = verify(log)
        assert not report.ok, f"anchored at {size}"
        assert report.problem is not None and report.problem.seq == size
        assert "no signed purge checkpoint" in report.problem.detail


def test_a_purge_checkpoint_missing_from_the_external_file_is_caught(log: Settings) -> None:
    with db(log) as conn:
        cut_ts = row(conn, 11)["ts"]
    store = AuditStore(log)
    try:
        store.purge_before(str(cut_ts), "os:it-admin")
    finally:
        store.close()
    lines = log.checkpoint_path.read_text().splitlines()
    log.checkpoint_path.write_text("\n".join(x for x in lines if "purged_by" not in x) + "\n")
    report = verify(log)
    assert not report.ok and report.problem is not None
    assert "not in the external checkpoint file" in report.problem.detail


def test_every_byte_flip_in_the_records_is_caught(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state", checkpoint_records=3)
    fill(settings, 1, 6)
    original = settings.audit_db_path.read_bytes()
    with sqlite3.connect(settings.audit_db_path) as conn:
        page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        pages = [
            p
            for (p,) in conn.execute(
                "SELECT pageno FROM dbstat WHERE name IN ('audit_records', 'audit_checkpoints')"
            )
        ]
    tables = ("audit_records", "audit_checkpoints", "audit_meta")

    def contents(path: Path) -> object:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as c:
            return [c.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall() for t in tables]

    baseline = contents(settings.audit_db_path)
    key = crypto.load_public_key(settings.signing_public_key_path)
    flipped = tmp_path / "flipped.db"
    passed_with_change = []
    offsets = [o for p in pages for o in range((p - 1) * page_size, p * page_size)]
    assert offsets
    for offset in offsets:
        data = bytearray(original)
        data[offset] ^= 0xFF
        flipped.write_bytes(bytes(data))
        report = chain.verify(flipped, key, settings.checkpoint_path)
        if report.ok:
            try:
                changed = contents(flipped) != baseline
            except sqlite3.Error:
                changed = True
            if changed:
                passed_with_change.append(offset)
    assert passed_with_change == []


def test_verify_needs_a_trusted_key_and_the_external_file(log: Settings) -> None:
    """The key in the database and a missing or empty checkpoint file are no trust
    anchor: each fails unless the caller waives it, and says how."""
    no_key = chain.verify(log.audit_db_path, None, log.checkpoint_path)
    assert not no_key.ok and no_key.problem is not None
    assert no_key.problem.kind == "untrusted key" and "--public-key" in no_key.problem.detail
    waived = chain.verify(log.audit_db_path, None, log.checkpoint_path, trust_database_key=True)
    assert waived.ok and any("taken from the database" in n for n in waived.notes)
    key = crypto.load_public_key(log.signing_public_key_path)
    gone = log.checkpoint_path.with_name("elsewhere.jsonl")
    missing = chain.verify(log.audit_db_path, key, gone)
    assert not missing.ok and missing.problem is not None
    assert (
        missing.problem.kind == "no external checkpoints" and "is missing" in missing.problem.detail
    )
    assert chain.verify(log.audit_db_path, key, gone, without_external=True).ok
    log.checkpoint_path.write_text("")
    empty = chain.verify(log.audit_db_path, key, log.checkpoint_path)
    assert not empty.ok and empty.problem is not None
    assert "holds no checkpoint of this log" in empty.problem.detail


def test_new_records_are_sealed_within_seconds(log: Settings) -> None:
    """The records after the last checkpoint are what could be rewritten unnoticed: a
    checkpoint covers them within SEAL_WITHIN_SECONDS, though checkpoint_seconds is
    five minutes and checkpoint_records not reached."""
    import time

    from appliance.audit.store import SEAL_WITHIN_SECONDS

    store = AuditStore(log)
    try:
        seq = store.append(Entry(kind="event", request_id="late", status=200))
        deadline = time.monotonic() + SEAL_WITHIN_SECONDS + 3
        sealed = 0
        while time.monotonic() < deadline and sealed < seq:
            time.sleep(0.2)
            found, _ = chain.read_file(log.checkpoint_path)
            sealed = max(cp.size for cp in found)
        assert sealed >= seq
    finally:
        store.close()
