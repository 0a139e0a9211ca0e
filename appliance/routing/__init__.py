"""Specialist-first routing: a route's name answers with the specialist whose domain
the question is in, the generalist when none is, and the site's referral message when
neither is confident (spec.py: the route's config and calibration; router.py: the
decision; calibrate.py: the thresholds, from an eval suite)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flask import Flask

if TYPE_CHECKING:
    from appliance.routing.router import Router

EXTENSION = "appliance.router"


def init_app(app: Flask, router: Router) -> Router:
    app.extensions[EXTENSION] = router
    return router


def get_router(app: Flask) -> Router:
    router: Router = app.extensions[EXTENSION]
    return router
