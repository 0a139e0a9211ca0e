# Shared by scripts/run and scripts/test.

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

ensure_venv() {
    if [ ! -x .venv/bin/python ]; then
        python3 -m venv .venv
    fi
}
