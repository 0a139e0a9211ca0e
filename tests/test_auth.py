"""Access control through the app on real SQLite files: the role x route matrix taken
from the app's own URL map, 401 against 403 in each shape, tokens, accounts, sessions,
CSRF, lockout, idle timeout, rate limits, the admin API, no secret at rest."""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from flask import Flask
from flask.testing import FlaskClient

from appliance.app import close_app, create_app
from appliance.auth.guard import CSRF_HEADER, SESSION_COOKIE
from appliance.auth.policy import PUBLIC, ROUTE_ROLES
from appliance.auth.store import ROLES, AuthStore, csrf_token, iso
from appliance.cli import main
from appliance.config import Settings, load_settings

PASSWORD = "correct horse battery"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # No model file: the app starts in a moment, and access control does not need one.
    return load_settings(
        env={}, overrides={"state_dir": tmp_path / "state", "rate_limit_per_minute": 0}
    )


def make_app(settings: Settings) -> Iterator[Flask]:
    app = create_app(settings)
    yield app
    close_app(app)


@pytest.fixture
def app(settings: Settings) -> Iterator[Flask]:
    yield from make_app(settings)


@pytest.fixture
def tokens(settings: Settings) -> dict[str, str]:
    store = AuthStore(settings)
    try:
        return {role: store.create_token(f"{role}-token", role)["token"] for role in ROLES}
    finally:
        store.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def concrete(rule: str) -> str:
    return re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"\1-x", rule)


def refused_by_gate(resp: Any) -> bool:
    """A 401 or 403 from the access gate (not from a route's own checks)."""
    if resp.status_code == 401:
        return "WWW-Authenticate" in resp.headers
    return resp.status_code == 403 and "may not use" in resp.get_data(as_text=True)


def test_every_route_is_in_the_table(app: Flask) -> None:
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints - set(ROUTE_ROLES) == set(), "a route escaped the access table"


def test_role_by_route_matrix(app: Flask, tokens: dict[str, str]) -> None:
    client = app.test_client()
    checked = 0
    for rule in app.url_map.iter_rules():
        roles = ROUTE_ROLES[rule.endpoint]
        path = concrete(rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            anonymous = client.open(path, method=method)
            if roles is PUBLIC:  # (the sign-in form may still refuse bad credentials)
                assert not refused_by_gate(anonymous), (method, path)
                continue
            if rule.endpoint.startswith("web."):
                assert anonymous.status_code == 303, (method, path)  # to the sign-in page
            else:
                assert anonymous.status_code == 401, (method, path)
            for role, token in tokens.items():
                resp = client.open(path, method=method, headers=bearer(token))
                if role in roles:
                    assert not refused_by_gate(resp), (role, method, path, resp.data)
                else:
                    assert resp.status_code == 403 and refused_by_gate(resp), (role, path)
                checked += 1
    assert checked > 50


def test_401_and_403_in_the_openai_shape(app: Flask, tokens: dict[str, str]) -> None:
    client = app.test_client()
    unknown = client.get("/v1/models")
    assert unknown.status_code == 401 and "Bearer" in unknown.headers["WWW-Authenticate"]
    assert set(unknown.get_json()["error"]) == {"message", "type", "param", "code"}
    assert unknown.get_json()["error"]["type"] == "authentication_error"
    forbidden = client.get("/admin/tokens", headers=bearer(tokens["line"]))
    assert forbidden.status_code == 403
    assert forbidden.get_json()["error"]["type"] == "permission_error"
    assert "line" in forbidden.get_json()["error"]["message"]


def test_401_and_403_in_the_v2_shape(app: Flask, tokens: dict[str, str]) -> None:
    client = app.test_client()
    unknown = client.get("/v2/models/anything")
    assert unknown.status_code == 401
    assert set(unknown.get_json()) == {"error"} and isinstance(unknown.get_json()["error"], str)
    forbidden = client.get("/v2/models/anything", headers=bearer(tokens["clinician"]))
    assert forbidden.status_code == 403
    assert set(forbidden.get_json()) == {"error"}
    assert "clinician" in forbidden.get_json()["error"]


def test_garbage_and_wrong_tokens_are_401(app: Flask, tokens: dict[str, str]) -> None:
    client = app.test_client()
    good = tokens["admin"]
    for header in (
        "Bearer",
        "Basic abc",
        "Bearer nonsense",
        f"Bearer {good[:-1]}x",
        f"Bearer {good}extra",
        "Bearer apl_00000000_" + "a" * 43,
    ):
        assert client.get("/v1/models", headers={"Authorization": header}).status_code == 401


def test_expired_and_revoked_tokens_are_refused_at_once(
    app: Flask, settings: Settings, tokens: dict[str, str]
) -> None:
    client = app.test_client()
    admin = bearer(tokens["admin"])
    made = client.post(
        "/admin/tokens", json={"name": "cam-3", "role": "line", "expires": "1h"}, headers=admin
    )
    assert made.status_code == 201
    line = made.get_json()
    assert client.get("/v1/models", headers=bearer(line["token"])).status_code != 401
    with sqlite3.connect(settings.auth_db_path) as conn:  # an hour passes
        conn.execute(
            "UPDATE tokens SET expires = ? WHERE id = ?",
            (iso(datetime.now(UTC) - timedelta(seconds=1)), line["id"]),
        )
    assert client.get("/v1/models", headers=bearer(line["token"])).status_code == 401

    other = client.post(
        "/admin/tokens", json={"name": "cam-4", "role": "line"}, headers=admin
    ).get_json()
    assert client.get("/v1/models", headers=bearer(other["token"])).status_code != 401
    assert client.delete(f"/admin/tokens/{other['id']}", headers=admin).status_code == 200
    assert client.get("/v1/models", headers=bearer(other["token"])).status_code == 401
    listed = client.get("/admin/tokens", headers=admin).get_json()["data"]
    assert next(t for t in listed if t["id"] == other["id"])["revoked"]
    assert all("token" not in t and "secret_sha256" not in t for t in listed)


def sign_in(client: FlaskClient, name: str, password: str) -> Any:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.get_data(as_text=True))
    assert token is not None
    return client.post(
        "/login", data={"username": name, "password": password, "csrf_token": token[1]}
    )


def add_user(settings: Settings, name: str = "nurse.ana", role: str = "clinician") -> None:
    store = AuthStore(settings)
    try:
        store.add_user(name, role, PASSWORD)
    finally:
        store.close()


def session_of(client: FlaskClient) -> str:
    cookie = client.get_cookie(SESSION_COOKIE)
    assert cookie is not None
    return cookie.value


def test_sign_in_session_cookie_and_sign_out(app: Flask, settings: Settings) -> None:
    add_user(settings)
    client = app.test_client()
    assert client.get("/").status_code == 303
    resp = sign_in(client, "nurse.ana", PASSWORD)
    assert resp.status_code == 303 and resp.headers["Location"] == "/"
    cookie_header = next(
        h for h in resp.headers.getlist("Set-Cookie") if h.startswith(SESSION_COOKIE)
    )
    assert "HttpOnly" in cookie_header and "SameSite=Strict" in cookie_header
    assert "Secure" not in cookie_header  # plain HTTP on loopback: Secure comes with TLS
    home = client.get("/")
    assert home.status_code == 200 and "nurse.ana" in home.get_data(as_text=True)
    assert "default-src 'self'" in home.headers["Content-Security-Policy"]
    assert client.get("/v1/models").status_code != 401  # the page may call /v1
    assert client.get("/admin/users").status_code == 403  # but a clinician is no admin
    out = client.post("/logout", data={"csrf_token": csrf_token(session_of(client))})
    assert out.status_code == 303
    assert client.get("/").status_code == 303


def test_csrf_is_required_for_cookie_writes(app: Flask, settings: Settings) -> None:
    add_user(settings)
    client = app.test_client()
    sign_in(client, "nurse.ana", PASSWORD)
    session = session_of(client)
    body = {"model": "none", "messages": [{"role": "user", "content": "hi"}]}
    refused = client.post("/v1/chat/completions", json=body)
    assert refused.status_code == 403 and refused.get_json()["error"]["code"] == "csrf_failed"
    wrong = client.post("/v1/chat/completions", json=body, headers={CSRF_HEADER: "0" * 64})
    assert wrong.status_code == 403
    right = client.post(
        "/v1/chat/completions", json=body, headers={CSRF_HEADER: csrf_token(session)}
    )
    assert right.status_code not in (401, 403)
    assert client.post("/logout").status_code == 403  # a form post without its token
    # Login CSRF: a sign-in form not issued by the appliance is refused.
    fresh = app.test_client()
    forged = fresh.post(
        "/login", data={"username": "nurse.ana", "password": PASSWORD, "csrf_token": "forged"}
    )
    assert forged.status_code == 403 and fresh.get_cookie(SESSION_COOKIE) is None


def test_lockout_and_its_end(app: Flask, settings: Settings) -> None:
    add_user(settings)
    client = app.test_client()
    for _ in range(settings.login_max_failures):
        assert sign_in(client, "nurse.ana", "wrong password!").status_code == 401
    locked = sign_in(client, "nurse.ana", PASSWORD)
    assert locked.status_code == 401 and "locked" in locked.get_data(as_text=True)
    # The lockout shuts out the address that guessed, not the nurse at her own desk.
    desk = app.test_client()
    desk.environ_base["REMOTE_ADDR"] = "10.1.2.3"
    assert sign_in(desk, "nurse.ana", PASSWORD).status_code == 303
    with sqlite3.connect(settings.auth_db_path) as conn:  # the lockout time passes
        conn.execute(
            "UPDATE login_failures SET locked_until = ?",
            (iso(datetime.now(UTC) - timedelta(seconds=1)),),
        )
    assert sign_in(client, "nurse.ana", PASSWORD).status_code == 303


def test_an_address_that_guesses_many_names_is_turned_away(app: Flask, settings: Settings) -> None:
    add_user(settings)
    client = app.test_client()
    limit = settings.login_max_failures * 4
    for i in range(limit):
        assert sign_in(client, f"guess{i}", "wrong password!").status_code == 401
    turned = sign_in(client, "nurse.ana", PASSWORD)
    assert turned.status_code == 429 and "from this computer" in turned.get_data(as_text=True)
    other = app.test_client()
    other.environ_base["REMOTE_ADDR"] = "10.1.2.3"
    assert sign_in(other, "nurse.ana", PASSWORD).status_code == 303
    # The names tried (a password typed in the wrong field, say) are kept nowhere in
    # clear: the auth database has their digest, the audit log "unknown user".
    raw = b"".join(
        p.read_bytes()
        for db in (settings.auth_db_path, settings.audit_db_path)
        for p in db.parent.glob(db.name + "*")
    )
    assert b"guess1" not in raw and b"unknown user" in raw


def test_sign_in_never_holds_the_write_lock_over_scrypt(
    app: Flask, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """scrypt runs for every attempt (an unknown name, a locked account: timing tells
    nothing), and never while the auth database's write lock is held, which every
    signed-in request would queue behind."""
    from appliance.auth import store as store_module

    add_user(settings)
    seen: list[bool] = []
    real = store_module.check_password

    def spy(password: str, stored: str) -> bool:
        probe = sqlite3.connect(settings.auth_db_path, timeout=0)
        try:
            probe.execute("BEGIN IMMEDIATE")  # fails at once if someone holds the lock
            probe.execute("ROLLBACK")
            seen.append(True)
        except sqlite3.OperationalError:
            seen.append(False)
        finally:
            probe.close()
        return real(password, stored)

    monkeypatch.setattr(store_module, "check_password", spy)
    client = app.test_client()
    for _ in range(settings.login_max_failures + 1):  # the last one meets the lock
        sign_in(client, "nurse.ana", "wrong password!")
    sign_in(client, "nobody.here", "wrong password!")
    assert seen == [True] * (settings.login_max_failures + 2)


def test_signed_in_requests_do_not_take_the_write_lock(app: Flask, settings: Settings) -> None:
    add_user(settings)
    client = app.test_client()
    assert sign_in(client, "nurse.ana", PASSWORD).status_code == 303
    holder = sqlite3.connect(settings.auth_db_path)
    holder.execute("BEGIN IMMEDIATE")  # a long write elsewhere (a sign-in, the admin API)
    try:
        assert client.get("/").status_code == 200
        assert client.get("/v1/models").status_code == 200
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_idle_timeout_signs_out(app: Flask, settings: Settings) -> None:
    add_user(settings)
    client = app.test_client()
    sign_in(client, "nurse.ana", PASSWORD)
    assert client.get("/").status_code == 200
    idle = timedelta(minutes=settings.session_idle_minutes, seconds=1)
    with sqlite3.connect(settings.auth_db_path) as conn:
        conn.execute("UPDATE sessions SET last_seen = ?", (iso(datetime.now(UTC) - idle),))
    resp = client.get("/")
    assert resp.status_code == 303 and resp.headers["Location"] == "/login?expired=1"
    assert "inactivity" in client.get("/login?expired=1").get_data(as_text=True)
    assert client.get("/v1/models").status_code == 401


def test_disabled_user_loses_sessions_at_once(
    app: Flask, settings: Settings, tokens: dict[str, str]
) -> None:
    add_user(settings)
    client = app.test_client()
    sign_in(client, "nurse.ana", PASSWORD)
    admin = app.test_client()
    done = admin.post("/admin/users/nurse.ana/disable", headers=bearer(tokens["admin"]))
    assert done.status_code == 200
    assert client.get("/").status_code == 303
    assert sign_in(app.test_client(), "nurse.ana", PASSWORD).status_code == 401


def test_rate_limit_gives_429_with_retry_after(tmp_path: Path) -> None:
    settings = load_settings(env={}, overrides={"state_dir": tmp_path, "rate_limit_per_minute": 3})
    for app in make_app(settings):
        store = AuthStore(settings)
        token = store.create_token("burst", "line")["token"]
        store.close()
        client = app.test_client()
        codes = [client.get("/v1/models", headers=bearer(token)).status_code for _ in range(4)]
        assert codes[:3] == [200, 200, 200] and codes[3] == 429
        resp = client.get("/v1/models", headers=bearer(token))
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.get_json()["error"]["code"] == "rate_limited"


def test_client_subnet_allowlist(tmp_path: Path) -> None:
    settings = load_settings(
        env={}, overrides={"state_dir": tmp_path, "allowed_clients": "10.20.0.0/16"}
    )
    for app in make_app(settings):
        resp = app.test_client().get("/healthz")
        assert resp.status_code == 403 and "127.0.0.1" in resp.get_json()["error"]["message"]
        # Bound to ::, an IPv4 client arrives as ::ffff:a.b.c.d: IPv4 subnets match it.
        inside = app.test_client().get("/healthz", environ_base={"REMOTE_ADDR": "::ffff:10.20.1.2"})
        assert inside.status_code == 200
        outside = app.test_client().get(
            "/healthz", environ_base={"REMOTE_ADDR": "::ffff:10.30.1.2"}
        )
        assert outside.status_code == 403


def test_admin_api_users_and_passwords(
    app: Flask, settings: Settings, tokens: dict[str, str]
) -> None:
    client = app.test_client()
    admin = bearer(tokens["admin"])
    made = client.post(
        "/admin/users",
        json={"name": "dr.b", "role": "clinician", "password": PASSWORD},
        headers=admin,
    )
    assert made.status_code == 201
    short = client.post(
        "/admin/users",
        json={"name": "dr.c", "role": "clinician", "password": "short"},
        headers=admin,
    )
    assert short.status_code == 400 and "at least" in short.get_json()["error"]["message"]
    bad_role = client.post(
        "/admin/users", json={"name": "x", "role": "king", "password": PASSWORD}, headers=admin
    )
    assert bad_role.status_code == 400 and bad_role.get_json()["error"]["param"] == "role"
    assert client.post("/admin/users/ghost/disable", headers=admin).status_code == 404
    reset = client.post(
        "/admin/users/dr.b/password", json={"password": "another long one"}, headers=admin
    )
    assert reset.status_code == 200
    assert sign_in(app.test_client(), "dr.b", PASSWORD).status_code == 401
    assert sign_in(app.test_client(), "dr.b", "another long one").status_code == 303
    names = [u["name"] for u in client.get("/admin/users", headers=admin).get_json()["data"]]
    assert names == ["dr.b"]


def test_no_token_or_password_in_clear_in_the_state_dir(
    app: Flask, settings: Settings, tokens: dict[str, str]
) -> None:
    client = app.test_client()
    admin = bearer(tokens["admin"])
    made = client.post(
        "/admin/tokens", json={"name": "scan", "role": "line"}, headers=admin
    ).get_json()
    client.post(
        "/admin/users",
        json={"name": "dr.scan", "role": "clinician", "password": PASSWORD},
        headers=admin,
    )
    signed = app.test_client()
    sign_in(signed, "dr.scan", PASSWORD)
    sign_in(app.test_client(), "dr.scan", "a wrong password")
    session = session_of(signed)
    secrets = [
        made["token"],
        made["token"].split("_", 2)[2],
        PASSWORD,
        "a wrong password",
        session,
        *tokens.values(),
        *(t.split("_", 2)[2] for t in tokens.values()),
    ]
    blob = b"".join(p.read_bytes() for p in settings.state_dir.rglob("*") if p.is_file())
    for secret in secrets:
        assert secret.encode() not in blob, secret[:12]


def test_auth_events_are_audited(app: Flask, settings: Settings, tokens: dict[str, str]) -> None:
    from appliance.api.trail import get_store
    from appliance.audit.reader import records

    add_user(settings)
    client = app.test_client()
    client.get("/v1/models", headers=bearer("apl_deadbeef_" + "x" * 43))
    client.get("/admin/users", headers=bearer(tokens["line"]))
    sign_in(client, "nurse.ana", "not the password")
    client.post(
        "/admin/users",
        json={"name": "dr.d", "role": "clinician", "password": PASSWORD},
        headers=bearer(tokens["admin"]),
    )
    rows = list(records(get_store(app)))
    by_type = {r["error_type"]: r for r in rows if r["error_type"]}
    assert by_type["unknown_token"]["status"] == 401
    assert by_type["unknown_token"]["actor_id"] == "token:deadbeef"
    assert by_type["forbidden"]["status"] == 403 and by_type["forbidden"]["actor_role"] == "line"
    failed = by_type["wrong_password"]
    assert failed["actor_name"] == "nurse.ana" and failed["status"] == 401
    assert failed["content"]["input"]["password"] == "[redacted]"
    created = next(r for r in rows if r["route"] == "/admin/users" and r["status"] == 201)
    assert created["actor_role"] == "admin"
    assert created["content"]["input"] == {
        "name": "dr.d",
        "role": "clinician",
        "password": "[redacted]",
    }


def test_cli_tokens_and_users(settings: Settings) -> None:
    runner = CliRunner()
    state = ["--state-dir", str(settings.state_dir)]
    made = runner.invoke(
        main,
        [
            "tokens",
            "create",
            "--name",
            "line-7",
            "--role",
            "line",
            "--expires",
            "90d",
            "--json",
            *state,
        ],
    )
    assert made.exit_code == 0, made.output
    import json

    token = json.loads(made.output)
    assert token["token"].startswith("apl_") and token["expires"]
    listed = json.loads(runner.invoke(main, ["tokens", "list", "--json", *state]).output)
    assert [t["id"] for t in listed] == [token["id"]] and "token" not in listed[0]
    assert runner.invoke(main, ["tokens", "revoke", token["id"], *state]).exit_code == 0
    revoked = json.loads(runner.invoke(main, ["tokens", "list", "--json", *state]).output)
    assert revoked[0]["revoked"]
    bad = runner.invoke(
        main, ["tokens", "create", "--name", "x", "--role", "line", "--expires", "soon", *state]
    )
    assert bad.exit_code != 0 and "90d" in bad.output

    added = runner.invoke(
        main,
        ["users", "add", "dr.e", "--role", "clinician", "--password-stdin", "--json", *state],
        input=PASSWORD + "\n",
    )
    assert added.exit_code == 0, added.output
    users = json.loads(runner.invoke(main, ["users", "list", "--json", *state]).output)
    assert users[0]["name"] == "dr.e" and users[0]["disabled"] is False
    reset = runner.invoke(
        main,
        ["users", "reset-password", "dr.e", "--password-stdin", *state],
        input="a brand new password\n",
    )
    assert reset.exit_code == 0
    assert runner.invoke(main, ["users", "disable", "dr.e", *state]).exit_code == 0
    users = json.loads(runner.invoke(main, ["users", "list", "--json", *state]).output)
    assert users[0]["disabled"] is True
    prompted = runner.invoke(
        main,
        ["users", "add", "dr.f", "--role", "auditor", *state],
        input=f"{PASSWORD}\n{PASSWORD}\n",
    )
    assert prompted.exit_code == 0, prompted.output


def test_a_remembered_token_is_still_checked_on_every_request(
    app: Flask, settings: Settings, tokens: dict[str, str]
) -> None:
    """A request thread remembers the tokens it has verified, but asks the database on
    every request whether anything changed: a wrong secret behind a remembered token's
    id is refused, and a revocation by another process (here a plain sqlite3
    connection, as the CLI's would be) counts from the very next request."""
    client = app.test_client()
    line = tokens["line"]
    for _ in range(3):
        assert client.get("/v1/models", headers=bearer(line)).status_code != 401
    wrong = line[:-1] + ("A" if line[-1] != "A" else "B")
    assert client.get("/v1/models", headers=bearer(wrong)).status_code == 401
    assert client.get("/v1/models", headers=bearer(line)).status_code != 401
    with sqlite3.connect(settings.auth_db_path) as conn:
        conn.execute("UPDATE tokens SET revoked = ? WHERE id = ?", ("now", line.split("_")[1]))
    assert client.get("/v1/models", headers=bearer(line)).status_code == 401
    assert client.get("/v1/models", headers=bearer(tokens["admin"])).status_code != 401


# Written by hand from the README's access-control section, NOT from the route table:
# widening a role's routes in appliance/auth/policy.py fails here until the README and
# this table say so too. Every route the app answers must be in it.
ANYONE = "anyone"
A, C, L, AU = "admin", "clinician", "line", "auditor"
EXPECTED: dict[tuple[str, str], set[str] | str] = {
    ("GET", "/healthz"): ANYONE,
    ("GET", "/readyz"): ANYONE,
    ("GET", "/livez"): ANYONE,
    ("GET", "/metrics"): ANYONE,
    ("GET", "/openapi.json"): ANYONE,
    ("GET", "/v2/health/live"): ANYONE,
    ("GET", "/v2/health/ready"): ANYONE,
    ("GET", "/login"): ANYONE,
    ("POST", "/login"): ANYONE,
    ("GET", "/favicon.ico"): ANYONE,
    ("GET", "/static/<path:filename>"): ANYONE,
    ("POST", "/logout"): {A, C, L, AU},
    ("GET", "/api"): {A, C, L, AU},
    ("GET", "/"): {A, C},
    ("GET", "/status"): {A},
    ("POST", "/v1/chat/completions"): {A, C, L},
    ("POST", "/v1/completions"): {A, C, L},
    ("POST", "/v1/embeddings"): {A, C, L},
    ("GET", "/v1/models"): {A, C, L},
    ("GET", "/v1/models/<path:name>"): {A, C, L},
    ("POST", "/v1/retrieve"): {A, C, L},
    ("GET", "/v1/collections"): {A, C, L},
    ("POST", "/tokenize"): {A, C, L},
    ("POST", "/detokenize"): {A, C, L},
    ("GET", "/v2"): {A, L},
    ("GET", "/v2/models/<name>"): {A, L},
    ("GET", "/v2/models/<name>/ready"): {A, L},
    ("POST", "/v2/models/<name>/infer"): {A, L},
    ("GET", "/v2/models/<name>/versions/<version>"): {A, L},
    ("GET", "/v2/models/<name>/versions/<version>/ready"): {A, L},
    ("POST", "/v2/models/<name>/versions/<version>/infer"): {A, L},
    ("GET", "/admin/tokens"): {A},
    ("POST", "/admin/tokens"): {A},
    ("DELETE", "/admin/tokens/<token_id>"): {A},
    ("GET", "/admin/users"): {A},
    ("POST", "/admin/users"): {A},
    ("POST", "/admin/users/<name>/disable"): {A},
    ("POST", "/admin/users/<name>/password"): {A},
    ("POST", "/admin/drain"): {A},
    ("GET", "/audit/verify"): {A, AU},
    ("GET", "/audit/export"): {A, AU},
}


def test_role_by_route_matrix_as_the_readme_says(app: Flask, tokens: dict[str, str]) -> None:
    client = app.test_client()
    answered = {
        (method, rule.rule)
        for rule in app.url_map.iter_rules()
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}
    }
    assert answered == set(EXPECTED), "a route the table does not say who may use"
    for (method, rule), who in EXPECTED.items():
        path = concrete(rule)
        anonymous = client.open(path, method=method)
        if who == ANYONE:
            assert not refused_by_gate(anonymous), (method, path)
            continue
        assert anonymous.status_code in (401, 303), (method, path)
        for role, token in tokens.items():
            resp = client.open(path, method=method, headers=bearer(token))
            if role in who:
                assert not refused_by_gate(resp), (role, method, path)
            else:
                assert resp.status_code == 403, (role, method, path, resp.status_code)


def test_the_auditor_reaches_the_audit_routes_and_nothing_else(
    app: Flask, tokens: dict[str, str]
) -> None:
    """The README: auditor, `/audit` only (signing out and the API reference aside)."""
    client = app.test_client()
    reached = set()
    for rule in app.url_map.iter_rules():
        if ROUTE_ROLES[rule.endpoint] is PUBLIC:
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            resp = client.open(
                concrete(rule.rule), method=method, headers=bearer(tokens["auditor"])
            )
            if not refused_by_gate(resp) and resp.status_code != 403:
                reached.add((method, rule.rule))
    assert reached == {
        ("GET", "/audit/verify"),
        ("GET", "/audit/export"),
        ("POST", "/logout"),
        ("GET", "/api"),
    }
