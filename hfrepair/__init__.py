"""hfrepair: merge independently trained networks with neuron alignment and REPAIR.

The pipeline is a chain of small stages, each usable on its own::

    spec = discover_spec(model_a, example)                     # which axes permute together
    stats = collect_statistics(model_a, model_b, spec.sites, batches)
    perms = match_permutations(spec, stats)                    # Hungarian on correlations
    aligned_b = permute_state_dict(model_b.state_dict(), spec, perms)
    mixed = interpolate(model_a.state_dict(), aligned_b, 0.5)
    state = repair(model_a, mixed, spec, stats, perms, 0.5, "repair", batches)  # fused weights

or all at once with :func:`merge`; :func:`merge_many` merges N models into one, and
:func:`match_weights` matches units from the weights alone. Every pass takes an optional ``accelerator``: under
``accelerate launch`` / ``torchrun`` each process reads its part of the batches and the
float64 sums are reduced across processes.
"""

from .startup import guard_startup

guard_startup()  # before the heavy imports: a Ctrl-C while the command starts is one line

from .discovery import ExportError, discover_spec
from .distributed import make_accelerator
from .evaluate import Metrics, barrier, evaluate
from .interpolate import interpolate
from .io import load_model, save_merged
from .many import ManyResult, merge_many
from .matching import match_permutations
from .pipeline import MergeError, MergeResult, merge
from .repair import METHODS, repair
from .spec import (
    ActivationSite,
    PermutationGroup,
    PermutationSpec,
    SpecError,
    permute_state_dict,
    verify_spec,
)
from .statistics import Statistics, collect_statistics
from .weight_matching import match_weights

__version__ = "0.1.0"

__all__ = [
    "METHODS", "ActivationSite", "ExportError", "ManyResult", "MergeError", "MergeResult", "Metrics",
    "PermutationGroup", "PermutationSpec", "SpecError", "Statistics", "barrier", "collect_statistics",
    "discover_spec", "evaluate", "interpolate", "load_model", "make_accelerator", "match_permutations",
    "match_weights", "merge", "merge_many", "permute_state_dict", "repair", "save_merged", "verify_spec",
]
