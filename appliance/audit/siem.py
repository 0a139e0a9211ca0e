"""The SIEM feed: every audit record's metadata, never its content, as an RFC 5424
syslog message over TLS (RFC 5425) to the site's collector (``siem_url``).

A thread of its own follows the audit log as a reader does, by sequence number: it is
not on the request path, so a collector that is away or slow can never hold a request.
The queue is the audit log itself: records stay in it until they are purged, and a
small state file beside it (``siem.json``: the log's id and the last seq sent, written
and fsync'd after every batch) says where the feed is. A collector away for hours, or
the appliance restarted meanwhile, loses nothing: the backlog goes, in order, when the
collector is back. Records purged before they were sent are reported to the collector
as a gap (MSGID ``gap``), and a log that holds fewer records than were sent (cut, or
restored from an older copy) as a rollback (MSGID ``rollback``).

Delivery is at least once. RFC 5425 has no acknowledgements: bytes the collector's
kernel took before it died are gone. The feed narrows that window by checking, before
each batch, that the collector has not closed the connection (it sends nothing in
this protocol, so anything to read is its close). A crash of the appliance between
sending and saving the state sends up to a batch again: the same log id, seq and hash,
which the SIEM can drop as duplicates.

A message (RFC 5424, octet-counted as RFC 5425 and RFC 6587 frame it):

    LEN <PRI>1 TIMESTAMP HOSTNAME APP-NAME PROCID MSGID [audit@32473 ...] SUMMARY

- PRI: facility 13, "log audit" (RFC 5424, table 1); severity from the record: a
  status >= 500 is err, 4xx warning, an administrative action notice, the rest info.
- TIMESTAMP: the record's own time (UTC, microseconds); MSGID: its kind (request,
  outcome, event, admin).
- STRUCTURED-DATA ``audit@32473``: the record's metadata columns (seq, request id,
  actor, client address, route, method, status, model and its SHA-256, latency, token
  counts, the record's hash and the previous record's, the log's id). 32473 is the
  Private Enterprise Number RFC 5612 reserves for documentation and examples: the
  appliance has no number of its own.
- Never sent: the content columns (ciphertext, nonce, key id, content digest). The
  query below does not read them, so no code path here can send a prompt or answer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import select
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import SQLAlchemyError

from appliance.config import Settings, SettingsError

if TYPE_CHECKING:
    from flask import Flask
    from prometheus_client.core import Metric

    from appliance.audit.store import AuditStore

log = logging.getLogger(__name__)
EXTENSION = "appliance.siem"
DEFAULT_PORT = 6514  # RFC 5425's port for syslog over TLS
FACILITY_LOG_AUDIT = 13
ERR, WARNING, NOTICE, INFO = 3, 4, 5, 6
ENTERPRISE = 32473  # RFC 5612: the example Private Enterprise Number
SD_ID = f"audit@{ENTERPRISE}"
GAP_SD_ID = f"audit-gap@{ENTERPRISE}"
STATE_FILE = "siem.json"
BATCH = 256  # records read and sent between two saves of the state
POLL_SECONDS = 0.5  # how often an idle feed looks for new records
CONNECT_TIMEOUT = 10.0
SEND_TIMEOUT = 10.0  # a collector that takes nothing for this long is dropped
MAX_BACKOFF = 10.0  # between tries to reach an absent collector (a SYN each)
# Every value is cut to this many characters, so that a message stays well inside the
# 8 KiB a collector is asked to take (RFC 5425 6.3; rsyslog's default maxMessageSize).
MAX_VALUE_CHARS = 256

# (column, SD-PARAM name): metadata only. ts goes in the header.
PARAMS = (
    ("seq", "seq"),
    ("kind", "kind"),
    ("request_id", "request_id"),
    ("actor_id", "actor_id"),
    ("actor_name", "actor"),
    ("actor_role", "role"),
    ("client", "client"),
    ("method", "method"),
    ("route", "route"),
    ("model", "model"),
    ("model_sha256", "model_sha256"),
    ("status", "status"),
    ("error_type", "error_type"),
    ("latency_us", "latency_us"),
    ("prompt_tokens", "prompt_tokens"),
    ("completion_tokens", "completion_tokens"),
    ("finish_reason", "finish_reason"),
    ("hash", "hash"),
    ("prev_hash", "prev_hash"),
)
COLUMNS = ("ts", *(column for column, _ in PARAMS))
SELECT_AFTER = f"SELECT {', '.join(COLUMNS)} FROM audit_records WHERE seq > ? ORDER BY seq LIMIT ?"
SELECT_HEAD = (
    "SELECT MAX(COALESCE((SELECT MAX(seq) FROM audit_records), 0), "
    "COALESCE((SELECT CAST(value AS INTEGER) FROM audit_meta WHERE name = 'anchor_seq'), 0))"
)
SELECT_TS = "SELECT ts FROM audit_records WHERE seq > ? ORDER BY seq LIMIT 1"
_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,6})?(Z|[+-]\d\d:\d\d)")
_APP_NAME = re.compile(r"[!-~]{1,48}")


# -- the message ----------------------------------------------------------------------


def severity(kind: str, status: int | None) -> int:
    if status is not None and status >= 500:
        return ERR
    if status is not None and status >= 400:
        return WARNING
    if kind == "admin":
        return NOTICE
    return INFO


def sd_value(value: Any) -> str:
    """A PARAM-VALUE: cut to MAX_VALUE_CHARS, with '"', '\\' and ']' escaped (RFC 5424
    6.3.3)."""
    text = str(value)
    if len(text) > MAX_VALUE_CHARS:
        text = text[: MAX_VALUE_CHARS - 1] + "\u2026"
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("]", "\\]")


def structured(sd_id: str, params: Sequence[tuple[str, Any]]) -> str:
    body = "".join(f' {name}="{sd_value(value)}"' for name, value in params if value is not None)
    return f"[{sd_id}{body}]"


def header_field(text: str, limit: int) -> str:
    """HOSTNAME, APP-NAME, PROCID or MSGID: printable US-ASCII, no space, bounded."""
    cleaned = "".join(c if "!" <= c <= "~" else "_" for c in text)[:limit]
    return cleaned or "-"


def frame(message: str) -> bytes:
    """RFC 5425 octet counting: the message's length in octets, a space, the message."""
    data = message.encode("utf-8", "backslashreplace")  # a lone surrogate, escaped
    return b"%d %s" % (len(data), data)


@dataclass(frozen=True)
class Origin:
    """Who sends: the header fields that are the same in every message."""

    log_id: str
    hostname: str
    app_name: str
    procid: str

    def message(self, pri: int, ts: str | None, msgid: str, sd: str, summary: str) -> bytes:
        stamp = ts if ts is not None and _TIMESTAMP.fullmatch(ts) else "-"
        text = summary.encode("ascii", "backslashreplace").decode("ascii")
        return frame(
            f"<{pri}>1 {stamp} {self.hostname} {self.app_name} {self.procid} "
            f"{header_field(msgid, 32)} {sd} {text}"
        )

    def record(self, row: dict[str, Any]) -> bytes:
        """One audit record's metadata as a framed message."""
        kind, status = str(row["kind"]), row["status"]
        pri = FACILITY_LOG_AUDIT * 8 + severity(kind, status)
        params = [(name, row[column]) for column, name in PARAMS]
        sd = structured(SD_ID, [*params, ("log", self.log_id)])
        summary = " ".join(
            str(v)
            for v in (kind, row["method"], row["route"], row["status"], row["actor_name"])
            if v is not None
        )[:MAX_VALUE_CHARS]
        return self.message(pri, str(row["ts"]), kind, sd, f"audit record {row['seq']}: {summary}")

    def gap(self, first: int, last: int, now: str) -> bytes:
        sd = structured(GAP_SD_ID, [("log", self.log_id), ("from", first), ("through", last)])
        return self.message(
            FACILITY_LOG_AUDIT * 8 + ERR,
            now,
            "gap",
            sd,
            f"audit records {first} to {last} were purged before they were forwarded",
        )

    def rollback(self, sent: int, held: int, now: str) -> bytes:
        sd = structured(GAP_SD_ID, [("log", self.log_id), ("forwarded", sent), ("held", held)])
        return self.message(
            FACILITY_LOG_AUDIT * 8 + ERR,
            now,
            "rollback",
            sd,
            f"the audit log holds {held} records and {sent} were forwarded: it was cut "
            "or restored from an older copy",
        )


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# -- settings -------------------------------------------------------------------------


@dataclass(frozen=True)
class Collector:
    host: str
    port: int

    @classmethod
    def parse(cls, url: str) -> Collector:
        parts = urllib.parse.urlsplit(url)
        bad = SettingsError(
            f"siem_url must be tls://HOST[:PORT] (e.g. tls://siem:6514), got {url!r}"
        )
        if parts.scheme != "tls" or not parts.hostname or parts.path not in ("", "/"):
            raise bad
        if parts.query or parts.fragment or parts.username or parts.password:
            raise bad
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise bad from None
        return cls(parts.hostname, port)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tls://{host}:{self.port}"


def tls_context(settings: Settings) -> ssl.SSLContext:
    """TLS 1.2 or later; the collector's chain verified against siem_ca (or the
    system's CAs) and its name against the URL's host; a client certificate if set."""
    ca = settings.siem_ca
    try:
        context = ssl.create_default_context(
            ssl.Purpose.SERVER_AUTH, cafile=str(ca) if ca is not None else None
        )
    except (OSError, ssl.SSLError) as exc:
        raise SettingsError(f"siem_ca {ca}: {exc}") from None
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    cert, key = settings.siem_client_cert, settings.siem_client_key
    if (cert is None) != (key is None):
        raise SettingsError("siem_client_cert and siem_client_key go together: set both")
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(str(cert), str(key))
        except (OSError, ssl.SSLError) as exc:
            raise SettingsError(f"siem_client_cert {cert} / siem_client_key {key}: {exc}") from None
    return context


def state_path(settings: Settings) -> Path:
    return settings.audit_db_path.parent / STATE_FILE


def read_state(path: Path) -> dict[str, Any]:
    """The feed's saved state ({} if none or unreadable)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_state(path: Path, data: dict[str, Any]) -> None:
    """Replace the state file whole and durably: a crash leaves the old or the new."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, json.dumps(data).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


# -- the forwarder --------------------------------------------------------------------


class CollectorClosed(ConnectionError):
    """The collector closed the connection (or sent what this protocol never sends)."""


def _peer_closed(sock: ssl.SSLSocket) -> bool:
    """Whether the collector has closed the connection. It sends nothing in this
    protocol but TLS housekeeping (session tickets): what else comes is its close."""
    if not select.select([sock], [], [], 0)[0]:
        return False
    sock.setblocking(False)
    try:
        return sock.recv(4096) == b""
    except ssl.SSLWantReadError:  # only TLS records (a session ticket) were waiting
        return False
    except OSError:  # reset, or a TLS alert
        return True
    finally:
        sock.settimeout(SEND_TIMEOUT)


class SiemForwarder:
    def __init__(self, settings: Settings, store: AuditStore) -> None:
        self.collector = Collector.parse(settings.siem_url)
        self.context = tls_context(settings)
        if not _APP_NAME.fullmatch(settings.siem_app_name):
            raise SettingsError(
                "siem_app_name must be 1 to 48 printable ASCII characters without spaces, "
                f"got {settings.siem_app_name!r}"
            )
        self.store = store
        self.origin = Origin(
            store.origin,
            header_field(socket.gethostname(), 255),
            settings.siem_app_name,
            str(os.getpid()),
        )
        self.path = state_path(settings)
        saved = read_state(self.path)
        if saved and saved.get("log") != store.origin:
            log.warning(
                "SIEM feed state is for another audit log: forwarding this one from its start",
                extra={"path": str(self.path)},
            )
        self.seq = int(saved.get("seq", 0)) if saved.get("log") == store.origin else 0
        self.forwarded = 0  # records sent since start
        self.gaps = 0  # records reported purged before they were sent
        self.connected = False
        self.last_error: str | None = None
        self._sock: ssl.SSLSocket | None = None
        self._final_timeout = 3.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="siem-feed", daemon=True)
        self._thread.start()

    def stop(self, final_timeout: float = 3.0) -> None:
        """Stop; what was written since the last batch goes first if the collector is
        connected (bounded by final_timeout); the rest waits in the log for next time."""
        self._final_timeout = final_timeout
        self._stop.set()
        if self._thread is not None:
            self._thread.join(final_timeout + SEND_TIMEOUT + 1)

    def _run(self) -> None:
        backoff = 1.0
        while not self._stop.is_set():
            try:
                if self._sock is None or _peer_closed(self._sock):
                    if self._sock is not None:
                        raise CollectorClosed("the collector closed the connection")
                    self._connect()
                sent = self._forward_batch()
                backoff = 1.0
                if not sent:
                    self._stop.wait(POLL_SECONDS)
            except SQLAlchemyError as exc:  # the log, not the collector: read it again soon
                log.error("SIEM feed cannot read the audit log", extra={"error": str(exc)})
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
            except Exception as exc:  # away, refused, not trusted, cut off
                self._lost(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF)
        self._last_pass()

    def _last_pass(self) -> None:
        sock = self._sock
        if sock is None:
            return
        deadline = time.monotonic() + self._final_timeout
        try:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            while time.monotonic() < deadline and not _peer_closed(sock):
                if not self._forward_batch():
                    break
        except Exception as exc:  # stopping: say so, the log keeps the rest
            log.warning("SIEM feed stopped with records unsent", extra={"error": str(exc)})
        self._disconnect(graceful=True)
        self._save()

    # -- the connection ------------------------------------------------------------

    def _connect(self) -> None:
        raw = socket.create_connection(
            (self.collector.host, self.collector.port), timeout=CONNECT_TIMEOUT
        )
        try:
            sock = self.context.wrap_socket(raw, server_hostname=self.collector.host)
        except BaseException:
            raw.close()
            raise
        sock.settimeout(SEND_TIMEOUT)
        self._sock, self.connected, self.last_error = sock, True, None
        log.info(
            "SIEM collector connected",
            extra={"collector": str(self.collector), "tls": sock.version(), "seq": self.seq},
        )
        self._save()

    def _disconnect(self, graceful: bool = False) -> None:
        sock, self._sock, self.connected = self._sock, None, False
        if sock is not None:
            if graceful:  # close_notify: the collector sees an end, not a cut
                with contextlib.suppress(OSError, ValueError):
                    sock.settimeout(1.0)
                    sock.unwrap()
            with contextlib.suppress(OSError):
                sock.close()

    def _lost(self, exc: Exception) -> None:
        was_connected = self.connected
        self._disconnect()
        error = f"{type(exc).__name__}: {exc}"
        if error != self.last_error or was_connected:  # once, not every retry
            # Not trusted (chain, name, protocol) needs someone to act; away may pass.
            level = logging.ERROR if isinstance(exc, ssl.SSLError) else logging.WARNING
            log.log(
                level,
                "SIEM collector not reached: records wait in the audit log",
                extra={"collector": str(self.collector), "error": error, "seq": self.seq},
            )
            self.last_error = error
            self._save()

    # -- forwarding ----------------------------------------------------------------

    def _forward_batch(self) -> int:
        """Send the next records (and any gap before them); how many messages went."""
        with self.store.reader.connect() as conn, conn.begin():
            execute = conn.exec_driver_sql
            rows: list[dict[str, Any]] = [
                dict(zip(COLUMNS, r, strict=True)) for r in execute(SELECT_AFTER, (self.seq, BATCH))
            ]
            head = int(execute(SELECT_HEAD).scalar() or 0) if not rows else None
        messages: list[tuple[int, bytes, bool]] = []  # (seq after it, message, is a record)
        last = self.seq
        if head is not None and head > last:  # all of them purged, nothing newer yet
            messages.append((head, self.origin.gap(last + 1, head, _now()), False))
        elif head is not None and head < last:
            messages.append((head, self.origin.rollback(last, head, _now()), False))
        for row in rows:
            seq = int(row["seq"])
            if seq > last + 1:
                messages.append((seq - 1, self.origin.gap(last + 1, seq - 1, _now()), False))
            messages.append((seq, self.origin.record(row), True))
            last = seq
        if not messages:
            return 0
        sock = self._sock
        assert sock is not None
        before = self.seq
        try:
            for seq, data, is_record in messages:
                sock.sendall(data)
                if not is_record and seq > self.seq:
                    self.gaps += seq - self.seq
                    log.error(
                        "audit records purged before they were forwarded to the SIEM",
                        extra={"from": self.seq + 1, "through": seq},
                    )
                elif not is_record:
                    log.error(
                        "the audit log holds fewer records than were forwarded to the SIEM",
                        extra={"forwarded": self.seq, "held": seq},
                    )
                self.seq = seq
                self.forwarded += is_record
        finally:
            if self.seq != before:
                self._save()
        return len(messages)

    def _save(self) -> None:
        data = {
            "log": self.origin.log_id,
            "seq": self.seq,
            "collector": str(self.collector),
            "connected": self.connected,
            "error": self.last_error,
            "updated": _now(),
        }
        try:
            _write_state(self.path, data)
        except OSError as exc:  # the next save tries again; a restart resends at most this
            log.warning(
                "SIEM feed state not saved", extra={"path": str(self.path), "error": str(exc)}
            )

    # -- what /metrics shows -------------------------------------------------------

    def backlog(self) -> tuple[int, float]:
        """Records not forwarded yet, and the age (seconds) of the oldest of them."""
        seq = self.seq
        with self.store.reader.connect() as conn, conn.begin():
            execute = conn.exec_driver_sql
            head = int(execute(SELECT_HEAD).scalar() or 0)
            if head <= seq:
                return 0, 0.0
            ts = execute(SELECT_TS, (seq,)).scalar()
        age = 0.0
        if ts:
            written = datetime.strptime(str(ts), "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
            age = max(0.0, time.time() - written.timestamp())
        return head - seq, age


def gauges(app: Flask) -> Iterator[Metric]:
    """The feed's figures for /metrics (with a collector configured)."""
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

    feed: SiemForwarder | None = app.extensions.get(EXTENSION)
    if feed is None:
        return
    yield GaugeMetricFamily(
        "appliance_siem_connected",
        "1 while the SIEM collector is connected (TLS, its certificate verified).",
        value=1.0 if feed.connected else 0.0,
    )
    yield CounterMetricFamily(
        "appliance_siem_forwarded",
        "Audit records sent to the SIEM collector since the appliance started.",
        value=feed.forwarded,
    )
    yield CounterMetricFamily(
        "appliance_siem_gap_records",
        "Audit records purged before they could be sent to the SIEM collector (reported "
        "to it as a gap) since the appliance started.",
        value=feed.gaps,
    )
    try:
        records, seconds = feed.backlog()
    except Exception:  # a scrape must not fail on a read; the gauges are left out
        return
    yield GaugeMetricFamily(
        "appliance_siem_backlog_records",
        "Audit records not sent to the SIEM collector yet (they wait in the audit log).",
        value=records,
    )
    yield GaugeMetricFamily(
        "appliance_siem_backlog_seconds",
        "Age of the oldest audit record not sent to the SIEM collector yet (0: none).",
        value=seconds,
    )


# -- what doctor and /status show ---------------------------------------------------


def probe(settings: Settings, timeout: float = 5.0) -> str:
    """A TLS handshake with the collector, as the feed makes it: what it negotiated.
    Raises SettingsError (bad settings) or OSError (unreachable, not trusted)."""
    collector = Collector.parse(settings.siem_url)
    context = tls_context(settings)
    with (
        socket.create_connection((collector.host, collector.port), timeout=timeout) as raw,
        context.wrap_socket(raw, server_hostname=collector.host) as sock,
    ):
        return f"{collector}: {sock.version()}, its certificate verified"


def state_summary(settings: Settings) -> tuple[bool, str]:
    """From the state file the running feed keeps: whether it is well, and what it says."""
    state = read_state(state_path(settings))
    if not state:
        return False, "the feed has not run yet (no state file)"
    said = f"forwarded through record {state.get('seq', 0)} (as of {state.get('updated')})"
    if state.get("connected"):
        return True, f"connected to {state.get('collector')}, {said}"
    error = state.get("error") or "not connected"
    return False, f"{error}; {said}, the rest waits in the audit log"


# -- wiring ---------------------------------------------------------------------------


def init_app(app: Flask, settings: Settings, store: AuditStore) -> SiemForwarder | None:
    """Start the feed when a collector is configured."""
    if not settings.siem_url:
        return None
    feed = SiemForwarder(settings, store)
    app.extensions[EXTENSION] = feed
    feed.start()
    return feed


def close_app(app: Flask) -> None:
    feed: SiemForwarder | None = app.extensions.get(EXTENSION)
    if feed is not None:
        feed.stop()
