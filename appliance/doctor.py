"""`appliance doctor`: is this machine fit to serve? Each check says ok, warn or fail,
with what it saw; any fail makes the command exit non-zero."""

from __future__ import annotations

import shutil
import stat
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil

from appliance.audit import chain, crypto
from appliance.audit.witness import cosigned_path
from appliance.config import Settings, SettingsError
from appliance.engines.kernels import AMX_FLAGS, cpu_flags
from appliance.registry import (
    HashCache,
    Manifest,
    ManifestError,
    load_manifests,
    verify_model,
)
from appliance.resources import MIB
from appliance.serving.loader import EngineLoader
from appliance.tls import tls_enabled

MIN_FREE_DISK = 1 << 30


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok | warn | fail
    detail: str


def _cpu() -> list[Check]:
    flags = cpu_flags()
    avx2 = "avx2" in flags
    avx512 = "avx512f" in flags
    amx = bool(AMX_FLAGS & flags)
    physical, logical = psutil.cpu_count(logical=False), psutil.cpu_count()
    return [
        Check(
            "cpu features",
            "ok" if avx2 else "warn",
            f"AVX2 {'yes' if avx2 else 'no'}, AVX-512 {'yes' if avx512 else 'no'}, "
            f"AMX {'yes' if amx else 'no'}"
            + ("" if avx2 else " (llama.cpp runs much slower without AVX2)"),
        ),
        Check("cpu cores", "ok", f"{physical} physical, {logical} logical"),
    ]


def _kernels(settings: Settings, manifests: list[Manifest], selftest: bool) -> list[Check]:
    """The llama.cpp kernels this machine gets, and (from the CLI) whether each verified
    language model decodes on them in a child process, as the server checks at start."""
    from appliance.engines import kernels

    try:
        plan = kernels.plan(settings.cpu_kernels)
    except kernels.KernelError as exc:
        return [Check("llama.cpp kernels", "fail", str(exc))]
    checks = [Check("llama.cpp kernels", "ok", plan.summary())]
    if not selftest:
        return checks
    from appliance.engines.selftest import check

    for manifest in manifests:
        outcome, attempts = check(
            settings.models_path / manifest.file,
            settings.cpu_kernels,
            plan.extra_buffers,
            settings.gpu_layers,
        )
        crashed = [a for a in attempts if not a.ok]
        detail = "; ".join(
            f"extra buffers {'on' if a.extra_buffers else 'off'}: "
            f"{'passed, ' + a.detail if a.ok else a.detail}"
            for a in attempts
        )
        status = "fail" if not outcome.ok else "warn" if crashed else "ok"
        checks.append(Check(f"self-test {manifest.name}", status, detail))
    return checks


def _models_and_memory(
    settings: Settings, manifests: list[Manifest], selftest: bool, quick: bool
) -> list[Check]:
    checks, need, language = [], 0, []
    # quick: an unchanged file (path, inode, size, times) keeps its cached hash.
    cache = HashCache(settings.cache_path / "sha256.json") if quick else None
    largest = 0  # of the models loaded on demand
    loader = EngineLoader(settings)
    for manifest in manifests:
        result = verify_model(manifest, settings.models_path, cache)
        pinned = manifest.serve.pinned
        if result.ok:
            size = loader.footprint(manifest)
            if pinned:
                need += size
            else:
                largest = max(largest, size)
            if manifest.format == "gguf":
                language.append(manifest)
        if not result.ok and not pinned and result.state == "missing":
            # A catalogue model not fetched: nothing is wrong, it is just not there.
            how = f"; `appliance models fetch {manifest.name}`" if manifest.fetch else ""
            checks.append(Check(f"model {manifest.name}", "ok", f"not installed{how}"))
            continue
        status = "ok" if result.ok else "fail"
        message = result.message + ("" if pinned else " (loaded on demand)")
        checks.append(Check(f"model {manifest.name}", status, message))
    memory = psutil.virtual_memory()
    room = memory.available - settings.memory_reserve_mb * MIB
    checks.append(
        Check(
            "memory",
            "ok" if need <= room else "fail",
            f"pinned models need about {need // MIB} MiB, the largest loaded on demand "
            f"{largest // MIB} MiB; {memory.available // MIB} MiB available of "
            f"{memory.total // MIB} MiB, reserve {settings.memory_reserve_mb} MiB",
        )
    )
    return checks + _kernels(settings, language, selftest)


def _disk(settings: Settings) -> Check:
    directory = settings.audit_db_path.parent
    probe = directory if directory.exists() else settings.state_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    return Check(
        "disk for the audit log",
        "ok" if free >= MIN_FREE_DISK else "fail",
        f"{free // MIB} MiB free at {probe} (need at least {MIN_FREE_DISK // MIB} MiB)",
    )


def _gpu(settings: Settings, manifests: list[Manifest]) -> Check:
    """The GPUs llama.cpp sees (once the kernels check loaded its backends), against the
    ``gpu_layers`` asked for, globally and per model: a GPU asked for and not seen is a
    warning, not a slow surprise."""
    from appliance.engines import devices, kernels
    from appliance.serving.loader import ServeSettings

    nodes = sorted(str(p) for p in Path("/dev").glob("nvidia[0-9]*"))
    language = [m for m in manifests if m.format == "gguf"]
    own = {
        m.name: layers
        for m in language
        if (layers := ServeSettings.of(settings, m).gpu_layers) != settings.gpu_layers
    }
    asked = f"gpu_layers = {settings.gpu_layers}" + (
        f" ({', '.join(f'{name}: {n}' for name, n in sorted(own.items()))})" if own else ""
    )
    wanted = settings.gpu_layers != 0 or any(n != 0 for n in own.values())
    seen = devices.gpus()
    if seen:
        names = ", ".join(
            f"{d.name} ({d.description}, {d.free_bytes // MIB} of {d.total_bytes // MIB} MiB free)"
            for d in seen
        )
        where = "models run on it" if wanted else "models run on the CPU"
        return Check("gpu", "ok", f"llama.cpp sees {names}; {asked}: {where}")
    device_nodes = f"NVIDIA devices: {', '.join(nodes)}" if nodes else "no /dev/nvidia*"
    if kernels.chosen() is None:  # no language model: llama.cpp was not asked
        return Check("gpu", "ok", f"{device_nodes}; {asked}")
    cuda = any(kernels.library_dir().glob("libggml-cuda*.so"))
    why = (
        "this build has a CUDA backend: is the NVIDIA driver loaded, and the device open "
        "to the service?"
        if cuda
        else "this build has no GPU backend: APPLIANCE_LLAMA_CMAKE_ARGS=-DGGML_CUDA=on"
    )
    if wanted:
        return Check(
            "gpu",
            "warn",
            f"{asked}, but llama.cpp sees no GPU ({device_nodes}; {why}): models run on the CPU",
        )
    if nodes:  # a GPU on the box, none asked for, and llama.cpp does not see it
        return Check("gpu", "ok", f"{device_nodes}, unused ({asked}); llama.cpp sees none: {why}")
    return Check("gpu", "ok", "none found: models run on the CPU")


def _keys(settings: Settings) -> list[Check]:
    checks = []
    for label, path in (
        ("master key", settings.master_key_path),
        ("signing key", settings.signing_key_path),
        ("TLS key", settings.tls_key_path),
    ):
        if not path.exists():
            if label != "TLS key":
                checks.append(Check(label, "ok", f"{path} not present (made on first start)"))
            elif tls_enabled(settings):
                checks.append(Check(label, "fail", f"{path} not present: run appliance tls init"))
            else:
                checks.append(Check(label, "ok", f"{path} not present (TLS off on loopback)"))
            continue
        mode = stat.S_IMODE(path.stat().st_mode)
        checks.append(
            Check(
                label,
                "fail" if mode & 0o077 else "ok",
                f"{path} mode {mode:04o}"
                + (": readable by group or others" if mode & 0o077 else ""),
            )
        )
    return checks


def _certificate(settings: Settings) -> Check:
    path = settings.tls_cert_path
    if not path.exists():
        return Check(
            "tls certificate",
            "fail" if tls_enabled(settings) else "ok",
            f"{path} not present"
            + ("" if tls_enabled(settings) else " (loopback serves plain HTTP)"),
        )
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(path.read_bytes())
    days = (cert.not_valid_after_utc - datetime.now(UTC)).days
    status = "fail" if days < 0 else "warn" if days < 30 else "ok"
    return Check(
        "tls certificate",
        status,
        f"{path} valid until {cert.not_valid_after_utc:%Y-%m-%d} ({days} days)",
    )


def _audit(settings: Settings, quick: bool) -> Check:
    if quick:
        return Check(
            "audit chain",
            "ok",
            "not walked on every view of this page: GET /audit/verify or "
            "`appliance audit verify` walks the whole log",
        )
    if not settings.audit_db_path.exists():
        return Check("audit chain", "ok", "no audit log yet (made on first start)")
    pub = settings.trusted_public_key_path
    key = crypto.load_public_key(pub) if pub.exists() else None
    report = chain.verify(
        settings.audit_db_path,
        key,
        settings.checkpoint_path,
        witness_key=settings.witness_key,  # cosignatures too, when a witness is set
        cosigned_file=cosigned_path(settings),
    )
    if report.ok:
        return Check(
            "audit chain",
            "ok",
            f"{report.records} records, {report.checkpoints} checkpoints verified",
        )
    assert report.problem is not None
    return Check(
        "audit chain",
        "fail",
        f"at {report.problem.seq}: {report.problem.kind}: {report.problem.detail}",
    )


def _siem(settings: Settings, quick: bool) -> list[Check]:
    """The SIEM feed, when a collector is configured: what the running feed last saw
    (its state file) and, from the CLI, a TLS handshake with the collector now."""
    if not settings.siem_url:
        return []
    from appliance.audit import siem

    well, said = siem.state_summary(settings)
    checks = [Check("siem feed", "ok" if well else "warn", said)]
    if not quick:
        try:
            checks.append(Check("siem collector", "ok", siem.probe(settings)))
        except (OSError, SettingsError) as exc:
            checks.append(Check("siem collector", "fail", f"{settings.siem_url}: {exc}"))
    return checks


def examine(settings: Settings, selftest: bool = False, quick: bool = False) -> list[Check]:
    """Every check; ``selftest`` also decodes with each language model in a child process
    (the CLI does; the status page shows what the server's own self-test saw). ``quick``
    (the status page, which IT may reload at will): model files by their cached hashes,
    and the audit chain not walked."""
    cpu = _cpu()
    try:  # read once: the models' checks and the GPU's (per-model gpu_layers) use them
        manifests = list(load_manifests(settings).values())
    except ManifestError as exc:
        manifests, models = [], [Check("models", "fail", str(exc))]
    else:
        models = _models_and_memory(settings, manifests, selftest, quick)
    return [
        *cpu,
        *models,
        _disk(settings),
        _gpu(settings, manifests),
        *_keys(settings),
        _certificate(settings),
        _audit(settings, quick),
        *_siem(settings, quick),
    ]


def as_dicts(checks: list[Check]) -> list[dict[str, str]]:
    return [asdict(c) for c in checks]
