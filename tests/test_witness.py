"""Witnessed audit (#21): the RFC 6962 tree and its proofs, the C2SP tlog-witness
exchange with a witness written for the tests (tests/witness.py: it keeps only size
and root per log), a rolled-back or forked log refused by it, and `audit verify`
checking the cosignatures kept against the records."""

from __future__ import annotations

import hashlib
import json
import shutil
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from witness import Witness, consistent

from appliance.audit import chain, crypto, merkle
from appliance.audit import witness as client
from appliance.audit.chain import Checkpoint, Report
from appliance.audit.records import FIELDS, GENESIS, Entry, record_hash
from appliance.audit.store import AuditStore, record_admin
from appliance.config import Settings, load_settings

from helpers import Server, ServerFactory, run_cli, wait_for

# -- the tree ------------------------------------------------------------------------

# RFC 6962's reference leaves and tree heads (the Certificate Transparency test data).
DATA = ["", "00", "10", "2021", "3031", "40414243", "5051525354555657"]
DATA.append("606162636465666768696a6b6c6d6e6f")
ROOTS = [
    "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
INCLUSION = {
    (0, 8): [
        "96a296d224f285c67bee93c30f8a309157f0daa35dc5b87e410b78630a09cfc7",
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (5, 8): [
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
}
CONSISTENCY = {
    (2, 8): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "6b47aaf29ee3c2af9af889bc1fb9254dabd31177f16232dd6aab035ca39bf6e4",
    ],
    (6, 8): [
        "0ebc5d3437fbe2db158b9f126a1d118e308181031d0a949f8dededebc558ef6a",
        "ca854ea128ed050b41b35ffc1b87b8eb2bde461e9e3b5596ece6b9d5975a0ae0",
        "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    ],
    (2, 5): [
        "5f083f0a1a33ca076a95279832580db3e0ef4584bdff1f54c8a360f50de3031e",
        "bc1a0643b12e4d2d7c77918f44e0f4f79a838b6cf9ec5b5c283e1f4d88599e6b",
    ],
}


def list_tree(leaves: list[bytes]) -> merkle.Tree:
    return merkle.Tree(lambda a, b: leaves[a:b])


def test_the_tree_is_rfc_6962s() -> None:
    leaves = [merkle.leaf_hash(bytes.fromhex(d)) for d in DATA]
    tree = list_tree(leaves)
    for size, root in enumerate(ROOTS):
        assert tree.root(size).hex() == root == merkle.root_of(leaves[:size]).hex()
    for (index, size), proof in INCLUSION.items():
        assert [h.hex() for h in tree.inclusion_proof(index, size)] == proof
        hashes = [bytes.fromhex(h) for h in proof]
        root = bytes.fromhex(ROOTS[size])
        assert merkle.verify_inclusion(leaves[index], index, size, hashes, root)
    for (old, new), proof in CONSISTENCY.items():
        assert [h.hex() for h in tree.consistency_proof(old, new)] == proof
        hashes = [bytes.fromhex(h) for h in proof]
        roots = bytes.fromhex(ROOTS[old]), bytes.fromhex(ROOTS[new])
        assert merkle.verify_consistency(old, new, *roots, hashes)
        assert consistent(old, new, *roots, hashes)


def _tampered(proof: list[bytes]) -> Iterator[list[bytes]]:
    for i in range(len(proof)):
        flipped = list(proof)
        flipped[i] = bytes([proof[i][0] ^ 1]) + proof[i][1:]
        yield flipped
    if proof:
        yield proof[:-1]
        yield proof[1:]
        yield proof[::-1] if len(proof) > 1 and proof[0] != proof[-1] else proof[:-1]
    yield [*proof, hashlib.sha256(b"extra").digest()]


def test_every_proof_verifies_and_no_tampered_one_does() -> None:
    """Every (m, n) consistency proof and (i, n) inclusion proof up to 40 leaves, by
    the product's verifier and by the test witness's own; then each tampered proof,
    wrong root and wrong size refused by both."""
    n_max = 40
    leaves = [merkle.leaf_hash(i.to_bytes(2, "big")) for i in range(n_max)]
    tree = list_tree(leaves)
    roots = [tree.root(n) for n in range(n_max + 1)]
    for n in range(1, n_max + 1):
        for i in range(n):
            proof = tree.inclusion_proof(i, n)
            assert merkle.verify_inclusion(leaves[i], i, n, proof, roots[n])
            assert not merkle.verify_inclusion(leaves[i], i, n, proof, roots[n - 1])
            assert not merkle.verify_inclusion(leaves[(i + 1) % n], i, n, proof, roots[n]) or n == 1
            for bad in _tampered(proof):
                assert not merkle.verify_inclusion(leaves[i], i, n, bad, roots[n]), (i, n)
            if n & (n - 1) == 0:  # the same path, claimed in a tree twice the size
                assert not merkle.verify_inclusion(leaves[i], i, 2 * n, proof, roots[n])
        for m in range(n + 1):
            proof = tree.consistency_proof(m, n)
            assert len(proof) <= 63
            for check in (merkle.verify_consistency, consistent):
                assert check(m, n, roots[m], roots[n], proof), (check, m, n)
                if m == 0:
                    continue
                assert not check(m, n, roots[m - 1], roots[n], proof), (m, n)
                if m < n:
                    assert not check(m, n, roots[m], roots[n - 1], proof), (m, n)
                    for bad in _tampered(proof):
                        assert not check(m, n, roots[m], roots[n], bad), (check, m, n, bad)


def test_a_tree_reads_few_leaves_and_survives_a_purge() -> None:
    """After the first root, the next checkpoint reads at most CHUNK leaves; a tree whose
    leaves before a cut are gone gives the same roots and proofs from the hashes a purge
    keeps (from the cut, and from the size the witness held before it)."""
    n = 5000
    leaves = [merkle.leaf_hash(i.to_bytes(4, "big")) for i in range(n + 50)]
    reads: list[int] = []

    def read(a: int, b: int) -> list[bytes]:
        reads.append(b - a)
        return leaves[a:b]

    tree = merkle.Tree(read)
    full = merkle.root_of(leaves[:n])
    assert tree.root(n) == full and sum(reads) == n
    reads.clear()
    assert tree.root(n + 50) == merkle.root_of(leaves)
    assert sum(reads) <= merkle.CHUNK + 50, reads

    cut, witnessed = 3001, 1234
    kept = list_tree(leaves).nodes_for([witnessed], cut)
    assert len(kept) < 40

    def after_cut(a: int, b: int) -> list[bytes]:
        if a < cut:
            raise merkle.MissingNodes(f"leaf {a} is purged")
        return leaves[a:b]

    purged = merkle.Tree(after_cut, cut, kept)
    whole = list_tree(leaves)
    for size in (cut, cut + 1, 4096, n + 50):
        assert purged.root(size) == whole.root(size)
        assert purged.consistency_proof(witnessed, size) == whole.consistency_proof(witnessed, size)
        assert purged.consistency_proof(cut, size) == whole.consistency_proof(cut, size)
    frontier = merkle.Frontier.from_nodes(cut, kept)
    for leaf in leaves[cut:n]:
        frontier.append(leaf)
    assert frontier.root() == full
    with pytest.raises(merkle.MissingNodes):
        purged.consistency_proof(witnessed - 1, n)  # a size nobody kept nodes for


# -- the exchange with a witness, on a real audit log ----------------------------------


class Box:
    """An audit log with a witness (the test's), as the appliance keeps it."""

    def __init__(self, root: Path, witness: Witness, **overrides: Any) -> None:
        self.witness = witness
        self.settings = load_settings(
            env={},
            overrides={
                "state_dir": root,
                "checkpoint_records": 5,
                "witness_url": witness.url,
                "witness_key": witness.vkey,
                **overrides,
            },
        )
        self.store = AuditStore(self.settings)
        self.origin = client.log_origin(self.store.origin)
        self.vkey = client.log_vkey(self.origin, self.store.signing_key.public_key())
        witness.trust(self.vkey)
        self.count = 0

    def add(self, n: int) -> None:
        for _ in range(n):
            self.count += 1
            self.store.append(
                Entry(kind="event", request_id=f"r{self.count}", status=200, content={"q": 1})
            )

    def cosign(self) -> client.Cosigned:
        return client.WitnessClient(self.settings, self.store).cosign()

    def verify(self, witness_key: str | None = None) -> Report:
        key = crypto.load_public_key(self.settings.signing_public_key_path)
        return chain.verify(
            self.settings.audit_db_path,
            key,
            self.settings.checkpoint_path,
            witness_key=self.witness.vkey if witness_key is None else witness_key,
            cosigned_file=client.cosigned_path(self.settings),
        )


@pytest.fixture
def witness() -> Iterator[Witness]:
    w = Witness().start()
    yield w
    w.stop()


@pytest.fixture
def box(tmp_path: Path, witness: Witness) -> Iterator[Box]:
    b = Box(tmp_path / "state", witness)
    yield b
    b.store.close()


def post(witness: Witness, body: str) -> httpx.Response:
    return httpx.post(f"{witness.url}/add-checkpoint", content=body.encode(), timeout=10)


def request(box: Box, old: int, size: int, root: bytes, proof: list[bytes] | None = None) -> str:
    """An add-checkpoint body, signed with the box's key."""
    proof = proof or []
    body = client.checkpoint_body(box.origin, size, root)
    note = client.sign_note(body, box.origin, box.store.signing_key)
    return f"old {old}\n" + "".join(f"{crypto.b64(h)}\n" for h in proof) + "\n" + note


def db_tree(settings: Settings) -> tuple[merkle.Tree, sqlite3.Connection]:
    conn = sqlite3.connect(settings.audit_db_path)
    return merkle.Tree(client.leaf_reader(conn.execute)), conn


def test_cosigned_checkpoints_verify(box: Box) -> None:
    box.add(12)
    first = box.cosign()
    box.add(9)
    second = box.cosign()  # with a consistency proof from the first
    assert first.size < second.size and box.witness.statuses() == [200, 200]
    assert box.witness.latest[box.origin] == (second.size, second.root)
    report = box.verify()
    assert report.ok, report.problem
    assert report.witnessed is not None
    assert (report.witnessed["cosignatures"], report.witnessed["size"]) == (2, second.size)
    kept = client.read_cosigned(client.cosigned_path(box.settings))[0]
    assert [c.size for c in kept] == [first.size, second.size]
    assert all(c.note.cosigned_at(client.Verifier.parse(box.witness.vkey)) for c in kept)
    # verify checks the cosignatures against the configured key, not any key
    impostor = Witness(name=box.witness.name).vkey
    report = box.verify(witness_key=impostor)
    assert not report.ok and report.problem is not None
    assert (report.problem.kind, report.problem.seq) == ("bad cosignature", first.size)
    # ... and the client keeps none but the configured witness's
    box.add(1)
    with pytest.raises(client.WitnessError):
        client.WitnessClient(replace(box.settings, witness_key=impostor), box.store).cosign()
    assert len(client.read_cosigned(client.cosigned_path(box.settings))[0]) == 2
    # a kept checkpoint whose log signature is not the trusted key's fails verify
    path = client.cosigned_path(box.settings)
    mine = f"{client.DASH} {box.origin} "
    other = client.sign_note(kept[0].note.body, box.origin, Ed25519PrivateKey.generate())
    forged = [json.loads(line) for line in path.read_text().splitlines()]
    forged[0]["note"] = other + "".join(
        line + "\n"
        for line in forged[0]["note"].splitlines()
        if line.startswith(client.DASH) and not line.startswith(mine)
    )
    path.write_text("".join(json.dumps(entry) + "\n" for entry in forged))
    report = box.verify()
    assert not report.ok and report.problem is not None
    assert (report.problem.kind, report.problem.seq) == ("bad signature", first.size)


def test_the_witness_answers_as_the_spec_says(box: Box, tmp_path: Path) -> None:
    box.add(6)
    tree, conn = db_tree(box.settings)
    with conn:
        root6, root3 = tree.root(6), tree.root(3)
    assert post(box.witness, "garbage").status_code == 400
    assert post(box.witness, request(box, 7, 6, root6)).status_code == 400  # old > size
    assert post(box.witness, request(box, 0, 0, root6)).status_code == 422  # empty tree
    assert post(box.witness, request(box, 0, 6, root6, [root3])).status_code == 422
    elsewhere = Witness().start()
    stranger = Box(tmp_path / "other", elsewhere)  # a log this witness does not know
    elsewhere.stop()
    assert post(box.witness, request(stranger, 0, 6, root6)).status_code == 404
    forged = request(box, 0, 6, root6).replace(
        client.checkpoint_body(box.origin, 6, root6), client.checkpoint_body(box.origin, 6, root3)
    )
    assert post(box.witness, forged).status_code == 403  # a bad signature of its key
    stranger.store.close()
    ok = post(box.witness, request(box, 0, 3, root3))
    assert ok.status_code == 200
    note = client.Note.parse(request(box, 0, 3, root3).partition("\n\n")[2] + ok.text)
    stamp = note.cosigned_at(client.Verifier.parse(box.witness.vkey))
    assert stamp is not None and abs(stamp - time.time()) < 60
    stale = post(box.witness, request(box, 0, 6, root6))
    assert stale.status_code == 409
    assert stale.headers["Content-Type"] == "text/x.tlog.size" and stale.text == "3\n"
    assert box.witness.latest[box.origin] == (3, root3)  # nothing else moved it


def rewrite_history(settings: Settings, seq: int) -> None:
    """What an attacker with the checkpoint key does: change record ``seq``, re-chain
    every record after it and re-sign every checkpoint, in the database and the file."""
    key = crypto.load_signing_key(settings.signing_key_path, create=False)
    cols = (*FIELDS, "hash")
    conn = sqlite3.connect(settings.audit_db_path, isolation_level=None)
    rows = conn.execute(
        f"SELECT {', '.join(cols)} FROM audit_records WHERE seq >= ? ORDER BY seq", (seq,)
    ).fetchall()
    prev = conn.execute("SELECT hash FROM audit_records WHERE seq = ?", (seq - 1,)).fetchone()
    link = prev[0] if prev else GENESIS
    heads: dict[int, str] = {}
    conn.execute("BEGIN")
    for values in rows:
        record = dict(zip(cols, values, strict=True))
        if record["seq"] == seq:
            record["status"] = 204
        record["prev_hash"] = link
        link = record_hash(tuple(record[f] for f in FIELDS))
        conn.execute(
            "UPDATE audit_records SET status = ?, prev_hash = ?, hash = ? WHERE seq = ?",
            (record["status"], record["prev_hash"], link, record["seq"]),
        )
        heads[int(record["seq"])] = link
    for cid, *fields in conn.execute(
        "SELECT id, origin, size, head, ts, key, signature FROM audit_checkpoints"
    ).fetchall():
        cp = Checkpoint(*fields)
        if cp.size in heads:
            cp = replace(cp, head=heads[cp.size]).signed(key)
            conn.execute(
                "UPDATE audit_checkpoints SET head = ?, signature = ? WHERE id = ?",
                (cp.head, cp.signature, cid),
            )
    conn.execute("COMMIT")
    conn.close()
    external = chain.read_file(settings.checkpoint_path)[0]
    lines = [
        (replace(cp, head=heads[cp.size]).signed(key) if cp.size in heads else cp).line()
        for cp in external
    ]
    settings.checkpoint_path.write_text("\n".join(lines) + "\n")


def test_a_forked_log_is_refused_and_verify_sees_it(box: Box) -> None:
    box.add(20)
    cosigned = box.cosign()
    box.store.close()
    rewrite_history(box.settings, 7)
    # The chain and every signature verify: only the witness knows better.
    assert box.verify(witness_key="").ok
    box.store = AuditStore(box.settings)
    with pytest.raises(client.WitnessRefused) as refused:
        box.cosign()  # same size, another root
    assert refused.value.status == 422
    box.add(3)
    with pytest.raises(client.WitnessRefused) as refused:
        box.cosign()  # grown, with a proof from the forked tree
    assert refused.value.status == 422
    assert box.witness.latest[box.origin] == (cosigned.size, cosigned.root)
    report = box.verify()
    assert not report.ok and report.problem is not None
    assert (report.problem.kind, report.problem.seq) == ("forked", cosigned.size)


def test_a_rolled_back_log_is_refused(box: Box, tmp_path: Path) -> None:
    """The whole state put back to an older copy (database, checkpoint and cosignature
    files): it verifies on its own, and the witness refuses to go back."""
    box.add(8)
    box.cosign()
    box.store.close()
    older = tmp_path / "older"
    shutil.copytree(box.settings.state_dir, older)
    box.store = AuditStore(box.settings)
    box.add(10)
    ahead = box.cosign()
    box.store.close()
    newer = tmp_path / "newer.jsonl"
    cosigned = client.cosigned_path(box.settings)
    shutil.copy(cosigned, newer)
    shutil.rmtree(box.settings.state_dir)
    shutil.copytree(older, box.settings.state_dir)
    assert box.verify().ok  # on its own, the older copy is a fine log
    box.store = AuditStore(box.settings)
    with pytest.raises(client.WitnessRefused) as refused:
        box.cosign()  # 409 (the witness holds more), then the log cannot reach it
    assert "rolled back" in str(refused.value)
    assert box.witness.statuses()[-1] == 409
    tree, conn = db_tree(box.settings)
    with conn:
        size = int(conn.execute("SELECT MAX(seq) FROM audit_records").fetchone()[0])
        root = tree.root(size)
    assert size < ahead.size
    assert post(box.witness, request(box, ahead.size, size, root)).status_code == 400
    assert box.witness.latest[box.origin] == (ahead.size, ahead.root)
    # With the cosignatures kept elsewhere (not rolled back with it), verify sees it too.
    shutil.copy(newer, cosigned)
    report = box.verify()
    assert not report.ok and report.problem is not None
    assert (report.problem.kind, report.problem.seq) == ("rolled back", size + 1)


def test_purges_keep_the_log_witnessable(box: Box) -> None:
    """A purge keeps the subtree hashes that later proofs need: from the cut, and from
    a witness left behind it (away when the purge ran)."""
    box.add(5)
    box.cosign()  # the witness holds 5
    box.add(20)
    conn = sqlite3.connect(box.settings.audit_db_path)
    cut_ts = conn.execute("SELECT ts FROM audit_records WHERE seq = 12").fetchone()[0]
    conn.close()
    assert box.store.purge_before(cut_ts, "os:it") == 11  # the witness is behind the cut
    box.add(2)
    box.cosign()  # a proof from 5 without records 1..11
    report = box.verify()
    assert report.ok, report.problem
    assert report.purged is not None and report.witnessed is not None
    conn = sqlite3.connect(box.settings.audit_db_path)
    cut_ts = conn.execute("SELECT ts FROM audit_records WHERE seq = 20").fetchone()[0]
    conn.close()
    assert box.store.purge_before(cut_ts, "os:it") == 19  # a second purge, witness ahead
    box.add(1)
    box.cosign()
    report = box.verify()
    assert report.ok, report.problem


def test_high_value_actions_are_witnessed_at_once(box: Box) -> None:
    box.add(3)
    record_admin(box.store, "audit show", {"seq": 1})  # an ordinary one waits for the timer
    assert box.witness.statuses() == []
    seq = record_admin(box.store, "models.promote", {"name": "x"})
    assert box.witness.latest[box.origin][0] == seq


def test_the_timer_retries_until_the_witness_answers(box: Box) -> None:
    """Refused (the witness does not know the log yet), then known: cosigned on the
    next try, within the backoff, with no request waiting on it."""
    box.witness.logs.clear()
    box.add(4)
    c = client.WitnessClient(replace(box.settings, witness_interval=2), box.store)
    c.start()
    try:
        assert wait_for(lambda: box.witness.statuses()[-1:] == [404], 10)
        # The client takes in the refusal after the witness has answered it: wait on that.
        assert wait_for(lambda: c.last_error is not None, 10)
        assert c.backlog()[0] == 4
        box.witness.trust(box.vkey)
        started = time.monotonic()
        assert wait_for(lambda: c.backlog()[0] == 0, 10)
        assert time.monotonic() - started <= 2 + 3  # the next try, not a later one
        assert c.last_error is None
    finally:
        c.stop(final_timeout=0)


# -- the real server -------------------------------------------------------------------


@pytest.mark.server
def test_the_server_cosigns_and_verify_checks_it(
    server_factory: ServerFactory, state_dir: Path, model_name: str, default_model: Any
) -> None:
    interval = 2
    made = run_cli("audit", "log-key", "--json", state=state_dir)
    assert made.returncode == 0, made.stderr
    log = json.loads(made.stdout)
    w = Witness().start()
    try:
        w.trust(log["vkey"])
        flags = ("--witness-url", w.url, "--witness-key", w.vkey)
        server: Server = server_factory(state_dir, *flags, "--witness-interval", str(interval))
        for _ in range(2):
            answer = server.http.post(
                "/v1/chat/completions",
                json={
                    "model": model_name,
                    "messages": [{"role": "user", "content": "Say hi."}],
                    "max_tokens": 4,
                },
            )
            assert answer.status_code == 200
        answered = time.monotonic()
        conn = sqlite3.connect(state_dir / "audit" / "audit.db")
        head = conn.execute("SELECT MAX(seq) FROM audit_records").fetchone()[0]
        conn.close()
        assert wait_for(lambda: w.latest.get(log["origin"], (0,))[0] >= head, interval + 3)
        assert time.monotonic() - answered <= interval + 3
        # The witness counts the checkpoint before it replies; the appliance keeps the
        # cosignature once the reply is in, so its side is read when it has caught up.

        def verified() -> dict[str, Any]:
            return server.http.get("/audit/verify").json()  # what an auditor's tool sees

        assert wait_for(lambda: (verified().get("witnessed") or {}).get("size", 0) >= head, 5)
        over_api = verified()
        assert over_api["ok"] and over_api["witnessed"]["size"] >= head, over_api
        metrics = server.http.get("/metrics").text
        assert "appliance_audit_witness_ok 1.0" in metrics
        assert server.stop() == 0
        env_flags = ("--witness-key", w.vkey)
        checked = run_cli("audit", "verify", "--json", *env_flags, state=state_dir)
        report = json.loads(checked.stdout)
        assert checked.returncode == 0 and report["ok"], report
        assert report["witnessed"]["size"] >= head
        settings = load_settings(env={}, overrides={"state_dir": state_dir})
        rewrite_history(settings, 2)
        assert run_cli("audit", "verify", state=state_dir).returncode == 0  # chain alone: fine
        again = run_cli("audit", "cosign", *flags, state=state_dir)
        assert again.returncode == 1 and "REFUSED" in again.stderr, again.stderr
        assert w.statuses()[-1] == 422
        failed = run_cli("audit", "verify", *env_flags, state=state_dir)
        assert failed.returncode == 1 and "forked" in failed.stdout, failed.stdout
    finally:
        w.stop()
