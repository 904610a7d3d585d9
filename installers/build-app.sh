#!/bin/sh
# Builds the packaged tray app for the machine it runs on (`make installer`): a build venv from the locks
# (requirements/app.txt: the tray, agent and SDK, no engine; requirements/installer.txt: PyInstaller),
# PyInstaller's one-folder app in build/app-dist/, then this OS's package in dist/.
# Only Linux is packaged here so far (a .tar.gz with a per-user installer and a .desktop entry).
set -eu
test -f pyproject.toml || { echo "run from the repo root" >&2; exit 1; }
python="${PYTHON:-python3}"
venv=build/app-venv

test -x "$venv/bin/python" || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/uv.txt
"$venv/bin/uv" pip install --quiet --python "$venv/bin/python" --require-hashes --no-deps \
    -r requirements/app.txt -r requirements/installer.txt
# Not editable: the app carries the package's metadata (its commands are entry points).
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall .
"$venv/bin/pyinstaller" --noconfirm --log-level WARN --distpath build/app-dist --workpath build/app-work \
    installers/app/compute-swarm.spec

# The menu's icon: the tray's own, drawn by the app's code.
QT_QPA_PLATFORM=offscreen "$venv/bin/python" -c "
from PySide6.QtWidgets import QApplication
application = QApplication([])
from compute_swarm.desktop.tray.widgets import state_icon
state_icon('earning', 256).pixmap(256).save('build/app-dist/compute-swarm-app/icon.png')
"

case "$(uname -s)" in
    Linux) sh installers/linux/package.sh build/app-dist/compute-swarm-app ;;
    *) echo "build-app.sh: the app is in build/app-dist/; packaging for $(uname -s) is not written yet" >&2 ;;
esac
