# Sourced by scripts/test (after scripts/lib.sh): what tests/test_siem.py needs.

# The SIEM feed's test runs Debian's rsyslog as the collector: imtcp with the gtls
# stream driver (syslog over TLS, RFC 5425), which rsyslog-gnutls provides. rsyslogd
# runs unprivileged there (its own config, work directory, pid file and port), but
# installing it takes root: without root and without the packages the test skips,
# saying so.
ensure_siem_tools() {
    if command -v /usr/sbin/rsyslogd >/dev/null && ls /usr/lib/*/rsyslog/lmnsd_gtls.so >/dev/null 2>&1; then
        return
    fi
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        apt-get update -qq
        # On a host running systemd this also enables the system's own rsyslog service
        # (local logging, no network input); the test never uses it.
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            rsyslog rsyslog-gnutls
    else
        echo "the SIEM feed test needs rsyslog and rsyslog-gnutls:" >&2
        echo "  sudo apt-get install -y --no-install-recommends rsyslog rsyslog-gnutls" >&2
    fi
}
