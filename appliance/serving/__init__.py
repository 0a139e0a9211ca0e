"""The models this process serves: the garden of manifests, loaded on demand within a
memory budget (pool.py), by one loader per kind (loader.py), each language model
behind its scheduler (scheduler.py); served names and their champions (aliases.py)."""

from __future__ import annotations

from flask import Flask

from appliance.config import Settings
from appliance.serving.aliases import AliasTable
from appliance.serving.loader import EngineLoader, Loader
from appliance.serving.pool import ModelPool

EXTENSION = "appliance.models"
ALIASES = "appliance.aliases"


def init_app(app: Flask, settings: Settings, loader: Loader | None = None) -> ModelPool:
    pool = ModelPool(settings, loader or EngineLoader(settings))
    aliases = AliasTable(settings.aliases_path)
    pool.aliases = aliases.resolve  # a served name is its champion
    app.extensions[EXTENSION] = pool
    app.extensions[ALIASES] = aliases
    return pool


def get_aliases(app: Flask) -> AliasTable:
    aliases: AliasTable = app.extensions[ALIASES]
    return aliases


def get_pool(app: Flask) -> ModelPool:
    pool: ModelPool = app.extensions[EXTENSION]
    return pool
