"""The Windows installer's NSIS script compiles (this machine builds no Windows app, but Debian's
makensis builds the installer around any folder): a broken recipe shows here, not on a release."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.desktop  # Qt draws the icon

REPOSITORY = Path(__file__).resolve().parent.parent


def test_the_windows_installer_script_compiles(tmp_path: Path, qapp) -> None:
    if shutil.which("makensis") is None:
        pytest.skip("needs makensis (Debian's nsis; installers/debian-packages.sh installs it)")
    app = tmp_path / "compute-swarm-app"
    (app / "_internal").mkdir(parents=True)
    (app / "compute-swarm-app.exe").write_bytes(b"MZ")
    (app / "_internal" / "python311.dll").write_bytes(b"MZ")
    # The icon as build-app.sh draws it.
    from compute_swarm.desktop.tray.widgets import state_icon

    assert state_icon("earning", 256).pixmap(256).toImage().save(str(app / "icon.ico"))
    output = tmp_path / "compute-swarm-0.1.0-windows-x86_64-setup.exe"
    compiled = subprocess.run(
        ["makensis", "-V2", "-DVERSION=0.1.0", f"-DAPP_FOLDER={app}", f"-DOUTPUT={output}",
         str(REPOSITORY / "installers/windows/compute-swarm.nsi")],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert compiled.returncode == 0, compiled.stdout + compiled.stderr
    assert output.read_bytes()[:2] == b"MZ"
