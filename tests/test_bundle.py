"""The offline bundle and the installer, for real: build a signed bundle from this
checkout (wheels from the local pip cache, the real models; the `bundle` fixtures are in
conftest.py), install it with --root into a temporary tree, run it again, upgrade to a
newer bundle over a used audit log, and refuse a tampered bundle before anything is
written. tests/test_nspawn.py installs the same bundles under systemd as PID 1."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from helpers import REPO, provision

# Building bundles (twice), installing them and qemu's emulation take minutes on a 2-core
# host (Haswell's emulation alone 190-210 s): past pytest's 300 s on a slower one. The
# subprocesses' own limits are the ones that say what ran too long.
pytestmark = [pytest.mark.server, pytest.mark.timeout(1200)]


def install(bundle: Path, public_key: Path, root: Path) -> subprocess.CompletedProcess[str]:
    return provision("install", str(bundle), "--public-key", str(public_key), "--root", str(root))


def snapshot(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file outside the virtual environment: size, mtime, mode."""
    found = {}
    for path in sorted(root.rglob("*")):
        if "venv" in path.relative_to(root).parts or not path.is_file():
            continue
        st = path.stat()
        found[str(path.relative_to(root))] = (st.st_size, st.st_mtime_ns, st.st_mode)
    return found


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def installed(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["APPLIANCE_STATE_DIR"] = str(root / "var/lib/appliance")
    return subprocess.run(
        [str(root / "opt/appliance/venv/bin/appliance"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def test_install_layout_rerun_and_upgrade(
    bundle: tuple[Path, Path], newer_bundle: tuple[Path, str], tmp_path: Path
) -> None:
    tar, pub = bundle
    root = tmp_path / "root"
    first = install(tar, pub, root)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "first admin token" in first.stdout
    token = first.stdout.strip().splitlines()[-2]
    assert token.startswith("apl_")

    state = root / "var/lib/appliance"
    assert (root / "etc/systemd/system/appliance.service").is_file()
    config = (root / "etc/appliance/appliance.toml").read_text()
    assert "# audit_content = " in config and "# port = 8080" in config
    assert mode(state) == 0o750
    for key in ("keys/audit-master.key", "keys/audit-signing.key", "tls/server.key", "tls/ca.key"):
        assert mode(state / key) == 0o600, key
    # The unit's LoadCredential= sources: root-only copies of the audit keys.
    credentials = root / "etc/appliance/credentials"
    assert mode(credentials) == 0o700
    for credential, key in (("audit-master-key", "master"), ("audit-signing-key", "signing")):
        assert mode(credentials / credential) == 0o600
        assert (credentials / credential).read_bytes() == (
            state / f"keys/audit-{key}.key"
        ).read_bytes()
    assert mode(state / "audit/audit.db") == 0o640
    assert {p.name for p in (state / "models").iterdir()} == {
        "SmolLM2-135M-Instruct.Q5_MIX.gguf",
        "line-anomaly.onnx",
    }
    verified = installed(root, "models", "verify", "--json")
    assert verified.returncode == 0, verified.stdout
    assert token.encode() not in b"".join(p.read_bytes() for p in state.rglob("*") if p.is_file())

    before = snapshot(root)
    again = install(tar, pub, root)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "first admin token" not in again.stdout
    assert snapshot(root) == before  # a second run changes nothing

    # Use the audit log, then upgrade over it: the records stay and still verify.
    assert installed(root, "audit", "rotate-key").returncode == 0
    before_upgrade = json.loads(installed(root, "audit", "verify", "--json").stdout)
    newer, version = newer_bundle
    upgraded = install(newer, pub, root)
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    assert "first admin token" not in upgraded.stdout
    python = root / "opt/appliance/venv/bin/python"
    now = subprocess.run(
        [str(python), "-I", "-c", "import appliance; print(appliance.__version__)"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert now.stdout.strip() == version
    after = json.loads(installed(root, "audit", "verify", "--json").stdout)
    assert after["ok"], after["problem"]
    assert after["first_seq"] == before_upgrade["first_seq"] == 1
    assert after["records"] >= before_upgrade["records"] > 0


def test_uninstall_keeps_the_audit_log_unless_purged(
    bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    tar, pub = bundle
    root = tmp_path / "root"
    assert install(tar, pub, root).returncode == 0
    kept = provision("uninstall", "--root", str(root))
    assert kept.returncode == 0, kept.stderr
    state = root / "var/lib/appliance"
    assert not (root / "opt/appliance").exists()
    assert not (root / "etc/systemd/system/appliance.service").exists()
    assert (state / "audit/audit.db").is_file() and (state / "keys/audit-master.key").is_file()
    purged = provision("uninstall", "--purge", "--root", str(root))
    assert purged.returncode == 0 and not state.exists()
    assert not (root / "etc/appliance").exists()


def test_tampered_bundle_is_refused_before_anything_is_written(
    bundle: tuple[Path, Path], tmp_path: Path
) -> None:
    tar, pub = bundle
    unpacked = tmp_path / "unpacked"
    with tarfile.open(tar) as archive:
        archive.extractall(unpacked, filter="data")
    onnx_file = unpacked / "models" / "line-anomaly.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[100] ^= 0x01
    onnx_file.write_bytes(bytes(data))
    tampered = tmp_path / "tampered.tar"
    with tarfile.open(tampered, "w") as archive:
        archive.add(unpacked, arcname=".")
    root = tmp_path / "root"
    refused = install(tampered, pub, root)
    assert refused.returncode == 1
    assert (
        "does not match SHA256SUMS" in refused.stderr and "nothing was installed" in refused.stderr
    )
    assert not root.exists()

    other_key = tmp_path / "other.pem"
    subprocess.run(
        ["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(other_key)],
        check=True,
        capture_output=True,
    )
    other_pub = tmp_path / "other.pub"
    subprocess.run(
        ["openssl", "pkey", "-in", str(other_key), "-pubout", "-out", str(other_pub)],
        check=True,
        capture_output=True,
    )
    foreign = install(tar, other_pub, root)
    assert foreign.returncode == 1 and "signature does not verify" in foreign.stderr
    assert not root.exists()


@pytest.mark.parametrize(
    ("kind", "name", "says"),
    [
        (tarfile.SYMTYPE, "./models/stolen.gguf", "not regular files or directories"),
        (tarfile.CHRTYPE, "./models/tty.gguf", "not regular files or directories"),
        (tarfile.REGTYPE, "../escaped.txt", "outside its own tree"),
    ],
)
def test_install_refuses_odd_members_before_extracting(
    bundle: tuple[Path, Path], tmp_path: Path, kind: bytes, name: str, says: str
) -> None:
    """A signed bundle with one more member appended (the signature covers SHA256SUMS,
    which does not list it): a link to a key file on the host, a device node, a path out
    of the tree. Refused from the listing, before anything is extracted or written; the
    link's target is never copied in."""
    import shutil

    tar, pub = bundle
    secret = tmp_path / "host-secret.key"
    secret.write_text("not for the bundle")
    evil = tmp_path / "evil.tar"
    shutil.copyfile(tar, evil)
    with tarfile.open(evil, "a") as archive:
        member = tarfile.TarInfo(name)
        member.type = kind
        if kind == tarfile.SYMTYPE:
            member.linkname = str(secret)
        archive.addfile(member, io.BytesIO() if kind == tarfile.REGTYPE else None)
    root = tmp_path / "root"
    refused = install(evil, pub, root)
    assert refused.returncode == 1, refused.stdout[-2000:]
    assert says in refused.stderr and "nothing was installed" in refused.stderr
    assert not root.exists()
    assert not (tmp_path / "escaped.txt").exists()


@pytest.mark.parametrize("script", ["build-bundle", "install"])
def test_an_option_where_the_file_belongs_gets_the_usage(script: str, tmp_path: Path) -> None:
    """`build-bundle --help` once built a 190 MB bundle named --help."""
    result = provision(script, "--help", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("usage: ")
    assert not (REPO / "--help").exists() and not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def bundle_llama(bundle: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle's llama-cpp-python wheel, unpacked: a site directory to run it from."""
    import zipfile

    into = tmp_path_factory.mktemp("bundle-llama")
    with tarfile.open(bundle[0]) as tar:
        member = next(
            m for m in tar.getmembers() if Path(m.name).name.startswith("llama_cpp_python-")
        )
        data = tar.extractfile(member)
        assert data is not None
        wheel = into / Path(member.name).name
        wheel.write_bytes(data.read())
    site = into / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(site)
    return site


@pytest.mark.parametrize(
    ("cpu", "variant", "lacks"),
    [("Haswell", "haswell", "AVX512"), ("Nehalem", "sse42", "AVX")],
)
def test_bundle_decodes_on_older_cpus(
    bundle_llama: Path, model_file: Path, cpu: str, variant: str, lacks: str
) -> None:
    """The bundle's own llama.cpp build on an emulated older CPU (qemu-user: Haswell,
    AVX2 and no AVX-512; Nehalem, SSE4.2 and no AVX) picks that CPU's kernels and
    decodes the same tokens as those kernels do natively: one build for every x86-64."""
    import shutil

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("qemu-x86_64 is missing (Debian's qemu-user; scripts/test installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
    env["PYTHONPATH"] = f"{bundle_llama}:{REPO}"
    python = str(REPO / ".venv" / "bin" / "python")
    probe = [python, "-m", "appliance.engines.selftest", str(model_file)]
    emulated = subprocess.run(
        [qemu, "-cpu", cpu, *probe], capture_output=True, text=True, timeout=600, env=env
    )
    assert emulated.returncode == 0, emulated.stderr[-2000:]
    result = json.loads(emulated.stdout.strip().splitlines()[-1])
    assert result["variant"] == variant
    assert lacks not in result["features"]
    native = subprocess.run(
        [*probe, "--kernels", variant], capture_output=True, text=True, timeout=300, env=env
    )
    assert native.returncode == 0, native.stderr[-2000:]
    assert json.loads(native.stdout.strip().splitlines()[-1])["tokens"] == result["tokens"]


def test_bundle_ships_the_llama_build_the_venv_runs(bundle_llama: Path) -> None:
    """Not whatever pip's cache holds: every llama.cpp library in the bundle is the one
    installed in .venv (which the tests ran on), byte for byte (RECORD's hashes), plus
    the OpenMP runtime a minimal Debian lacks."""
    import csv
    from importlib.metadata import distribution

    def libs(record: str) -> dict[str, str]:
        rows = csv.reader(record.splitlines())
        return {r[0]: r[1] for r in rows if r and r[0].startswith("llama_cpp/lib/")}

    installed = libs(distribution("llama-cpp-python").read_text("RECORD") or "")
    record = next(bundle_llama.glob("llama_cpp_python-*.dist-info")) / "RECORD"
    shipped = libs(record.read_text())
    assert shipped.pop("llama_cpp/lib/libgomp.so.1")
    assert shipped == installed
    assert "llama_cpp/lib/libggml-cpu-x64.so" in shipped
