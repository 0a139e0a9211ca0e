"""Key files survive a cut-short first start: written whole (temporary file, fsync,
rename, directory fsync), and an empty public key left by an older build is rewritten."""

from __future__ import annotations

from pathlib import Path

from appliance.audit import crypto
from appliance.audit.store import AuditStore
from appliance.config import load_settings


def test_an_empty_public_key_is_written_again(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"state_dir": tmp_path / "state"})
    AuditStore(settings).close()
    pub = settings.signing_public_key_path
    good = pub.read_bytes()
    pub.write_bytes(b"")  # what a power cut between create and write could leave
    AuditStore(settings).close()
    assert pub.read_bytes() == good
    crypto.load_public_key(pub)  # verification can read it
    assert not pub.with_name(pub.name + ".tmp").exists()
