#!/bin/sh
# Installs compute-swarm for this user, without root: the app in ~/.local/share/compute-swarm/app, a
# command in ~/.local/bin, and an entry in the applications menu. Run it again to update.
set -eu
here="$(cd "$(dirname "$0")" && pwd)"
data="${XDG_DATA_HOME:-$HOME/.local/share}"
target="$data/compute-swarm/app"
rm -rf "$target.new"
mkdir -p "$data/compute-swarm" "$data/applications" "$HOME/.local/bin"
cp -a "$here/compute-swarm-app" "$target.new"
rm -rf "$target"
mv "$target.new" "$target"
ln -sf "$target/compute-swarm-app" "$HOME/.local/bin/compute-swarm-app"
icon="$target/icon.png"
sed -e "s|@APP@|$target/compute-swarm-app|" -e "s|@ICON@|$icon|" "$here/compute-swarm.desktop" \
    > "$data/applications/compute-swarm.desktop"
cp "$here/uninstall.sh" "$data/compute-swarm/uninstall.sh"
echo "compute-swarm is installed: open it from the applications menu, or run $target/compute-swarm-app"
