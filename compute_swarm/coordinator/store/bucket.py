"""The bucket in which coordinator replicas share their artifacts: an S3-compatible object store (AWS S3,
MinIO, SeaweedFS, Ceph...), reached with boto3. Credentials come the way boto3 reads them (the
AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY environment variables, a profile, an instance role), so
no secret passes through the coordinator's settings.

Only store.artifacts uses it: the bucket holds each verified blob under `blobs/<sha256>` and the
chunks of uploads in progress under `uploads/<upload id>/<offset>`, so a buyer's upload may send its
chunks through any replica.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class BucketError(RuntimeError):
    """The bucket could not be reached or refused: the request fails (the client may try again)."""


class Bucket:
    def __init__(self, url: str, endpoint: str = ""):
        """`url` is s3://bucket or s3://bucket/prefix; `endpoint` the server's URL for a store that
        is not AWS (e.g. http://127.0.0.1:8333)."""
        parts = urlsplit(url)
        if parts.scheme != "s3" or not parts.netloc:
            raise ValueError(f"an artifact bucket is named s3://bucket[/prefix], not {url!r}")
        try:
            import boto3
            from botocore.config import Config
        except ImportError:
            raise ValueError(
                "an artifact bucket needs boto3: install compute-swarm[replicas] (requirements/postgres.txt)"
            ) from None
        self.name = parts.netloc
        self.prefix = parts.path.strip("/")
        config = Config(
            # Self-hosted stores serve buckets by path, not by host name.
            s3={"addressing_style": "path"} if endpoint else {},
            retries={"max_attempts": 5, "mode": "standard"},
            connect_timeout=10,
            read_timeout=60,
        )
        self.client: Any = boto3.client("s3", endpoint_url=endpoint or None, config=config)

    def key(self, *parts: str) -> str:
        return "/".join(part for part in (self.prefix, *parts) if part)

    def size(self, key: str) -> int | None:
        """The object's size, or None when there is none."""
        from botocore.exceptions import ClientError

        try:
            return int(self._call("head_object", Bucket=self.name, Key=key)["ContentLength"])
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise BucketError(f"the artifact bucket refused to describe {key}: {error}") from error

    def upload(self, path: Path, key: str) -> None:
        self._call("upload_file", str(path), self.name, key)

    def download(self, key: str, path: Path) -> None:
        self._call("download_file", self.name, key, str(path))

    def put(self, key: str, data: bytes) -> None:
        self._call("put_object", Bucket=self.name, Key=key, Body=data)

    def listing(self, prefix: str) -> list[tuple[str, int]]:
        """The (key, size) of every object under the prefix, in key order."""
        found: list[tuple[str, int]] = []
        token: dict[str, str] = {}
        while True:
            page = self._call("list_objects_v2", Bucket=self.name, Prefix=prefix, **token)
            found += [(item["Key"], int(item["Size"])) for item in page.get("Contents", [])]
            if not page.get("IsTruncated"):
                return sorted(found)
            token = {"ContinuationToken": page["NextContinuationToken"]}

    def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # S3 deletes at most 1000 objects a request
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            self._call("delete_objects", Bucket=self.name, Delete={"Objects": batch, "Quiet": True})

    def _call(self, operation: str, *arguments: Any, **keywords: Any) -> Any:
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return getattr(self.client, operation)(*arguments, **keywords)
        except ClientError as error:
            if operation == "head_object":
                raise  # size() tells a missing object from a refusal
            raise BucketError(f"the artifact bucket refused {operation}: {error}") from error
        except (BotoCoreError, Boto3Error) as error:
            raise BucketError(f"the artifact bucket is unreachable ({operation}): {error}") from error
