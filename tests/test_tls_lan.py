"""TLS on a real LAN address: the server in a network namespace of its own on
10.78.0.1, the client in another, joined by a veth pair. `tls = auto` turns TLS on for
a non-loopback address (a client verifying against the appliance's CA is served, one
speaking clear HTTP is not), and a site's own certificate (`tls_cert`, `tls_key`, signed
by the site's CA) is what the server presents instead."""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.fleet import enter_netns, wait_until
from tests.helpers import admin_token, run_cli

pytestmark = [
    pytest.mark.server,
    pytest.mark.netns("10.78.0.0/24"),
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root: network namespaces (ip netns)"),
]
SERVER, CLIENT, PORT = "10.78.0.1", "10.78.0.2", 8443


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@pytest.fixture
def lan() -> Iterator[tuple[str, ThreadPoolExecutor]]:
    """Two namespaces on one veth pair; the pool's threads live in the client's."""
    tag = f"tl{os.getpid() % 10000}"
    server, client = f"{tag}-srv", f"{tag}-cli"
    for ns in (server, client):
        ip("netns", "add", ns)
    try:
        ip("link", "add", f"{tag}s", "type", "veth", "peer", "name", f"{tag}c")
        for ns, end, address in ((server, f"{tag}s", SERVER), (client, f"{tag}c", CLIENT)):
            ip("link", "set", end, "netns", ns)
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", end)
            ip("-n", ns, "link", "set", end, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        with ThreadPoolExecutor(4, initializer=enter_netns, initargs=(client,)) as pool:
            yield server, pool
    finally:
        for ns in (server, client):
            subprocess.run(["ip", "netns", "del", ns], check=False, timeout=30)


def serve(ns: str, state: Path, *flags: str) -> subprocess.Popen[bytes]:
    cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "appliance", "serve"]
    cmd += ["--state-dir", str(state), "--host", SERVER, "--port", str(PORT), *flags]
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    log = (state.parent / "serve.log").open("wb")
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    assert proc.wait(60) == 0


def site_ca(work: Path) -> tuple[Path, Path, Path]:
    """The site's own CA and a server certificate it signed, for its own name and the
    LAN address: what a hospital's PKI hands IT."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Ward 7 site CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "appliance.ward7")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("appliance.ward7"), x509.IPAddress(ipaddress.ip_address(SERVER))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = work / "site-ca.crt", work / "site.crt", work / "site.key"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_path, cert_path, key_path


def ready(pool: ThreadPoolExecutor, ca: Path) -> bool:
    url = f"https://{SERVER}:{PORT}/readyz"
    context = ssl.create_default_context(cafile=str(ca))
    return (
        pool.submit(lambda: httpx.get(url, verify=context, timeout=5).status_code).result() == 200
    )


def test_tls_auto_on_a_lan_address(lan: tuple[str, ThreadPoolExecutor], state_dir: Path) -> None:
    ns, pool = lan
    made = run_cli("tls", "init", "--host", SERVER, "--name", SERVER, state=state_dir)
    assert made.returncode == 0, made.stderr
    token = admin_token(state_dir)
    proc = serve(ns, state_dir)  # tls left at auto: a LAN address gets TLS
    try:
        ca = state_dir / "tls" / "ca.crt"
        assert wait_until(lambda: ready(pool, ca), 120, interval=0.3), (
            state_dir.parent / "serve.log"
        ).read_text()[-2000:]
        context = ssl.create_default_context(cafile=str(ca))
        models = pool.submit(
            lambda: httpx.get(
                f"https://{SERVER}:{PORT}/v1/models",
                verify=context,
                headers={"Authorization": f"Bearer {token}"},
                timeout=10,
            )
        ).result()
        assert models.status_code == 200
        with pytest.raises(httpx.TransportError):  # clear HTTP to it gets nowhere
            pool.submit(lambda: httpx.get(f"http://{SERVER}:{PORT}/readyz", timeout=5)).result()
        strange = ssl.create_default_context()  # the system's CAs: not the appliance's
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            pool.submit(
                lambda: httpx.get(f"https://{SERVER}:{PORT}/readyz", verify=strange, timeout=5)
            ).result()
    finally:
        stop(proc)


def test_the_sites_own_certificate_is_presented(
    lan: tuple[str, ThreadPoolExecutor], state_dir: Path, tmp_path: Path
) -> None:
    ns, pool = lan
    site, cert, key = site_ca(tmp_path)
    proc = serve(ns, state_dir, "--tls-cert", str(cert), "--tls-key", str(key))
    try:
        assert wait_until(lambda: ready(pool, site), 120, interval=0.3), (
            state_dir.parent / "serve.log"
        ).read_text()[-2000:]

        def presented() -> bytes:
            context = ssl.create_default_context(cafile=str(site))
            with (
                socket.create_connection((SERVER, PORT), timeout=5) as raw,
                context.wrap_socket(raw, server_hostname=SERVER) as tls,
            ):
                der = tls.getpeercert(binary_form=True)
                assert der is not None
                return der

        der = pool.submit(presented).result()
        given = x509.load_pem_x509_certificate(cert.read_bytes())
        assert x509.load_der_x509_certificate(der) == given  # the site's, not one made here
        assert not (state_dir / "tls" / "server.crt").exists()  # nothing generated
    finally:
        stop(proc)
