"""One typed settings schema; the TOML file, APPLIANCE_* variables, CLI flags and docs
all come from it.

Precedence: defaults < TOML file (``--config``) < environment < command-line flags.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENV_PREFIX = "APPLIANCE_"
CONFIG_ENV = "APPLIANCE_CONFIG"


class SettingsError(ValueError):
    """A setting has a value that cannot be used; the message names it and the value."""


def _setting(
    default: Any,
    help: str,
    *,
    minimum: int | None = None,
    choices: tuple[str, ...] | None = None,
) -> Any:
    return field(default=default, metadata={"help": help, "minimum": minimum, "choices": choices})


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "appliance"


@dataclass(frozen=True)
class Settings:
    host: str = _setting("127.0.0.1", "Address to listen on.")
    port: int = _setting(8080, "TCP port to listen on.", minimum=0)
    state_dir: Path = _setting(
        _default_state_dir(),
        "Directory for the appliance's state: models, imported manifests, the audit log "
        "and its keys, the auth and documents databases, routes, served names, evals.",
    )
    model_dir: Path | None = _setting(
        None, "Directory holding model files; default: STATE_DIR/models."
    )
    manifest_dir: Path | None = _setting(
        None, "Directory of the built-in model manifests; default: the ones shipped."
    )
    threads: int = _setting(
        0, "CPU threads per language model; 0 means the physical core count.", minimum=0
    )
    context_size: int = _setting(
        2048,
        "Context window (tokens) of each stream of a language model, capped by the "
        "model's own; the KV cache holds parallel_streams times this.",
        minimum=16,
    )
    kv_cache_type: str = _setting(
        "f16",
        "Number format of the KV cache: f16, or q8_0 (half the memory, answers differ "
        "slightly from f16).",
        choices=("f16", "q8_0"),
    )
    parallel_streams: int = _setting(
        4,
        "Requests a language model answers at once, decoded together in one batch; "
        "more wait in the queue.",
        minimum=1,
    )
    keep_alive: int = _setting(
        300,
        "Seconds a model that is not pinned stays loaded after its last request; then it "
        "is unloaded (-1: until another model needs its memory). A manifest's [serve] "
        "keep_alive wins.",
        minimum=-1,
    )
    load_timeout: int = _setting(
        120,
        "Seconds a request waits for its model to load; then 503 with Retry-After.",
        minimum=1,
    )
    cpu_kernels: str = _setting(
        "auto",
        "llama.cpp CPU kernels: auto (the best this CPU runs, never AMX, which crashes), "
        "amx (AMX allowed, guarded by the start-up self-test) or a variant's name "
        "(x64, haswell, skylakex, icelake, zen4, ...).",
    )
    gpu_layers: int = _setting(
        0, "Layers to offload to the GPU (-1: all; 0: CPU only).", minimum=-1
    )
    queue_depth: int = _setting(
        8,
        "Requests that may wait per model while it is busy; beyond it: 503.",
        minimum=0,
    )
    max_body_bytes: int = _setting(
        1_048_576, "Largest request body accepted, in bytes; beyond it: 413.", minimum=1
    )
    max_tokens: int = _setting(2048, "Largest max_tokens a request may ask for.", minimum=1)
    http_threads: int = _setting(
        32, "Threads serving HTTP connections (each stream holds one).", minimum=1
    )
    client_timeout: int = _setting(
        30,
        "Seconds a client may take to send a request's headers, or its body, and may leave "
        "a read or a write of its connection waiting (a stream it stopped reading); then "
        "it is cut off and its slot freed.",
        minimum=1,
    )
    max_connections_per_client: int = _setting(
        64,
        "Open connections one client address may hold; more are closed as they come.",
        minimum=1,
    )
    shutdown_grace: int = _setting(
        30, "Seconds in-flight requests get to finish on SIGTERM.", minimum=0
    )
    stall_seconds: int = _setting(
        60,
        "Seconds a language model may run a request without finishing an engine step, "
        "or the HTTP loop go without turning (it turns every second), before the "
        "appliance calls itself wedged and stops its systemd watchdog pings.",
        minimum=2,
    )
    drain_seconds: int = _setting(
        0,
        "Seconds between SIGTERM and the stop of accepting: /readyz answers 404 (drain) "
        "and new requests are still served meanwhile, so a balancer checking /readyz "
        "moves new work elsewhere first. Behind a balancer: more than its check interval.",
        minimum=0,
    )
    log_level: str = _setting("info", "Log level.", choices=("debug", "info", "warning", "error"))
    audit_db: Path | None = _setting(
        None, "Audit database (SQLite); default: STATE_DIR/audit/audit.db."
    )
    audit_content: str = _setting(
        "full",
        "What the audit keeps of prompts and answers: full (encrypted), digest "
        "(a keyed HMAC-SHA256 only) or none.",
        choices=("full", "digest", "none"),
    )
    master_key_file: Path | None = _setting(
        None,
        "Audit master key (wraps the data keys; mode 0600); default: "
        "STATE_DIR/keys/audit-master.key. A systemd credential audit-master-key wins.",
    )
    signing_key_file: Path | None = _setting(
        None,
        "Ed25519 key that signs audit checkpoints (public half beside it, .pub); default: "
        "STATE_DIR/keys/audit-signing.key. A systemd credential audit-signing-key wins.",
    )
    checkpoint_file: Path | None = _setting(
        None,
        "File the signed checkpoints are appended to; put it on another disk or host. "
        "Default: STATE_DIR/audit/checkpoints.jsonl.",
    )
    trusted_public_key: Path | None = _setting(
        None,
        "The audit signing key's public half that `audit verify`, `doctor` and /audit/verify "
        "trust; keep it where the service cannot write (the installer puts it in "
        "/etc/appliance). Default: the .pub beside the signing key.",
    )
    checkpoint_records: int = _setting(
        1000, "Seal a signed checkpoint after this many records.", minimum=1
    )
    checkpoint_seconds: int = _setting(
        300, "Seal a signed checkpoint at least this often, idle or not.", minimum=1
    )
    audit_write_timeout: int = _setting(
        5, "Seconds a request waits for its audit record to be durable; then 503.", minimum=1
    )
    witness_url: str = _setting(
        "",
        "The site's C2SP tlog-witness (URL prefix; checkpoints go to URL/add-checkpoint); "
        "it cosigns the audit log's checkpoints (origin, size, Merkle root: no record "
        "leaves the box). Empty: no witness.",
    )
    witness_key: str = _setting(
        "",
        "The witness's public key as a vkey (name+keyid+base64); its cosignatures are "
        "kept, and `audit verify` checks them when it is set.",
    )
    witness_interval: int = _setting(
        60,
        "Seconds between cosignings while records are added: the longest a record stays "
        "unwitnessed (rewritable by whoever holds the signing key) while the witness "
        "answers. Purges, key rotations and promotions are cosigned at once.",
        minimum=1,
    )
    siem_url: str = _setting(
        "",
        "The site's SIEM collector, tls://HOST[:PORT] (port 6514 if left out): every audit "
        "record's metadata (never its content) goes to it as RFC 5424 syslog over TLS "
        "(RFC 5425), in order; while it is away the records wait in the audit log. Empty: "
        "no feed.",
    )
    siem_ca: Path | None = _setting(
        None,
        "CA certificate(s) (PEM) that sign the SIEM collector's certificate; default: the "
        "system's CAs. Its name must match siem_url's host either way.",
    )
    siem_client_cert: Path | None = _setting(
        None,
        "Client certificate (PEM) the appliance shows the SIEM collector, for a collector "
        "that asks for one (mutual TLS); with siem_client_key.",
    )
    siem_client_key: Path | None = _setting(
        None, "Private key (PEM, mode 0600) of siem_client_cert."
    )
    siem_app_name: str = _setting(
        "appliance",
        "APP-NAME of the SIEM feed's syslog messages (1 to 48 printable ASCII characters).",
    )
    onnx_threads: int = _setting(1, "onnxruntime intra-op threads per tensor model run.", minimum=0)
    memory_reserve_mb: int = _setting(
        512,
        "Memory (MiB) kept free: a model that would eat into it is not loaded, and "
        "requests get 503 while the machine is below it.",
        minimum=0,
    )
    memory_limit_mb: int = _setting(
        0,
        "Most memory (MiB) the models may take together; 0: what the machine has. When a "
        "model must load and the budget is spent, the least recently used idle model "
        "that is not pinned is unloaded.",
        minimum=0,
    )
    tls: str = _setting(
        "auto",
        "TLS: auto (whenever the address is not loopback), on, or off.",
        choices=("auto", "on", "off"),
    )
    insecure_lan: bool = _setting(
        False,
        "Allow serving a non-loopback address without TLS (patient data in clear on the "
        "LAN): only when something else encrypts the link.",
    )
    tls_cert: Path | None = _setting(
        None, "Server certificate (PEM, chain included); default: STATE_DIR/tls/server.crt."
    )
    tls_key: Path | None = _setting(
        None, "Server private key (PEM, mode 0600); default: STATE_DIR/tls/server.key."
    )
    tls_names: str = _setting(
        "", "Extra host names and IP addresses for `tls init`'s certificate, comma-separated."
    )
    allowed_clients: str = _setting(
        "", "Client subnets allowed to connect (CIDR, comma-separated); empty: any."
    )
    session_idle_minutes: int = _setting(
        15, "Minutes without activity after which a web session ends.", minimum=1
    )
    login_max_failures: int = _setting(
        5,
        "Failed sign-ins in a row that lock an account for the client address they came "
        "from; 4 times as many from one address, over all names, turn it away (429).",
        minimum=1,
    )
    login_lockout_minutes: int = _setting(
        15, "Minutes a lockout (of an account for an address, or of an address) lasts.", minimum=1
    )
    max_requests_per_caller: int = _setting(
        8,
        "Inference requests one token or user may have in flight at once (running, queued "
        "or streaming), over all models; beyond it: 429. 0: no limit.",
        minimum=0,
    )
    audit_reserve_mb: int = _setting(
        256,
        "Free disk (MiB) at the audit log kept for the records of known callers: below it, "
        "refusals of unknown callers are counted, not recorded one by one.",
        minimum=0,
    )
    refusals_per_minute: int = _setting(
        60,
        "Refused unauthenticated requests recorded per minute per client address; beyond "
        "it they get 429 and are only counted, in the address's next record. 0: no limit.",
        minimum=0,
    )
    rate_limit_per_minute: int = _setting(
        600, "Requests per minute per token or user; beyond it: 429. 0: no limit.", minimum=0
    )
    answer_caution: str = _setting(
        "Answers come from a language model and can be wrong: check them before you act on them.",
        "The caution the clinicians' page shows when it opens and under every answer.",
    )
    retrieval_min_similarity: int = _setting(
        30,
        "Grounded answers: the least cosine similarity (in hundredths) of a passage to the "
        "question for it to be a source; below it, the answer says no source was found. A "
        "collection calibrated with `appliance docs calibrate` uses its own.",
        minimum=0,
    )
    retrieval_top_k: int = _setting(
        3, "Grounded answers: passages given to the model as sources (at most).", minimum=1
    )
    data_key_max_uses: int = _setting(
        1 << 30,
        "Encryptions under one data key before it is rotated (AES-GCM's limit is 2^32).",
        minimum=1,
    )

    @property
    def models_path(self) -> Path:
        return self.model_dir if self.model_dir is not None else self.state_dir / "models"

    @property
    def docs_db_path(self) -> Path:
        return self.state_dir / "docs" / "docs.db"

    @property
    def routes_path(self) -> Path:
        return self.state_dir / "routes"

    @property
    def aliases_path(self) -> Path:
        return self.state_dir / "aliases.json"

    @property
    def evals_path(self) -> Path:
        return self.state_dir / "evals"

    @property
    def imported_manifests_path(self) -> Path:
        return self.state_dir / "manifests"

    @property
    def cache_path(self) -> Path:
        return self.state_dir / "cache"

    @property
    def audit_db_path(self) -> Path:
        return self.audit_db or self.state_dir / "audit" / "audit.db"

    @property
    def master_key_path(self) -> Path:
        return self.master_key_file or self.state_dir / "keys" / "audit-master.key"

    @property
    def signing_key_path(self) -> Path:
        return self.signing_key_file or self.state_dir / "keys" / "audit-signing.key"

    @property
    def signing_public_key_path(self) -> Path:
        return self.signing_key_path.with_suffix(".pub")

    @property
    def trusted_public_key_path(self) -> Path:
        return self.trusted_public_key or self.signing_public_key_path

    @property
    def auth_db_path(self) -> Path:
        return self.state_dir / "auth.db"

    @property
    def tls_dir(self) -> Path:
        return self.state_dir / "tls"

    @property
    def tls_cert_path(self) -> Path:
        return self.tls_cert or self.tls_dir / "server.crt"

    @property
    def tls_key_path(self) -> Path:
        return self.tls_key or self.tls_dir / "server.key"

    @property
    def checkpoint_path(self) -> Path:
        return self.checkpoint_file or self.state_dir / "audit" / "checkpoints.jsonl"

    def as_dict(self) -> dict[str, Any]:
        return {
            f.name: (str(v) if isinstance(v, Path) else v)
            for f in dataclasses.fields(self)
            for v in [getattr(self, f.name)]
        }


@dataclass(frozen=True)
class SettingSpec:
    """What the schema says about one setting: the source of flags, env and docs."""

    name: str
    kind: type
    optional: bool
    default: Any
    help: str
    minimum: int | None
    choices: tuple[str, ...] | None

    @property
    def env(self) -> str:
        return ENV_PREFIX + self.name.upper()

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


_KINDS: dict[str, tuple[type, bool]] = {
    "bool": (bool, False),
    "str": (str, False),
    "int": (int, False),
    "Path": (Path, False),
    "Path | None": (Path, True),
}


def schema() -> list[SettingSpec]:
    specs = []
    for f in dataclasses.fields(Settings):
        kind, optional = _KINDS[str(f.type)]
        specs.append(
            SettingSpec(
                name=f.name,
                kind=kind,
                optional=optional,
                default=f.default,
                help=f.metadata["help"],
                minimum=f.metadata["minimum"],
                choices=f.metadata["choices"],
            )
        )
    return specs


def _coerce(spec: SettingSpec, value: Any, source: str) -> Any:
    if value is None or (spec.optional and value == ""):
        if spec.optional:
            return None
        raise SettingsError(f"{spec.name} ({source}) must have a value")
    if spec.kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise SettingsError(f"{spec.name} ({source}) must be true or false, got {value!r}")
    if spec.kind is int:
        if isinstance(value, bool):
            raise SettingsError(f"{spec.name} ({source}) must be an integer, got {value!r}")
        try:
            number = int(value)
        except (TypeError, ValueError):
            raise SettingsError(
                f"{spec.name} ({source}) must be an integer, got {value!r}"
            ) from None
        if spec.minimum is not None and number < spec.minimum:
            raise SettingsError(
                f"{spec.name} ({source}) must be at least {spec.minimum}, got {number}"
            )
        return number
    if not isinstance(value, str | Path):
        raise SettingsError(f"{spec.name} ({source}) must be a string, got {value!r}")
    if spec.choices and value not in spec.choices:
        raise SettingsError(
            f"{spec.name} ({source}) must be one of {', '.join(spec.choices)}; got {value!r}"
        )
    return Path(value).expanduser() if spec.kind is Path else str(value)


def read_config_file(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"config file {path} is not valid TOML: {exc}") from None
    known = {spec.name for spec in schema()}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SettingsError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
            f"known: {', '.join(sorted(known))}"
        )
    return data


def load_settings(
    config_file: Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Build Settings from the layers; ``overrides`` are the flags actually given."""
    env = os.environ if env is None else env
    if config_file is None and env.get(CONFIG_ENV):
        config_file = Path(env[CONFIG_ENV])
    file_values = read_config_file(config_file) if config_file else {}
    values: dict[str, Any] = {}
    for spec in schema():
        if overrides and overrides.get(spec.name) is not None:
            values[spec.name] = _coerce(spec, overrides[spec.name], spec.flag)
        elif spec.env in env:
            values[spec.name] = _coerce(spec, env[spec.env], spec.env)
        elif spec.name in file_values:
            values[spec.name] = _coerce(spec, file_values[spec.name], str(config_file))
    return Settings(**values)


def docs_markdown() -> str:
    """The settings reference, as a Markdown table (README and `appliance config docs`)."""
    lines = [
        "| setting | env | flag | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for spec in schema():
        if spec.name == "state_dir":
            default = "`$XDG_STATE_HOME/appliance` or `~/.local/state/appliance`"
        elif spec.default is None:
            default = "unset"
        else:
            default = f"`{spec.default}`"
        meaning = spec.help
        if spec.choices:
            meaning += f" One of: {', '.join(spec.choices)}."
        lines.append(f"| `{spec.name}` | `{spec.env}` | `{spec.flag}` | {default} | {meaning} |")
    return "\n".join(lines) + "\n"


def sample_toml() -> str:
    """Every setting, commented out at its default: the starting point of a site file."""
    from appliance.tomlfmt import format_value

    out = ["# Appliance settings. Precedence: defaults < this file < APPLIANCE_* < flags.", ""]
    for spec in schema():
        out.append(f"# {spec.help}")
        out.append(f"# env: {spec.env}, flag: {spec.flag}")
        if spec.default is None:
            out.append(f'# {spec.name} = ""')
        else:
            out.append(f"# {spec.name} = {format_value(spec.default)}")
        out.append("")
    return "\n".join(out)
