"""TLS on the LAN: a local certificate authority and a server certificate made with
`cryptography`, and the rule that a non-loopback address is served only over TLS
unless IT says --insecure-lan."""

from __future__ import annotations

import ipaddress
import socket
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance.config import Settings
from appliance.keyfiles import check_private, write_private

CA_DAYS = 3650
SERVER_DAYS = 825


class TLSError(ValueError):
    """TLS cannot be set up as asked; the message says why and what to do."""


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def tls_enabled(settings: Settings) -> bool:
    if settings.tls == "on":
        return True
    if settings.tls == "off":
        return False
    return not is_loopback(settings.host)


def check_serving(settings: Settings) -> None:
    """Refuse, saying why, to serve the LAN in clear or TLS without its files."""
    if not is_loopback(settings.host) and not tls_enabled(settings) and not settings.insecure_lan:
        raise TLSError(
            f"refusing to serve {settings.host} without TLS: prompts and answers would cross "
            "the network in clear. Run `appliance tls init` (or configure tls_cert and "
            "tls_key) and keep tls=auto, or pass --insecure-lan if something else encrypts "
            "the link."
        )
    if tls_enabled(settings):
        for path in (settings.tls_cert_path, settings.tls_key_path):
            if not path.is_file():
                raise TLSError(f"TLS is on but {path} does not exist: run `appliance tls init`")
        check_private(settings.tls_key_path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Appliance"),
            x509.NameAttribute(NameOID.COMMON_NAME, common),
        ]
    )


def _load_or_make_ca(directory: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key_path, cert_path = directory / "ca.key", directory / "ca.crt"
    if key_path.exists() and cert_path.exists():
        check_private(key_path)
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise TLSError(f"{key_path} is not an EC private key")
        return key, x509.load_pem_x509_certificate(cert_path.read_bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(UTC) - timedelta(minutes=5)
    name = _name(f"Appliance local CA ({socket.gethostname()})")
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key, cert


def _alt_names(settings: Settings, extra: list[str]) -> list[x509.GeneralName]:
    wanted = ["localhost", socket.gethostname(), socket.getfqdn(), "127.0.0.1", "::1"]
    if settings.host not in ("0.0.0.0", "::"):
        wanted.append(settings.host)
    wanted += [n.strip() for n in settings.tls_names.split(",") if n.strip()] + extra
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for item in wanted:
        if not item or item in seen:
            continue
        seen.add(item)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(item)))
        except ValueError:
            names.append(x509.DNSName(item))
    return names


def init_tls(settings: Settings, extra_names: list[str]) -> dict[str, Any]:
    """Make the CA (once) and a fresh server certificate signed by it."""
    directory = settings.tls_dir
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    ca_key, ca_cert = _load_or_make_ca(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    start = datetime.now(UTC) - timedelta(minutes=5)
    alt = _alt_names(settings, extra_names)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(socket.gethostname()))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path, key_path = settings.tls_cert_path, settings.tls_key_path
    key_path.unlink(missing_ok=True)
    write_private(key_path, _key_pem(key))
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.PEM)
        + ca_cert.public_bytes(serialization.Encoding.PEM)
    )
    return {
        "ca": str(directory / "ca.crt"),
        "cert": str(cert_path),
        "key": str(key_path),
        "names": [str(n.value) for n in alt],
        "not_after": cert.not_valid_after_utc.isoformat(),
    }
