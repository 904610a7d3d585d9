#!/bin/sh
# Packs build/app-dist/compute-swarm.app as dist/compute-swarm-<version>-macos-<arm64|x86_64>.dmg, with a
# link to /Applications to drag it onto. Signing and notarization follow these settings (environment
# variables; .github/workflows/installers.yml takes them from the repository's secrets):
#   MACOS_SIGNING_IDENTITY  a "Developer ID Application: NAME (TEAM)" identity in the keychain: the app
#                           is signed with the hardened runtime and installers/macos/entitlements.plist,
#                           and the .dmg is signed too. Unset: an unsigned build (Gatekeeper warns).
#   MACOS_NOTARY_PROFILE    a notarytool keychain profile (xcrun notarytool store-credentials NAME
#                           --apple-id ... --team-id ... --password <app-specific password>): the .dmg
#                           is submitted to Apple's notary service and the ticket stapled to it.
# The app's swarm travels in the .dmg's file name (a sell page adds it), never inside the signed files.
set -eu
folder="${1:?usage: package.sh APP_FOLDER}"
app="$(dirname "$folder")/compute-swarm.app"
test -d "$app" || { echo "package.sh: $app is missing (the spec makes it on macOS)" >&2; exit 1; }
version="${APP_VERSION:?run by installers/build-app.sh, which sets APP_VERSION}"
name="compute-swarm-$version-macos-$(uname -m)"
stage="build/package/$name"
rm -rf "$stage"
mkdir -p "$stage" dist
cp -R "$app" "$stage/"
ln -s /Applications "$stage/Applications"

if [ -n "${MACOS_SIGNING_IDENTITY:-}" ]; then
    codesign --force --deep --options runtime --timestamp \
        --entitlements installers/macos/entitlements.plist \
        --sign "$MACOS_SIGNING_IDENTITY" "$stage/compute-swarm.app"
    codesign --verify --strict --verbose=2 "$stage/compute-swarm.app"
else
    echo "package.sh: MACOS_SIGNING_IDENTITY is not set: the app is not signed" >&2
fi
rm -f "dist/$name.dmg"
hdiutil create -volname compute-swarm -srcfolder "$stage" -fs HFS+ -format UDZO -ov "dist/$name.dmg" >/dev/null
if [ -n "${MACOS_SIGNING_IDENTITY:-}" ]; then
    codesign --force --timestamp --sign "$MACOS_SIGNING_IDENTITY" "dist/$name.dmg"
fi
if [ -n "${MACOS_NOTARY_PROFILE:-}" ]; then
    xcrun notarytool submit "dist/$name.dmg" --keychain-profile "$MACOS_NOTARY_PROFILE" --wait
    xcrun stapler staple "dist/$name.dmg"
fi
echo "dist/$name.dmg ($(du -m "dist/$name.dmg" | cut -f1) MB)"
