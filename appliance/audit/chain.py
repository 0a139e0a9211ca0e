"""Signed checkpoints and verification of the audit log, with no decryption key.

A checkpoint seals (origin, size, head hash, time) with Ed25519; it is stored in the
database and appended to an external file. Verification walks every record (hash and
link), every checkpoint (signature and head), then the database against the external
file, and names the first bad sequence number and what is wrong with it.
"""

from __future__ import annotations

import json
import os
import sqlite3
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from appliance.audit import crypto, merkle, witness
from appliance.audit.records import FIELDS, GENESIS, record_hash

CHECKPOINT_FORMAT = b"appliance-audit-checkpoint-v1\n"
WALK_BATCH = 2000  # records read at a time by verify


@dataclass(frozen=True)
class Checkpoint:
    origin: str
    size: int
    head: str
    ts: str
    key: str
    signature: str = ""
    # A purge checkpoint (who cut the log there): the only kind that may start a log
    # whose earlier records are gone. Its signature covers the mark, so an ordinary
    # checkpoint cannot be passed off as one.
    purged_by: str = ""

    def message(self) -> bytes:
        body: dict[str, Any] = {
            "origin": self.origin,
            "size": self.size,
            "head": self.head,
            "ts": self.ts,
            "key": self.key,
        }
        if self.purged_by:
            body["purged_by"] = self.purged_by
        return CHECKPOINT_FORMAT + json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def signed(self, key: Ed25519PrivateKey) -> Checkpoint:
        return replace(self, signature=crypto.b64(key.sign(self.message())))

    @classmethod
    def from_line(cls, line: str) -> Checkpoint:
        data = json.loads(line)
        fields = ("origin", "size", "head", "ts", "key", "signature")
        return cls(**{k: data[k] for k in fields}, purged_by=str(data.get("purged_by", "")))

    def valid_under(self, key: Ed25519PublicKey) -> bool:
        try:
            return crypto.verify_signature(key, crypto.unb64(self.signature), self.message())
        except (ValueError, TypeError, AttributeError):  # not even shaped like one
            return False

    def line(self) -> str:
        body = asdict(self)
        if not self.purged_by:
            del body["purged_by"]
        return json.dumps(body, sort_keys=True, separators=(",", ":"))


def append_to_file(path: Path, checkpoint: Checkpoint) -> None:
    """Append durably: the external copy must survive a crash of this machine."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640)
    try:
        os.write(fd, (checkpoint.line() + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def read_file(path: Path) -> tuple[list[Checkpoint], list[str]]:
    """Checkpoints in the file, and the lines that are not checkpoints."""
    found, bad = [], []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            found.append(Checkpoint.from_line(line))
        except (ValueError, KeyError, TypeError):
            bad.append(f"line {n}")
    return found, bad


@dataclass
class Problem:
    seq: int | None
    kind: str  # modified | inserted | deleted | reordered | truncated | rolled back | ...
    detail: str


@dataclass
class Report:
    ok: bool = True
    records: int = 0
    first_seq: int | None = None
    head_seq: int = 0
    head_hash: str = GENESIS
    checkpoints: int = 0
    external_checkpoints: int = 0
    incomplete: list[str] = field(default_factory=list)
    purged: dict[str, Any] | None = None  # through (seq), at (time), by (who): a purge
    witnessed: dict[str, Any] | None = None  # witness, cosignatures, size, at: see below
    problem: Problem | None = None
    notes: list[str] = field(default_factory=list)

    def fail(self, seq: int | None, kind: str, detail: str) -> Report:
        if self.problem is None:
            self.ok = False
            self.problem = Problem(seq, kind, detail)
        return self

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _classify_bad_row(rows: list[tuple[Any, ...]], i: int) -> tuple[str, int, str]:
    """A row whose stored hash does not match its content: find out whether it was
    edited in place, or moved (by an insertion, a deletion or a swap)."""
    row = list(rows[i][:-1])
    stored = rows[i][-1]
    seq = int(row[0])
    for original in (seq - 1, seq + 1):
        row[0] = original
        if record_hash(tuple(row)) != stored:
            continue
        if original == seq - 1:
            return (
                "inserted",
                seq - 1,
                (
                    f"record {seq - 1} is not the original: the original record {seq - 1} "
                    f"now sits at {seq}, pushed along by an insertion"
                ),
            )
        nxt = rows[i + 1] if i + 1 < len(rows) else None
        if nxt is not None:
            moved = list(nxt[:-1])
            moved[0] = seq
            if record_hash(tuple(moved)) == nxt[-1]:
                return "reordered", seq, f"records {seq} and {seq + 1} have swapped places"
        return (
            "deleted",
            seq,
            (f"the original record {seq} is gone: record {seq + 1} was renumbered to {seq}"),
        )
    return "modified", seq, f"record {seq} does not match its hash: it was changed"


def walk_records(
    db: sqlite3.Connection,
    report: Report,
    anchor_seq: int,
    anchor_head: str,
    wanted: set[int] | None = None,
) -> dict[int, str]:
    """Check every record's hash and link, reading them in order a batch at a time (a
    log of millions of records is never all in memory). Returns seq -> hash for the
    sequence numbers in ``wanted`` (the checkpoints' sizes; all when None)."""
    columns = ", ".join((*FIELDS, "hash"))
    cursor = db.execute(f"SELECT {columns} FROM audit_records ORDER BY seq")
    hashes: dict[int, str] = {}
    expected, prev = anchor_seq + 1, anchor_head
    request_ids: dict[str, bool] = {}
    kind_at = FIELDS.index("kind")
    rid_at = FIELDS.index("request_id")
    link_at = FIELDS.index("prev_hash")
    count, first = 0, None
    window: list[tuple[Any, ...]] = cursor.fetchmany(WALK_BATCH)
    while window:
        ahead = cursor.fetchmany(WALK_BATCH)
        rows = window + ahead[:1]  # one row of look-ahead, for telling a swap
        for i, row in enumerate(window):
            seq, stored, link = row[0], row[-1], row[link_at]
            if not isinstance(seq, int):
                report.fail(expected, "modified", f"record {expected} has sequence number {seq!r}")
                return hashes
            if seq < expected:
                report.fail(seq, "inserted", f"record {seq} lies before the start of the log")
                return hashes
            if seq > expected:
                report.fail(
                    expected, "deleted", f"record {expected} is missing (the next record is {seq})"
                )
                return hashes
            if record_hash(row[:-1]) != stored:
                kind, at, detail = _classify_bad_row(rows, i)
                report.fail(at, kind, detail)
                return hashes
            if link != prev:
                report.fail(
                    seq,
                    "inserted",
                    f"record {seq} does not link to record {seq - 1}: it was put in after the fact",
                )
                return hashes
            if wanted is None or seq in wanted:
                hashes[seq] = stored
            if row[kind_at] == "request":
                request_ids[row[rid_at]] = False
            elif row[kind_at] == "outcome" and row[rid_at] in request_ids:
                del request_ids[row[rid_at]]  # complete: nothing more to remember of it
            first = seq if first is None else first
            count += 1
            expected, prev = seq + 1, stored
        window = ahead
    report.records = count
    report.first_seq = first
    report.head_seq, report.head_hash = expected - 1, prev
    report.incomplete = [rid for rid, done in request_ids.items() if not done]
    return hashes


def check_checkpoints(
    db: sqlite3.Connection,
    report: Report,
    hashes: dict[int, str],
    key: Ed25519PublicKey,
    origin: str,
    anchor_seq: int,
) -> int:
    """Every stored checkpoint: signed by the trusted key, and its head matches the
    records. Returns the largest size any stored checkpoint sealed."""
    largest = 0
    rows = db.execute(
        "SELECT origin, size, head, ts, key, signature FROM audit_checkpoints ORDER BY id"
    ).fetchall()
    for row in rows:
        cp = Checkpoint(*row)
        if not cp.valid_under(key) or cp.origin != origin:
            report.fail(
                cp.size,
                "bad signature",
                f"checkpoint at size {cp.size} ({cp.ts}) is not signed by the trusted "
                "key for this log",
            )
            return largest
        largest = max(largest, cp.size)
        if cp.size > report.head_seq:
            continue  # judged below, as truncation
        if cp.size > anchor_seq and hashes.get(cp.size) != cp.head:
            report.fail(
                cp.size, "modified", f"record {cp.size} differs from what checkpoint {cp.ts} sealed"
            )
            return largest
    report.checkpoints = len(rows)
    return largest


def check_external(
    report: Report,
    external: list[Checkpoint],
    hashes: dict[int, str],
    key: Ed25519PublicKey,
    origin: str,
    stored_largest: int,
    anchor_seq: int,
) -> None:
    mine = [cp for cp in external if cp.origin == origin]
    if external and not mine:
        report.fail(
            None,
            "rolled back",
            "the checkpoint file holds no checkpoint of this log (replaced database?)",
        )
        return
    for cp in mine:
        if not cp.valid_under(key):
            report.fail(
                cp.size,
                "bad signature",
                f"external checkpoint at size {cp.size} ({cp.ts}) has a bad signature",
            )
            return
    report.external_checkpoints = len(mine)
    if not mine:
        return
    latest = max(mine, key=lambda cp: (cp.size, cp.ts))
    if latest.size > report.head_seq:
        if stored_largest > report.head_seq:
            report.fail(
                report.head_seq + 1,
                "truncated",
                f"records {report.head_seq + 1}..{latest.size} are missing: "
                f"the log ends at {report.head_seq}, its checkpoints reach {latest.size}",
            )
        else:
            report.fail(
                report.head_seq + 1,
                "rolled back",
                f"the database ends at {report.head_seq} but the external checkpoint "
                f"of {latest.ts} sealed {latest.size} records: an older copy",
            )
        return
    for cp in mine:
        if cp.size > anchor_seq and hashes.get(cp.size) != cp.head:
            report.fail(
                cp.size,
                "rolled back",
                f"record {cp.size} differs from what the external checkpoint of {cp.ts} sealed",
            )
            return


def _check_purge(
    report: Report,
    meta: dict[str, str],
    key: Ed25519PublicKey,
    origin: str,
    anchor_seq: int,
    anchor_head: str,
    external: list[Checkpoint],
) -> None:
    """A log that starts after record 1 must start at a signed purge checkpoint that
    the external file holds too: anyone who can write the database can set the anchor
    (audit_meta) and delete records, but cannot sign a purge."""
    try:
        cp = Checkpoint.from_line(meta.get("anchor_checkpoint", ""))
    except (ValueError, KeyError, TypeError):
        report.fail(
            anchor_seq,
            "deleted",
            f"records 1..{anchor_seq} are gone and no signed purge checkpoint says who "
            "cut them: a wipe, or a purge by a version before the purge checkpoint",
        )
        return
    if not (cp.purged_by and cp.valid_under(key) and cp.origin == origin):
        report.fail(
            anchor_seq, "bad signature", "the purge checkpoint is not signed by the trusted key"
        )
        return
    if (cp.size, cp.head) != (anchor_seq, anchor_head):
        report.fail(
            anchor_seq,
            "deleted",
            f"the log starts after record {anchor_seq}, but the signed purge cut it at {cp.size}",
        )
        return
    if external and not any(e.signature == cp.signature for e in external):
        report.fail(
            anchor_seq,
            "deleted",
            f"the purge checkpoint at {cp.size} ({cp.ts}) is not in the external checkpoint "
            "file: it was not made by the appliance's purge",
        )
        return
    report.purged = {"through": cp.size, "at": cp.ts, "by": cp.purged_by}


def _roots_at(
    db: sqlite3.Connection, meta: dict[str, str], sizes: set[int]
) -> tuple[dict[int, bytes], set[int]]:
    """The Merkle root of the records at each of ``sizes``, in one pass over them (and
    the sizes before a purge's cut whose roots the kept subtree hashes cannot give)."""
    first = int(meta.get("anchor_seq", "0"))
    known = witness.kept_nodes(meta)
    roots: dict[int, bytes] = {}
    unknown: set[int] = set()
    tree = merkle.Tree(witness.leaf_reader(db.execute), first, known)
    for size in sorted(s for s in sizes if s < first):
        try:
            roots[size] = tree.root(size)
        except merkle.MissingNodes:
            unknown.add(size)
    later = sorted(s for s in sizes if s >= first)
    if not later:
        return roots, unknown
    try:
        frontier = merkle.Frontier.from_nodes(first, known)
    except merkle.MissingNodes:
        return roots, unknown | set(later)
    wanted = iter(later)
    size = next(wanted)
    cursor = db.execute("SELECT hash FROM audit_records ORDER BY seq")
    while True:
        while size == frontier.size:
            roots[size] = frontier.root()
            size = next(wanted, -1)
        rows = cursor.fetchmany(WALK_BATCH) if size > 0 else []
        if not rows:
            break
        for (digest,) in rows:
            frontier.append(merkle.record_leaf(str(digest)))
            if frontier.size == size:
                roots[size] = frontier.root()
                size = next(wanted, -1)
    return roots, unknown


def check_witnessed(
    db: sqlite3.Connection,
    report: Report,
    key: Ed25519PublicKey,
    meta: dict[str, str],
    cosigned_file: Path,
    witness_key: str,
) -> None:
    """The cosignatures kept: each by the trusted witness on a checkpoint the trusted
    key signed, none beyond the records (rolled back), and each root the Merkle root of
    the records now (else they were rewritten after the witness saw them: a fork)."""
    try:
        trusted = witness.Verifier.parse(witness_key)
    except ValueError as exc:
        report.fail(None, "bad witness key", str(exc))
        return
    origin = witness.log_origin(meta.get("origin", ""))
    entries, bad_lines = witness.read_cosigned(cosigned_file)
    if bad_lines:
        report.notes.append(f"unreadable cosignature lines: {', '.join(bad_lines)}")
    mine = [e for e in entries if e.origin == origin]
    if not mine:
        if report.records or report.checkpoints:
            report.fail(
                None,
                "not witnessed",
                f"{cosigned_file} holds no checkpoint of this log cosigned by "
                f"{trusted.name}: never witnessed, or the cosignatures were removed",
            )
        return
    times: dict[int, int] = {}
    for entry in mine:
        if not entry.note.signed_by(origin, key):
            report.fail(
                entry.size,
                "bad signature",
                f"the witnessed checkpoint at size {entry.size} is not signed by the "
                "trusted key for this log",
            )
            return
        stamp = entry.note.cosigned_at(trusted)
        if stamp is None:
            report.fail(
                entry.size,
                "bad cosignature",
                f"the checkpoint at size {entry.size} carries no valid cosignature of "
                f"{trusted.name}",
            )
            return
        times[entry.size] = max(stamp, times.get(entry.size, 0))
    latest = max(mine, key=lambda e: (e.size, times[e.size]))
    when = datetime.fromtimestamp(times[latest.size], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    if latest.size > report.head_seq:
        report.fail(
            report.head_seq + 1,
            "rolled back",
            f"{trusted.name} cosigned {latest.size} records of this log at {when}; the "
            f"log ends at {report.head_seq}: cut short, or an older copy",
        )
        return
    roots, unknown = _roots_at(db, meta, {e.size for e in mine})
    for entry in sorted(mine, key=lambda e: e.size):
        if entry.size in unknown:
            continue
        if roots.get(entry.size) != entry.root:
            at = datetime.fromtimestamp(times[entry.size], UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            report.fail(
                entry.size,
                "forked",
                f"records 1..{entry.size} are not those {trusted.name} cosigned at {at}: "
                "rewritten after the witness saw them (re-signed by whoever holds the key)",
            )
            return
    if unknown:
        report.notes.append(
            f"{len(unknown)} cosigned checkpoint(s) before the purge cut checked by "
            "signature only: the purge kept no Merkle nodes for them"
        )
    if latest.size < report.head_seq:
        report.notes.append(f"records {latest.size + 1}..{report.head_seq} are not witnessed yet")
    report.witnessed = {
        "witness": trusted.name,
        "cosignatures": len(mine),
        "size": latest.size,
        "at": when,
    }


def verify(
    db_path: Path,
    public_key: Ed25519PublicKey | None,
    checkpoint_file: Path | None,
    trust_database_key: bool = False,
    without_external: bool = False,
    witness_key: str = "",
    cosigned_file: Path | None = None,
) -> Report:
    """Verify the log against a trusted public key and the external checkpoint file.
    Without the key (the database's own would let a forger re-sign) or without the file
    (holding this log's checkpoints: else a rollback cannot be caught) it fails, unless
    ``trust_database_key`` or ``without_external`` says to go on, in the notes. With a
    ``witness_key``, the cosignatures kept in ``cosigned_file`` are checked too."""
    report = Report()
    if not db_path.is_file():
        return report.fail(None, "missing", f"audit database {db_path} does not exist")
    try:
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        return report.fail(None, "unreadable", f"{db_path}: {exc}")
    try:
        db.execute("PRAGMA trusted_schema=OFF")
        db.execute("BEGIN")  # one snapshot for the whole check
        meta = dict(db.execute("SELECT name, value FROM audit_meta").fetchall())
        origin = meta.get("origin", "")
        stored_pub = meta.get("signing_public_key")
        if public_key is None:
            if stored_pub is None or not trust_database_key:
                return report.fail(
                    None,
                    "untrusted key",
                    "no trusted public key to check the signatures against: give the "
                    "signing key's .pub kept apart from this machine (--public-key), or "
                    "--trust-database-key to use the key the database names (a forger who "
                    "can write the database re-signs with their own)",
                )
            public_key = crypto.public_from_raw(bytes.fromhex(stored_pub))
            report.notes.append(
                "public key taken from the database itself: a re-signed forgery would pass; "
                "pass --public-key"
            )
        elif stored_pub is not None and stored_pub != crypto.public_raw(public_key).hex():
            report.notes.append("the database names another signing key than the trusted one")
        anchor_seq = int(meta.get("anchor_seq", "0"))
        anchor_head = meta.get("anchor_head", GENESIS)
        external, bad_lines = (
            read_file(checkpoint_file)
            if checkpoint_file is not None and checkpoint_file.is_file()
            else ([], [])
        )
        sealed = {size for (size,) in db.execute("SELECT size FROM audit_checkpoints")}
        wanted = sealed | {cp.size for cp in external}
        hashes = walk_records(db, report, anchor_seq, anchor_head, wanted)
        if anchor_seq or "anchor_checkpoint" in meta:
            _check_purge(report, meta, public_key, origin, anchor_seq, anchor_head, external)
        largest = check_checkpoints(db, report, hashes, public_key, origin, anchor_seq)
        if largest > report.head_seq:
            report.fail(
                report.head_seq + 1,
                "truncated",
                f"records {report.head_seq + 1}..{largest} are missing: the log ends "
                f"at {report.head_seq}, its own checkpoints reach {largest}",
            )
        if bad_lines:
            report.notes.append(f"unreadable checkpoint lines: {', '.join(bad_lines)}")
        if external or checkpoint_file is not None:
            check_external(report, external, hashes, public_key, origin, largest, anchor_seq)
        holds_mine = any(cp.origin == origin for cp in external)
        if report.ok and not holds_mine and (report.records or report.checkpoints):
            missing = checkpoint_file is None or not checkpoint_file.is_file()
            message = (
                f"the external checkpoint file {checkpoint_file} "
                f"{'is missing' if missing else 'holds no checkpoint of this log'}: a "
                "database replaced by an older copy, or cut short, cannot be caught without it"
            )
            if without_external:
                report.notes.append(message)
            else:
                report.fail(None, "no external checkpoints", message + " (--without-external)")
        if report.ok and witness_key and cosigned_file is not None:
            check_witnessed(db, report, public_key, meta, cosigned_file, witness_key)
    except Exception as exc:  # a damaged file must give a failed report, never a crash
        report.fail(None, "unreadable", f"the database cannot be read as an audit log: {exc}")
    finally:
        db.close()
    return report
