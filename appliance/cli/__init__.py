"""The `appliance` command. Each command parses, calls one library function, prints.
Every command takes --config and the state/model directory flags (and honours
APPLIANCE_* variables); every command that prints data takes --json."""

from appliance.cli import access, adapters, audit, docs, evals, models, routes, serve, specialize
from appliance.cli.common import main

__all__ = [
    "access",
    "adapters",
    "audit",
    "docs",
    "evals",
    "main",
    "models",
    "routes",
    "serve",
    "specialize",
]
