"""Where models come from: the catalogue, the verified download cache, and GGUF preparation.

A model reference is a catalogue name, a Hugging Face directory (safetensors) or a .gguf file. GGUF
files are dequantized once into a safetensors directory in the cache, keyed by the file's sha256, so
later loads take a fraction of a second instead of tens of seconds.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from compute_swarm.engine.catalogue import (  # noqa: F401 (re-exported)
    MODELS_DIR_ENVIRONMENT_VARIABLE,
    ModelError,
    UnknownModelError,
    fetch_catalogue_model,
    models_directory,
    sha256_of_file,
)
from compute_swarm.engine.jobs import CATALOGUE, DEFAULT_MODEL, CatalogueModel, InvalidJobError  # noqa: F401 (re-exported)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)


def resolve_model_path(reference: str) -> Path:
    """Turn a model reference into a local Hugging Face directory or .gguf file that exists."""
    if reference in CATALOGUE:
        return fetch_catalogue_model(reference)
    path = Path(reference).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UnknownModelError(f"{path} is not a Hugging Face model directory: it has no config.json")
        if not any(path.glob("*.safetensors")):
            raise UnknownModelError(f"{path} has no .safetensors weights (pickled weights are never loaded)")
        return path
    if path.exists():
        raise UnknownModelError(f"{path} is neither a .gguf file nor a Hugging Face model directory")
    raise UnknownModelError(
        f"model {reference!r} not found: give a catalogue name ({', '.join(sorted(CATALOGUE))}), "
        "a Hugging Face model directory or a .gguf file"
    )


@dataclass(frozen=True)
class ResolvedModel:
    """A model found on this machine: its own file or directory, and the safetensors directory it is
    (or becomes, once a GGUF is prepared). Resolve once per job: resolving may hash gigabytes."""

    source: Path
    directory: Path

    @property
    def fingerprint(self) -> str:
        """Identifies the model wherever a node keeps it: a GGUF's sha256, or a directory's config and
        weight layout."""
        if self.source != self.directory:
            return self.directory.name  # the GGUF file's sha256
        # Its config and safetensors headers (names, shapes, dtypes, offsets) change with any change of
        # architecture or precision, without hashing gigabytes of weights.
        digest = hashlib.sha256((self.source / "config.json").read_bytes())
        for weights in sorted(self.source.glob("*.safetensors")):
            with open(weights, "rb") as file:
                header_length = int.from_bytes(file.read(8), "little")
                digest.update(file.read(min(header_length, 100 << 20)))
        return digest.hexdigest()

    @property
    def gguf(self) -> Path | None:
        """The GGUF llama.cpp serves this model from, which a trained adapter is exported for: the
        source itself, or the one GGUF beside a directory's safetensors (desktop.model_files)."""
        if self.source.suffix == ".gguf":
            return self.source
        found = sorted(self.source.glob("*.gguf"))
        return found[0] if len(found) == 1 else None

    @property
    def is_prepared(self) -> bool:
        return (self.directory / "config.json").is_file()

    def prepare(self) -> Path:
        """The safetensors directory, dequantizing a GGUF into the cache the first time."""
        if not self.is_prepared:
            _convert_gguf(self.source, self.directory)
        return self.directory


def resolve_model(reference: str) -> ResolvedModel:
    path = resolve_model_path(reference)
    if path.is_dir():
        return ResolvedModel(path, path)
    # A catalogue file was just verified against its pinned hash, and a node verified the files its
    # record lists (desktop.model_files): hashing gigabytes again would add nothing.
    digest = (
        CATALOGUE[reference].sha256
        if reference in CATALOGUE
        else _recorded_sha256(path) or sha256_of_file(path)
    )
    return ResolvedModel(path, models_directory() / "converted" / digest)


def _recorded_sha256(path: Path) -> str | None:
    """The sha256 a node recorded for a model file it fetched and verified (model.json beside it),
    while the file keeps the recorded size."""
    try:
        record = json.loads((path.parent / "model.json").read_text())
        files = [record["gguf"], *record.get("weights", ())]
        size = path.stat().st_size
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for file in files:
        if isinstance(file, dict) and file.get("name") == path.name and file.get("size") == size:
            return str(file.get("sha256"))
    return None


def prepared_model_directory(reference: str) -> Path:
    """A safetensors directory for the model: the directory itself, or the cached conversion of a GGUF."""
    return resolve_model(reference).prepare()


def _convert_gguf(gguf_file: Path, destination: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("dequantizing %s into %s (once)", gguf_file, destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    directory, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    # A model loaded from GGUF is marked quantized and refuses to save; a plain model built from the
    # same config, holding the dequantized weights, saves as ordinary safetensors.
    config = AutoConfig.from_pretrained(directory, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    with tempfile.TemporaryDirectory(dir=destination.parent, prefix=".convert-") as scratch:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            os.replace(scratch, destination)
        except OSError:
            # Another process converted the same file first; its result is identical.
            if not (destination / "config.json").is_file():
                raise
        else:
            os.mkdir(scratch)  # leave something for TemporaryDirectory to clean up


def load_tokenizer(directory: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a prepared model directory, with a pad token for batching."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    directory: Path, *, dtype: torch.dtype, device: str = "cpu", quantization_config: object | None = None
) -> PreTrainedModel:
    """Load a prepared model directory's weights (safetensors only) for training or evaluation, with
    its attention through our kernels where one runs on `device` (kernels.attention).

    quantization_config: a transformers BitsAndBytesConfig; its layers are quantized as they are
    placed on `device`, so the unquantized model is never whole in memory.
    """
    from transformers import AutoModelForCausalLM

    from compute_swarm.kernels.attention import transformers_implementation

    if quantization_config is not None:
        # A quantized model cannot be moved once loaded: it is loaded where it runs.
        return AutoModelForCausalLM.from_pretrained(
            str(directory),
            dtype=dtype,
            use_safetensors=True,
            attn_implementation=transformers_implementation(device),
            quantization_config=quantization_config,
            device_map={"": device},
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(directory),
        dtype=dtype,
        use_safetensors=True,
        attn_implementation=transformers_implementation(device),
    )
    return model.to(device)
