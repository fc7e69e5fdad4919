"""Permutation specs discovered earlier, kept on disk, one file per architecture.

A spec depends on the architecture alone (its module classes and their code, their
hyper-parameters, the state_dict's names, shapes, dtypes and tied tensors, the inputs'
shapes), never on weight values, so a merge of another pair of the same architecture can
reuse it. Discovery's ``torch.export`` costs 2-3 s in a fresh process even on a small
model (its first call imports torch._dynamo) and grows with the model; a stored spec is
read in milliseconds. A stored spec still passes the random-permutation check on every
merge; one that fails it (code changed under an unchanged key) is discovered anew.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .discovery import discover_spec, tied_state_keys
from .spec import PermutationSpec, verify_spec, write_text_atomically

# Bumped whenever what a stored spec means changes in a way its key cannot see.
FORMAT = 2  # 2: entries carry the digest of their content
# The code that makes a spec: a change to it (a new rule) must not reuse older specs.
_DISCOVERY_CODE = [str(Path(__file__).with_name(name)) for name in ("discovery.py", "spec.py")]
# Config entries that name a checkpoint rather than describe its architecture.
_CONFIG_NAMES = {"_name_or_path", "_commit_hash", "transformers_version"}


def default_spec_cache() -> Path:
    """``$HFREPAIR_CACHE/specs``, by default ``~/.cache/hfrepair/specs``."""
    return Path(os.environ.get("HFREPAIR_CACHE", Path.home() / ".cache" / "hfrepair")) / "specs"


def _file_digest(path: str, digests: dict[str, str]) -> str:
    if path not in digests:
        digests[path] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return digests[path]


def _input_shapes(example_inputs) -> dict:
    """Each input's shape past the batch axis and its dtype: the graph depends on them."""
    named = example_inputs if isinstance(example_inputs, Mapping) else {"": example_inputs}
    return {name: [list(t.shape[1:]), str(t.dtype)] for name, t in sorted(named.items()) if isinstance(t, torch.Tensor)}


def _config(model: nn.Module) -> dict | None:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        return None
    described = {k: v for k, v in config.to_dict().items() if k not in _CONFIG_NAMES}
    # The attention implementation (eager, sdpa) changes the graph and is not always in to_dict.
    described["attention implementation"] = getattr(config, "_attn_implementation", None)
    return described


def _exists(path: Path) -> bool:
    """Whether a stored spec is there; a cache folder that cannot be read counts as empty."""
    try:
        return path.is_file()
    except OSError:
        return False


def architecture_key(model: nn.Module, example_inputs) -> str | None:
    """A digest of everything ``model``'s spec depends on; None when some module's code
    cannot be found (a class defined in an interactive session), which is never cached."""
    digests: dict[str, str] = {}
    try:
        code = {f"{cls.__module__}.{cls.__qualname__}": _file_digest(inspect.getsourcefile(cls), digests)
                for cls in {type(module) for module in model.modules()}}
        ours = [_file_digest(path, digests) for path in _DISCOVERY_CODE]
    except (TypeError, OSError):
        return None
    state = model.state_dict(keep_vars=True)
    tied = {tuple(keys) for keys in tied_state_keys(model).values() if len(keys) > 1}
    described = {
        "format": FORMAT, "hfrepair": ours, "torch": torch.__version__,
        "transformers": getattr(sys.modules.get("transformers"), "__version__", None),
        "code": dict(sorted(code.items())), "modules": repr(model), "config": _config(model),
        "state": [[key, list(value.shape), str(value.dtype)] for key, value in state.items()],
        "tied": sorted(tied),
        "inputs": _input_shapes(example_inputs),
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()


def _digest(data: dict) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _store(spec: PermutationSpec, path: Path) -> None:
    """Write it with the digest of its content (atomically: processes of one merge may store
    the same spec at once); a cache that cannot be written (read-only home, a file in its
    place) only costs the next merge a discovery."""
    data = spec.to_dict()
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomically(path, json.dumps({"sha256": _digest(data), "spec": data}))


def _stored(path: Path) -> PermutationSpec:
    """The spec stored at ``path``; ValueError unless its content is what was stored (a file
    cut short, edited or replaced is discovered anew, never used)."""
    entry = json.loads(path.read_text())
    if not isinstance(entry, dict) or entry.get("sha256") != _digest(entry.get("spec")):
        raise ValueError(f"{path}: not a spec this cache stored")
    return PermutationSpec.from_dict(entry["spec"])


def checked_spec(model: nn.Module, example_inputs, cache: str | Path | None = None) -> tuple[PermutationSpec, str]:
    """``model``'s spec, checked with :func:`verify_spec` on ``example_inputs``, and where it
    came from: ``"cached"`` (an earlier discovery of the same architecture, stored in the
    folder ``cache``) or ``"discovered"`` (from the export graph now; stored in ``cache``
    once it passes the check). ``cache`` None: always discover, store nothing."""
    key = architecture_key(model, example_inputs) if cache is not None else None
    path = Path(cache) / f"{key}.json" if key else None
    if path is not None and _exists(path):
        try:
            spec = _stored(path)
            verify_spec(model, spec, example_inputs)
            return spec, "cached"
        # Whatever fails in a stored spec (unreadable, altered, stale: code changed under an
        # unchanged key) means the same: discover anew.
        except Exception:  # noqa: BLE001
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
    spec = discover_spec(model, example_inputs)
    verify_spec(model, spec, example_inputs)
    if path is not None:
        _store(spec, path)
    return spec, "discovered"
