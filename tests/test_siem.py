"""The SIEM feed against a real collector: Debian's rsyslog (imtcp with the gtls
stream driver, rsyslog-gnutls), run unprivileged in the foreground on a free port with
its own work directory and certificates made here. rsyslog parses what arrives as RFC
5424 and writes each message's fields (PRI, header, STRUCTURED-DATA, MSG, the raw
message) as a JSON line; the test reads the structured data with a strict RFC 5424
parser of its own and compares every message with the audit log itself."""

from __future__ import annotations

import datetime
import ipaddress
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from glob import glob
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from appliance import doctor
from appliance.audit import siem
from appliance.audit.reader import records as read_records
from appliance.audit.records import Actor, Entry
from appliance.audit.store import AuditStore, utc_now
from appliance.config import Settings, load_settings

from helpers import Server, ServerFactory, free_port, make_state, metric, wait_for

CANARY = "Quillon Marchbanks, ward 9, bed 3: SIEM-CANARY-7f3a"
APP_NAME = "appliance-test"
FACILITY = 13  # log audit


def _rsyslogd() -> str:
    """rsyslogd with its gtls driver, or the reason the test cannot run."""
    found = shutil.which("rsyslogd") or shutil.which("rsyslogd", path="/usr/sbin:/sbin")
    if found and glob("/usr/lib/*/rsyslog/lmnsd_gtls.so") + glob("/usr/lib/rsyslog/lmnsd_gtls.so"):
        return found
    how = "apt-get install rsyslog rsyslog-gnutls (scripts/test does: ensure_siem_tools)"
    if os.geteuid() != 0:
        pytest.skip(f"needs root: to install rsyslog and rsyslog-gnutls ({how})")
    pytest.fail(f"rsyslog or rsyslog-gnutls is missing: {how}")


# -- certificates -----------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path  # signs the collector's and the appliance's certificates
    other_ca: Path  # signs nothing here: a collector checked against it is not trusted
    server_cert: Path  # the collector's, for 127.0.0.1 only
    server_key: Path
    client_cert: Path  # the appliance's, for a collector that asks for one
    client_key: Path


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ip: str | None = None,
    usage: x509.ObjectIdentifier | None = None,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if ip is not None:
        san = x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(ip))])
        builder = builder.add_extension(san, critical=False)
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey | None) -> None:
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is not None:
        key_path = path.with_suffix(".key")
        key_path.write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        key_path.chmod(0o600)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    root = tmp_path_factory.mktemp("pki")
    ca_key, other_key = _key(), _key()
    ca = _cert("site CA", ca_key, None, ca_key)
    other = _cert("another CA", other_key, None, other_key)
    server_key, client_key = _key(), _key()
    server = _cert(
        "collector", server_key, ca, ca_key, ip="127.0.0.1", usage=ExtendedKeyUsageOID.SERVER_AUTH
    )
    client = _cert("appliance", client_key, ca, ca_key, usage=ExtendedKeyUsageOID.CLIENT_AUTH)
    _write(root / "ca.pem", ca, None)
    _write(root / "other-ca.pem", other, None)
    _write(root / "server.pem", server, server_key)
    _write(root / "client.pem", client, client_key)
    return Pki(
        root / "ca.pem",
        root / "other-ca.pem",
        root / "server.pem",
        root / "server.key",
        root / "client.pem",
        root / "client.key",
    )


# -- the collector ----------------------------------------------------------------------

FIELDS = ("pri", "timestamp", "hostname", "app-name", "procid", "msgid")
CONF = """\
global(workDirectory="{work}"
       DefaultNetstreamDriver="gtls"
       DefaultNetstreamDriverCAFile="{ca}"
       DefaultNetstreamDriverCertFile="{cert}"
       DefaultNetstreamDriverKeyFile="{key}")
module(load="imtcp" StreamDriver.Name="gtls" StreamDriver.Mode="1"
       StreamDriver.AuthMode="{auth}")
input(type="imtcp" address="127.0.0.1" port="{port}" ruleset="siem")
template(name="fields" type="list" option.jsonf="on") {{
{properties}
  property(outname="sd" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
  property(outname="raw" name="rawmsg" format="jsonf")
}}
ruleset(name="siem") {{
  action(type="omfile" file="{out}" template="fields")
}}
"""


@dataclass
class Rsyslog:
    """rsyslogd -n as the site's collector: TLS on 127.0.0.1:port, every message it
    takes written to ``out`` as a JSON line of its fields."""

    binary: str
    work: Path
    pki: Pki
    auth: str = "anon"  # or x509/certvalid: the appliance must show a certificate
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def out(self) -> Path:
        return self.work / "received.jsonl"

    def start(self) -> None:
        (self.work / "spool").mkdir(parents=True, exist_ok=True)
        properties = "\n".join(
            f'  property(outname="{name}" name="{name}"'
            + (' dateFormat="rfc3339"' if name == "timestamp" else "")
            + ' format="jsonf")'
            for name in FIELDS
        )
        conf = self.work / "rsyslog.conf"
        conf.write_text(
            CONF.format(
                work=self.work / "spool",
                ca=self.pki.ca,
                cert=self.pki.server_cert,
                key=self.pki.server_key,
                auth=self.auth,
                port=self.port,
                properties=properties,
                out=self.out,
            )
        )
        log = (self.work / "rsyslogd.log").open("ab")
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(conf), "-i", str(self.work / "rsyslogd.pid")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        assert wait_for(self.listening, 15), (self.work / "rsyslogd.log").read_text()

    def listening(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.diagnostics()
        import socket

        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
        except OSError:
            return False
        return True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(15)
        self.proc = None

    def diagnostics(self) -> str:
        path = self.work / "rsyslogd.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def messages(self) -> list[dict[str, Any]]:
        """What arrived: rsyslog's fields, the structured data parsed, in order."""
        if not self.out.exists():
            return []
        found = []
        # rsyslog may be part-way through writing a line (or a UTF-8 character):
        # only whole lines count.
        data = self.out.read_bytes()
        for line in data[: data.rfind(b"\n") + 1].decode().splitlines():
            message = json.loads(line)
            message["params"] = parse_sd(message["sd"])
            found.append(message)
        return found


@pytest.fixture
def collector(tmp_path: Path, pki: Pki) -> Iterator[Rsyslog]:
    server = Rsyslog(_rsyslogd(), tmp_path / "collector", pki)
    yield server
    server.stop()


def parse_sd(sd: str) -> dict[str, dict[str, str]]:
    """RFC 5424 STRUCTURED-DATA, strictly: [SD-ID PARAM="VALUE"...]... with '"', '\\'
    and ']' escaped in the values; anything else fails."""
    if sd == "-":
        return {}
    elements: dict[str, dict[str, str]] = {}
    i = 0
    while i < len(sd):
        head = re.compile(r"\[([!#-<>-\\^-~]{1,32})(?=[ \]])").match(sd, i)
        assert head, f"no SD-ELEMENT at {i}: {sd!r}"
        sd_id, i, params = head.group(1), head.end(), {}
        while sd[i] == " ":
            name = re.compile(r' ([!#-<>-\\^-~]{1,32})="').match(sd, i)
            assert name, f"no SD-PARAM at {i}: {sd!r}"
            i, value = name.end(), []
            while sd[i] != '"':
                if sd[i] == "\\" and sd[i + 1] in '"\\]':
                    i += 1
                else:
                    assert sd[i] not in '"]', f"unescaped {sd[i]!r} at {i}: {sd!r}"
                value.append(sd[i])
                i += 1
            params[name.group(1)] = "".join(value)
            i += 1
        assert sd[i] == "]", f"SD-ELEMENT not closed at {i}: {sd!r}"
        elements[sd_id] = params
        i += 1
    return elements


def audit_messages(collector: Rsyslog) -> list[dict[str, Any]]:
    return [m for m in collector.messages() if m["app-name"] == APP_NAME]


def seqs(messages: list[dict[str, Any]]) -> list[int]:
    return [int(m["params"]["audit@32473"]["seq"]) for m in messages if m["msgid"] != "gap"]


def no_canary(collector: Rsyslog) -> None:
    """The prompt is nowhere in what the collector holds (its files, its spool)."""
    for path in collector.work.rglob("*"):
        if path.is_file():
            assert CANARY.encode() not in path.read_bytes(), path


def settings_for(root: Path, **overrides: Any) -> Settings:
    return load_settings(
        env={}, overrides={"state_dir": root, "siem_app_name": APP_NAME, **overrides}
    )


# -- through the real server ------------------------------------------------------------


def ask(server: Server, model: str) -> tuple[str, float]:
    started = time.monotonic()
    resp = server.http.post(
        "/v1/chat/completions",
        timeout=60,
        json={
            "model": model,
            "messages": [{"role": "user", "content": CANARY}],
            "max_tokens": 4,
            "temperature": 0,
        },
    )
    assert resp.status_code == 200, resp.text
    return resp.headers["X-Request-Id"], time.monotonic() - started


@pytest.mark.server
def test_every_record_reaches_rsyslog_once_in_order_through_an_outage(
    collector: Rsyslog,
    server_factory: ServerFactory,
    tmp_path: Path,
    model_file: Path,
    model_name: str,
    pki: Pki,
) -> None:
    collector.start()
    state = make_state(tmp_path / "state", model_file)
    server = server_factory(
        state,
        env={
            "APPLIANCE_SIEM_URL": f"tls://127.0.0.1:{collector.port}",
            "APPLIANCE_SIEM_CA": str(pki.ca),
            "APPLIANCE_SIEM_APP_NAME": APP_NAME,
        },
    )
    before = [ask(server, model_name)]
    outcomes = lambda: {  # noqa: E731
        m["params"]["audit@32473"].get("request_id")
        for m in audit_messages(collector)
        if m["msgid"] == "outcome"
    }
    assert wait_for(lambda: {rid for rid, _ in before} <= outcomes(), 15), collector.diagnostics()
    assert metric(server, "appliance_siem_connected") == 1.0

    # The collector goes away: requests are answered as fast as before, the feed
    # notices, and the records wait in the audit log.
    collector.stop()
    assert wait_for(lambda: metric(server, "appliance_siem_connected") == 0.0, 10)
    during = [ask(server, model_name) for _ in range(2)]
    # (A feed that held the audit writer while it waited for the collector would make
    # them wait, or fail with 503 past audit_write_timeout.)
    assert max(s for _, s in during) < 2 * before[0][1] + 2.0, (before, during)
    backlog = metric(server, "appliance_siem_backlog_records")
    assert backlog >= 2 * len(during), backlog
    said = [r for r in server.log_records() if r.get("logger") == "appliance.audit.siem"]
    assert any(r["msg"].startswith("SIEM collector not reached") for r in said), said

    # Back: the backlog goes, in order, none twice, none missing.
    collector.start()
    assert wait_for(lambda: {rid for rid, _ in during} <= outcomes(), 40), collector.diagnostics()
    assert wait_for(lambda: metric(server, "appliance_siem_backlog_records") == 0.0, 10)
    assert server.stop() == 0  # the unload records written while stopping go too
    collector.stop()

    store = AuditStore(settings_for(state), create_keys=False)
    try:
        rows = list(read_records(store))
    finally:
        store.close()
    assert any(CANARY in json.dumps(r["content"]) for r in rows)  # kept in the log ...
    no_canary(collector)  # ... and never sent
    received = audit_messages(collector)
    assert seqs(received) == [r["seq"] for r in rows]  # each once, in order, no gap
    for message, row in zip(received, rows, strict=True):
        params = message["params"]["audit@32473"]
        assert message["msgid"] == row["kind"]
        assert message["timestamp"] == row["ts"]
        assert int(message["pri"]) == FACILITY * 8 + siem.severity(row["kind"], row["status"])
        assert params["hash"] == row["hash"] and params["prev_hash"] == row["prev_hash"]
        assert params["log"] == store.origin
        assert not {"content", "ciphertext", "nonce", "key_id", "content_digest"} & set(params)
        for column, name in siem.PARAMS:
            assert params.get(name) == (None if row[column] is None else str(row[column]))
    asked = {rid for rid, _ in before + during}
    answered = [
        m["params"]["audit@32473"]
        for m in received
        if m["msgid"] == "outcome" and m["params"]["audit@32473"]["request_id"] in asked
    ]
    assert len(answered) == len(asked)
    for params in answered:
        assert params["route"] == "/v1/chat/completions" and params["method"] == "POST"
        assert params["status"] == "200" and params["model"] == model_name
        assert params["actor"] == "tests" and params["role"] == "admin"
        assert len(params["model_sha256"]) == 64 and int(params["latency_us"]) > 0


# -- in process: a real audit log, a real collector -------------------------------------


def _fill(store: AuditStore, actor: Actor, n: int) -> list[int]:
    return [
        store.append(
            Entry(
                kind="outcome",
                request_id=f"req-{i}",
                actor=actor,
                client="127.0.0.1",
                method="POST",
                route="/v1/chat/completions",
                model="m",
                status=200 if i % 2 else 503,
                latency_us=1234,
                content={"messages": [{"role": "user", "content": CANARY}]},
            )
        )
        for i in range(n)
    ]


def _feed(settings: Settings, store: AuditStore) -> siem.SiemForwarder:
    feed = siem.SiemForwarder(settings, store)
    feed.start()
    return feed


def refused(feed: siem.SiemForwarder, why: str) -> bool:
    return feed.last_error is not None and why in feed.last_error


def test_untrusted_collector_gets_nothing_and_the_log_says_why(
    collector: Rsyslog, tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture
) -> None:
    collector.auth = "x509/certvalid"  # and it wants the appliance's certificate
    collector.start()
    url = f"tls://127.0.0.1:{collector.port}"
    client = {"siem_client_cert": pki.client_cert, "siem_client_key": pki.client_key}
    root = tmp_path / "state"
    store = AuditStore(settings_for(root))
    try:
        _fill(store, Actor("token:t", "tests", "admin"), 3)
        caplog.set_level(logging.WARNING, logger="appliance.audit.siem")
        for overrides, why in (
            ({"siem_url": url, "siem_ca": pki.other_ca}, "certificate verify failed"),
            (
                {"siem_url": f"tls://localhost:{collector.port}", "siem_ca": pki.ca},
                "not valid for 'localhost'",
            ),
        ):
            feed = _feed(settings_for(root, **overrides, **client), store)
            try:
                assert wait_for(lambda: refused(feed, why), 10), feed.last_error  # noqa: B023
            finally:
                feed.stop()
            assert feed.forwarded == 0 and not feed.connected
            checks = doctor._siem(settings_for(root, **overrides, **client), quick=False)
            assert checks[-1].status == "fail" and why in checks[-1].detail, checks
            logged = [r for r in caplog.records if r.name == "appliance.audit.siem"]
            assert any(why in str(getattr(r, "error", "")) for r in logged), logged
            assert logged[-1].levelno == logging.ERROR
        assert audit_messages(collector) == []

        # The same collector, trusted, with the appliance's certificate: all of it.
        trusted = settings_for(root, siem_url=url, siem_ca=pki.ca, **client)
        assert doctor._siem(trusted, quick=False)[-1].status == "ok"
        feed = _feed(trusted, store)
        try:
            assert wait_for(lambda: len(audit_messages(collector)) == 3, 10), (
                feed.last_error,
                collector.diagnostics(),
            )
        finally:
            feed.stop()
    finally:
        store.close()
    assert seqs(audit_messages(collector)) == [1, 2, 3]
    no_canary(collector)


def test_restart_resumes_after_the_last_sent_and_a_purge_is_a_gap(
    collector: Rsyslog, tmp_path: Path, pki: Pki
) -> None:
    collector.start()
    root = tmp_path / "state"
    settings = settings_for(root, siem_url=f"tls://127.0.0.1:{collector.port}", siem_ca=pki.ca)
    store = AuditStore(settings)
    try:
        # A name that needs RFC 5424's escapes, and UTF-8 (the frame counts octets).
        odd = Actor("token:o", 'Dr. "Zoë" ]\\[ Ångström', "clinician")
        _fill(store, odd, 4)
        feed = _feed(settings, store)
        try:
            assert wait_for(lambda: len(audit_messages(collector)) == 4, 10), feed.last_error

            # What /status shows (doctor's quick check, from the feed's state file, which
            # the feed writes after its batch: the collector may have it first).
            def shown() -> doctor.Check:
                return doctor.examine(settings, quick=True)[-1]

            assert wait_for(lambda: "forwarded through record 4 " in shown().detail, 5), shown()
            assert shown().name == "siem feed" and shown().status == "ok", shown()
        finally:
            feed.stop()
        assert siem.read_state(siem.state_path(settings))["seq"] == 4
        # Stopped (as across a restart), records 5 to 7 are written and 1 to 6 purged.
        _, sixth = _fill(store, odd, 2)
        ts = next(r["ts"] for r in read_records(store, seq=sixth))
        assert wait_for(lambda: utc_now() > ts, 1)  # the 7th is newer than the cut
        (newest,) = _fill(store, odd, 1)
        cutoff = next(r["ts"] for r in read_records(store, seq=newest))
        assert store.purge_before(cutoff, by="tests") == 6
        feed = _feed(settings, store)
        try:
            assert wait_for(lambda: len(audit_messages(collector)) == 6, 10), feed.last_error
        finally:
            feed.stop()  # joins the feed: its counts are final (they move after a send)
        assert feed.gaps == 2 and feed.forwarded == 1
    finally:
        store.close()
    received = audit_messages(collector)
    assert seqs(received) == [1, 2, 3, 4, 7]  # nothing sent twice
    gap = received[4]
    assert gap["msgid"] == "gap" and int(gap["pri"]) == FACILITY * 8 + 3
    assert gap["params"]["audit-gap@32473"] == {"log": store.origin, "from": "5", "through": "6"}
    for message in received[:4]:
        params = message["params"]["audit@32473"]
        assert params["actor"] == odd.name and params["role"] == "clinician"
    assert [int(m["pri"]) for m in received[:4]] == [FACILITY * 8 + s for s in (3, 6, 3, 6)]
    no_canary(collector)
