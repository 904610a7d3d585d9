#!/usr/bin/env sh
# Installs the Debian/Ubuntu packages the tray app and its tests need (Qt's runtime libraries, fonts,
# Xvfb for a real window) and Chromium for the web page's browser tests (driven through Playwright,
# never a browser it downloads), when they are missing and apt-get can run (as root, or through sudo).
# Elsewhere it says what is missing and goes on: the tests that need a package skip with the reason.
set -eu
PACKAGES="libegl1 libgl1 libfontconfig1 libfreetype6 libglib2.0-0 libdbus-1-3 libxkbcommon0 \
libxkbcommon-x11-0 libx11-xcb1 libxcb-cursor0 libxcb-icccm4 libxcb-image0 libxcb-keysyms1 \
libxcb-randr0 libxcb-render-util0 libxcb-shape0 libxcb-sync1 libxcb-xfixes0 libxcb-xkb1 \
libx11-6 libxss1 libxtst6 fonts-dejavu-core xvfb xauth chromium chromium-driver"

command -v dpkg-query >/dev/null 2>&1 || exit 0  # not a Debian system: nothing to do here
missing=""
for package in $PACKAGES; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" = 0 ]; then
    as_root=""
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    as_root="sudo -n"
else
    echo "installers/debian-packages.sh: please install:$missing (the desktop and browser tests skip without them)" >&2
    exit 0
fi
echo "installing Debian packages:$missing"
export DEBIAN_FRONTEND=noninteractive
# An out-of-date package list (a fresh container) fails the install: refresh it once and retry.
$as_root apt-get install -y -q --no-install-recommends $missing >/dev/null 2>&1 || {
    $as_root apt-get update -q >/dev/null
    $as_root apt-get install -y -q --no-install-recommends $missing >/dev/null
}
