"""/openapi.json describes every route the app answers, with the security the route
table gives it (issue #19), and /api shows it as a page made of local assets only."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest
from flask import Flask
from openapi_spec_validator import validate

from appliance.auth.guard import SESSION_COOKIE
from appliance.auth.policy import PUBLIC, ROUTE_ROLES

IGNORED_METHODS = {"HEAD", "OPTIONS"}  # Flask answers these itself


def openapi_path(rule: str) -> str:
    """/v1/models/<path:name> -> /v1/models/{name}"""
    return re.sub(r"<(?:[^:<>]+:)?([^:<>]+)>", r"{\1}", rule)


def undocumented(app: Flask, document: dict[str, Any]) -> list[str]:
    """Each route and method of the URL map the document lacks (or gives to another
    endpoint), and each operation it has that no route answers."""
    problems, answered = [], set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":  # Flask's own; the app has none (web.static is kept)
            continue
        path = openapi_path(rule.rule)
        for method in sorted((rule.methods or set()) - IGNORED_METHODS):
            answered.add((path, method.lower()))
            operation = document["paths"].get(path, {}).get(method.lower())
            if operation is None:
                problems.append(f"{method} {path} ({rule.endpoint}) is not in the document")
            elif operation.get("x-endpoint") != rule.endpoint:
                problems.append(f"{method} {path} is {rule.endpoint}, not {operation}")
    for path, item in document["paths"].items():
        for method in item:
            if (path, method) not in answered:
                problems.append(f"{method.upper()} {path} is documented but no route answers it")
    return problems


def dangling_refs(node: Any, root: dict[str, Any]) -> list[str]:
    """Every $ref in the document that does not lead to a definition in it."""
    found = []
    if isinstance(node, dict):
        target = node.get("$ref")
        if isinstance(target, str):
            here: Any = root
            for part in target.removeprefix("#/").split("/"):
                here = here.get(part) if isinstance(here, dict) else None
            if not target.startswith("#/") or here is None:
                found.append(target)
        for value in node.values():
            found += dangling_refs(value, root)
    elif isinstance(node, list):
        for value in node:
            found += dangling_refs(value, root)
    return found


def operations(document: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(p, m, op) for p, item in document["paths"].items() for m, op in item.items()]


@pytest.fixture(scope="module")
def document(app: Flask) -> dict[str, Any]:
    resp = app.test_client().get("/openapi.json")  # public: no token
    assert resp.status_code == 200 and resp.mimetype == "application/json"
    doc: dict[str, Any] = resp.get_json()
    return doc


def test_every_route_is_in_the_document_and_it_is_valid(
    app: Flask, document: dict[str, Any]
) -> None:
    validate(document)
    assert undocumented(app, document) == []
    assert dangling_refs(document, document) == []
    assert len(document["paths"]) >= 36
    ids = [op["operationId"] for _, _, op in operations(document)]
    assert len(ids) == len(set(ids))


def test_the_checks_catch_a_missing_route_and_a_dangling_ref(
    app: Flask, document: dict[str, Any]
) -> None:
    lacking = copy.deepcopy(document)
    del lacking["paths"]["/admin/tokens/{token_id}"]
    del lacking["paths"]["/v2/models/{name}/versions/{version}/infer"]["post"]
    assert undocumented(app, lacking) == [
        "POST /v2/models/{name}/versions/{version}/infer (kserve.infer) is not in the document",
        "DELETE /admin/tokens/{token_id} (admin.revoke_token) is not in the document",
    ]
    stale = copy.deepcopy(document)
    stale["paths"]["/v1/gone"] = {"get": {"x-endpoint": "openai.gone", "responses": {}}}
    assert undocumented(app, stale) == ["GET /v1/gone is documented but no route answers it"]
    del stale["components"]["schemas"]["OipInferRequest"]
    assert "#/components/schemas/OipInferRequest" in dangling_refs(stale, stale)


def test_security_and_roles_come_from_the_route_table(document: dict[str, Any]) -> None:
    schemes = document["components"]["securitySchemes"]
    assert schemes["bearer"] == {**schemes["bearer"], "type": "http", "scheme": "bearer"}
    assert (schemes["session"]["type"], schemes["session"]["in"]) == ("apiKey", "cookie")
    assert schemes["session"]["name"] == SESSION_COOKIE
    for path, method, op in operations(document):
        roles = ROUTE_ROLES[op["x-endpoint"]]
        where = (method, path)
        if roles is PUBLIC:
            assert op["security"] == [] and "x-roles" not in op, where
            assert "Public" in op["description"], where
            continue
        assert op["security"] == [{"bearer": []}, {"session": []}], where
        assert op["x-roles"] == sorted(roles), where
        assert f"Roles: {', '.join(sorted(roles))}" in op["description"], where
        refused = "303" if op["x-endpoint"].startswith("web.") else "401"
        assert {refused, "403", "429"} <= set(op["responses"]), where


def test_errors_are_in_each_protocols_shape(document: dict[str, Any]) -> None:
    for path, method, op in operations(document):
        if "requestBody" in op:
            assert "413" in op["responses"], (method, path)
        for code, response in op["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get("schema")
            if not code.startswith(("4", "5")) or schema is None or path in ("/readyz", "/livez"):
                continue  # (/readyz's 404 and 503, /livez's 503: their reports)
            shape = "OipError" if path.startswith("/v2") else "ErrorResponse"
            assert schema == {"$ref": f"#/components/schemas/{shape}"}, (method, path, code)
    infer = document["paths"]["/v2/models/{name}/infer"]["post"]
    assert "application/octet-stream" in infer["requestBody"]["content"]
    headers = {p["name"] for p in infer["parameters"] if p["in"] == "header"}
    assert headers == {"Inference-Header-Content-Length"}
    metrics = document["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert set(metrics) == {"text/plain"}
    assert set(document["paths"]["/login"]["post"]["responses"]) >= {"303", "401", "429"}
    assert "303" in document["paths"]["/logout"]["post"]["responses"]


LINKS = re.compile(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", re.IGNORECASE)


def test_the_reference_page_lists_every_path_from_local_assets(
    app: Flask, app_token: str, document: dict[str, Any]
) -> None:
    client = app.test_client()
    auth = {"Authorization": f"Bearer {app_token}"}
    resp = client.get("/api", headers=auth)
    assert resp.status_code == 200 and resp.mimetype == "text/html"
    html = resp.get_data(as_text=True)
    for path, method, _ in operations(document):
        assert f'<code class="path">{path}</code>' in html, (method, path)
    for tag in document["tags"]:
        assert f"<h2>{tag['name']}</h2>" in html
    assert "<script" not in html and "style=" not in html  # the CSP allows neither inline
    links = LINKS.findall(html)
    assert "/static/api.css" in links and "/openapi.json" in links
    for link in links:
        assert not re.match(r"(?i)([a-z][a-z0-9+.-]*:|//)", link), link  # no other origin
        if link.startswith("/static/"):
            assert client.get(link, headers=auth).status_code == 200, link
    status = client.get("/status", headers=auth).get_data(as_text=True)
    assert 'href="/api"' in status
    anonymous = client.get("/api")
    assert anonymous.status_code == 303 and anonymous.headers["Location"].startswith("/login")
