"""The models this process serves: the garden of manifests, loaded on demand within a
memory budget (pool.py), by one loader per kind (loader.py), each language model
behind its scheduler (scheduler.py)."""

from __future__ import annotations

from flask import Flask

from appliance.config import Settings
from appliance.serving.loader import EngineLoader, Loader
from appliance.serving.pool import ModelPool

EXTENSION = "appliance.models"


def init_app(app: Flask, settings: Settings, loader: Loader | None = None) -> ModelPool:
    pool = ModelPool(settings, loader or EngineLoader(settings))
    app.extensions[EXTENSION] = pool
    return pool


def get_pool(app: Flask) -> ModelPool:
    pool: ModelPool = app.extensions[EXTENSION]
    return pool
