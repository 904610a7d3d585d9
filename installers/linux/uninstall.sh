#!/bin/sh
# Removes compute-swarm for this user. --all also removes the engine runtime, the node's data (jobs,
# cached models) and its settings; without it they stay for a later install.
set -eu
data="${XDG_DATA_HOME:-$HOME/.local/share}"
config="${XDG_CONFIG_HOME:-$HOME/.config}"
rm -rf "$data/compute-swarm/app"
rm -f "$HOME/.local/bin/compute-swarm-app" "$data/applications/compute-swarm.desktop"
rm -f "$config/autostart/compute-swarm.desktop"
if [ "${1:-}" = "--all" ]; then
    rm -rf "$data/compute-swarm" "$config/compute-swarm"
    echo "compute-swarm, its engine runtime, data and settings are removed"
else
    rm -f "$data/compute-swarm/uninstall.sh"
    echo "compute-swarm is removed; its engine runtime, data and settings stay (uninstall.sh --all removes them)"
fi
