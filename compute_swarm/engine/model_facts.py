"""What ops' model files say about the model: its architecture, parameter count, context length, chat
template and shape, read from a Hugging Face directory's config and safetensors headers and from a
GGUF's metadata. No weight is loaded and nothing imports torch, so the coordinator's `admin add-model`
reads a 7B model's facts in a fraction of a second.

The same reading picks the directory's files a node needs to train (config, tokenizer, safetensors)
and refuses what a node must never load: pickled weights can run code on a seller's machine.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from compute_swarm.engine.memory import ModelShape
from compute_swarm.engine.resources import ResourceError, model_shape, read_weight_shapes

# The files of a Hugging Face model directory a node trains from; anything else there (a README,
# images, a .git folder, other formats' weights) stays with ops.
_WANTED_NAMES = frozenset(
    {
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
        "chat_template.json",
        "tokenizer.model",  # SentencePiece (Llama 2, Mistral, Gemma)
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "model.safetensors.index.json",
    }
)
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# A plain file name, as a node will write it into its own directory: no path, nothing hidden.
FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
MAX_MODEL_FILES = 128

# Hugging Face model types and GGUF architectures this project trains and serves (llama.cpp's
# converter writes Mistral as "llama"; engine.gguf_adapter exports adapters for these).
SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "gemma2")
_GGUF_ARCHITECTURE = {"mistral": "llama"}


class ModelFilesError(ValueError):
    """Model files that cannot join the catalogue; the message says which file and why."""


@dataclass(frozen=True)
class ModelFacts:
    architecture: str  # the Hugging Face model_type, or the GGUF's general.architecture
    parameters: int
    context_length: int
    chat_template: str | None
    shape: ModelShape


def weight_files(directory: Path) -> list[Path]:
    """The files of a Hugging Face model directory a node needs to train, sorted by name. Raises
    ModelFilesError for a directory without config.json or safetensors, or with pickled weights only."""
    if not directory.is_dir():
        raise ModelFilesError(f"{directory} is not a directory")
    if not (directory / "config.json").is_file():
        raise ModelFilesError(f"{directory} is not a Hugging Face model directory: it has no config.json")
    chosen = sorted(
        path
        for path in directory.iterdir()
        if path.is_file() and (path.name in _WANTED_NAMES or path.suffix == ".safetensors")
    )
    if not any(path.suffix == ".safetensors" for path in chosen):
        pickled = [path.name for path in directory.iterdir() if path.suffix in _PICKLE_SUFFIXES]
        hint = (
            f" (it has {', '.join(sorted(pickled)[:3])}: pickled weights are never loaded)" if pickled else ""
        )
        raise ModelFilesError(f"{directory} has no .safetensors weights{hint}")
    for path in chosen:
        if not FILE_NAME.match(path.name):
            raise ModelFilesError(f"{path.name!r} is not a plain file name a node can write")
    if len(chosen) > MAX_MODEL_FILES:
        raise ModelFilesError(
            f"{directory} has {len(chosen)} model files; at most {MAX_MODEL_FILES} are taken"
        )
    return chosen


def read_model_facts(*, directory: Path | None = None, gguf_file: Path | None = None) -> ModelFacts:
    """The facts of a model given as a Hugging Face directory, a GGUF, or both (then they must describe
    the same model: same architecture, widths, depth and vocabulary). The directory's figures win
    where both have one: its parameters are the ones trained."""
    if directory is None and gguf_file is None:
        raise ModelFilesError("give a Hugging Face directory, a GGUF file, or both")
    from_directory = _directory_facts(directory) if directory is not None else None
    from_gguf = _gguf_facts(gguf_file) if gguf_file is not None else None
    if from_directory is not None and from_gguf is not None:
        _check_same_model(from_directory, from_gguf, directory, gguf_file)
        if from_directory.chat_template is None and from_gguf.chat_template is not None:
            return ModelFacts(
                from_directory.architecture,
                from_directory.parameters,
                from_directory.context_length,
                from_gguf.chat_template,
                from_directory.shape,
            )
    facts = from_directory or from_gguf
    assert facts is not None
    return facts


def _directory_facts(directory: Path) -> ModelFacts:
    weight_files(directory)
    config = _read_json(directory / "config.json")
    architecture = str(config.get("model_type", ""))
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelFilesError(
            f"{directory}: model_type {architecture!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    context_length = config.get("max_position_embeddings")
    if not isinstance(context_length, int) or context_length < 1:
        raise ModelFilesError(f"{directory}/config.json has no max_position_embeddings")
    heads = config.get("num_attention_heads")
    try:
        shape = model_shape(
            read_weight_shapes(directory), attention_heads=heads if isinstance(heads, int) else None
        )
    except ResourceError as error:
        raise ModelFilesError(f"{directory}: {error}") from None
    return ModelFacts(
        architecture, shape.parameters, context_length, _directory_chat_template(directory), shape
    )


def _directory_chat_template(directory: Path) -> str | None:
    """transformers keeps the template in chat_template.jinja (v4.43+) or tokenizer_config.json."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tokenizer_config = directory / "tokenizer_config.json"
    if tokenizer_config.is_file():
        template = _read_json(tokenizer_config).get("chat_template")
        if isinstance(template, str):
            return template
        if isinstance(template, list):  # named templates: the default one
            for entry in template:
                if isinstance(entry, dict) and entry.get("name") == "default":
                    return str(entry.get("template"))
    return None


def _gguf_facts(gguf_file: Path) -> ModelFacts:
    import gguf

    if not gguf_file.is_file():
        raise ModelFilesError(f"{gguf_file} is not a file")
    try:
        reader = gguf.GGUFReader(gguf_file, "r")
    except Exception as error:  # the reader raises ValueError, IndexError, struct errors...
        raise ModelFilesError(f"{gguf_file} is not a readable GGUF file: {error}") from None

    def value(key: str) -> object:
        field = reader.get_field(key)
        return None if field is None else field.contents()

    architecture = str(value(gguf.Keys.General.ARCHITECTURE))
    if architecture not in {_GGUF_ARCHITECTURE.get(name, name) for name in SUPPORTED_ARCHITECTURES}:
        raise ModelFilesError(f"{gguf_file.name} is a {architecture!r} model, which is not supported")
    if str(value(gguf.Keys.General.TYPE) or "model") != "model":
        raise ModelFilesError(f"{gguf_file.name} is not a model (it is a {value(gguf.Keys.General.TYPE)})")
    context_length = value(f"{architecture}.context_length")
    heads = value(f"{architecture}.attention.head_count")
    if not isinstance(context_length, int):
        raise ModelFilesError(f"{gguf_file.name} has no {architecture}.context_length")
    try:
        shape = model_shape(
            read_weight_shapes(gguf_file), attention_heads=heads if isinstance(heads, int) else None
        )
    except ResourceError as error:
        raise ModelFilesError(f"{gguf_file.name}: {error}") from None
    template = value("tokenizer.chat_template")
    # The count includes the few 1-D tables llama.cpp may add (Llama 3.1's rope_freqs): negligible.
    return ModelFacts(
        architecture, shape.parameters, context_length, template if isinstance(template, str) else None, shape
    )


def shape_record(shape: ModelShape) -> dict:
    """A shape as JSON the catalogue stores (shape_from_record reads it back)."""
    record = {name: getattr(shape, name) for name in shape.__dataclass_fields__ if name != "linear_weights"}
    record["linear_weights"] = {
        module: [list(pair) for pair in pairs] for module, pairs in shape.linear_weights.items()
    }
    return record


def shape_from_record(record: dict) -> ModelShape:
    fields = {name: value for name, value in record.items() if name != "linear_weights"}
    linear_weights = {
        module: tuple((int(out_features), int(in_features)) for out_features, in_features in pairs)
        for module, pairs in record["linear_weights"].items()
    }
    return ModelShape(**fields, linear_weights=linear_weights)


def _check_same_model(directory_facts: ModelFacts, gguf_facts: ModelFacts, directory, gguf_file) -> None:
    if (
        _GGUF_ARCHITECTURE.get(directory_facts.architecture, directory_facts.architecture)
        != gguf_facts.architecture
    ):
        raise ModelFilesError(
            f"{gguf_file.name} is a {gguf_facts.architecture!r} model but {directory} is "
            f"{directory_facts.architecture!r}: they are not the same model"
        )
    ours, theirs = directory_facts.shape, gguf_facts.shape
    for what, mine, other in (
        ("hidden size", ours.hidden_size, theirs.hidden_size),
        ("layer count", ours.layer_count, theirs.layer_count),
        ("intermediate size", ours.intermediate_size, theirs.intermediate_size),
        ("vocabulary", ours.vocabulary_size, theirs.vocabulary_size),
        ("key/value width", ours.key_value_width, theirs.key_value_width),
    ):
        if mine != other:
            raise ModelFilesError(
                f"{gguf_file.name} has {what} {other} but {directory} has {mine}: they are not the same model"
            )


def _read_json(path: Path) -> dict:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFilesError(f"{path} is not readable JSON: {error}") from None
    if not isinstance(loaded, dict):
        raise ModelFilesError(f"{path} is not a JSON object")
    return loaded
