"""Ops' catalogue commands: `compute-swarm admin add-model | models | deprecate-model | remove-model |
list-model`, on the coordinator's database and artifact store (service/catalogue.py)."""

from __future__ import annotations

import argparse
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

# Licence texts recognised by their wording, so ops need not type the SPDX identifier.
_KNOWN_LICENCES = (
    (re.compile(r"Apache License,?\s+Version 2\.0", re.IGNORECASE), "Apache-2.0"),
    (re.compile(r"^\s*MIT License", re.IGNORECASE | re.MULTILINE), "MIT"),
    (re.compile(r"LLAMA 3\.1 COMMUNITY LICENSE", re.IGNORECASE), "Llama 3.1 Community License"),
    (re.compile(r"LLAMA 3\.2 COMMUNITY LICENSE", re.IGNORECASE), "Llama 3.2 Community License"),
    (re.compile(r"Gemma Terms of Use", re.IGNORECASE), "Gemma Terms of Use"),
    (re.compile(r"Qwen RESEARCH LICENSE", re.IGNORECASE), "Qwen Research License"),
    (re.compile(r"Qwen LICENSE AGREEMENT", re.IGNORECASE), "Qwen License"),
)
HUB_REFERENCE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<revision>[0-9a-f]{40})$"
)
# What a hub download takes: the files a node trains from, a GGUF if the repository has one, the licence.
HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja", "merges.txt", "LICENSE*", "*.gguf"]


def register_catalogue_commands(
    actions: argparse._SubParsersAction,
    data_dir_option: Callable[[argparse.ArgumentParser], None],
    settings: Callable[..., object],
    database: Callable[[argparse.Namespace], object],
) -> None:
    def catalogue(arguments: argparse.Namespace):
        from compute_swarm.coordinator.service.catalogue import Catalogue
        from compute_swarm.coordinator.store.artifacts import ArtifactStore

        configured = settings(arguments)
        store = ArtifactStore.configured(
            configured.artifacts_dir, configured.artifact_bucket, configured.artifact_bucket_endpoint
        )
        return Catalogue(database(arguments), store)

    add = actions.add_parser(
        "add-model",
        help="add a model to the catalogue from local files (or a pinned Hugging Face Hub revision)",
        description="Hash the model's files into the artifact store, read its architecture, parameters, "
        "context length and chat template, and list it for fine-tuning and inference. Give a Hugging Face "
        "directory (what nodes train from), a GGUF (what llama.cpp serves; made from the directory when "
        "not given), or both, and the licence text.",
    )
    data_dir_option(add)
    add.add_argument("--name", required=True, help="the model's name in the catalogue (qwen2.5-7b-instruct)")
    add.add_argument("--hf-dir", type=Path, help="a Hugging Face model directory (config.json, safetensors)")
    add.add_argument("--gguf", type=Path, help="the model's GGUF file")
    add.add_argument(
        "--from-hub", metavar="REPO@REVISION", help="fetch from the Hugging Face Hub at this commit"
    )
    add.add_argument("--license", "--licence", dest="licence_file", type=Path, help="the licence text")
    add.add_argument(
        "--license-name", "--licence-name", dest="licence_name", help="its SPDX identifier or title"
    )
    add.set_defaults(handler=lambda arguments: _add_model(arguments, catalogue(arguments)))

    listing = actions.add_parser("models", help="list the catalogue (every state)")
    data_dir_option(listing)
    listing.set_defaults(handler=lambda arguments: _models(catalogue(arguments)))

    for action, state, words in (
        ("deprecate-model", "deprecated", "keep serving a model but take no new fine-tunes on it"),
        ("remove-model", "removed", "stop offering a model (its jobs stay readable)"),
        ("list-model", "listed", "offer a deprecated or removed model again"),
    ):
        change = actions.add_parser(action, help=words)
        data_dir_option(change)
        change.add_argument("name")
        change.set_defaults(
            handler=lambda arguments, state=state: _set_state(catalogue(arguments), arguments.name, state)
        )


def licence_title(text: str) -> str:
    """A licence's SPDX identifier when its wording is known, else its first line."""
    for pattern, title in _KNOWN_LICENCES:
        if pattern.search(text):
            return title
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first[:100]


def _add_model(arguments: argparse.Namespace, catalogue) -> int:
    from compute_swarm.coordinator.service.catalogue import CatalogueError
    from compute_swarm.engine.model_facts import ModelFilesError

    directory, gguf_file, licence_file, source = (
        arguments.hf_dir,
        arguments.gguf,
        arguments.licence_file,
        "files",
    )
    with tempfile.TemporaryDirectory(prefix="add-model-", dir=catalogue.store.scratch) as scratch:
        if arguments.from_hub:
            if directory is not None or gguf_file is not None:
                raise SystemExit("compute-swarm: give --from-hub alone, or local files, not both")
            directory, gguf_file, licence_file = _from_hub(arguments.from_hub, Path(scratch), licence_file)
            source = f"hub:{arguments.from_hub}"
        if directory is None and gguf_file is None:
            raise SystemExit("compute-swarm: give --hf-dir, --gguf (or both), or --from-hub REPO@REVISION")
        if licence_file is None:
            raise SystemExit("compute-swarm: give the licence text with --license FILE")
        try:
            licence_text = licence_file.read_text(encoding="utf-8", errors="replace")
        except OSError as error:
            raise SystemExit(
                f"compute-swarm: cannot read the licence {licence_file}: {error.strerror}"
            ) from None
        try:
            model = catalogue.add(
                arguments.name,
                licence=arguments.licence_name or licence_title(licence_text),
                licence_file=licence_file,
                directory=directory,
                gguf_file=gguf_file,
                source=source,
                convert=_converter(),
                scratch=Path(scratch),
            )
        except (CatalogueError, ModelFilesError) as error:
            raise SystemExit(f"compute-swarm: {error}") from None
    print(f"added {model.name}: {_describe(model)}")
    return 0


def _converter():
    """engine.gguf_export, where the engine is installed: a model given as a directory alone gets the
    GGUF llama.cpp serves."""
    try:
        from compute_swarm.engine.gguf_export import export_model_to_gguf
    except ImportError:
        return None
    return lambda directory, output: export_model_to_gguf(directory, output, dtype="f16")


def _from_hub(
    reference: str, scratch: Path, licence_file: Path | None
) -> tuple[Path, Path | None, Path | None]:
    """A pinned revision of a Hub repository, downloaded into `scratch`. Only a full commit hash pins
    a revision: a branch or tag can move under the catalogue's hashes."""
    match = HUB_REFERENCE.match(reference)
    if match is None:
        raise SystemExit(
            "compute-swarm: --from-hub takes OWNER/REPO@COMMIT, the revision as a full 40-character commit hash"
        )
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SystemExit(
            "compute-swarm: --from-hub needs huggingface_hub: pip install huggingface_hub"
        ) from None
    directory = Path(
        snapshot_download(
            match["repo"], revision=match["revision"], local_dir=scratch / "hub", allow_patterns=HUB_PATTERNS
        )
    )
    ggufs = sorted(directory.glob("*.gguf"))
    if licence_file is None:
        licence_file = next(iter(sorted(directory.glob("LICENSE*"))), None)
    has_weights = any(directory.glob("*.safetensors"))
    return (directory if has_weights else None), (ggufs[0] if len(ggufs) == 1 else None), licence_file


def _describe(model) -> str:
    from compute_swarm.coordinator.domain import pricing
    from compute_swarm.engine.memory import format_bytes
    from compute_swarm.protocol import format_credits

    rates = pricing.model_rates_micro(model)
    weights = sum(file.size for file in model.weights)
    return (
        f"{model.architecture}, {model.parameters:,} parameters, context {model.context_length:,}, "
        f"GGUF {format_bytes(model.file_size_bytes)}"
        + (f", weights {format_bytes(weights)}" if weights else "")
        + f", {model.licence}; fine-tune {format_credits(rates['fine_tune_per_million_tokens_micro'])} credits "
        f"and inference {format_credits(rates['inference_per_million_tokens_micro'])} credits per million tokens"
    )


def _models(catalogue) -> int:
    models = catalogue.models(states=("listed", "deprecated", "removed"))
    for model in models:
        print(f"{model.name} [{model.state}{', built in' if model.built_in else ''}]: {_describe(model)}")
    return 0


def _set_state(catalogue, name: str, state: str) -> int:
    from compute_swarm.coordinator.service.catalogue import CatalogueError

    try:
        model = catalogue.set_state(name, state)
    except CatalogueError as error:
        raise SystemExit(f"compute-swarm: {error}") from None
    print(f"{model.name} is {model.state}")
    return 0
