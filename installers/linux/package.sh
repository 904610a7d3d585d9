#!/bin/sh
# Packs the built app folder ($1) as dist/compute-swarm-<version>-linux-<machine>.tar.gz: the app, a
# per-user installer (no root), an uninstaller and the desktop entry.
set -eu
app="${1:?usage: package.sh APP_FOLDER}"
version="${APP_VERSION:?run by installers/build-app.sh, which sets APP_VERSION}"
name="compute-swarm-$version-linux-$(uname -m)"
stage="build/package/$name"
rm -rf "$stage"
mkdir -p "$stage" dist
cp -a "$app" "$stage/compute-swarm-app"
cp installers/linux/install.sh installers/linux/uninstall.sh installers/linux/compute-swarm.desktop "$stage/"
chmod +x "$stage/install.sh" "$stage/uninstall.sh"
tar -C build/package -czf "dist/$name.tar.gz" "$name"
echo "dist/$name.tar.gz ($(du -m "dist/$name.tar.gz" | cut -f1) MB; unpacked $(du -sm "$stage" | cut -f1) MB)"
