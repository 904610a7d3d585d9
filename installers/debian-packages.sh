#!/usr/bin/env sh
# Installs the Debian/Ubuntu packages the tray app and its tests need (Qt's runtime libraries, fonts,
# Xvfb for a real window, xdotool to press its buttons there, NSIS to compile the Windows installer,
# iproute2 and nftables for the NAT test's network namespaces, nginx for the load balancer in front of
# coordinator replicas in tests/test_deploy.py)
# and Chromium for the web page's browser tests (driven through Playwright, never a browser it
# downloads), when they are missing and apt-get can run (as root, or through sudo).
# Elsewhere it says what is missing and goes on: the tests that need a package skip with the reason.
set -eu
PACKAGES="libegl1 libgl1 libfontconfig1 libfreetype6 libglib2.0-0 libdbus-1-3 libxkbcommon0 \
libxkbcommon-x11-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-sync1 libxcb-xfixes0 libxcb-xkb1 \
libx11-6 libxss1 libxtst6 fonts-dejavu-core xvfb xauth xdotool nsis iproute2 nftables"
# The web page's browser tests. Ubuntu has Chromium only as a snap: there these fail to install, the
# script says so, and the browser tests skip (or SWARM_CHROMIUM names a Chromium to use).
BROWSER_PACKAGES="chromium chromium-driver firefox-esr"  # firefox-esr: tests/browser/test_firefox.py
# nginx starts a server on port 80 as it installs where systemd runs: on a machine whose port 80 is
# taken the install fails, and only tests/test_deploy.py's nginx tests skip for it.
OPTIONAL_PACKAGES="$BROWSER_PACKAGES nginx"

command -v dpkg-query >/dev/null 2>&1 || exit 0  # not a Debian system: nothing to do here
missing_of() {
    for package in "$@"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || printf ' %s' "$package"
    done
}
# shellcheck disable=SC2086
missing="$(missing_of $PACKAGES)"
# shellcheck disable=SC2086
missing_optional="$(missing_of $OPTIONAL_PACKAGES)"
[ -z "$missing$missing_optional" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    echo "installers/debian-packages.sh: please install:$missing$missing_optional (the desktop, browser and deploy tests skip without them)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt_install() {
    # An out-of-date package list (a fresh container) fails the install: refresh it once and retry.
    $as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
        $as_root apt-get update -q >/dev/null
        $as_root apt-get install -y -q --no-install-recommends "$@" >/dev/null
    }
}
if [ -n "$missing" ]; then
    echo "installing Debian packages:$missing"
    # shellcheck disable=SC2086
    apt_install $missing
fi
if [ -n "$missing_optional" ]; then
    echo "installing Debian packages:$missing_optional"
    # shellcheck disable=SC2086
    apt_install $missing_optional || echo "installers/debian-packages.sh: could not install$missing_optional; the tests that need them will skip" >&2
fi
