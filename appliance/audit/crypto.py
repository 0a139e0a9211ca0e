"""Keys of the audit log: the master key (wraps data keys; never in the database), the
data keys (AES-256-GCM per record), the Ed25519 key that signs checkpoints.

Keys come from a systemd credential ($CREDENTIALS_DIRECTORY) when one is there, else
from a file that must not be readable by group or others.
"""

from __future__ import annotations

import base64
import hashlib
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from appliance.keyfiles import KeyFileError, check_private, fsync_dir, write_private

MASTER_CREDENTIAL = "audit-master-key"
SIGNING_CREDENTIAL = "audit-signing-key"
NONCE_BYTES = 12
KEY_BYTES = 32


class AuditKeyError(KeyFileError):
    """A key cannot be used; the message says which file and why."""


class DecryptionFailed(Exception):
    """A ciphertext does not open under its key and associated data."""


def credential_path(name: str) -> Path | None:
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    if directory and (Path(directory) / name).is_file():
        return Path(directory) / name
    return None


def _read_key_file(path: Path) -> bytes:
    try:
        check_private(path)
    except KeyFileError as exc:
        raise AuditKeyError(str(exc)) from None
    return path.read_bytes()


def parse_master_key(data: bytes, where: Path) -> bytes:
    text = data.strip()
    if len(data) == KEY_BYTES:
        return data
    try:
        key = bytes.fromhex(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != KEY_BYTES:
        raise AuditKeyError(f"master key {where} must hold 32 bytes (raw or 64 hex digits)")
    return key


def load_master_key(path: Path, create: bool) -> bytes:
    """The master key from the systemd credential, or the file (created if allowed)."""
    cred = credential_path(MASTER_CREDENTIAL)
    if cred is not None:
        return parse_master_key(_read_key_file(cred), cred)
    if not path.exists():
        if not create:
            raise AuditKeyError(f"master key file {path} does not exist")
        write_private(path, secrets.token_bytes(KEY_BYTES).hex().encode() + b"\n")
    return parse_master_key(_read_key_file(path), path)


def load_signing_key(path: Path, create: bool) -> Ed25519PrivateKey:
    cred = credential_path(SIGNING_CREDENTIAL)
    source = cred or path
    if cred is None and not path.exists():
        if not create:
            raise AuditKeyError(f"checkpoint signing key {path} does not exist")
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        write_private(path, pem)
        write_public_key(path.with_suffix(".pub"), key.public_key())
    try:
        loaded = serialization.load_pem_private_key(_read_key_file(source), password=None)
    except ValueError as exc:
        raise AuditKeyError(
            f"checkpoint signing key {source} is not a PEM private key: {exc}"
        ) from None
    if not isinstance(loaded, Ed25519PrivateKey):
        raise AuditKeyError(f"checkpoint signing key {source} is not an Ed25519 key")
    return loaded


def public_from_raw(raw: bytes) -> Ed25519PublicKey:
    return Ed25519PublicKey.from_public_bytes(raw)


def public_raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(key: Ed25519PublicKey) -> str:
    return hashlib.sha256(public_raw(key)).hexdigest()[:16]


def write_public_key(path: Path, key: Ed25519PublicKey) -> None:
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # Whole or not at all, and durable: a power cut on first start must not leave an
    # empty key file that verification then trips on.
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        fh.write(pem)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise AuditKeyError(f"public key {path} cannot be read: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise AuditKeyError(f"public key {path} is not an Ed25519 key")
    return key


def verify_signature(key: Ed25519PublicKey, signature: bytes, message: bytes) -> bool:
    try:
        key.verify(signature, message)
    except InvalidSignature:
        return False
    return True


def new_data_key() -> bytes:
    return AESGCM.generate_key(bit_length=256)


def _wrap_aad(key_id: str) -> bytes:
    return b"appliance-audit-data-key|" + key_id.encode()


def wrap(master: bytes, key_id: str, data_key: bytes) -> bytes:
    nonce = secrets.token_bytes(NONCE_BYTES)
    return nonce + AESGCM(master).encrypt(nonce, data_key, _wrap_aad(key_id))


def unwrap(master: bytes, key_id: str, wrapped: bytes) -> bytes:
    try:
        return AESGCM(master).decrypt(
            wrapped[:NONCE_BYTES], wrapped[NONCE_BYTES:], _wrap_aad(key_id)
        )
    except InvalidTag:
        raise AuditKeyError(
            f"data key {key_id} does not open under this master key (wrong master key?)"
        ) from None


@dataclass
class Sealed:
    nonce: bytes
    ciphertext: bytes


def seal(data_key: bytes, plaintext: bytes, aad: bytes) -> Sealed:
    return seal_with(AESGCM(data_key), plaintext, aad)


def seal_with(aead: AESGCM, plaintext: bytes, aad: bytes) -> Sealed:
    """seal() with the key's cipher made once (the writer keeps one per data key)."""
    nonce = secrets.token_bytes(NONCE_BYTES)
    return Sealed(nonce, aead.encrypt(nonce, plaintext, aad))


def open_sealed(data_key: bytes, nonce: bytes, ciphertext: bytes, aad: bytes) -> bytes:
    try:
        return AESGCM(data_key).decrypt(nonce, ciphertext, aad)
    except InvalidTag:
        raise DecryptionFailed("ciphertext does not open under its key and row") from None


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)
