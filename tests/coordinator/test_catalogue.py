"""The ops-curated catalogue through a real coordinator process: `admin add-model` hashes ops' files into
the artifact store and reads the model's facts; buyers see the model in /v1/models, /api/models and its
prices; nodes may fetch its files; deprecating and removing it keep the jobs that used it readable; bad
files and names are refused with the reason, and nothing is listed."""

from __future__ import annotations

import hashlib
import json

import httpx
import pytest

from compute_swarm.coordinator.domain import pricing
from compute_swarm.coordinator.service.catalogue import CACHE_SECONDS
from compute_swarm.engine.catalogue import fetch_catalogue_model
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, DEMO_CHAT_DATASET
from compute_swarm.sdk.client import NodeClient, SwarmClient, SwarmError
from tests.coordinator.test_node_socket import check_ledger
from tests.swarm_processes import Coordinator, run_cli, wait_for

APACHE = (
    "                                 Apache License\n                           Version 2.0, January 2004\n"
)


@pytest.fixture(scope="module")
def coordinator(tmp_path_factory):
    server = Coordinator(tmp_path_factory.mktemp("coordinator")).start()
    yield server
    server.stop()
    check_ledger(server.data_dir)


@pytest.fixture(scope="module")
def demo_gguf():
    return fetch_catalogue_model(DEFAULT_MODEL)


@pytest.fixture
def licence(tmp_path):
    path = tmp_path / "LICENSE"
    path.write_text(APACHE + "\n   TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION\n")
    return path


def admin(coordinator: Coordinator, *arguments: str):
    return run_cli("admin", *arguments, "--data-dir", str(coordinator.data_dir), timeout=300)


def served_models(coordinator: Coordinator, api_key: str) -> dict[str, dict]:
    response = httpx.get(f"{coordinator.url}/v1/models", headers={"Authorization": f"Bearer {api_key}"})
    response.raise_for_status()
    return {model["id"]: model for model in response.json()["data"]}


def catalogue(coordinator: Coordinator) -> dict[str, dict]:
    return {model["name"]: model for model in httpx.get(f"{coordinator.url}/api/models").json()}


def test_ops_add_a_model_from_a_gguf_and_buyers_and_nodes_see_it(coordinator, demo_gguf, licence):
    added = admin(
        coordinator,
        "add-model",
        "--name",
        "smollm2-copy",
        "--gguf",
        str(demo_gguf),
        "--license",
        str(licence),
    )
    assert added.returncode == 0, added.stderr
    assert "llama, 134,515,008 parameters, context 8,192" in added.stdout and "Apache-2.0" in added.stdout

    # The GGUF and the licence text are content-addressed artifacts, byte for byte.
    sha256 = hashlib.sha256(demo_gguf.read_bytes()).hexdigest()
    blob = coordinator.data_dir / "artifacts" / "blobs" / sha256[:2] / sha256
    assert blob.read_bytes() == demo_gguf.read_bytes()
    licence_sha256 = hashlib.sha256(licence.read_bytes()).hexdigest()
    assert (coordinator.data_dir / "artifacts" / "blobs" / licence_sha256[:2] / licence_sha256).is_file()

    # The running coordinator lists it within its cache's lifetime, with the facts read from the file.
    api_key = coordinator.create_buyer("catalogue-reader", "10")
    models = wait_for(
        lambda: (found := served_models(coordinator, api_key)).get("smollm2-copy") and found,
        10 * CACHE_SECONDS,
        "the added model in /v1/models",
    )
    copy = models["smollm2-copy"]
    assert (copy["object"], copy["owned_by"], copy["base_model"]) == (
        "model",
        "compute-swarm",
        "smollm2-copy",
    )
    assert (copy["context_length"], copy["parameters"], copy["licence"]) == (8192, 134_515_008, "Apache-2.0")
    assert copy["deprecated"] is False
    listed = catalogue(coordinator)["smollm2-copy"]
    assert listed["state"] == "listed" and listed["architecture"] == "llama"
    assert listed["gguf_bytes"] == demo_gguf.stat().st_size and listed["weights_bytes"] == 0
    rates = pricing.model_rates_micro(CATALOGUE[DEFAULT_MODEL])  # the same parameter count: the same prices
    assert listed["fine_tune_per_million_tokens_micro"] == rates["fine_tune_per_million_tokens_micro"]
    assert listed["inference_per_million_tokens_micro"] == copy["inference_per_million_tokens_micro"]

    # The public models page shows it with its licence and prices.
    page = httpx.get(f"{coordinator.url}/models").text
    assert "smollm2-copy" in page and "Apache-2.0" in page and "8,192" in page
    assert '<a href="/api/models/smollm2-copy/licence">' in page
    assert httpx.get(f"{coordinator.url}/api/models/smollm2-copy/licence").text == licence.read_text()
    assert httpx.get(f"{coordinator.url}/api/models/nothing-here/licence").status_code == 404

    # Any node may fetch a catalogue model's files from the coordinator, and gets exactly its bytes.
    _, token = NodeClient.register(coordinator.url, "catalogue-node")
    fetched = NodeClient(coordinator.url, token).download_artifact(
        sha256, licence.parent / "model.gguf", size=demo_gguf.stat().st_size
    )
    assert fetched.read_bytes() == demo_gguf.read_bytes()
    # ...but not its licence text, which is ops' record, nor anything else.
    with pytest.raises(SwarmError):
        NodeClient(coordinator.url, token).download_artifact(licence_sha256, licence.parent / "licence")

    shown = admin(coordinator, "models")
    assert "smollm2-copy [listed]" in shown.stdout and f"{DEFAULT_MODEL} [listed, built in]" in shown.stdout


def test_a_deprecated_or_removed_model_takes_no_new_fine_tunes_and_its_jobs_stay_readable(
    coordinator, demo_gguf, licence
):
    added = admin(
        coordinator, "add-model", "--name", "retiring", "--gguf", str(demo_gguf), "--license", str(licence)
    )
    assert added.returncode == 0, added.stderr
    api_key = coordinator.create_buyer("retiring-buyer", "10")
    buyer = SwarmClient(coordinator.url, api_key)
    dataset = buyer.upload_file(DEMO_CHAT_DATASET)
    spec = {"base_model": "retiring", "dataset": dataset["id"], "max_steps": 2}
    job = wait_for(lambda: _submitted(buyer, spec), 10 * CACHE_SECONDS, "a fine-tune on the added model")
    assert job["spec"]["base_model"] == "retiring" and job["state"] == "queued"

    assert admin(coordinator, "deprecate-model", "retiring").returncode == 0
    wait_for(
        lambda: served_models(coordinator, api_key)["retiring"]["deprecated"],
        10 * CACHE_SECONDS,
        "deprecation",
    )
    with pytest.raises(SwarmError) as refused:
        buyer.submit_lora(spec)
    assert refused.value.status_code == 422 and "deprecated" in str(refused.value)
    assert buyer.job(job["id"])["spec"]["base_model"] == "retiring"

    assert admin(coordinator, "remove-model", "retiring").returncode == 0
    wait_for(lambda: "retiring" not in served_models(coordinator, api_key), 10 * CACHE_SECONDS, "removal")
    assert "retiring" not in catalogue(coordinator)
    with pytest.raises(SwarmError) as unknown:
        buyer.submit_lora(spec)
    assert unknown.value.status_code == 422 and "unknown base_model 'retiring'" in str(unknown.value)
    chat = httpx.post(
        f"{coordinator.url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {api_key}"},
        json={"model": "retiring", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "model_not_found"
    # The job that used it stays readable, and can be cancelled (its hold comes back).
    assert buyer.job(job["id"])["spec"]["base_model"] == "retiring"
    assert buyer.cancel(job["id"])["state"] == "cancelled"
    assert "retiring [removed]" in admin(coordinator, "models").stdout

    # Its name is never given to another model; ops may offer it again.
    again = admin(
        coordinator, "add-model", "--name", "retiring", "--gguf", str(demo_gguf), "--license", str(licence)
    )
    assert again.returncode != 0 and "removed: its jobs keep the name" in again.stderr
    assert admin(coordinator, "list-model", "retiring").returncode == 0
    wait_for(lambda: "retiring" in served_models(coordinator, api_key), 10 * CACHE_SECONDS, "listing again")
    builtin = admin(coordinator, "remove-model", DEFAULT_MODEL)
    assert builtin.returncode != 0 and "built-in model" in builtin.stderr


def _submitted(buyer: SwarmClient, spec: dict) -> dict | None:
    try:
        return buyer.submit_lora(spec)
    except SwarmError as error:
        if error.status_code == 422 and "unknown base_model" in str(error):
            return None  # not yet in this replica's cached catalogue
        raise


def test_bad_model_files_and_names_are_refused_with_the_reason(coordinator, demo_gguf, licence, tmp_path):
    def refused(*arguments: str) -> str:
        result = admin(coordinator, "add-model", *arguments)
        assert result.returncode != 0, result.stdout
        return result.stderr

    assert "must be lowercase" in refused(
        "--name", "Bad Name", "--gguf", str(demo_gguf), "--license", str(licence)
    )
    assert "already has a model named" in refused(
        "--name", DEFAULT_MODEL, "--gguf", str(demo_gguf), "--license", str(licence)
    )
    assert "--license" in refused("--name", "no-licence", "--gguf", str(demo_gguf))
    assert "give --hf-dir, --gguf" in refused("--name", "no-files", "--license", str(licence))

    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf at all" * 100)
    assert "is not a readable GGUF file" in refused(
        "--name", "broken", "--gguf", str(not_gguf), "--license", str(licence)
    )

    config_only = tmp_path / "config-only"
    config_only.mkdir()
    (config_only / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (config_only / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    message = refused("--name", "pickled", "--hf-dir", str(config_only), "--license", str(licence))
    assert "has no .safetensors weights" in message and "pickled weights are never loaded" in message

    no_config = tmp_path / "no-config"
    no_config.mkdir()
    assert "has no config.json" in refused(
        "--name", "no-config", "--hf-dir", str(no_config), "--license", str(licence)
    )

    bad_hub = refused(
        "--name", "hub", "--from-hub", "Qwen/Qwen2.5-7B-Instruct@main", "--license", str(licence)
    )
    assert "full 40-character commit hash" in bad_hub

    names = catalogue(coordinator)
    assert not {"broken", "pickled", "no-config", "no-licence", "no-files", "hub"} & set(names)
