# Shared by scripts/run and scripts/test.

# llama.cpp as the appliance ships it: one build for every x86-64 CPU. GGML_BACKEND_DL
# with GGML_CPU_ALL_VARIANTS compiles the CPU kernels once per CPU generation (x64,
# haswell, skylakex, icelake, zen4, sapphirerapids, ...) as loadable modules next to
# libllama, and the appliance picks one at start (appliance/engines/kernels.py): never
# the AMX one on an AMX CPU unless asked to, and self-tested. pip's wheel cache does not
# key on CMAKE_ARGS, so the wheel is built into a cache of our own keyed by version and
# flags, and installed from that file (build-bundle ships that very file).
LLAMA_CPP_VERSION=0.3.36
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib -DLLAVA_BUILD=OFF"

# llama-cpp-python is built from source by pip (then cached as a wheel): it needs a C
# and C++ compiler and cmake's build tools; libgomp1 (OpenMP) comes with gcc.
ensure_build_tools() {
    if command -v cc >/dev/null && command -v c++ >/dev/null; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq build-essential python3-venv
    else
        echo "a C/C++ compiler is needed to build llama-cpp-python:" >&2
        echo "  sudo apt-get install -y build-essential python3-venv" >&2
        exit 1
    fi
}

# The browser tests drive Debian's Chromium (never a browser Playwright downloads).
ensure_chromium() {
    if [ -x /usr/bin/chromium ]; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium
    else
        echo "the browser tests need Debian's Chromium: sudo apt-get install -y chromium" >&2
        exit 1
    fi
}

# tests/test_nspawn.py boots a minimal Debian (debootstrap) with systemd as PID 1
# (systemd-nspawn) to install the bundle in it for real; it needs root, as apt does.
ensure_nspawn() {
    if [ "$(id -u)" != 0 ]; then
        return  # the test skips itself, saying so
    fi
    if command -v debootstrap >/dev/null && command -v systemd-nspawn >/dev/null; then
        return
    fi
    if command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            debootstrap systemd-container
    else
        echo "the systemd test needs debootstrap and systemd-nspawn (systemd-container)" >&2
        exit 1
    fi
}

# tests/test_bundle.py runs the bundle's llama.cpp on an emulated AVX2-only CPU
# (qemu-x86_64 -cpu Haswell) to prove one build serves older CPUs.
ensure_qemu() {
    if command -v qemu-x86_64 >/dev/null; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends qemu-user
    else  # the test skips itself, saying so
        echo "the emulated-CPU test needs qemu-x86_64: sudo apt-get install -y qemu-user" >&2
    fi
}

# tests/test_campaign.py runs the server in a network namespace of its own under
# strace, to see that it reaches for nothing but loopback (as root, like CI).
ensure_egress_tools() {
    if [ "$(id -u)" != 0 ] || { command -v strace >/dev/null && command -v ip >/dev/null; }; then
        return  # not root: the test skips itself, saying so
    fi
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends strace iproute2
}

# tests/test_observability.py checks deploy/prometheus's alerting rules with promtool
# (Debian's prometheus package ships it).
ensure_promtool() {
    if command -v promtool >/dev/null; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus
    else
        echo "the observability test needs promtool: sudo apt-get install -y prometheus" >&2
        exit 1
    fi
}

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
}

# The llama-cpp-python wheel for LLAMA_CMAKE_ARGS (plus APPLIANCE_LLAMA_CMAKE_ARGS, e.g.
# -DGGML_CUDA=on), built once per key and installed into .venv from that file.
ensure_llama_wheel() {
    local flags="$LLAMA_CMAKE_ARGS ${APPLIANCE_LLAMA_CMAKE_ARGS:-}"
    local key
    key=$(printf '%s\n%s\n' "$LLAMA_CPP_VERSION" "$flags" | sha256sum | cut -c1-16)
    local dir="${XDG_CACHE_HOME:-$HOME/.cache}/appliance/llama-wheels/$key"
    local wheel
    wheel=$(ls "$dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$wheel" ]; then
        echo "building llama-cpp-python $LLAMA_CPP_VERSION for every x86-64 CPU (once, ~8 min on 2 cores)" >&2
        echo "  (compiling llama.cpp's CPU kernels for each CPU generation; its progress follows)" >&2
        mkdir -p "$dir.tmp"
        # -v: CMake's [ n%] lines show the compile going, not minutes of silence;
        # only those lines, so that the log stays readable.
        CMAKE_ARGS="$flags" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" .venv/bin/pip wheel -v \
            --disable-pip-version-check --no-cache-dir --no-deps \
            --no-binary llama-cpp-python -w "$dir.tmp" "llama-cpp-python==$LLAMA_CPP_VERSION" 2>&1 \
            | grep --line-buffered -E '^\s*\[ *[0-9]+%\]|Successfully|ERROR|error:' >&2 || true
        ls "$dir.tmp"/llama_cpp_python-*.whl >/dev/null  # the build made its wheel (or stop here)
        rm -rf "$dir" && mv "$dir.tmp" "$dir"
        wheel=$(ls "$dir"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl | head -n 1)
    fi
    # Reinstall when the venv holds another build of the same version (pip would keep it).
    if ! .venv/bin/python - "$wheel" <<'PY'
import json, sys
from importlib.metadata import distribution
from pathlib import Path
try:
    dist = distribution("llama-cpp-python")
except Exception:
    sys.exit(1)
url = json.loads(dist.read_text("direct_url.json") or "{}").get("url", "")
sys.exit(0 if url == Path(sys.argv[1]).resolve().as_uri() else 1)
PY
    then
        .venv/bin/pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$wheel"
    fi
}

# tests/test_fleet.py runs three appliances behind two HAProxy balancers that share a
# floating address with keepalived, each in a network namespace of its own (root).
ensure_fleet_tools() {
    if [ "$(id -u)" != 0 ] || { command -v haproxy >/dev/null && command -v keepalived >/dev/null; }; then
        return  # not root: the test skips itself, saying so
    fi
    if command -v apt-get >/dev/null; then
        apt-get update -qq
        # Installing starts neither on a machine without systemd; the test runs its own.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            haproxy keepalived iproute2
    fi
}
