"""API tokens, user accounts and web sessions, in STATE_DIR/auth.db.

Nothing secret is stored as it is: a token is kept as the SHA-256 of its 256-bit secret
(plenty for a random secret) behind a short public id used for lookup; a password as
scrypt; a session as the SHA-256 of its cookie. Every comparison is constant-time.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import (
    Column,
    Engine,
    Integer,
    MetaData,
    String,
    Table,
    delete,
    func,
    insert,
    select,
    update,
)

from appliance.config import Settings
from appliance.db import open_engine

ROLES = ("admin", "clinician", "line", "auditor")
TOKEN_PREFIX = "apl"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SCRYPT = {"n": 2**14, "r": 8, "p": 1}
MIN_PASSWORD = 10
# An address is turned away after this many times login_max_failures failed sign-ins
# (over all names) within login_lockout_minutes.
CLIENT_FAILURE_FACTOR = 4
SESSION_TOUCH = 15  # seconds: how stale a session's idle timer may be

metadata = MetaData()
tokens = Table(
    "tokens",
    metadata,
    Column("id", String(16), primary_key=True),
    Column("name", String(128), nullable=False),
    Column("role", String(16), nullable=False),
    Column("secret_sha256", String(64), nullable=False),
    Column("created", String(32), nullable=False),
    Column("expires", String(32)),
    Column("revoked", String(32)),
)
users = Table(
    "users",
    metadata,
    Column("name", String(64), primary_key=True),
    Column("role", String(16), nullable=False),
    Column("password", String(256), nullable=False),
    Column("created", String(32), nullable=False),
    Column("disabled", Integer, nullable=False, default=0),
    Column("failures", Integer, nullable=False, default=0),
    Column("locked_until", String(32)),
)
# Failed sign-ins per account *and client address*: the lockout shuts out the address
# that guessed, not the clinician at another workstation (else anyone could lock any
# account with a few tries). ``user`` is the SHA-256 of the name typed, so that an
# unknown name (perhaps a password typed in the wrong field) is never stored.
login_failures = Table(
    "login_failures",
    metadata,
    Column("user", String(64), primary_key=True),
    Column("client", String(64), primary_key=True),
    Column("failures", Integer, nullable=False),
    Column("last_failure", String(32), nullable=False),
    Column("locked_until", String(32)),
)
sessions = Table(
    "sessions",
    metadata,
    Column("id_sha256", String(64), primary_key=True),
    Column("user", String(64), nullable=False),
    Column("created", String(32), nullable=False),
    Column("last_seen", String(32), nullable=False),
)


class AuthError(ValueError):
    """A request to the auth store that cannot be done; the message says why."""


def now() -> datetime:
    return datetime.now(UTC)


def iso(moment: datetime) -> str:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_iso(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, maxmem=64 << 20, **SCRYPT)
    params = f"{SCRYPT['n']}${SCRYPT['r']}${SCRYPT['p']}"
    return f"scrypt${params}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    try:
        _, n, r, p, salt, digest = stored.split("$")
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(
            password.encode(),
            salt=base64.b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            maxmem=64 << 20,
            dklen=len(expected),
        )
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def parse_duration(text: str) -> timedelta:
    """'90d', '12h', '30m' -> a timedelta."""
    match = re.fullmatch(r"(\d{1,5})([dhm])", text.strip())
    if not match:
        raise AuthError(f"expiry {text!r} must look like 90d, 12h or 30m")
    amount, unit = int(match[1]), match[2]
    return {
        "d": timedelta(days=amount),
        "h": timedelta(hours=amount),
        "m": timedelta(minutes=amount),
    }[unit]


TOKEN_BY_ID = "SELECT id, name, role, secret_sha256, expires, revoked FROM tokens WHERE id = ?"
VERIFIED_PER_THREAD = 256  # tokens a request thread remembers as checked, at most


@dataclass(frozen=True)
class _TokenRow:
    id: str
    name: str
    role: str
    secret_sha256: str
    expires: str | None
    revoked: str | None


@dataclass(frozen=True)
class Principal:
    """Who a request is from, once authenticated."""

    kind: str  # token | user
    id: str
    name: str
    role: str


@dataclass(frozen=True)
class LoginResult:
    principal: Principal | None
    session: str | None = None
    reason: str = ""


class AuthStore:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # Writers take the write lock at BEGIN (read-then-write is one transaction);
        # plain reads use their own engine and never hold it.
        self.engine: Engine = open_engine(settings.auth_db_path)
        self.reader: Engine = open_engine(settings.auth_db_path, immediate=False)
        metadata.create_all(self.engine)
        self._local = threading.local()
        # Checked against when the name is unknown, so that an unknown name costs the
        # same scrypt as a known one and timing does not tell which names exist.
        self._dummy_hash = hash_password(secrets.token_urlsafe(16))

    def close(self) -> None:
        self.engine.dispose()
        self.reader.dispose()

    # -- tokens ----------------------------------------------------------------------

    def create_token(self, name: str, role: str, expires: str | None = None) -> dict[str, Any]:
        """A new token; the returned 'token' is the only time the secret is seen."""
        if role not in ROLES:
            raise AuthError(f"role {role!r} is not one of {', '.join(ROLES)}")
        if not name.strip() or len(name) > 128:
            raise AuthError("a token needs a name of 1 to 128 characters")
        public_id = secrets.token_hex(4)
        secret = secrets.token_urlsafe(32)  # 256 bits
        created = now()
        until = iso(created + parse_duration(expires)) if expires else None
        with self.engine.begin() as conn:
            conn.execute(
                insert(tokens).values(
                    id=public_id,
                    name=name,
                    role=role,
                    secret_sha256=sha256(secret),
                    created=iso(created),
                    expires=until,
                    revoked=None,
                )
            )
        return {
            "id": public_id,
            "name": name,
            "role": role,
            "created": iso(created),
            "expires": until,
            "token": f"{TOKEN_PREFIX}_{public_id}_{secret}",
        }

    def list_tokens(self) -> list[dict[str, Any]]:
        with self.reader.connect() as conn:
            rows = (
                conn.execute(
                    select(
                        tokens.c.id,
                        tokens.c.name,
                        tokens.c.role,
                        tokens.c.created,
                        tokens.c.expires,
                        tokens.c.revoked,
                    ).order_by(tokens.c.created)
                )
                .mappings()
                .all()
            )
        return [dict(r) for r in rows]

    def revoke_token(self, public_id: str) -> dict[str, Any]:
        with self.engine.begin() as conn:
            row = conn.execute(
                select(tokens.c.name, tokens.c.revoked).where(tokens.c.id == public_id)
            ).first()
            if row is None:
                raise AuthError(f"no token with id {public_id!r}")
            if row.revoked is None:
                conn.execute(
                    update(tokens).where(tokens.c.id == public_id).values(revoked=iso(now()))
                )
        return {"id": public_id, "name": row.name, "revoked": True}

    def check_token(self, presented: str) -> tuple[Principal | None, str]:
        """The token's principal, or None and why (for the audit, not the client)."""
        parts = presented.split("_", 2)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX:
            return None, "malformed_token"
        # Every request asks the database, on this thread's own connection, whether
        # anything changed since this thread last looked (PRAGMA data_version moves
        # with every commit by any other connection, this process's admin API and the
        # CLI alike): a revocation counts from the very next request. Only when nothing
        # changed does a token this thread has already verified skip the lookup.
        conn = self._reader()
        local = self._local
        version = conn.execute("PRAGMA data_version").fetchone()[0]
        verified: dict[str, _TokenRow] = local.verified
        if local.version != version:
            verified.clear()
            local.version = version
        # Keyed by the token's hash: no secret stays in memory past its request.
        fingerprint = sha256(presented)
        row: _TokenRow | None = verified.get(fingerprint)
        if row is None:
            row = self._token_row(parts[1])
            if row is None:
                hmac.compare_digest(sha256(parts[2]), "0" * 64)  # same work either way
                return None, "unknown_token"
            if not hmac.compare_digest(sha256(parts[2]), row.secret_sha256):
                return None, "wrong_secret"
            if row.revoked is None:
                if len(verified) >= VERIFIED_PER_THREAD:
                    verified.clear()
                verified[fingerprint] = row  # the exact token, checked: a hit needs it
        if row.revoked is not None:
            return None, "revoked_token"
        if row.expires is not None and parse_iso(row.expires) <= now():
            return None, "expired_token"
        return Principal("token", f"token:{row.id}", row.name, row.role), ""

    def _reader(self) -> sqlite3.Connection:
        """This thread's read-only connection: in autocommit, each statement its own
        snapshot, holding no lock."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            path = self.settings.auth_db_path
            conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None)
            conn.execute("PRAGMA trusted_schema=OFF")
            self._local.conn = conn
            self._local.version = None
            self._local.verified = {}
        return conn

    def _token_row(self, public_id: str) -> _TokenRow | None:
        found = self._reader().execute(TOKEN_BY_ID, (public_id,)).fetchone()
        return None if found is None else _TokenRow(*found)

    # -- users -----------------------------------------------------------------------

    def add_user(self, name: str, role: str, password: str) -> dict[str, Any]:
        if not NAME_RE.match(name):
            raise AuthError(f"user name {name!r} must match {NAME_RE.pattern}")
        if role not in ROLES:
            raise AuthError(f"role {role!r} is not one of {', '.join(ROLES)}")
        self._check_password_rules(password)
        with self.engine.begin() as conn:
            if conn.execute(select(users.c.name).where(users.c.name == name)).first():
                raise AuthError(f"user {name!r} exists already")
            conn.execute(
                insert(users).values(
                    name=name,
                    role=role,
                    password=hash_password(password),
                    created=iso(now()),
                    disabled=0,
                    failures=0,
                    locked_until=None,
                )
            )
        return {"name": name, "role": role}

    @staticmethod
    def _check_password_rules(password: str) -> None:
        if len(password) < MIN_PASSWORD:
            raise AuthError(
                f"a password needs at least {MIN_PASSWORD} characters, this one has {len(password)}"
            )

    def list_users(self) -> list[dict[str, Any]]:
        """Each user; ``failures`` and ``locked_until`` over the client addresses that
        failed to sign in as them (the lockout is per address)."""
        stamp = iso(now())
        with self.reader.connect() as conn:
            rows = conn.execute(
                select(users.c.name, users.c.role, users.c.created, users.c.disabled).order_by(
                    users.c.name
                )
            ).all()
            found = []
            for r in rows:
                lock = conn.execute(
                    select(
                        func.coalesce(func.sum(login_failures.c.failures), 0),
                        func.max(login_failures.c.locked_until),
                    ).where(login_failures.c.user == sha256(r.name))
                ).one()
                until = lock[1] if lock[1] is not None and lock[1] > stamp else None
                found.append(
                    {
                        "name": r.name,
                        "role": r.role,
                        "created": r.created,
                        "disabled": bool(r.disabled),
                        "failures": int(lock[0]),
                        "locked_until": until,
                    }
                )
            return found

    def disable_user(self, name: str) -> dict[str, Any]:
        with self.engine.begin() as conn:
            done = conn.execute(update(users).where(users.c.name == name).values(disabled=1))
            if done.rowcount == 0:
                raise AuthError(f"no user {name!r}")
            conn.execute(delete(sessions).where(sessions.c.user == name))
        return {"name": name, "disabled": True}

    def reset_password(self, name: str, password: str) -> dict[str, Any]:
        self._check_password_rules(password)
        hashed = hash_password(password)  # scrypt, outside the write lock
        with self.engine.begin() as conn:
            done = conn.execute(
                update(users)
                .where(users.c.name == name)
                .values(password=hashed, failures=0, locked_until=None)
            )
            if done.rowcount == 0:
                raise AuthError(f"no user {name!r}")
            conn.execute(delete(sessions).where(sessions.c.user == name))
            conn.execute(delete(login_failures).where(login_failures.c.user == sha256(name)))
        return {"name": name, "password_reset": True}

    def login(self, name: str, password: str, client: str = "") -> LoginResult:
        """Check a sign-in from ``client`` (its address). scrypt runs outside any write
        transaction and for every attempt (unknown names and locked accounts too, so
        that timing tells nothing); failures lock the account for that address only,
        and an address with too many failures over all names is turned away."""
        s = self.settings
        stamp = now()
        since = iso(stamp - timedelta(minutes=s.login_lockout_minutes))
        key = sha256(name)
        with self.reader.connect() as conn:
            row = conn.execute(select(users).where(users.c.name == name)).first()
            mine = conn.execute(
                select(login_failures).where(
                    login_failures.c.user == key, login_failures.c.client == client
                )
            ).first()
            from_client: int = conn.execute(
                select(func.coalesce(func.sum(login_failures.c.failures), 0)).where(
                    login_failures.c.client == client, login_failures.c.last_failure > since
                )
            ).scalar_one()
        if from_client >= s.login_max_failures * CLIENT_FAILURE_FACTOR:
            return LoginResult(None, reason="too_many_attempts")
        right = check_password(password, row.password if row is not None else self._dummy_hash)
        locked = mine is not None and mine.locked_until and parse_iso(mine.locked_until) > stamp
        if row is None or locked or not right:
            if locked:
                return LoginResult(None, reason="locked")
            stale = mine is None or mine.last_failure <= since or mine.locked_until is not None
            failures = 1 if mine is None or stale else int(mine.failures) + 1
            until = (
                iso(stamp + timedelta(minutes=s.login_lockout_minutes))
                if row is not None and failures >= s.login_max_failures
                else None
            )
            values = {"failures": failures, "last_failure": iso(stamp), "locked_until": until}
            with self.engine.begin() as conn:
                done = conn.execute(
                    update(login_failures)
                    .where(login_failures.c.user == key, login_failures.c.client == client)
                    .values(**values)
                )
                if done.rowcount == 0:
                    conn.execute(insert(login_failures).values(user=key, client=client, **values))
            if row is None:
                return LoginResult(None, reason="unknown_user")
            return LoginResult(None, reason="locked_now" if until else "wrong_password")
        if row.disabled:  # said only to whoever knows the password
            return LoginResult(None, reason="disabled")
        session = secrets.token_urlsafe(32)
        with self.engine.begin() as conn:
            conn.execute(
                delete(login_failures).where(
                    login_failures.c.user == key, login_failures.c.client == client
                )
            )
            conn.execute(
                insert(sessions).values(
                    id_sha256=sha256(session), user=name, created=iso(stamp), last_seen=iso(stamp)
                )
            )
        return LoginResult(Principal("user", f"user:{name}", name, row.role), session)

    # -- sessions --------------------------------------------------------------------

    def check_session(self, cookie: str) -> tuple[Principal | None, str]:
        """The session's user, refreshing its idle timer; None and why otherwise. Read
        without the write lock; the idle timer is written at most every SESSION_TOUCH
        seconds, so signed-in users do not queue behind each other (or behind sign-ins)."""
        key = sha256(cookie)
        idle = timedelta(minutes=self.settings.session_idle_minutes)
        stamp = now()
        with self.reader.connect() as conn:
            row = conn.execute(
                select(sessions.c.user, sessions.c.last_seen).where(sessions.c.id_sha256 == key)
            ).first()
            user = (
                conn.execute(
                    select(users.c.role, users.c.disabled).where(users.c.name == row.user)
                ).first()
                if row is not None
                else None
            )
        if row is None:
            return None, "unknown_session"
        last_seen = parse_iso(row.last_seen)
        if last_seen + idle <= stamp:
            with self.engine.begin() as conn:
                conn.execute(delete(sessions).where(sessions.c.id_sha256 == key))
            return None, "session_idle_timeout"
        if user is None or user.disabled:
            return None, "disabled"
        if stamp - last_seen >= timedelta(seconds=SESSION_TOUCH):
            with self.engine.begin() as conn:
                conn.execute(
                    update(sessions).where(sessions.c.id_sha256 == key).values(last_seen=iso(stamp))
                )
        return Principal("user", f"user:{row.user}", row.user, user.role), ""

    def end_session(self, cookie: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(sessions).where(sessions.c.id_sha256 == sha256(cookie)))


def csrf_token(session: str) -> str:
    """The session's CSRF token: derived, so never stored."""
    return hmac.new(session.encode(), b"appliance-csrf", hashlib.sha256).hexdigest()
