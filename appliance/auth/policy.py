"""The route table: every endpoint and the roles that may reach it. An endpoint that is
not in this table is denied to everyone; the tests walk the app's URL map against it."""

from __future__ import annotations

PUBLIC = frozenset({"*public*"})  # no authentication needed
SIGNED_IN = frozenset({"admin", "clinician", "line", "auditor"})  # any known principal

INFERENCE = frozenset({"admin", "clinician", "line"})
TENSORS = frozenset({"admin", "line"})
ADMIN = frozenset({"admin"})
AUDIT = frozenset({"admin", "auditor"})
WEB = frozenset({"admin", "clinician"})

ROUTE_ROLES: dict[str, frozenset[str]] = {
    "health.healthz": PUBLIC,
    "health.readyz": PUBLIC,
    "health.livez": PUBLIC,
    "openapi.openapi_json": PUBLIC,
    "web.static": PUBLIC,
    "web.favicon": PUBLIC,
    "web.login_page": PUBLIC,
    "web.login": PUBLIC,
    "web.logout": SIGNED_IN,
    "web.home": WEB,
    "web.status": ADMIN,
    "web.api_reference": SIGNED_IN,
    "openai.chat_completions": INFERENCE,
    "openai.completions": INFERENCE,
    "openai.embeddings": INFERENCE,
    "openai.list_models": INFERENCE,
    "openai.get_model": INFERENCE,
    "openai.retrieve": INFERENCE,
    "tokens.tokenize": INFERENCE,
    "tokens.detokenize": INFERENCE,
    "openai.list_collections": INFERENCE,
    "kserve.server_metadata": TENSORS,
    "kserve.live": PUBLIC,
    "kserve.ready": PUBLIC,
    "kserve.model_metadata": TENSORS,
    "kserve.model_ready": TENSORS,
    "kserve.infer": TENSORS,
    "metrics.metrics": PUBLIC,
    "admin.list_tokens": ADMIN,
    "admin.create_token": ADMIN,
    "admin.revoke_token": ADMIN,
    "admin.list_users": ADMIN,
    "admin.add_user": ADMIN,
    "admin.disable_user": ADMIN,
    "admin.reset_password": ADMIN,
    "admin.drain": ADMIN,
    "audit_api.verify": AUDIT,
    "audit_api.export": AUDIT,
}

# The routes that take a model's time: a caller may have max_requests_per_caller of
# these in flight at once (running, queued or streaming).
MODEL_WORK = frozenset(
    {
        "openai.chat_completions",
        "openai.completions",
        "openai.embeddings",
        "openai.retrieve",
        "kserve.infer",
    }
)


def allowed(endpoint: str | None, role: str | None) -> bool:
    roles = ROUTE_ROLES.get(endpoint or "")
    if roles is None:
        return False
    return roles is PUBLIC or (role is not None and role in roles)
