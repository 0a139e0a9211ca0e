"""TLS on the LAN: the generated CA and certificate verified by real clients (httpx, the
openai SDK), Secure cookies, and no LAN address served in clear."""

from __future__ import annotations

import json
import re
import socket
import ssl
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID
from openai import OpenAI

from appliance.config import Settings, load_settings
from appliance.tls import TLSError, check_serving

from helpers import ServerFactory, run_cli

pytestmark = pytest.mark.server


def test_tls_init_and_real_clients_verify_against_the_ca(
    server_factory: ServerFactory, state_dir: Path, model_name: str
) -> None:
    made = run_cli(
        "tls",
        "init",
        "--name",
        "appliance.ward.local",
        "--name",
        "10.1.2.3",
        "--json",
        state=state_dir,
    )
    assert made.returncode == 0, made.stderr
    info = json.loads(made.stdout)
    assert oct(Path(info["key"]).stat().st_mode & 0o777) == "0o600"
    cert = x509.load_pem_x509_certificate(Path(info["cert"]).read_bytes())
    # The names as the certificate carries them (not as the command says it made them),
    # each of the right type: a host name as a DNS name, an address as an IP address.
    alt = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(alt.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in alt.get_values_for_type(x509.IPAddress)}
    assert {"localhost", "appliance.ward.local"} <= dns
    assert {"127.0.0.1", "::1", "10.1.2.3"} <= ips
    assert not {"127.0.0.1", "10.1.2.3"} & dns  # an address as a DNS name: no client matches
    assert set(info["names"]) == dns | ips  # what the command said is what it made
    # For a server, and only that: a client certificate made of it would be refused.
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical and constraints.value.ca is False
    ca_cert = x509.load_pem_x509_certificate(Path(info["ca"]).read_bytes())
    assert cert.issuer == ca_cert.subject

    ca = Path(info["ca"])
    server = server_factory(state_dir, "--tls", "on", ca=ca)
    assert server.url.startswith("https://")
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
        assert client.get(f"{server.url}/healthz").status_code == 200
    sdk = OpenAI(
        base_url=f"{server.url}/v1",
        api_key=server.token,
        max_retries=0,
        http_client=httpx.Client(verify=ssl.create_default_context(cafile=str(ca))),
    )
    answer = sdk.chat.completions.create(
        model=model_name, messages=[{"role": "user", "content": "Hello"}], max_tokens=4
    )
    assert answer.choices[0].message.content is not None
    with httpx.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
        metrics = client.get(f"{server.url}/metrics").text
    expiry = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("appliance_tls_certificate_expiry_timestamp_seconds ")
    )
    assert expiry == cert.not_valid_after_utc.timestamp()  # for the alert on expiry
    # A client checks the name it asked for against the certificate's names.
    context = ssl.create_default_context(cafile=str(ca))
    for name in ("appliance.ward.local", "localhost", "10.1.2.3"):
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            context.wrap_socket(raw, server_hostname=name) as tls,
        ):
            assert tls.version() is not None
    with (
        socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
        pytest.raises(ssl.SSLCertVerificationError, match=r"other\.ward\.local"),
    ):
        context.wrap_socket(raw, server_hostname="other.ward.local")
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{server.url}/healthz")  # without the site's CA: refused
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"http://127.0.0.1:{server.port}/healthz")  # no clear text on a TLS port

    # Under TLS the session cookie is Secure.
    store_settings = load_settings(env={}, overrides={"state_dir": state_dir})
    from appliance.auth.store import AuthStore

    auth = AuthStore(store_settings)
    auth.add_user("nurse.tls", "clinician", "correct horse battery")
    auth.close()
    with server.client() as client:
        page = client.get("/login")
        token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert token is not None
        client.headers.pop("Authorization")
        resp = client.post(
            "/login",
            data={
                "username": "nurse.tls",
                "password": "correct horse battery",
                "csrf_token": token[1],
            },
        )
        assert resp.status_code == 303
        cookie = next(
            h for h in resp.headers.get_list("set-cookie") if h.startswith("appliance_session")
        )
        assert "Secure" in cookie and "HttpOnly" in cookie


def test_lan_address_without_tls_is_refused(state_dir: Path) -> None:
    clear = run_cli("serve", "--host", "0.0.0.0", "--port", "1", "--tls", "off", state=state_dir)
    assert clear.returncode == 1
    assert "refusing to serve 0.0.0.0 without TLS" in clear.stderr
    assert "--insecure-lan" in clear.stderr
    no_cert = run_cli("serve", "--host", "0.0.0.0", "--port", "1", state=state_dir)
    assert no_cert.returncode == 1 and "appliance tls init" in no_cert.stderr


def test_serving_rules(tmp_path: Path) -> None:
    def settings(**kw: object) -> Settings:
        return load_settings(env={}, overrides={"state_dir": tmp_path, **kw})

    check_serving(settings(host="127.0.0.1"))  # loopback: plain HTTP is fine
    check_serving(settings(host="0.0.0.0", tls="off", insecure_lan=True))  # said explicitly
    with pytest.raises(TLSError, match="without TLS"):
        check_serving(settings(host="192.168.1.5", tls="off"))
    with pytest.raises(TLSError, match="tls init"):
        check_serving(settings(host="::", tls="auto"))
