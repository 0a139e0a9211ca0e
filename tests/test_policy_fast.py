"""The route table's rule on its own: a route not in the table is denied to everyone, a
public route is open to all, any other route to its roles only."""

from __future__ import annotations

from appliance.auth.policy import PUBLIC, ROUTE_ROLES, allowed
from appliance.auth.store import ROLES


def test_a_route_not_in_the_table_is_denied_to_everyone() -> None:
    for role in (*ROLES, None):
        assert not allowed("openai.not_a_route", role)
        assert not allowed(None, role)  # no route matched
        assert not allowed("", role)


def test_a_public_route_is_open_without_a_role() -> None:
    for role in (*ROLES, None, "no such role"):
        assert allowed("health.healthz", role)


def test_other_routes_only_to_their_roles() -> None:
    for endpoint, roles in ROUTE_ROLES.items():
        if roles is PUBLIC:
            continue
        for role in ROLES:
            assert allowed(endpoint, role) == (role in roles), (endpoint, role)
        assert not allowed(endpoint, None), endpoint  # signed in, or not let in
        assert not allowed(endpoint, "*public*"), endpoint  # no role is "public"
