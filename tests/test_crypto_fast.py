"""The audit log's keys on real files: where each key comes from (systemd credential,
else a private file, made when allowed), what a bad key file gets (a clear error naming
it), and the wrapping and sealing formats, pinned: data keys and contents written by
one version must open under the next."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.audit import crypto
from appliance.audit.crypto import AuditKeyError, DecryptionFailed

MASTER = bytes(range(32))
DATA_KEY = bytes(range(32, 64))
# wrap(MASTER, "k1", DATA_KEY) as the appliance wrote it: nonce, then the sealed key.
WRAPPED = bytes.fromhex(
    "5d2d3f26a9c59037f1f39189cb4f99b790cd6711a6e72279fe2881993e3d96172a9a91d2390e32b0"
    "6920e62d7b38fd5ab971cbb19d54e02a9f65a928"
)
# seal(DATA_KEY, b'{"input":"hi"}', b"appliance-audit-v1|1|t|k1")
NONCE = bytes.fromhex("519e6b701bed8ccbe3610c64")
SEALED = bytes.fromhex("2de16f901dce4d92d223d8bd64538aefd8d89621898e465bcc28b44810ad")
ROW_AAD = b"appliance-audit-v1|1|t|k1"


def private_file(path: Path, data: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


@pytest.fixture
def no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def test_a_master_key_is_32_raw_bytes_or_64_hex_digits(tmp_path: Path) -> None:
    where = tmp_path / "master.key"
    assert crypto.parse_master_key(MASTER, where) == MASTER
    assert crypto.parse_master_key(MASTER.hex().encode() + b"\n", where) == MASTER
    for bad in (MASTER[:31], MASTER.hex()[:62].encode(), b"\xff" * 64, b"zz" * 32):
        with pytest.raises(AuditKeyError) as caught:
            crypto.parse_master_key(bad, where)
        assert str(caught.value) == (
            f"master key {where} must hold 32 bytes (raw or 64 hex digits)"
        )


def test_a_bad_master_key_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    path = private_file(tmp_path / "master.key", b"too short")
    with pytest.raises(AuditKeyError, match=f"^master key {path} must hold 32 bytes"):
        crypto.load_master_key(path, create=False)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cred = private_file(tmp_path / "audit-master-key", b"too short")
    with pytest.raises(AuditKeyError, match=f"^master key {cred} must hold 32 bytes"):
        crypto.load_master_key(tmp_path / "elsewhere.key", create=False)


@pytest.mark.usefixtures("no_credentials")
def test_a_missing_master_key_is_made_only_when_allowed(tmp_path: Path) -> None:
    path = tmp_path / "keys" / "master.key"
    with pytest.raises(AuditKeyError, match=f"^master key file {path} does not exist$"):
        crypto.load_master_key(path, create=False)
    assert not path.exists()
    key = crypto.load_master_key(path, create=True)
    assert len(key) == 32
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert path.read_bytes() == key.hex().encode() + b"\n"  # 64 hex digits, as documented
    assert crypto.load_master_key(path, create=False) == key
    assert crypto.load_master_key(path, create=True) == key  # made once, then kept


@pytest.mark.usefixtures("no_credentials")
def test_a_key_file_others_can_read_is_refused_by_name(tmp_path: Path) -> None:
    path = private_file(tmp_path / "master.key", MASTER.hex().encode(), 0o640)
    with pytest.raises(AuditKeyError, match=f"key file {path} has mode 0640"):
        crypto.load_master_key(path, create=False)


def test_keys_come_from_systemd_credentials_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert crypto.credential_path("audit-master-key") is None  # no such credential
    private_file(creds / "audit-master-key", MASTER)
    signing = Ed25519PrivateKey.generate()
    pem = signing.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    private_file(creds / "audit-signing-key", pem)
    assert crypto.credential_path("audit-master-key") == creds / "audit-master-key"
    files = tmp_path / "files"  # the file settings name nothing that exists
    assert crypto.load_master_key(files / "master.key", create=False) == MASTER
    loaded = crypto.load_signing_key(files / "signing.pem", create=False)
    assert crypto.public_raw(loaded.public_key()) == crypto.public_raw(signing.public_key())
    assert not files.exists()  # nothing made beside a credential
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "")
    assert crypto.credential_path("audit-master-key") is None


@pytest.mark.usefixtures("no_credentials")
def test_a_signing_key_is_made_with_its_public_half_beside_it(tmp_path: Path) -> None:
    path = tmp_path / "audit-signing.pem"
    with pytest.raises(AuditKeyError, match=f"^checkpoint signing key {path} does not exist$"):
        crypto.load_signing_key(path, create=False)
    key = crypto.load_signing_key(path, create=True)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    public = crypto.load_public_key(tmp_path / "audit-signing.pub")
    assert crypto.public_raw(public) == crypto.public_raw(key.public_key())
    again = crypto.load_signing_key(path, create=False)
    assert crypto.public_raw(again.public_key()) == crypto.public_raw(key.public_key())


@pytest.mark.usefixtures("no_credentials")
def test_a_signing_key_that_is_not_ed25519_pem_is_refused(tmp_path: Path) -> None:
    garbage = private_file(tmp_path / "garbage.pem", b"not a key")
    with pytest.raises(AuditKeyError, match=f"^checkpoint signing key {garbage} is not a PEM"):
        crypto.load_signing_key(garbage, create=False)
    other = ec.generate_private_key(ec.SECP256R1())
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    wrong = private_file(tmp_path / "ec.pem", pem)
    with pytest.raises(AuditKeyError, match=f"^checkpoint signing key {wrong} is not an Ed25519"):
        crypto.load_signing_key(wrong, create=False)
    public = tmp_path / "ec.pub"
    public.write_bytes(
        other.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    with pytest.raises(AuditKeyError, match=f"^public key {public} is not an Ed25519 key$"):
        crypto.load_public_key(public)
    with pytest.raises(AuditKeyError, match=f"^public key {garbage} cannot be read: "):
        crypto.load_public_key(garbage)
    with pytest.raises(AuditKeyError, match="cannot be read"):
        crypto.load_public_key(tmp_path / "absent.pub")


def test_a_public_key_round_trips_and_has_a_stable_fingerprint() -> None:
    key = Ed25519PrivateKey.from_private_bytes(bytes(range(32))).public_key()
    raw = crypto.public_raw(key)
    assert len(raw) == 32
    assert crypto.public_raw(crypto.public_from_raw(raw)) == raw
    assert crypto.fingerprint(key) == "56475aa75463474c"


def test_signatures_verify_only_for_their_message_and_key() -> None:
    key = Ed25519PrivateKey.generate()
    signature = key.sign(b"checkpoint")
    assert crypto.verify_signature(key.public_key(), signature, b"checkpoint")
    assert not crypto.verify_signature(key.public_key(), signature, b"checkpoinT")
    other = Ed25519PrivateKey.generate().public_key()
    assert not crypto.verify_signature(other, signature, b"checkpoint")


def test_data_keys_are_fresh_256_bit_keys() -> None:
    keys = {crypto.new_data_key() for _ in range(8)}
    assert len(keys) == 8
    assert all(len(k) == 32 for k in keys)


def test_a_data_key_wrapped_earlier_still_unwraps() -> None:
    assert crypto.unwrap(MASTER, "k1", WRAPPED) == DATA_KEY


def test_a_wrapped_key_opens_only_under_its_master_key_and_id() -> None:
    wrapped = crypto.wrap(MASTER, "k2", DATA_KEY)
    assert len(wrapped) == 12 + 32 + 16  # nonce, key, tag
    assert wrapped != crypto.wrap(MASTER, "k2", DATA_KEY)  # a fresh nonce each time
    assert crypto.unwrap(MASTER, "k2", wrapped) == DATA_KEY
    message = "^data key k1 does not open under this master key \\(wrong master key\\?\\)$"
    with pytest.raises(AuditKeyError, match=message):
        crypto.unwrap(MASTER, "k1", wrapped)  # another key's slot
    with pytest.raises(AuditKeyError, match="wrong master key"):
        crypto.unwrap(DATA_KEY, "k2", wrapped)


def test_content_sealed_earlier_still_opens() -> None:
    assert crypto.open_sealed(DATA_KEY, NONCE, SEALED, ROW_AAD) == b'{"input":"hi"}'


def test_sealed_content_opens_only_in_its_own_row() -> None:
    first = crypto.seal(DATA_KEY, b"secret", ROW_AAD)
    second = crypto.seal(DATA_KEY, b"secret", ROW_AAD)
    assert len(first.nonce) == 12
    assert first.nonce != second.nonce and first.ciphertext != second.ciphertext
    assert b"secret" not in first.ciphertext
    assert crypto.open_sealed(DATA_KEY, first.nonce, first.ciphertext, ROW_AAD) == b"secret"
    with pytest.raises(DecryptionFailed, match=r"^ciphertext does not open under its key and row$"):
        crypto.open_sealed(DATA_KEY, first.nonce, first.ciphertext, ROW_AAD + b"2")
    with pytest.raises(DecryptionFailed):
        crypto.open_sealed(MASTER, first.nonce, first.ciphertext, ROW_AAD)


def test_base64_is_strict() -> None:
    assert crypto.b64(b"\x00\xffsig") == "AP9zaWc="
    assert crypto.unb64("AP9zaWc=") == b"\x00\xffsig"
    with pytest.raises(ValueError):
        crypto.unb64("AP9z aWc=")  # not base64: refused, not skipped over


def test_permissions_are_checked_on_the_credential_too(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cred = private_file(tmp_path / "audit-master-key", MASTER, 0o644)
    with pytest.raises(AuditKeyError, match=f"key file {cred} has mode 0644"):
        crypto.load_master_key(tmp_path / "elsewhere.key", create=False)
