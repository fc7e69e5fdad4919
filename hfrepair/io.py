"""Load endpoints from model folders and write merged models in the endpoints' format.

A folder holds ``config.json`` and safetensors weights (single file or sharded with an
index), as on the Hub. Built-in architectures are recognised by ``model_type`` in their
config; anything else loads through the transformers auto class of its task, which the
config's ``architectures`` names (:func:`task_of`). Text models' tokenizers are saved
with the merge by their own ``save_pretrained``.
Pickle weights are never loaded, and remote code runs only when the caller trusts it.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from huggingface_hub import save_torch_state_dict
from huggingface_hub.serialization._base import parse_size_to_int  # the savers' own parser
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import nn

from .models import BUILTIN_MODELS

# Files copied from endpoint A so that the merged folder loads like the endpoints.
SIDECAR_FILES = ("config.json", "preprocessor_config.json", "generation_config.json")
# The Hub's task names (pipeline tags), by the end of a transformers architecture's name.
TASKS = {"ForCausalLM": "text-generation", "LMHeadModel": "text-generation",
         "ForSequenceClassification": "text-classification", "ForImageClassification": "image-classification"}
AUTO_CLASSES = {"text-generation": "AutoModelForCausalLM", "text-classification": "AutoModelForSequenceClassification",
                "image-classification": "AutoModelForImageClassification"}
TEXT_TASKS = ("text-generation", "text-classification")


class ModelLoadError(ValueError):
    """A model folder that cannot be loaded; the message says why."""


def read_config(folder: str | Path) -> dict:
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ModelLoadError(f"{folder}: no config.json (expected a model folder as saved on the Hub)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path}: a model config must be a JSON object, not a {type(config).__name__}")
    return config


def task_of(config: dict) -> str:
    """What the model does, as the Hub names it: from the class its config says it was saved
    as (``architectures``); built-in models and unnamed classes are image classifiers."""
    architectures = config.get("architectures") or []
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise ModelLoadError(f"the config's architectures must be a list of class names, not {architectures!r}")
    for architecture in architectures:
        for ending, task in TASKS.items():
            if architecture.endswith(ending):
                return task
    if config.get("architectures"):
        raise ModelLoadError(f"{config['architectures'][0]} is not a model hfrepair can merge (image or sequence "
                             "classifiers and causal language models)")
    return "image-classification"


def load_model(folder: str | Path, trust_remote_code: bool = False) -> nn.Module:
    """The model saved in ``folder``, in eval mode, from safetensors weights only.

    ``trust_remote_code`` lets transformers run modelling code shipped in the folder; it is
    off unless the user asks, since that code runs with the user's rights.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelLoadError(f"{folder}: no such model folder")
    config = read_config(folder)
    if not list(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt")]
        hint = f" (found only pickle weights: {', '.join(pickles)}; hfrepair loads safetensors only)" if pickles else ""
        raise ModelLoadError(f"{folder}: no safetensors weights{hint}")
    model_type = config.get("model_type")
    if model_type in BUILTIN_MODELS:
        try:
            return BUILTIN_MODELS[model_type].from_folder(str(folder)).eval()
        # A config whose values the model refuses, or weights files that are not safetensors
        # (cut short, or something else under the name): whatever the folder holds.
        except (TypeError, ValueError, RuntimeError, OSError, SafetensorError) as error:
            raise ModelLoadError(f"{folder}: cannot load {model_type}: "
                                 f"{(str(error).splitlines() or [type(error).__name__])[0]}") from error
    import transformers

    auto_class = getattr(transformers, AUTO_CLASSES[task_of(config)])
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its table of missing tensors: said below in one line
    try:
        model, info = auto_class.from_pretrained(
            str(folder), use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True)
    except (ValueError, KeyError, OSError, RuntimeError, ImportError, SafetensorError) as error:
        if "auto_map" in config and not trust_remote_code:
            raise ModelLoadError(f"{folder}: model_type {model_type!r} needs the modelling code shipped with "
                                 "the model; pass --trust-remote-code if you trust it") from error
        raise ModelLoadError(f"{folder}: cannot load model_type {model_type!r}: {str(error).splitlines()[0]}") from error
    finally:
        transformers.logging.set_verbosity(verbosity)
    check_loaded_tensors(folder, type(model).__name__, info)
    return model.eval()


def check_loaded_tensors(folder: Path, architecture: str, info: dict) -> None:
    """Refuse weights that do not fill the architecture exactly: transformers would start a
    missing tensor from random values (and merge them) and drop one it has no place for."""
    missing = sorted({*(info.get("missing_keys") or ()), *(k[0] for k in info.get("mismatched_keys") or ())})
    unexpected = sorted(info.get("unexpected_keys") or ())
    for keys, what in ((missing, "lack {} " + architecture + " needs; {} would start from random values"),
                       (unexpected, "hold {} " + architecture + " has no place for; {} would be dropped")):
        if keys:
            count = f"{len(keys)} tensor{'s' if len(keys) > 1 else ''} (e.g. {keys[0]!r})"
            raise ModelLoadError(f"{folder}: its weights {what.format(count, 'they' if len(keys) > 1 else 'it')}")


# Config fields that say how a model runs or was trained, not what it computes from its weights.
RUNTIME_FIELDS = {"use_cache", "problem_type", "output_attentions", "output_hidden_states", "return_dict",
                  "torchscript", "gradient_checkpointing"}
NAME_FIELDS = {"_name_or_path", "id2label", "label2id", "transformers_version", "torch_dtype", "dtype"}


def class_names(config: dict) -> dict[str, str] | None:
    """A classifier's class names by index, or None for transformers' placeholders (LABEL_0, ...)."""
    labels = config.get("id2label")
    if not isinstance(labels, dict) or all(str(name) == f"LABEL_{index}" for index, name in labels.items()):
        return None
    return {str(index): name for index, name in labels.items()}


def training_only(field: str) -> bool:
    """Config fields that act only in training (dropout rates, layer drop, drop path): endpoints
    trained with other rates compute the same function at inference."""
    return "dropout" in field or field.endswith(("_pdrop", "layerdrop")) or field.startswith("drop_path")


def config_differences(config_a: dict, config_b: dict) -> list[str]:
    """Config fields that differ between two endpoints, those that name the architecture
    first; names and how a model runs (``use_cache``, ``problem_type``, ...) are ignored, but
    not class names that both endpoints give and that differ (their output rows would mean
    different classes)."""
    keys = {k for k in (set(config_a) | set(config_b)) - NAME_FIELDS - RUNTIME_FIELDS if not training_only(k)}
    differ = sorted((k for k in keys if config_a.get(k) != config_b.get(k)),
                    key=lambda k: (k not in ("model_type", "architectures"), k))
    names_a, names_b = class_names(config_a), class_names(config_b)
    return differ + (["id2label"] if names_a and names_b and names_a != names_b else [])


def save_merged(model: nn.Module, folder: str | Path, source: str | Path,
                max_shard_size: int | str = "5GB", tokenizer=None) -> None:
    """Write ``model`` as safetensors next to endpoint A's config and preprocessing files
    (and ``tokenizer``, the endpoints' own, for a text model); above ``max_shard_size`` the
    weights are split into shards with an index, as on the Hub.

    A transformers model is written by its own ``save_pretrained``: transformers 5 renames
    some tensors between file and memory (ViT's ``attention.attention.key`` is ``k_proj`` in
    ``state_dict()``), and only its saver writes them back under the endpoints' file names
    (it also drops tied copies such as GPT-2's ``lm_head.weight``). Its config.json is the
    model's config, which was loaded from A's.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pretrained = _is_transformers_model(model)
    if pretrained:
        model.save_pretrained(folder, max_shard_size=max_shard_size, safe_serialization=True)
    else:
        _save_state_dict({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, folder,
                         max_shard_size)
    for name in SIDECAR_FILES:  # after saving, so that A's own files win over generated ones
        if (Path(source) / name).is_file() and not (pretrained and name == "config.json"):
            shutil.copy2(Path(source) / name, folder / name)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(folder))


def _save_state_dict(state: dict, folder: Path, max_shard_size: int | str) -> None:
    """``model.safetensors`` as huggingface_hub's ``save_torch_state_dict`` writes it; when the
    weights fit one shard and share no storage, through safetensors' own ``save_file``: the
    sharding helper imports torch.distributed.tensor on its first call (0.6 s, a noticeable
    part of a small merge) only to ask whether a tensor is distributed."""
    limit = int(max_shard_size) if str(max_shard_size).isdigit() else parse_size_to_int(max_shard_size)
    storages = {t.untyped_storage().data_ptr() for t in state.values()}
    if sum(t.numel() * t.element_size() for t in state.values()) <= limit and len(storages) == len(state):
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_torch_state_dict(state, folder, max_shard_size=max_shard_size)


def _is_transformers_model(model: nn.Module) -> bool:
    """Whether ``model`` is a transformers ``PreTrainedModel``; looked up only when transformers
    is already imported (such a model implies it), so built-in merges do not pay its import."""
    transformers = sys.modules.get("transformers")
    return transformers is not None and isinstance(model, transformers.PreTrainedModel)


class OutputError(ValueError):
    """OUTPUT could not be written (nothing of it is left)."""


def write_atomically(output: Path, write, replace: bool = True) -> None:
    """``write(folder)`` into a staging folder, then swap it in; an old OUTPUT is moved aside
    first and deleted only once the new one is in place. Unless ``replace``, an OUTPUT that
    appeared meanwhile (another merge into it, a user's folder) is kept and this one refused."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # a folder as mkdir makes it, not mkdtemp's private 0700
    previous = None
    try:
        try:
            write(staging)
        except (OSError, SafetensorError) as error:  # a full disk, a quota
            raise OutputError(f"cannot write {output}: {(str(error).splitlines() or [''])[0]}") from error
        if output.exists() and not replace:
            raise OutputError(f"{output} appeared while this ran; it is kept (pass --overwrite to replace it)")
        if output.exists():
            previous = Path(tempfile.mkdtemp(prefix=f".{output.name}.old.", dir=output.parent))
            output.rename(previous / output.name)
        staging.rename(output)
    except BaseException:
        if previous is not None and not output.exists():
            (previous / output.name).rename(output)
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)
