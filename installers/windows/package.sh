#!/bin/sh
# Packs the built app folder ($1) as dist/compute-swarm-<version>-windows-x86_64-setup.exe with NSIS
# (installers/windows/compute-swarm.nsi: per user, no administrator rights). Signing follows these
# settings (environment variables; .github/workflows/installers.yml takes them from its secrets):
#   WINDOWS_SIGNING_CERTIFICATE  a .pfx code-signing certificate, and WINDOWS_SIGNING_PASSWORD its
#                                password: the app's executable and then the installer are signed with
#                                signtool (Windows SDK), time-stamped. Unset: unsigned (SmartScreen warns).
# The app's swarm travels in the installer's file name (a sell page adds it), never inside it.
set -eu
app="${1:?usage: package.sh APP_FOLDER}"
version="${APP_VERSION:?run by installers/build-app.sh, which sets APP_VERSION}"
output="dist/compute-swarm-$version-windows-x86_64-setup.exe"
mkdir -p dist
sign() {
    [ -n "${WINDOWS_SIGNING_CERTIFICATE:-}" ] || return 0
    signtool sign /f "$WINDOWS_SIGNING_CERTIFICATE" /p "${WINDOWS_SIGNING_PASSWORD:-}" \
        /fd sha256 /tr http://timestamp.digicert.com /td sha256 "$1"
}
[ -n "${WINDOWS_SIGNING_CERTIFICATE:-}" ] || echo "package.sh: WINDOWS_SIGNING_CERTIFICATE is not set: not signed" >&2
sign "$app/compute-swarm-app.exe"
# makensis takes -D options with a dash on Linux and with a slash or a dash on Windows.
makensis -V2 -DVERSION="$version" -DAPP_FOLDER="$app" -DOUTPUT="$PWD/$output" installers/windows/compute-swarm.nsi
sign "$output"
echo "$output ($(du -m "$output" | cut -f1) MB)"
