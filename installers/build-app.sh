#!/bin/sh
# Builds the packaged tray app for the machine it runs on (`make installer`): a build venv from the locks
# (requirements/app.txt: the tray, agent and SDK, no engine; requirements/installer.txt: PyInstaller),
# PyInstaller's one-folder app in build/app-dist/, then this OS's package in dist/:
#   Linux: a .tar.gz with a per-user installer and a .desktop entry (installers/linux/package.sh);
#   Windows (Git Bash): a per-user NSIS installer .exe (installers/windows/package.sh);
#   macOS: compute-swarm.app in a .dmg, signed and notarized when the settings for it are set
#   (installers/macos/package.sh).
# .github/workflows/installers.yml runs it on each OS.
set -eu
test -f pyproject.toml || { echo "run from the repo root" >&2; exit 1; }
python="${PYTHON:-python3}"
venv=build/app-venv
case "$(uname -s)" in
    Linux) os=linux bin="$venv/bin" ;;
    Darwin) os=macos bin="$venv/bin" ;;
    MINGW* | MSYS* | CYGWIN*) os=windows bin="$venv/Scripts" ;;
    *) echo "build-app.sh: no package is written for $(uname -s)" >&2; exit 1 ;;
esac

test -x "$bin/python" || test -x "$bin/python.exe" || "$python" -m venv "$venv"
"$bin/python" -m pip install --quiet --disable-pip-version-check --require-hashes --no-deps -r requirements/uv.txt
"$bin/uv" pip install --quiet --python "$bin/python" --require-hashes --no-deps \
    -r requirements/app.txt -r requirements/installer.txt
# Not editable: the app carries the package's metadata (its commands are entry points).
"$bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --force-reinstall .
# The icons: the tray's own, drawn by the app's code (PNG for Linux's menu, ICO for Windows, ICNS for macOS).
mkdir -p build/app-icons
QT_QPA_PLATFORM=offscreen "$bin/python" -c "
from PySide6.QtWidgets import QApplication
application = QApplication([])
from compute_swarm.desktop.tray.widgets import state_icon
image = state_icon('earning', 256).pixmap(256).toImage()
for name in ('icon.png', 'icon.ico', 'icon.icns'):
    assert image.save('build/app-icons/' + name), name
"
# llama-cpp-python for the engine runtime: no public index has a wheel, so the app's own is built here
# (for every CPU; Metal on macOS), published beside the package in dist/wheels/ (a coordinator serves
# it from its app-downloads folder), and pinned by its hash in a lock the app carries.
llama_build=cpu
[ "$os" = macos ] && llama_build=mps
rm -rf build/app-locks dist/wheels
mkdir -p build/app-locks
llama_wheel="$(sh installers/llama-cpp.sh "$bin/python" --wheel-into dist/wheels | tail -n 1)"
case "$llama_wheel" in
    *.whl)
        llama_version="$(basename "$llama_wheel" | cut -d- -f2)"
        llama_hash="$("$bin/python" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$llama_wheel")"
        printf '# installers/build-app.sh: the llama-cpp-python wheel it built (dist/wheels/)\nllama-cpp-python==%s \\\n    --hash=sha256:%s\n' \
            "$llama_version" "$llama_hash" > "build/app-locks/llama-cpp-$llama_build-$os.txt"
        ;;
    *) echo "build-app.sh: no llama-cpp-python wheel for this machine: the app will serve no inference" >&2 ;;
esac
"$bin/pyinstaller" --noconfirm --log-level WARN --distpath build/app-dist --workpath build/app-work \
    installers/app/compute-swarm.spec
cp build/app-icons/icon.png build/app-icons/icon.ico build/app-dist/compute-swarm-app/
APP_VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -n 1)" \
    sh "installers/$os/package.sh" build/app-dist/compute-swarm-app
