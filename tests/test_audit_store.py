"""The audit store on real SQLite files: content policies, no plaintext at rest, keys,
rotation, concurrency, checkpoints, backup, the schema's migrations."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from appliance.audit import chain, crypto
from appliance.audit import store as store_module
from appliance.audit.reader import backup, records
from appliance.audit.records import Entry, content_bytes
from appliance.audit.schema import metadata
from appliance.audit.store import AuditStore
from appliance.config import Settings, load_settings

from helpers import wait_for

SECRET_IN = "patient Zebulon Quartermaine, bed 14"
SECRET_OUT = "suspected Quartermaine syndrome"


def settings_for(root: Path, **overrides: object) -> Settings:
    return load_settings(env={}, overrides={"state_dir": root, **overrides})


def raw_bytes(settings: Settings) -> bytes:
    path = settings.audit_db_path
    return b"".join(
        Path(str(path) + suffix).read_bytes()
        for suffix in ("", "-wal", "-shm")
        if Path(str(path) + suffix).exists()
    )


def write_pair(store: AuditStore, request_id: str = "req-1") -> None:
    store.append(
        Entry(
            kind="request",
            request_id=request_id,
            model="m",
            content={"input": {"messages": [{"role": "user", "content": SECRET_IN}]}},
        )
    )
    store.append(
        Entry(kind="outcome", request_id=request_id, status=200, content={"output": SECRET_OUT})
    )


def verify(settings: Settings) -> chain.Report:
    key = crypto.load_public_key(settings.signing_public_key_path)
    return chain.verify(settings.audit_db_path, key, settings.checkpoint_path)


@pytest.mark.parametrize("policy", ["full", "digest", "none"])
def test_no_plaintext_at_rest_under_any_policy(tmp_path: Path, policy: str) -> None:
    settings = settings_for(tmp_path, audit_content=policy)
    store = AuditStore(settings)
    write_pair(store)
    # Look while the WAL still holds the records, then after the checkpoint into the db.
    assert b"Quartermaine" not in raw_bytes(settings)
    rows = list(records(store))
    store.close()
    blob = raw_bytes(settings)
    assert b"Quartermaine" not in blob
    assert verify(settings).ok
    request = next(r for r in rows if r["kind"] == "request")
    if policy == "full":
        assert request["content"]["input"]["messages"][0]["content"] == SECRET_IN
        assert request["key_id"]
    elif policy == "digest":
        # Keyed (HMAC under a key derived from the master key): the log cannot confirm a
        # guessed prompt to whoever lacks the key, as a bare SHA-256 would.
        assert set(request["content"]) == {"hmac_sha256"}
        master = crypto.load_master_key(settings.master_key_path, create=False)
        key = hmac.new(master, b"appliance-audit-digest-v1", "sha256").digest()
        plain = content_bytes({"input": {"messages": [{"role": "user", "content": SECRET_IN}]}})
        assert request["content"]["hmac_sha256"] == hmac.new(key, plain, "sha256").hexdigest()
        assert request["content"]["hmac_sha256"] != hashlib.sha256(plain).hexdigest()
    else:
        assert request["content"] is None and request["content_digest"] is None


def test_master_key_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    AuditStore(settings).close()
    os.chmod(settings.master_key_path, 0o644)
    with pytest.raises(crypto.AuditKeyError, match=r"mode 0644.*chmod 600"):
        AuditStore(settings)


def test_missing_master_key_for_existing_records_is_refused(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = AuditStore(settings)
    write_pair(store)
    store.close()
    settings.master_key_path.unlink()
    with pytest.raises(crypto.AuditKeyError, match="holds records encrypted under it"):
        AuditStore(settings)
    assert not settings.master_key_path.exists()  # no new key was made behind its back


def test_keys_from_systemd_credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    crypto.write_private(creds / crypto.MASTER_CREDENTIAL, os.urandom(32).hex().encode())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    settings = settings_for(tmp_path / "state")
    store = AuditStore(settings)
    write_pair(store)
    assert next(records(store))["content"]["input"]
    store.close()
    assert not settings.master_key_path.exists()  # the credential was used, no file made


def test_many_threads_give_one_gap_free_chain(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, checkpoint_records=100)
    store = AuditStore(settings)
    errors: list[BaseException] = []

    def writer(n: int) -> None:
        try:
            for i in range(40):
                store.append(Entry(kind="event", request_id=f"t{n}-{i}", content={"i": i}))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store.close()
    assert errors == []
    with sqlite3.connect(settings.audit_db_path) as conn:
        seqs = [s for (s,) in conn.execute("SELECT seq FROM audit_records ORDER BY seq")]
    assert seqs == list(range(1, 32 * 40 + 1))
    report = verify(settings)
    assert report.ok and report.records == 32 * 40


def test_rotation_by_hand_and_by_count(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, data_key_max_uses=3)
    store = AuditStore(settings)
    for i in range(7):
        store.append(Entry(kind="event", content={"i": i}))
    manual = store.rotate_key()
    store.append(Entry(kind="event", content={"i": 7}))
    rows = list(records(store))
    store.close()
    key_ids = [r["key_id"] for r in rows]
    assert len(set(key_ids)) >= 4  # 3 uses per key, then the manual rotation
    assert key_ids[-1] == manual
    assert [r["content"]["i"] for r in rows] == list(range(8))  # older keys still open
    with sqlite3.connect(settings.audit_db_path) as conn:
        uses = conn.execute("SELECT MAX(uses) FROM audit_data_keys").fetchone()[0]
        primaries = conn.execute("SELECT COUNT(*) FROM audit_data_keys WHERE is_primary=1")
        assert uses <= 3 and primaries.fetchone()[0] == 1


def test_idle_periods_are_sealed(tmp_path: Path) -> None:
    settings = settings_for(tmp_path, checkpoint_seconds=1)
    store = AuditStore(settings)
    store.append(Entry(kind="event"))

    def sealed_at_one() -> list[chain.Checkpoint]:
        if not settings.checkpoint_path.exists():
            return []
        cps, bad = chain.read_file(settings.checkpoint_path)
        assert bad == []
        return [cp for cp in cps if cp.size == 1]

    started = time.monotonic()
    # The quiet seconds are sealed too: two seals over the one record, by the writer
    # alone (closing seals one more, so look before).
    assert wait_for(lambda: len(sealed_at_one()) >= 2, 10)
    assert time.monotonic() - started < 5  # about one a checkpoint_seconds, not at close
    store.close()
    assert len({cp.ts for cp in sealed_at_one()}) == len(sealed_at_one())


def test_backup_is_a_verifiable_copy(tmp_path: Path) -> None:
    settings = settings_for(tmp_path / "state")
    store = AuditStore(settings)
    write_pair(store)
    dest = tmp_path / "backup" / "audit.db"
    assert backup(store, dest) > 0
    store.close()
    assert oct(dest.stat().st_mode & 0o777) == "0o600"
    key = crypto.load_public_key(settings.signing_public_key_path)
    assert chain.verify(dest, key, None, without_external=True).ok


def test_migrations_create_exactly_the_declared_schema(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    store = AuditStore(settings)
    try:
        with store.engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    finally:
        store.close()
    assert diff == []
    assert version == "0001"


DATA = Path(__file__).parent / "data"


def test_a_log_made_by_the_first_release_is_migrated_read_and_extended(tmp_path: Path) -> None:
    """tests/data/audit-v1.*: a log the first release's code wrote (schema 0001, its
    bare SHA-256 digests, a key rotation; tests/data/README.md). Today's code brings
    it to the newest schema with every row kept, opens its content under the old keys,
    verifies it against its own checkpoint file, and extends its chain."""
    settings = settings_for(tmp_path, audit_content="full")
    settings.audit_db_path.parent.mkdir(parents=True)
    settings.master_key_path.parent.mkdir(parents=True, mode=0o700)
    shutil.copyfile(DATA / "audit-v1.sqlite", settings.audit_db_path)
    shutil.copyfile(DATA / "audit-v1.checkpoints.jsonl", settings.checkpoint_path)
    for name in ("audit-master.key", "audit-signing.key", "audit-signing.pub"):
        target = settings.master_key_path.parent / name
        shutil.copyfile(DATA / f"audit-v1.{name}", target)
        os.chmod(target, 0o600)
    with sqlite3.connect(settings.audit_db_path) as conn:
        [(old_version,)] = conn.execute("SELECT version_num FROM alembic_version")
        old_rows = conn.execute("SELECT * FROM audit_records ORDER BY seq").fetchall()
    assert old_version == "0001" and len(old_rows) == 4

    store = AuditStore(settings)
    try:
        with store.engine.connect() as conn:
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []
            version = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
        assert version == store_module.SCHEMA_HEAD
        rows = {(r["request_id"], r["kind"]): r for r in records(store)}
        assert rows["v1-full", "request"]["content"] == {
            "input": {"messages": [{"role": "user", "content": "asked under full"}]}
        }
        assert rows["v1-full", "outcome"]["content"] == {"output": "answered under full"}
        # That release's digest was a bare SHA-256 of the content: still read as one.
        plain = content_bytes({"output": "answered under digest"})
        assert rows["v1-digest", "outcome"]["content"] == {
            "sha256": hashlib.sha256(plain).hexdigest()
        }
        write_pair(store, "today")
    finally:
        store.close()
    with sqlite3.connect(settings.audit_db_path) as conn:
        kept = conn.execute("SELECT * FROM audit_records WHERE seq <= 4 ORDER BY seq").fetchall()
    assert kept == old_rows  # the migration kept every row as it was
    report = verify(settings)
    assert report.ok, report.problem
    assert report.records == 6 and report.incomplete == [] and report.external_checkpoints >= 3


def test_schema_head_is_the_newest_migration() -> None:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from appliance.audit import store

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(store.__file__).parent / "migrations"))
    assert ScriptDirectory.from_config(cfg).get_current_head() == store.SCHEMA_HEAD


def test_a_current_database_opens_without_alembic(tmp_path: Path) -> None:
    """Alembic (~11 MiB resident) is imported only when there is something to migrate."""
    AuditStore(settings_for(tmp_path)).close()  # made, and migrated, here
    script = (
        "import sys\n"
        "from appliance.audit.store import AuditStore\n"
        "from appliance.config import load_settings\n"
        f"settings = load_settings(env={{}}, overrides={{'state_dir': {str(tmp_path)!r}}})\n"
        "AuditStore(settings).close()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'alembic'))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    settings = settings_for(tmp_path)
    for request_id in ("a", "b", "c"):
        store = AuditStore(settings)
        write_pair(store, request_id)
        store.close()
    report = verify(settings)
    assert report.ok and report.records == 6 and report.incomplete == []


def test_the_wal_is_checkpointed_off_the_commit_path_and_reused(tmp_path: Path) -> None:
    """Commits from an idle log's caller, many of them: the writer copies the WAL back
    into the database after it has answered (never inside a commit), so the WAL stays
    at about a MiB and is overwritten rather than grown; every record is there and the
    chain verifies."""
    settings = settings_for(tmp_path)
    store = AuditStore(settings)
    wal = Path(str(settings.audit_db_path) + "-wal")
    sizes = []
    for i in range(600):  # ~1800 WAL pages: several times the checkpoint threshold
        store.commit(
            [
                Entry(kind="request", request_id=f"r{i}", content={"input": {"i": i}}),
                Entry(kind="outcome", request_id=f"r{i}", status=200, content={"output": "o"}),
            ]
        )
        sizes.append(wal.stat().st_size)
    store.close()
    assert max(sizes) < 3 * 2**20  # SQLite's own autocheckpoint would let it reach ~4 MiB
    # Appended to, the last 200 commits would have added ~2.4 MiB; reused, about nothing.
    assert sizes[-1] - sizes[-200] < 2**18
    report = verify(settings)
    assert report.ok and report.records == 1200 and report.incomplete == []


def test_checkpoints_fall_where_due_when_callers_write_their_own(tmp_path: Path) -> None:
    """Callers writing their own records (an idle log) seal a signed checkpoint every
    checkpoint_records records, exactly where it falls due."""
    settings = settings_for(tmp_path, checkpoint_records=5)
    store = AuditStore(settings)
    for i in range(12):
        store.append(Entry(kind="event", request_id=f"e{i}", content={"i": i}))
    store.close()
    cps, bad = chain.read_file(settings.checkpoint_path)
    assert bad == [] and [cp.size for cp in cps][:2] == [5, 10]
    report = verify(settings)
    assert report.ok and report.records == 12
