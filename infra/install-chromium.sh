#!/usr/bin/env bash
# Install Chromium from the system package manager (for the browser test of the chat page,
# tests/test_serve_browser.py). Playwright's own browser download is not used: the test
# launches this binary through executable_path.
#
# Idempotent: when chromium (or chromium-browser) is on PATH, print its path and exit 0.
# Otherwise, as root with apt-get, install the Debian package `chromium` (apt-get update
# only when the package lists do not know it, or when an install from stale lists fails)
# and print the path. Anything else: exit non-zero with a one-line reason on stderr.
set -u

find_chromium() {
    local name
    for name in chromium chromium-browser; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    return 1
}

if path=$(find_chromium); then
    echo "$path"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-chromium: chromium is not on PATH and apt-get is not available; install Chromium by hand" >&2
    exit 2
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "install-chromium: chromium is not on PATH and installing it with apt-get needs root (run: sudo $0)" >&2
    exit 3
fi

export DEBIAN_FRONTEND=noninteractive
log=$(mktemp "${TMPDIR:-/tmp}/install-chromium.XXXXXX.log")

has_candidate() {
    apt-cache policy chromium 2>/dev/null | grep -Eq 'Candidate: [^(]'
}

update() {
    apt-get update >>"$log" 2>&1
}

install() {
    apt-get install -y --no-install-recommends chromium >>"$log" 2>&1
}

if ! has_candidate; then
    if ! update; then
        echo "install-chromium: apt-get update failed ($(tail -n 1 "$log")); see $log" >&2
        exit 4
    fi
    if ! has_candidate; then
        echo "install-chromium: no 'chromium' package in the apt sources; see $log" >&2
        exit 5
    fi
fi

# The lists may be stale (a package version gone from the mirror): update once and retry.
if ! install && ! { update && install; }; then
    echo "install-chromium: apt-get install chromium failed ($(tail -n 1 "$log")); see $log" >&2
    exit 6
fi

if path=$(find_chromium); then
    rm -f "$log"
    echo "$path"
    exit 0
fi
echo "install-chromium: the chromium package installed but no chromium binary is on PATH; see $log" >&2
exit 7
