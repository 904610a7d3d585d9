"""A package index on 127.0.0.1 over a folder of wheels built here, for the engine runtime's tests
(tests/desktop/test_runtime.py, the tray's first run): PyPI's JSON or HTML simple API, range requests,
a download cut off mid-file, and a slow line."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import threading
import time
import zipfile
from pathlib import Path

from packaging.tags import Tag
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

from compute_swarm.engine.package_index import Pin

TAGS = [Tag("py3", "none", "any")]


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A wheel of `files` (paths inside the wheel), with its dist-info and a true RECORD."""
    dist_info = f"{name}-{version}.dist-info"
    members = dict(files)
    members[f"{dist_info}/METADATA"] = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode()
    members[f"{dist_info}/WHEEL"] = b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    record = "".join(
        f"{path},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for path, data in members.items()
    )
    members[f"{dist_info}/RECORD"] = (record + f"{dist_info}/RECORD,,\n").encode()
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in members.items():
            archive.writestr(member, data)
    return path


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pin_of(wheel: Path) -> Pin:
    name, version, _, _ = parse_wheel_filename(wheel.name)
    return Pin(canonicalize_name(name), Version(str(version)), frozenset({sha256_of(wheel)}))


class Index:
    """A package index on 127.0.0.1 over a folder of wheels: the JSON simple API (or HTML), with range
    requests, and a switch that cuts a download off after some bytes."""

    def __init__(self, folder: Path, *, html: bool = False):
        self.folder = folder
        self.html = html
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header)
        self.cut_after_bytes: int | None = None
        self.seconds_per_chunk = 0.0
        index = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *arguments) -> None:
                pass

            def do_GET(self) -> None:
                index.requests.append((self.path, self.headers.get("Range")))
                parts = [part for part in self.path.split("/") if part]
                if parts[:1] == ["simple"] and len(parts) == 2:
                    return self._project(parts[1])
                if parts[:1] == ["files"] and len(parts) == 2:
                    return self._file(index.folder / parts[1])
                self.send_error(404)

            def _project(self, project: str) -> None:
                wheels_here = sorted(
                    path
                    for path in index.folder.glob("*.whl")
                    if path.name.split("-")[0].replace("_", "-") == project
                )
                if not wheels_here:
                    return self.send_error(404)
                if index.html:
                    body = "".join(
                        f'<a href="../../files/{path.name}#sha256={sha256_of(path)}">{path.name}</a>\n'
                        for path in wheels_here
                    ).encode()
                    content_type = "text/html"
                else:
                    body = json.dumps(
                        {
                            "meta": {"api-version": "1.1"},
                            "name": project,
                            "files": [
                                {
                                    "filename": path.name,
                                    "url": f"../../files/{path.name}",
                                    "hashes": {"sha256": sha256_of(path)},
                                    "size": path.stat().st_size,
                                }
                                for path in wheels_here
                            ],
                        }
                    ).encode()
                    content_type = "application/vnd.pypi.simple.v1+json"
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def _file(self, path: Path) -> None:
                if not path.is_file():
                    return self.send_error(404)
                data = path.read_bytes()
                start = 0
                if (wanted := self.headers.get("Range")) is not None:
                    start = int(wanted.removeprefix("bytes=").rstrip("-"))
                    if start >= len(data):
                        return self.send_error(416)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if index.cut_after_bytes is not None:
                    self.wfile.write(body[: index.cut_after_bytes])
                    self.wfile.flush()
                    self.connection.shutdown(2)  # the line drops mid-file
                    return
                for offset in range(0, len(body), 64 * 1024):
                    self.wfile.write(body[offset : offset + 64 * 1024])
                    if index.seconds_per_chunk:
                        time.sleep(index.seconds_per_chunk)  # a slow line

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address) -> None:
                pass  # a client that stops reading (a cancelled download) is no error here

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def downloads(self) -> list[str]:
        return [path.rsplit("/", 1)[-1] for path, _ in self.requests if path.startswith("/files/")]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
