"""The model garden: every manifest verified at start, each model loaded on its first
request (pinned ones at start), kept loaded for its keep-alive, and unloaded when idle
past it or when another model needs its memory (least recently used first).

One lookup, ``acquire(name, kind)``, returns a lease on a ready model or raises a
domain problem: unknown, wrong kind, refused, no room, still loading. A lease keeps its
model loaded until it is released (a stream holds it until the stream ends).

A model's life: unloaded -> loading -> ready -> unloading -> unloaded; refused (its
file failed verification, it can never fit, or it failed to load) is final until the
service restarts. Loads and unloads are told to ``on_event`` (the audit log, metrics).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import psutil

from appliance.config import Settings
from appliance.problems import Invalid, NotFound, Unavailable
from appliance.registry import (
    Manifest,
    ManifestError,
    Verification,
    file_identity,
    load_manifests,
    verify_all,
    verify_model,
)
from appliance.serving.budget import Budget, Candidate
from appliance.serving.loader import Loader, Parts, ServeSettings
from appliance.serving.models import ChatModel, Loaded, RunModel

log = logging.getLogger(__name__)

# Where each kind is served: named in the error a wrong-kind request gets.
KIND_ROUTES = {
    "chat": "/v1/chat/completions or /v1/completions",
    "specialist": "/v1/chat/completions or /v1/completions",
    "embedding": "/v1/embeddings",
    "tensor": "/v2/models/{name}/infer",
    "adapter": "a specialist that names it",
}
KIND_NAMES = {
    "chat": "a chat model",
    "specialist": "a specialist",
    "embedding": "an embedding model",
    "tensor": "a tensor model",
    "adapter": "a LoRA adapter",
}


_MOVING = ("loading", "unloading")


def _served_as(kind: str) -> str:
    """The kind of request that reaches a model of this kind: a specialist answers
    chat requests; an adapter none on its own."""
    return "chat" if kind == "specialist" else kind


class UnknownModel(NotFound):
    def __init__(self, name: str, known: list[str]) -> None:
        super().__init__(
            f"model {name!r} does not exist; available: {', '.join(known) or 'none'}",
            param="model",
            code="model_not_found",
        )


class WrongKind(Invalid):
    def __init__(self, name: str, kind: str, wanted: str) -> None:
        route = KIND_ROUTES[kind].format(name=name)
        super().__init__(
            f"model {name!r} is {KIND_NAMES[kind]} (kind {kind}), not {KIND_NAMES[wanted]}: "
            f"use {route}",
            param="model",
            code="wrong_model_kind",
        )
        self.kind = kind


class ModelUnavailable(Unavailable):
    def __init__(self, message: str, retry_after: int | None = None) -> None:
        super().__init__(message, param="model", code="model_unavailable", retry_after=retry_after)


class NoRoom(Unavailable):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(
            message, param="model", code="insufficient_memory", retry_after=retry_after
        )


@dataclass(frozen=True)
class PoolEvent:
    """A load or an unload, for the audit log, the metrics and the log."""

    action: str  # load | unload | load_failed
    model: str
    sha256: str
    reason: str  # first request, pinned, keep-alive, make room for X, stopping, or the error
    seconds: float = 0.0
    memory_bytes: int = 0
    # A language model's load: the kernels it runs on (with the self-test's word) and
    # where its layers are, as /v1/models shows them.
    runs_on: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Entry:
    manifest: Manifest
    serve: ServeSettings
    need: int
    identities: list[list[int]] | None
    state: str = "unloaded"  # unloaded | loading | ready | unloading | refused
    reason: str | None = None
    missing: bool = False  # a catalogue model not fetched: refused, and not listed
    model: Loaded | None = None
    in_use: int = 0
    last_used: float = 0.0
    settled: threading.Event = field(default_factory=threading.Event)  # a load/unload ended
    loads: int = 0
    unloads: int = 0
    load_seconds: float | None = None
    rss_growth: int | None = None
    parts: Parts | None = None  # a specialist's base and adapters
    base_lease: Lease | None = None  # a loaded specialist holds its base

    @property
    def pinned(self) -> bool:
        return self.manifest.serve.pinned

    def candidate(self) -> Candidate:
        return Candidate(self.manifest.name, self.need, self.last_used, self.pinned, self.in_use)


class Lease:
    """A ready model held for one request; ``release`` (idempotent) lets it go."""

    def __init__(self, pool: ModelPool, entry: _Entry) -> None:
        self._pool = pool
        self._entry = entry
        self.model: Loaded = entry.model  # type: ignore[assignment]  # ready: set
        self.manifest = entry.manifest
        self.parts = entry.parts  # a specialist's base and adapters
        self.loaded_now = False  # this request waited for the load
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._pool._release(self._entry)


Notify = Callable[[PoolEvent], None]


class ModelPool:
    def __init__(
        self,
        settings: Settings,
        loader: Loader,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.loader = loader
        self.clock = clock
        self.problems: list[str] = []  # not tied to one model (a bad imported manifest)
        self.listeners: list[Notify] = []
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self.budget = Budget(settings.memory_limit_mb, settings.memory_reserve_mb)
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None
        # A served name's champion (serving/aliases.py); by default every name is its own.
        self.aliases: Callable[[str], str] = lambda name: name

    # -- start and stop -------------------------------------------------------------

    def open(self) -> None:
        """Read and verify every manifest; load the pinned models now (in start-up)."""
        try:
            manifests = load_manifests(self.settings, self.problems)
        except ManifestError as exc:
            self.problems.append(str(exc))
            log.error("manifests refused", extra={"reason": str(exc)})
            return
        for problem in self.problems:  # bad imported manifests, left out
            log.error("manifest refused", extra={"reason": problem})
        for verification in verify_all(self.settings, manifests.values()):
            self._add(manifests[verification.name], verification)
        for entry in list(self._entries.values()):
            if entry.manifest.kind == "specialist" and entry.state != "refused":
                self._compose(entry)
        for entry in self._entries.values():
            if entry.pinned and entry.state == "unloaded":
                try:
                    self.acquire(entry.manifest.name, reason="pinned").release()
                except Unavailable as exc:  # /readyz says why until it is mended
                    entry.reason = entry.reason or exc.message
                    log.error(exc.message, extra={"model": entry.manifest.name})

    def _add(self, manifest: Manifest, verification: Verification) -> None:
        serve = ServeSettings.of(self.settings, manifest)
        # A specialist's footprint needs its base's: _compose counts it.
        need = 0 if manifest.kind == "specialist" else self.loader.footprint(manifest)
        entry = _Entry(manifest, serve, need, verification.identities)
        self._entries[manifest.name] = entry
        if not verification.ok:
            entry.missing = verification.state == "missing"
            if entry.missing and manifest.fetch is not None:
                verification = replace(
                    verification,
                    message=f"{verification.message}; install it with "
                    f"`appliance models fetch {manifest.name}`",
                )
            self._refuse(entry, verification.message, loud=entry.pinned or not entry.missing)
            return
        too_big = self.budget.never_fits(manifest.name, entry.need)
        if too_big is not None:
            self._refuse(entry, too_big)

    def _compose(self, entry: _Entry) -> None:
        """A specialist's parts, checked against each other: its base a chat model
        that serves, each adapter one made for that very base file (by hash)."""
        manifest = entry.manifest
        spec = manifest.specialist
        assert spec is not None
        name = manifest.name
        base = self._entries.get(spec.base)
        if base is None or base.manifest.kind != "chat":
            what = "does not exist" if base is None else f"is kind {base.manifest.kind}"
            self._refuse(entry, f"specialist {name!r} refused: its base {spec.base!r} {what}")
            return
        if base.state == "refused":
            self._refuse(entry, f"specialist {name!r} refused: its base: {base.reason}")
            return
        adapters = []
        for adapter_name, scale in spec.adapters:
            adapter = self._entries.get(adapter_name)
            if adapter is None or adapter.manifest.adapter is None:
                what = "does not exist" if adapter is None else "is not an adapter"
                self._refuse(entry, f"specialist {name!r} refused: {adapter_name!r} {what}")
                return
            fit = adapter.manifest.adapter
            if adapter.state == "refused":
                self._refuse(entry, f"specialist {name!r} refused: {adapter.reason}")
                return
            if fit.base != spec.base or fit.base_sha256 != base.manifest.sha256:
                self._refuse(
                    entry,
                    f"specialist {name!r} refused: adapter {adapter_name!r} was made for "
                    f"base {fit.base!r} with sha256 {fit.base_sha256}; its base "
                    f"{spec.base!r} has sha256 {base.manifest.sha256}",
                )
                return
            adapters.append((adapter.manifest, fit.scale if scale is None else scale))
        entry.parts = Parts(base.manifest, tuple(adapters))
        entry.need = self.loader.footprint(manifest, entry.parts)
        too_big = self.budget.never_fits(name, entry.need)
        if too_big is not None:
            self._refuse(entry, too_big)

    def _refuse(self, entry: _Entry, reason: str, loud: bool = True) -> None:
        entry.state, entry.reason = "refused", reason
        if loud:
            log.error(reason, extra={"model": entry.manifest.name})

    def start_reaper(self, interval: float = 1.0) -> None:
        """Unload models idle past their keep-alive, checked every ``interval``."""

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.reap()
                except Exception:  # the reaper must outlive one bad unload
                    log.exception("keep-alive check failed")

        self._reaper = threading.Thread(target=run, name="model-keep-alive", daemon=True)
        self._reaper.start()

    def close(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(5)
        # A load or an unload under way ends first (bounded), then what is loaded goes.
        with self._lock:
            moving = [e.settled for e in self._entries.values() if e.state in _MOVING]
        for settled in moving:
            settled.wait(self.settings.load_timeout)
        with self._lock:
            # Specialists first: a base's weights (and the adapters llama.cpp ties to
            # them) must outlive every context over them; freed before, a specialist's
            # worker crashes the process in its last step.
            entries = sorted(
                (e for e in self._entries.values() if e.state == "ready"),
                key=lambda e: e.base_lease is None,
            )
            for entry in entries:
                entry.state = "unloading"
                entry.settled = threading.Event()
        for entry in entries:
            self._unload(entry, "stopping")

    # -- the one lookup -------------------------------------------------------------

    def needs_load(self, name: str, kind: str) -> bool:
        """Whether a request for ``name`` of this kind would wait for a load now (not
        when it would be refused at once: unknown, wrong kind, refused)."""
        with self._lock:
            entry = self._lookup(name)
            return (
                entry is not None
                and _served_as(entry.manifest.kind) == kind
                and entry.state in ("unloaded", "loading", "unloading")
            )

    def manifest(self, name: str) -> Manifest:
        with self._lock:
            return self._entry(name).manifest

    def _lookup(self, name: str) -> _Entry | None:
        """A model by its name, or a served name's champion (a model's own name wins)."""
        return self._entries.get(name) or self._entries.get(self.aliases(name))

    def has(self, name: str) -> bool:
        """Whether ``name`` is a model's own name (installed or not)."""
        with self._lock:
            return name in self._entries

    def parts(self, name: str) -> Parts | None:
        """A specialist's base and adapters (composed at open, loaded or not)."""
        with self._lock:
            entry = self._lookup(name)
            return entry.parts if entry is not None else None

    def _entry(self, name: str) -> _Entry:
        entry = self._lookup(name)
        if entry is None:
            raise UnknownModel(name, self._listed())
        return entry

    def _listed(self) -> list[str]:
        return sorted(n for n, e in self._entries.items() if not e.missing)

    def acquire(
        self,
        name: str,
        kind: str | None = None,
        reason: str = "first request",
        wait: float | None = None,
    ) -> Lease:
        """A lease on model ``name``, loading it first if need be (the caller waits, at
        most ``wait`` seconds, default load_timeout). Raises UnknownModel, WrongKind,
        ModelUnavailable (refused, or still loading) or NoRoom."""
        deadline = self.clock() + (self.settings.load_timeout if wait is None else wait)
        waited = False  # for a load (this request's or another's): a cold start
        while True:
            victims: list[_Entry] = []
            with self._lock:
                entry = self._entry(name)
                manifest = entry.manifest
                if kind is not None and _served_as(manifest.kind) != kind:
                    raise WrongKind(name, manifest.kind, kind)
                if entry.state == "refused":
                    raise ModelUnavailable(entry.reason or f"model {name!r} is refused")
                if entry.state == "ready":
                    entry.in_use += 1
                    entry.last_used = self.clock()
                    lease = Lease(self, entry)
                    lease.loaded_now = waited
                    return lease
                settled = entry.settled
                load_it = False
                if entry.state == "unloaded":
                    room = self._make_room(entry)
                    if isinstance(room, threading.Event):
                        settled = room  # memory is being freed: wait for it, then again
                    else:
                        victims, load_it = room, True
                        entry.state = "loading"
                        entry.settled = settled = threading.Event()
                        self.budget.used += entry.need
            waited = True
            if load_it:
                for victim in victims:
                    self._unload(victim, f"make room for {name}")
                self._load(entry, reason)
                continue
            left = deadline - self.clock()
            if left <= 0 or not settled.wait(left):
                raise ModelUnavailable(
                    f"model {name!r} is not ready yet ({entry.state}); retry shortly "
                    f"(load_timeout {self.settings.load_timeout} s)",
                    retry_after=5,
                )

    def embed(self, name: str, texts: list[str]) -> tuple[np.ndarray, str]:
        """Unit vectors of ``texts`` from embedding model ``name`` (each text cut to what
        the model reads), outside any request's audit pair (routing and retrieval embed
        a question on the way to their answer), and the model's hash."""
        lease = self.acquire(name, "embedding")
        try:
            model = lease.model
            assert isinstance(model, RunModel)
            with model.admission:
                vectors: np.ndarray = model.engine.embed_texts(texts)
            return vectors, lease.manifest.sha256
        finally:
            lease.release()

    def check_room(self, name: str) -> None:
        """Raise NoRoom now if model ``name`` could not be loaded now (a stream that
        would wait for a load learns it as a 503, not as an error inside the stream)."""
        with self._lock:
            entry = self._lookup(name)
            if entry is not None and entry.state == "unloaded":
                self._victims_for(entry)

    def _victims_for(self, entry: _Entry) -> list[_Entry] | threading.Event:
        """Under the lock: the idle models to unload so that ``entry`` fits, least
        recently used first; an unloading model's event when the memory it frees may be
        enough; NoRoom when the budget cannot be met now."""
        keep = entry.parts.base.name if entry.parts is not None else None  # it is needed
        loaded = {
            e.manifest.name: e
            for e in self._entries.values()
            if e.state == "ready" and e.manifest.name != keep
        }
        candidates, groups = self._candidates(loaded)
        chosen = self.budget.victims(entry.need, candidates)
        if chosen is not None:
            # A base goes with the idle specialists that hold it, they first.
            return [victim for c in chosen for victim in groups.get(c.name, [loaded[c.name]])]
        leaving = [e for e in self._entries.values() if e.state == "unloading"]
        if leaving:
            return leaving[0].settled
        held = sorted(loaded.values(), key=lambda e: e.manifest.name)
        holders = ", ".join(
            f"{e.manifest.name} ({e.need >> 20} MiB, "
            + ("pinned" if e.pinned else f"{e.in_use} request(s)")
            + ")"
            for e in held
        )
        free = max(self.budget.capacity - self.budget.used, 0)
        raise NoRoom(
            f"model {entry.manifest.name!r} needs about {entry.need >> 20} MiB; "
            f"{free >> 20} MiB of the models' budget ({self.budget.describe()}) is free "
            f"and the models holding the rest are pinned or busy: {holders or 'none'}; "
            "retry shortly",
            retry_after=5,
        )

    def _candidates(
        self, loaded: dict[str, _Entry]
    ) -> tuple[list[Candidate], dict[str, list[_Entry]]]:
        """What may make room: each idle model; a base held only by idle specialists
        counts as one candidate with them (its memory and theirs), since unloading
        them lets it go; those specialists are then no candidates of their own."""
        holders: dict[str, list[_Entry]] = {}
        for e in loaded.values():
            if e.parts is not None and e.base_lease is not None:
                holders.setdefault(e.parts.base.name, []).append(e)
        candidates: list[Candidate] = []
        groups: dict[str, list[_Entry]] = {}
        grouped: set[str] = set()
        for base_name, held_by in holders.items():
            base = loaded.get(base_name)
            idle = all(h.in_use == 0 for h in held_by)
            if base is None or base.pinned or not idle or base.in_use != len(held_by):
                continue
            groups[base_name] = [*held_by, base]
            grouped.update(h.manifest.name for h in held_by)
            candidates.append(
                Candidate(
                    base_name,
                    base.need + sum(h.need for h in held_by),
                    max(e.last_used for e in groups[base_name]),
                    False,
                    0,
                )
            )
        for e in loaded.values():
            if e.manifest.name not in grouped and e.manifest.name not in groups:
                candidates.append(e.candidate())
        return candidates, groups

    def _make_room(self, entry: _Entry) -> list[_Entry] | threading.Event:
        """Under the lock: _victims_for, with the victims marked as unloading."""
        room = self._victims_for(entry)
        if isinstance(room, list):
            for victim in room:
                victim.state = "unloading"
                victim.settled = threading.Event()
        return room

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.in_use -= 1
            entry.last_used = self.clock()
        if entry.serve.keep_alive == 0 and not entry.pinned:
            self.reap()

    # -- loading and unloading ------------------------------------------------------

    def _load(self, entry: _Entry, reason: str) -> None:
        manifest = entry.manifest
        name = manifest.name
        started = time.perf_counter()
        process = psutil.Process()
        base_lease: Lease | None = None
        try:
            self._check_files(entry)
            parts = entry.parts
            if parts is not None:  # a specialist: its base loaded and held first
                for adapter, _ in parts.adapters:
                    self._check_files(self._entries[adapter.name])
                base_lease = self.acquire(parts.base.name, "chat", reason=f"base of {name}")
                parts = Parts(parts.base, parts.adapters, base_lease.model)
            short = self.budget.machine_short(name, entry.need)
            if short is not None:
                raise NoRoom(short, retry_after=10)
            before = process.memory_info().rss
            model = self.loader.load(manifest, parts)
            growth = process.memory_info().rss - before
        except Unavailable:  # no room now, for it or its base: it may load later
            if base_lease is not None:
                base_lease.release()
            with self._lock:
                self.budget.used -= entry.need
                entry.state = "unloaded"
                entry.settled.set()
            raise
        except Exception as exc:
            if base_lease is not None:
                base_lease.release()
            message = f"model {name!r} failed to load: {exc}"
            log.error(message, extra={"model": name})
            with self._lock:
                self.budget.used -= entry.need
                self._refuse(entry, message, loud=False)
                entry.settled.set()
            self._tell(PoolEvent("load_failed", name, manifest.sha256, message))
            return
        seconds = time.perf_counter() - started
        with self._lock:
            entry.model = model
            entry.base_lease = base_lease
            entry.state = "ready"
            entry.reason = None
            entry.loads += 1
            entry.load_seconds = seconds
            entry.rss_growth = growth
            entry.last_used = self.clock()
            entry.settled.set()
        details: dict[str, Any] = {}
        runs_on: dict[str, Any] = {}
        if isinstance(model, ChatModel):
            info = model.engine.info
            details = {"n_ctx": info.n_ctx, "threads": info.threads, "slots": model.scheduler.slots}
            details.update(info.extra)
            runs_on = {k: info.extra[k] for k in ("kernels", "placement") if info.extra.get(k)}
        log.info(
            "model loaded",
            extra={
                "model": name,
                "kind": manifest.kind,
                "why": reason,
                "seconds": round(seconds, 3),
                "rss_growth_mib": growth >> 20,
                **details,
            },
        )
        self._tell(PoolEvent("load", name, manifest.sha256, reason, seconds, entry.need, runs_on))

    def _check_files(self, entry: _Entry) -> None:
        """The files must be the ones that were hashed, not ones swapped in since; a
        changed file is hashed again before it loads."""
        files = [self.settings.models_path / f for f, _ in entry.manifest.files()]
        try:
            now = [file_identity(p) for p in files]
        except OSError as exc:
            raise RuntimeError(f"{exc}") from None
        if now == entry.identities:
            return
        verification = verify_model(entry.manifest, self.settings.models_path)
        if not verification.ok:
            raise RuntimeError(verification.message)
        entry.identities = verification.identities

    def _unload(self, entry: _Entry, reason: str) -> None:
        """Close a model marked unloading (outside the lock: closing takes time). A
        close that fails is logged; the entry is unloaded all the same, so that no
        waiter hangs and the budget stays true."""
        model = entry.model
        freed = True
        try:
            if model is not None:
                freed = model.close()
        except Exception:
            log.exception("closing a model failed", extra={"model": entry.manifest.name})
        with self._lock:
            entry.model = None
            base_lease, entry.base_lease = entry.base_lease, None
            entry.state = "unloaded"
            entry.unloads += 1
            self.budget.used -= entry.need
            entry.settled.set()
        if base_lease is not None and freed:  # the base may go now, in its own time
            base_lease.release()
        elif base_lease is not None:  # a context still in a step: its base must outlive it
            log.error(
                "a specialist's base kept: its context was not freed",
                extra={"model": entry.manifest.name},
            )
        name = entry.manifest.name
        log.info("model unloaded", extra={"model": name, "why": reason})
        self._tell(PoolEvent("unload", name, entry.manifest.sha256, reason, 0.0, entry.need))

    def reap(self) -> list[str]:
        """Unload the models idle past their keep-alive; their names."""
        now = self.clock()
        with self._lock:
            due = [
                e
                for e in self._entries.values()
                if e.state == "ready"
                and not e.pinned
                and e.in_use == 0
                and e.serve.keep_alive >= 0
                and now - e.last_used >= e.serve.keep_alive
            ]
            for entry in due:
                entry.state = "unloading"
                entry.settled = threading.Event()
        for entry in due:
            self._unload(entry, f"idle past keep_alive {entry.serve.keep_alive} s")
        return [e.manifest.name for e in due]

    def _tell(self, event: PoolEvent) -> None:
        for listener in self.listeners:
            try:
                listener(event)
            except Exception:  # a listener's failure is its own (the audit logs it)
                log.exception("pool event listener failed", extra={"event": event.action})

    # -- what the pool holds --------------------------------------------------------

    @property
    def ready(self) -> bool:
        """Every pinned model ready, and no manifest problem."""
        with self._lock:
            pinned = [e for e in self._entries.values() if e.pinned]
            return bool(pinned) and all(e.state == "ready" for e in pinned) and not self.problems

    def not_ready_reasons(self) -> list[str]:
        with self._lock:
            reasons = list(self.problems)
            pinned = [e for e in self._entries.values() if e.pinned]
            for entry in pinned:
                if entry.state != "ready":
                    reasons.append(
                        entry.reason or f"pinned model {entry.manifest.name!r} is {entry.state}"
                    )
            if not pinned and not reasons:
                reasons.append("no model is pinned")
            return reasons

    def loaded(self) -> dict[str, Loaded]:
        with self._lock:
            return {n: e.model for n, e in self._entries.items() if e.model is not None}

    def names(self, kind: str | None = None) -> list[str]:
        """Installed models (their files present), of a kind."""
        with self._lock:
            return [
                n for n in self._listed() if kind is None or self._entries[n].manifest.kind == kind
            ]

    def refused(self) -> dict[str, str]:
        with self._lock:
            return {n: e.reason or "" for n, e in self._entries.items() if e.state == "refused"}

    def state(self) -> list[dict[str, Any]]:
        """One row per known model: its state and memory, and, when loaded, its queue."""
        rows: list[dict[str, Any]] = []
        with self._lock:
            entries = sorted(self._entries.items())
            for name, entry in entries:
                manifest = entry.manifest
                row: dict[str, Any] = {
                    "name": name,
                    "kind": manifest.kind,
                    "format": manifest.format,
                    "state": entry.state,
                    "pinned": entry.pinned,
                    "installed": not entry.missing,
                    "memory_bytes": entry.need,
                    "keep_alive": entry.serve.keep_alive,
                    "in_use": entry.in_use,
                    "loads": entry.loads,
                    "unloads": entry.unloads,
                }
                if entry.reason:
                    row["reason"] = entry.reason
                if entry.load_seconds is not None:
                    row["load_seconds"] = round(entry.load_seconds, 3)
                if entry.rss_growth is not None:
                    row["rss_growth_bytes"] = entry.rss_growth
                if entry.parts is not None:
                    row["base"] = entry.parts.base.name
                    row["adapters"] = [
                        {"name": a.name, "sha256": a.sha256, "scale": scale}
                        for a, scale in entry.parts.adapters
                    ]
                if entry.model is not None:
                    row.update(entry.model.snapshot())
                rows.append(row)
        return rows

    def budget_state(self) -> dict[str, int]:
        with self._lock:
            return {"capacity_bytes": self.budget.capacity, "used_bytes": self.budget.used}


__all__ = ["ChatModel", "Lease", "ModelPool", "PoolEvent", "RunModel"]
