#!/usr/bin/env bash
# Make sure the system services the tests talk to are present and running:
# mosquitto (the broker binary; tests start their own instances), PostgreSQL on 127.0.0.1:5432 and
# Chromium (the web console tests drive it headless through Playwright).
# Installs them with apt-get when run as root on Debian/Ubuntu; otherwise says what to do.
# With --broker-only, only mosquitto is needed (the local demo runs the fleet on SQLite).
set -euo pipefail

broker_only=false
[ "${1:-}" = "--broker-only" ] && broker_only=true

need_apt=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_apt+=(mosquitto)
$broker_only || command -v pg_ctlcluster >/dev/null 2>&1 || need_apt+=(postgresql)
$broker_only || [ -x /usr/bin/chromium ] || need_apt+=(chromium chromium-driver)

if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}"
    else
        echo "please install: ${need_apt[*]} (e.g. sudo apt-get install ${need_apt[*]})" >&2
        exit 1
    fi
fi

$broker_only && exit 0

if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -1)
    if [ -n "$version" ] && [ "$(id -u)" = 0 ]; then
        pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    fi
    for _ in $(seq 1 30); do
        pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && break
        sleep 1
    done
fi
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
    echo "PostgreSQL is not accepting connections on 127.0.0.1:5432; start it" \
         "(e.g. sudo pg_ctlcluster <version> main start) with trust auth for user postgres" >&2
    exit 1
fi
