"""The verifier's word, exactly: for each way a log can be wrong, the first bad
sequence number, the kind (one of those the README lists) and the detail an auditor
reads; the report's figures for a sound log; and the checkpoint format, pinned byte for
byte (a checkpoint signed by one version must verify under the next). Real SQLite
files and real keys, no model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_audit_chain import N, db, fill, make_settings, public, row, verify

from appliance.audit import chain, crypto, witness
from appliance.audit.chain import Checkpoint, Problem, Report
from appliance.audit.records import Entry, record_hash
from appliance.audit.store import AuditStore
from appliance.config import Settings

KEY = Ed25519PrivateKey.from_private_bytes(bytes(32))
HEAD = "ab" * 32
MESSAGE = (
    b"appliance-audit-checkpoint-v1\n"
    b'{"head":"' + HEAD.encode() + b'","key":"3b6a27bcceb6a42d","origin":"origin-1",'
    b'"size":5,"ts":"2026-01-02T03:04:05Z"}'
)
SIGNATURE = (
    "x8QY9XoQYQ9gsBn22o/jmAmrzXI1S73leyN2wDd4R55LFAr8nSygEPjcKGKweB9nkdTkZGRIZteQaeTp/AGxAA=="
)
PURGE_SIGNATURE = (
    "+cKzv91y1bUNYOcOrhqHmGvPmrPryfn5zlimcG22Td46MtJZmaWxmHvbqzNyC6D93S1NG+5n7RBm8ztqS1eRBw=="
)


def checkpoint(**changes: object) -> Checkpoint:
    cp = Checkpoint("origin-1", 5, HEAD, "2026-01-02T03:04:05Z", "3b6a27bcceb6a42d")
    return Checkpoint(**{**cp.__dict__, **changes})


def test_the_checkpoint_format_is_pinned() -> None:
    cp = checkpoint().signed(KEY)
    assert cp.message() == MESSAGE
    assert cp.signature == SIGNATURE  # Ed25519 signs deterministically
    assert cp.line() == (
        '{"head":"' + HEAD + '","key":"3b6a27bcceb6a42d","origin":"origin-1",'
        '"signature":"' + SIGNATURE + '","size":5,"ts":"2026-01-02T03:04:05Z"}'
    )
    assert Checkpoint.from_line(cp.line()) == cp


def test_a_purge_checkpoint_signs_who_cut_the_log() -> None:
    cp = checkpoint(purged_by="os:root").signed(KEY)
    assert cp.message() == MESSAGE.replace(b'"origin-1",', b'"origin-1","purged_by":"os:root",')
    assert cp.signature == PURGE_SIGNATURE
    assert '"purged_by":"os:root","signature":"' + PURGE_SIGNATURE + '"' in cp.line()
    assert Checkpoint.from_line(cp.line()) == cp
    # An ordinary checkpoint's signature does not make it a purge checkpoint.
    posing = checkpoint(purged_by="os:root", signature=SIGNATURE)
    assert not posing.valid_under(KEY.public_key())


def test_a_checkpoint_is_valid_only_as_signed_by_its_key() -> None:
    public = KEY.public_key()
    assert checkpoint().signed(KEY).valid_under(public)
    assert not checkpoint(signature=SIGNATURE, size=6).valid_under(public)
    assert not checkpoint().signed(Ed25519PrivateKey.generate()).valid_under(public)
    for garbage in ("", "not base64!", "AAAA"):
        assert not checkpoint(signature=garbage).valid_under(public)


def test_the_external_file_is_appended_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "elsewhere" / "deeper" / "checkpoints.jsonl"
    first, second = checkpoint().signed(KEY), checkpoint(size=9).signed(KEY)
    chain.append_to_file(path, first)
    chain.append_to_file(path, second)
    assert path.stat().st_mode & 0o007 == 0  # not for others to read
    assert path.read_text() == first.line() + "\n" + second.line() + "\n"
    with path.open("a") as fh:
        fh.write("\n{not json\n" + '{"origin":"o"}\n')
    assert chain.read_file(path) == ([first, second], ["line 4", "line 5"])


def test_the_first_problem_found_is_the_one_reported() -> None:
    report = Report()
    assert report.fail(7, "modified", "first") is report
    report.fail(8, "deleted", "second")
    assert not report.ok
    assert report.problem == Problem(7, "modified", "first")
    assert report.as_dict()["problem"] == {"seq": 7, "kind": "modified", "detail": "first"}


@pytest.fixture
def log(tmp_path: Path) -> Settings:
    settings = make_settings(tmp_path / "state")
    fill(settings, 1, N)
    return settings


def test_a_sound_log_reports_its_figures(log: Settings) -> None:
    report = verify(log)
    with db(log) as conn:
        head = row(conn, N)["hash"]
    assert (report.ok, report.problem, report.notes) == (True, None, [])
    assert (report.records, report.first_seq, report.head_seq, report.head_hash) == (
        N,
        1,
        N,
        head,
    )
    with db(log) as conn:
        sealed = conn.execute("SELECT COUNT(*) FROM audit_checkpoints").fetchone()[0]
    assert sealed >= N // 5
    assert report.checkpoints == sealed
    assert report.external_checkpoints == len(log.checkpoint_path.read_text().splitlines())
    assert (report.incomplete, report.purged) == ([], None)


def test_an_empty_log_verifies(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    AuditStore(settings).close()
    report = chain.verify(settings.audit_db_path, public(settings), settings.checkpoint_path)
    assert (report.ok, report.problem, report.records, report.head_seq) == (True, None, 0, 0)


def test_a_request_without_its_outcome_is_incomplete_not_tampering(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    store = AuditStore(settings)
    try:
        for kind, rid in (("request", "a"), ("request", "b"), ("outcome", "a"), ("event", "c")):
            store.append(Entry(kind=kind, request_id=rid))
        store.append(Entry(kind="outcome", request_id="never asked"))
    finally:
        store.close()
    report = verify(settings)
    assert report.ok, report.problem
    assert (report.records, report.incomplete) == (5, ["b"])


def insert(conn: Any, forged: dict[str, Any]) -> None:
    """Put a forged row in, as someone with write access to the file could."""
    columns = ", ".join(forged)
    marks = ", ".join("?" for _ in forged)
    conn.execute(f"INSERT INTO audit_records ({columns}) VALUES ({marks})", tuple(forged.values()))


def caught(report: Report, seq: int | None, kind: str, detail: str) -> None:
    assert report.ok is False  # what --json and /audit/verify say
    assert report.problem == Problem(seq, kind, detail)


def test_a_changed_record(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("UPDATE audit_records SET status = 500 WHERE seq = 7")
    caught(verify(log), 7, "modified", "record 7 does not match its hash: it was changed")


def test_a_deleted_record(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq = 8")
    caught(verify(log), 8, "deleted", "record 8 is missing (the next record is 9)")


def test_a_deleted_record_hidden_by_renumbering(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq = 8")
        for seq in range(9, N + 1):
            conn.execute("UPDATE audit_records SET seq = ? WHERE seq = ?", (seq - 1, seq))
    caught(
        verify(log),
        8,
        "deleted",
        "the original record 8 is gone: record 9 was renumbered to 8",
    )


def test_the_last_record_deleted_and_the_tail_renumbered(log: Settings) -> None:
    with db(log) as conn:
        conn.execute(f"DELETE FROM audit_records WHERE seq = {N - 1}")
        conn.execute(f"UPDATE audit_records SET seq = {N - 1} WHERE seq = {N}")
    caught(
        verify(log),
        N - 1,
        "deleted",
        f"the original record {N - 1} is gone: record {N} was renumbered to {N - 1}",
    )


def test_an_inserted_record_pushes_the_original_along(log: Settings) -> None:
    with db(log) as conn:
        for seq in range(N, 7, -1):
            conn.execute("UPDATE audit_records SET seq = ? WHERE seq = ?", (seq + 1, seq))
        forged = row(conn, 7) | {"seq": 8, "request_id": "forged"}
        forged["prev_hash"] = row(conn, 7)["hash"]
        forged["hash"] = record_hash(forged)  # the forger knows the format
        insert(conn, forged)
    caught(
        verify(log),
        8,
        "inserted",
        "record 8 is not the original: the original record 8 now sits at 9, "
        "pushed along by an insertion",
    )


def test_swapped_records(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("UPDATE audit_records SET seq = -1 WHERE seq = 6")
        conn.execute("UPDATE audit_records SET seq = 6 WHERE seq = 7")
        conn.execute("UPDATE audit_records SET seq = 7 WHERE seq = -1")
    caught(verify(log), 6, "reordered", "records 6 and 7 have swapped places")


def test_a_record_before_the_start_of_the_log(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("UPDATE audit_records SET seq = 0 WHERE seq = 1")
    caught(verify(log), 0, "inserted", "record 0 lies before the start of the log")


def test_an_appended_record_that_does_not_link(log: Settings) -> None:
    with db(log) as conn:
        forged = row(conn, N) | {"seq": N + 1, "request_id": "forged", "prev_hash": "f" * 64}
        forged["hash"] = record_hash(forged)
        insert(conn, forged)
    caught(
        verify(log),
        N + 1,
        "inserted",
        f"record {N + 1} does not link to record {N}: it was put in after the fact",
    )


def test_a_cut_tail(log: Settings) -> None:
    with db(log) as conn:
        conn.execute("DELETE FROM audit_records WHERE seq > 15")
    report = verify(log)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (16, "truncated")
    assert report.problem.detail.startswith("records 16..20 are missing: the log ends at 15, ")


def test_checkpoints_signed_by_another_key(log: Settings) -> None:
    other = Ed25519PrivateKey.generate().public_key()
    report = chain.verify(log.audit_db_path, other, log.checkpoint_path)
    assert report.problem is not None
    assert (report.problem.seq, report.problem.kind) == (5, "bad signature")
    assert report.problem.detail.startswith("checkpoint at size 5 (")
    assert report.problem.detail.endswith(") is not signed by the trusted key for this log")
    assert report.notes == ["the database names another signing key than the trusted one"]


@pytest.mark.parametrize("size", [10, N])  # in the log, and at its head
def test_a_checkpoint_that_seals_other_records(log: Settings, size: int) -> None:
    with db(log) as conn:
        ts = conn.execute("SELECT ts FROM audit_checkpoints WHERE size = ?", (size,)).fetchone()
        ts = ts[0]
        cp = Checkpoint(
            conn.execute("SELECT value FROM audit_meta WHERE name='origin'").fetchone()[0],
            size,
            "0" * 64,
            ts,
            "k",
        ).signed(crypto.load_signing_key(log.signing_key_path, create=False))
        conn.execute(
            "UPDATE audit_checkpoints SET head = ?, key = ?, signature = ? WHERE size = ?",
            (cp.head, cp.key, cp.signature, size),
        )
    caught(verify(log), size, "modified", f"record {size} differs from what checkpoint {ts} sealed")


def test_without_a_trusted_key_verify_fails_unless_told(log: Settings) -> None:
    caught(
        chain.verify(log.audit_db_path, None, log.checkpoint_path),
        None,
        "untrusted key",
        "no trusted public key to check the signatures against: give the signing key's "
        ".pub kept apart from this machine (--public-key), or --trust-database-key to use "
        "the key the database names (a forger who can write the database re-signs with "
        "their own)",
    )
    report = chain.verify(log.audit_db_path, None, log.checkpoint_path, trust_database_key=True)
    assert report.ok, report.problem
    assert report.notes == [
        "public key taken from the database itself: a re-signed forgery would pass; "
        "pass --public-key"
    ]


def test_without_the_external_file_verify_fails_unless_told(log: Settings) -> None:
    key = public(log)
    message = (
        "the external checkpoint file None is missing: a database replaced by an older "
        "copy, or cut short, cannot be caught without it"
    )
    caught(
        chain.verify(log.audit_db_path, key, None),
        None,
        "no external checkpoints",
        message + " (--without-external)",
    )
    report = chain.verify(log.audit_db_path, key, None, without_external=True)
    assert (report.ok, report.notes) == (True, [message])
    absent = log.checkpoint_path.with_name("absent.jsonl")
    report = chain.verify(log.audit_db_path, key, absent, without_external=True)
    assert report.ok and report.notes == [message.replace("None", str(absent))]


def test_an_external_file_of_another_log(log: Settings) -> None:
    other = log.checkpoint_path.with_name("other.jsonl")
    chain.append_to_file(other, checkpoint(size=3).signed(KEY))
    caught(
        chain.verify(log.audit_db_path, public(log), other),
        None,
        "rolled back",
        "the checkpoint file holds no checkpoint of this log (replaced database?)",
    )


def test_unreadable_lines_in_the_external_file_are_noted(log: Settings) -> None:
    lines = len(log.checkpoint_path.read_text().splitlines())
    with log.checkpoint_path.open("a") as fh:
        fh.write("garbage\n\n[1]\n")
    report = verify(log)
    assert report.ok, report.problem
    assert report.notes == [f"unreadable checkpoint lines: line {lines + 1}, line {lines + 3}"]


def test_a_forged_external_checkpoint(log: Settings) -> None:
    lines = log.checkpoint_path.read_text().splitlines()
    forged = Checkpoint.from_line(lines[1])
    forged = Checkpoint(**{**forged.__dict__, "head": "0" * 64})
    log.checkpoint_path.write_text("\n".join([lines[0], forged.line(), *lines[2:]]) + "\n")
    caught(
        verify(log),
        10,
        "bad signature",
        f"external checkpoint at size 10 ({forged.ts}) has a bad signature",
    )
    signer = crypto.load_signing_key(log.signing_key_path, create=False)
    resigned = Checkpoint(**{**forged.__dict__, "signature": ""}).signed(signer)
    log.checkpoint_path.write_text("\n".join([lines[0], resigned.line(), *lines[2:]]) + "\n")
    caught(
        verify(log),
        10,
        "rolled back",
        f"record 10 differs from what the external checkpoint of {forged.ts} sealed",
    )


def test_a_database_older_than_the_external_file(tmp_path: Path) -> None:
    settings = make_settings(tmp_path / "state")
    fill(settings, 1, 10)
    old = settings.audit_db_path.read_bytes()
    fill(settings, 11, 10)
    for suffix in ("-wal", "-shm"):
        Path(f"{settings.audit_db_path}{suffix}").unlink(missing_ok=True)
    settings.audit_db_path.write_bytes(old)
    report = verify(settings)
    latest = Checkpoint.from_line(settings.checkpoint_path.read_text().splitlines()[-1])
    caught(
        report,
        11,
        "rolled back",
        f"the database ends at 10 but the external checkpoint of {latest.ts} sealed "
        f"{latest.size} records: an older copy",
    )


def test_a_database_that_is_not_there_or_not_a_log(log: Settings) -> None:
    absent = log.audit_db_path.with_name("absent.db")
    caught(
        chain.verify(absent, public(log), None),
        None,
        "missing",
        f"audit database {absent} does not exist",
    )
    junk = log.audit_db_path.with_name("junk.db")
    junk.write_bytes(b"not a database" * 100)
    caught(
        chain.verify(junk, public(log), log.checkpoint_path),
        None,
        "unreadable",
        "the database cannot be read as an audit log: file is not a database",
    )


def purged(log: Settings) -> str:
    with db(log) as conn:
        cut = str(row(conn, 11)["ts"])
    store = AuditStore(log)
    try:
        assert store.purge_before(cut, "os:it-admin") == 10
    finally:
        store.close()
    return cut


def test_a_purge_is_reported_with_who_and_when(log: Settings) -> None:
    purged(log)
    report = verify(log)
    assert report.ok, report.problem
    cut = Checkpoint.from_line(
        next(x for x in log.checkpoint_path.read_text().splitlines() if "purged_by" in x)
    )
    assert report.purged == {"through": 10, "at": cut.ts, "by": "os:it-admin"}
    assert (report.records, report.first_seq, report.head_seq) == (N - 10, 11, N)


def test_a_purge_that_does_not_match_the_log(log: Settings) -> None:
    """A signed purge checkpoint of another cut cannot vouch for this one."""
    with db(log) as conn:
        head = row(conn, 10)["hash"]
    purged(log)
    with db(log) as conn:
        text = conn.execute(
            "SELECT value FROM audit_meta WHERE name = 'anchor_checkpoint'"
        ).fetchone()[0]
        cut = Checkpoint.from_line(text)
        assert (cut.size, cut.head) == (10, head)
        other = Checkpoint(**{**cut.__dict__, "size": 9, "signature": ""}).signed(
            crypto.load_signing_key(log.signing_key_path, create=False)
        )
        conn.execute(
            "UPDATE audit_meta SET value = ? WHERE name = 'anchor_checkpoint'", (other.line(),)
        )
    caught(
        verify(log),
        10,
        "deleted",
        "the log starts after record 10, but the signed purge cut it at 9",
    )


def test_a_purge_not_in_the_external_file(log: Settings) -> None:
    purged(log)
    lines = log.checkpoint_path.read_text().splitlines()
    cut = Checkpoint.from_line(next(x for x in lines if "purged_by" in x))
    log.checkpoint_path.write_text("\n".join(x for x in lines if "purged_by" not in x) + "\n")
    caught(
        verify(log),
        10,
        "deleted",
        f"the purge checkpoint at 10 ({cut.ts}) is not in the external checkpoint file: "
        "it was not made by the appliance's purge",
    )


def test_a_purge_checkpoint_signed_by_another_key(log: Settings) -> None:
    purged(log)
    with db(log) as conn:
        text = conn.execute(
            "SELECT value FROM audit_meta WHERE name = 'anchor_checkpoint'"
        ).fetchone()[0]
        forged = Checkpoint.from_line(text)
        forged = Checkpoint(**{**forged.__dict__, "signature": ""}).signed(KEY)
        conn.execute(
            "UPDATE audit_meta SET value = ? WHERE name = 'anchor_checkpoint'", (forged.line(),)
        )
    caught(
        verify(log), 10, "bad signature", "the purge checkpoint is not signed by the trusted key"
    )


def test_a_wipe_is_not_a_purge(log: Settings) -> None:
    with db(log) as conn:
        head = row(conn, 10)["hash"]
        conn.execute("DELETE FROM audit_records WHERE seq <= 10")
        for name, value in (("anchor_seq", "10"), ("anchor_head", head)):
            conn.execute("DELETE FROM audit_meta WHERE name = ?", (name,))
            conn.execute("INSERT INTO audit_meta (name, value) VALUES (?, ?)", (name, value))
    caught(
        verify(log),
        10,
        "deleted",
        "records 1..10 are gone and no signed purge checkpoint says who cut them: a wipe, "
        "or a purge by a version before the purge checkpoint",
    )


def witness_vkey(name: str) -> str:
    public = Ed25519PrivateKey.generate().public_key()
    raw = crypto.public_raw(public)
    kid = witness.key_id(name, witness.COSIGNATURE_ED25519, raw)
    return str(witness.Verifier(name, kid, public))


def test_a_witness_key_that_is_not_one_fails_verify_plainly(log: Settings) -> None:
    cosigned = log.checkpoint_path.with_name("cosigned.jsonl")
    caught(
        chain.verify(
            log.audit_db_path,
            public(log),
            log.checkpoint_path,
            witness_key="nonsense",
            cosigned_file=cosigned,
        ),
        None,
        "bad witness key",
        "witness_key must be a vkey, name+keyid+base64, got 'nonsense'",
    )


def test_a_log_never_witnessed_fails_when_a_witness_is_trusted(log: Settings) -> None:
    """Cosignatures removed (or never made) are not a pass: the witness is what catches
    a log rewritten and re-signed by whoever holds the key."""
    cosigned = log.checkpoint_path.with_name("cosigned.jsonl")
    cosigned.write_text("not a cosigned checkpoint\n\n{}\n")
    report = chain.verify(
        log.audit_db_path,
        public(log),
        log.checkpoint_path,
        witness_key=witness_vkey("witness.example"),
        cosigned_file=cosigned,
    )
    caught(
        report,
        None,
        "not witnessed",
        f"{cosigned} holds no checkpoint of this log cosigned by witness.example: never "
        "witnessed, or the cosignatures were removed",
    )
    assert report.notes == ["unreadable cosignature lines: line 1, line 3"]
    assert report.witnessed is None
    # No witness trusted: the file is not looked at.
    report = chain.verify(
        log.audit_db_path, public(log), log.checkpoint_path, cosigned_file=cosigned
    )
    assert (report.ok, report.notes, report.witnessed) == (True, [], None)
