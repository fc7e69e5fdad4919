"""The permutation spec: which weight axes share one permutation, as plain data.

A :class:`PermutationSpec` is what every later stage works from. It holds

* ``groups``: name -> :class:`PermutationGroup`, the set of ``(state_dict key, axis)``
  that must be permuted together (e.g. a conv's output rows, the next BatchNorm's
  parameters and buffers, and the next conv's input columns);
* ``fixed``: ``(key, axis) -> reason`` for every axis that must not move;
* ``sites``: :class:`ActivationSite` s, module outputs whose channel axis belongs to a
  group, where activations are measured (matching) and corrected (REPAIR);
* ``streams``: :class:`StreamFold` s, stretches of a residual stream with nothing but
  additions on them, whose sums REPAIR can correct and fold back into the weights.

A member ``(key, axis)`` means the whole axis carries the group's units. An axis can also
carry units of several groups in a regular pattern (a q projection's output rows are
``heads x head_dim``; GPT-2's fused QKV rows are three such blocks side by side; a
classifier after a flatten reads ``channels x height x width``): such a member is
``(key, axis, offset, outers, inner)`` and the group's unit ``u`` occupies the positions
``offset + sum(o_k * stride_k) + u * inner + j`` for every ``o_k < count_k`` of
``outers = ((count_k, stride_k), ...)`` and ``j < inner``. A sixth element ``units``, also
``((count, stride), ...)``, places units that are not evenly spaced: unit ``u`` written in
mixed radix over those counts sits at ``sum(digit_k * stride_k)`` (the dims of every head,
head by head, for a group with one permutation of the dims per head). Sites describe their
unit axis the same way (``layout``).

Specs are discovered from the model's graph (:func:`hfrepair.discovery.discover_spec`),
can be written or edited by hand, and round-trip through JSON. Permutations are index
tensors ``perm`` with the convention ``new[i] = old[perm[i]]``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .batches import floating_dtype, model_outputs
from .passes import kept_modes


# What a group's units are, as reports and cards name them.
GROUP_KINDS = ("stream", "heads", "head_dims", "mlp", "channels", "units")


@dataclass
class PermutationGroup:
    """Axes that share one permutation of ``size`` units.

    ``kind`` says what the units are (``stream``, ``heads``, ``head_dims``, ``mlp``,
    ``channels``), for reports only. With ``blocks > 1`` the permutation is block-diagonal:
    ``blocks`` independent permutations of ``size // blocks`` units each (the dims of each
    attention head, permuted per head). It is applied after the groups that move the blocks
    themselves (the heads), so each head's dims follow the head they belong to.
    """

    name: str
    size: int
    members: list[tuple]
    kind: str = "units"
    blocks: int = 1


def positions(size: int, offset: int = 0, outers=(), inner: int = 1, units=()) -> torch.Tensor:
    """Flat axis positions of ``size`` units laid out as in a member: shape (copies, size, inner)."""
    if units:
        starts = torch.tensor([0])
        for count, stride in units:
            starts = (starts[:, None] + torch.arange(count) * stride).reshape(-1)
    else:
        starts = torch.arange(size) * inner
    units = starts[:, None] + torch.arange(inner)
    base = torch.tensor([offset])
    for count, stride in outers:
        base = (base[:, None] + torch.arange(count) * stride).reshape(-1)
    return base[:, None, None] + units


def block_order(length: int, size: int, perm: torch.Tensor, offset: int = 0, outers=(), inner: int = 1,
                units=()):
    """Index vector that applies ``perm`` to the units of one block of an axis of ``length``."""
    order = torch.arange(length)
    where = positions(size, offset, outers, inner, units)
    order[where] = where[:, perm.cpu()]
    return order


def _block(member: tuple) -> tuple:
    """(offset, outers, inner, units) of a member; a 2-tuple member covers its whole axis."""
    return (*member[2:5], member[5] if len(member) > 5 else ()) if len(member) > 2 else (0, (), 1, ())


def _nested(item) -> tuple:
    return tuple(tuple(pair) for pair in item)


@dataclass
class ActivationSite:
    """A module output whose ``axis`` carries the units of ``group``.

    When the axis carries units of several groups (or a group in a pattern, such as the
    heads of a q projection), ``group`` is None and ``layout`` lists
    ``(group, offset, outers, inner)`` blocks as for members; units outside every block
    stay fixed. ``weight_axis`` is the axis of ``weight`` that holds the output units (1 for
    GPT-2's Conv1D, which stores its weight transposed).

    ``kind`` is ``linear`` (conv/linear output), ``batchnorm``, ``norm`` (other norms),
    ``activation`` or ``sum`` (a residual stream's sum of a :class:`StreamFold`). ``batchnorm`` names the BatchNorm module that consumes a linear site's
    output and nothing else (REPAIR then resets it instead of adding a corrector).
    ``weight``/``bias`` are the state_dict keys of a linear site's parameters, or of a
    norm site's per-unit affine.
    """

    module: str
    axis: int
    group: str | None
    kind: str
    batchnorm: str | None = None
    weight: str | None = None
    bias: str | None = None
    layout: list | None = None
    weight_axis: int = 0
    source: str | None = None  # a norm site's input when that is another site's output

    def groups(self) -> list[str]:
        """Every group whose units this site carries."""
        return [self.group] if self.group is not None else list(dict.fromkeys(b[0] for b in self.layout or ()))

    def order(self, perms: dict[str, torch.Tensor], length: int) -> torch.Tensor:
        """The permutation of this site's whole unit axis under ``perms``; a group with no
        permutation there (one a hand-written spec leaves out) keeps its units in order."""
        if self.group is not None:
            return perms[self.group].cpu() if self.group in perms else torch.arange(length)
        order = torch.arange(length)
        for group, *block in self.layout or ():  # discovery lists per-head groups after the heads
            if group in perms:
                order = order[block_order(length, len(perms[group]), perms[group], *block)]
        return order


@dataclass
class StreamFold:
    """A stretch of a residual stream on which nothing but additions sit (a ConvNeXt stage):
    ``t_k = t_{k-1} + branch_k(t_{k-1})``, started by the output of ``entry``.

    A per-unit correction ``a_k * t_k + b_k`` of each sum (the output of ``sums[k]``, a site
    of kind ``sum``) folds exactly into the weights: the stream is carried scaled by
    ``D_k = a_{k+1} ... a_K`` (``D_K = 1`` at the last sum, whose readers may be anything),
    so the entry's weight rows and bias take ``D_0``, each branch's last layer (``writers``,
    site modules, through a per-unit ``gains`` parameter such as ConvNeXt's layer scale)
    takes ``D_{k-1}`` and the shift ``D_k b_k``, and every layer that reads the stream before
    the last sum (``readers[k]``: ``[key, axis]`` of weight axes over the stream's units,
    for the entry's output and then each sum but the last) takes ``1 / D_k``.
    """

    entry: str
    sums: list[str]
    writers: list[str]
    gains: list[str | None]
    readers: list[list[list]]


@dataclass
class PermutationSpec:
    """Which weight axes share one permutation (``groups``), which must not move and why
    (``fixed``), where each group's activations are measured and corrected (``sites``), and
    the residual streams REPAIR can fold (``streams``); see the module docstring. Plain data:
    discovered, edited by hand, saved and loaded as JSON."""

    groups: dict[str, PermutationGroup]
    fixed: dict[tuple[str, int], str] = field(default_factory=dict)
    sites: list[ActivationSite] = field(default_factory=list)
    streams: list[StreamFold] = field(default_factory=list)

    def sites_of(self, group: str, kinds: tuple[str, ...] | None = None) -> list[ActivationSite]:
        return [s for s in self.sites if group in s.groups() and (kinds is None or s.kind in kinds)]

    def to_dict(self) -> dict:
        return {
            "groups": [asdict(g) for g in self.groups.values()],
            "fixed": [{"key": k, "axis": a, "reason": r} for (k, a), r in self.fixed.items()],
            "sites": [asdict(s) for s in self.sites],
            "streams": [asdict(s) for s in self.streams],
        }

    @classmethod
    def from_dict(cls, data: dict) -> PermutationSpec:
        names = [g["name"] for g in data["groups"]]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            raise ValueError(f"two groups are named {repeated[0]!r}")
        groups = {
            g["name"]: PermutationGroup(g["name"], g["size"], [_member(m) for m in g["members"]],
                                        g.get("kind", "units"), g.get("blocks", 1))
            for g in data["groups"]
        }
        fixed = {(f["key"], f["axis"]): f["reason"] for f in data.get("fixed", [])}
        sites = []
        for site in data.get("sites", []):
            site = dict(site)
            if site.get("layout") is not None:
                blocks = [(b[0], b[1], _nested(b[2]), *b[3:4], *(_nested(u) for u in b[4:])) for b in site["layout"]]
                # A site whose groups were all left out of a hand-written spec keeps its units in
                # place (a spec without groups is an unaligned merge). One that lost some of them
                # is kept as written and refused by check_spec_fits: a renamed group, most likely.
                site["layout"] = blocks if any(b[0] in groups for b in blocks) else []
            sites.append(ActivationSite(**site))
        return cls(groups, fixed, sites, [StreamFold(**stream) for stream in data.get("streams", [])])

    def save(self, path: str | Path) -> None:
        """Write the spec as JSON, atomically (:func:`write_text_atomically`)."""
        write_text_atomically(Path(path), json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> PermutationSpec:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def summary(self) -> str:
        lines = [f"{len(self.groups)} permutation groups, {len(self.sites)} activation sites, "
                 f"{len(self.streams)} foldable stream stretches"]
        for group in self.groups.values():
            lines.append(f"  {group.name}: {group.kind}, {group.size} units, {len(group.members)} tied axes")
        return "\n".join(lines)


def write_text_atomically(path: Path, text: str) -> None:
    """``text`` into ``path`` through a temporary file: a failed write (a full disk) leaves no
    partial file, and processes writing the same file at once each replace it whole."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink(missing_ok=True)
        raise


def _member(item) -> tuple:
    """A member read from JSON: lists back to the tuples used in memory."""
    if len(item) == 2:
        return tuple(item)
    key, axis, offset, outers, inner, *units = item
    return key, axis, offset, _nested(outers), inner, *(_nested(u) for u in units)


def coupled_blocks(spec: PermutationSpec, site: ActivationSite) -> list[tuple[int, int]] | None:
    """The ``(start, stop)`` ranges of a site's unit axis that no permutation crosses (the
    q, k and v thirds of a fused QKV output), or None when units may move anywhere. Matching
    and the closed form compare units within these ranges only."""
    if not site.layout:
        return None
    ranges = sorted((int(copy.min()), int(copy.max()) + 1)
                    for group, *block in site.layout for copy in positions(spec.groups[group].size, *block))
    merged = [list(ranges[0])]
    for start, stop in ranges[1:]:
        if start < merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], stop)
        else:
            merged.append([start, stop])
    return [tuple(r) for r in merged] if len(merged) > 1 else None


def permute_state_dict(
    state_dict: dict[str, torch.Tensor], spec: PermutationSpec, perms: dict[str, torch.Tensor],
    keys: set[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Apply one permutation per group to every tied axis (BatchNorm buffers included);
    with ``keys``, to those tensors only (the others are returned as they are)."""
    check_state_dict(state_dict, spec, keys)
    check_permutations(spec, perms)
    permuted = dict(state_dict)
    # Block-diagonal groups (each head's dims) after the groups that move the blocks (heads).
    for name, perm in sorted(perms.items(), key=lambda item: spec.groups[item[0]].blocks > 1):
        for member in spec.groups[name].members:
            key, axis = member[0], member[1]
            if keys is not None and key not in keys:
                continue
            tensor = permuted[key]
            order = perm if len(member) == 2 else block_order(tensor.shape[axis], len(perm), perm, *_block(member))
            permuted[key] = tensor.index_select(axis, order.to(tensor.device))
    return permuted


def check_permutations(spec: PermutationSpec, perms: dict[str, torch.Tensor], every_group: bool = False) -> None:
    """Each of ``perms`` an integer tensor permuting its group's units (a wrong length or a
    repeated unit would silently resize or duplicate weights); groups left out keep their
    order, unless ``every_group`` (statistics of B's units must be read in one order each)."""
    if not isinstance(perms, Mapping):
        raise ValueError(f"perms must map group names to permutations, not {type(perms).__name__}")
    missing = [name for name in spec.groups if name not in perms]
    if every_group and missing:
        raise ValueError(f"perms has no permutation for group {missing[0]!r} (give every group one; "
                         "identity_permutations(spec) leaves B's units where they are)")
    for name, perm in perms.items():
        if name not in spec.groups:
            raise ValueError(f"no permutation group {name!r} in the spec (its groups: {', '.join(spec.groups)})")
        if not isinstance(perm, torch.Tensor) or perm.is_floating_point() or perm.is_complex() or \
                perm.dtype == torch.bool:
            raise ValueError(f"the permutation of group {name!r} must be an integer tensor, not "
                             f"{perm.dtype if isinstance(perm, torch.Tensor) else type(perm).__name__}")
        size = spec.groups[name].size
        if perm.shape != (size,) or not torch.equal(perm.sort().values.cpu(), torch.arange(size)):
            raise ValueError(f"the permutation of group {name!r} must hold each of its {size} units once (0 to "
                             f"{size - 1}), got {perm.numel()} values")


def check_state_dict(state_dict, spec: PermutationSpec, keys: set[str] | None = None,
                     name: str = "state_dict") -> None:
    """A mapping of tensors holding every tensor the spec's groups permute (of ``keys``, if given)."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(f"{name} must be a state dict (a mapping of names to tensors), not "
                         f"{type(state_dict).__name__}; pass model.state_dict()")
    for group in spec.groups.values():
        for key, *_ in group.members:
            if key not in state_dict and (keys is None or key in keys):
                raise ValueError(f"{name} has no tensor {key!r}, which group {group.name!r} permutes")


def identity_permutations(spec: PermutationSpec) -> dict[str, torch.Tensor]:
    """Every group's units left where they are (B unaligned)."""
    return {name: torch.arange(group.size) for name, group in spec.groups.items()}


def random_permutations(spec: PermutationSpec, generator: torch.Generator | None = None) -> dict:
    """A random permutation per group (block-diagonal where the group says so)."""
    return {name: block_diagonal([torch.randperm(g.size // g.blocks, generator=generator) for _ in range(g.blocks)])
            for name, g in spec.groups.items()}


def block_diagonal(perms: list[torch.Tensor]) -> torch.Tensor:
    """One permutation made of independent permutations of consecutive blocks."""
    size = len(perms[0])
    return torch.cat([perm + index * size for index, perm in enumerate(perms)])


def with_state_dict(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``model`` carrying ``state_dict`` (all keys required)."""
    return load_into(copy.deepcopy(model), state_dict)


def load_into(workspace: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """``workspace`` (a working copy of the architecture) carrying ``state_dict``; reusing
    one copy per merge keeps a single extra model in memory however many networks are built."""
    workspace.load_state_dict(state_dict, strict=True)
    return workspace


class SpecError(RuntimeError):
    """A permutation spec that does not preserve the model's function."""


def check_spec_fits(model: nn.Module, spec: PermutationSpec) -> None:
    """Refuse, with the first mismatch named, a spec whose groups or sites do not fit
    ``model``'s tensors and modules (a hand-written or edited spec, or one for another model):
    every group a positive size in equal blocks, each member an axis of a state_dict tensor
    with room for the group's units, each site a module of the model."""
    state = model.state_dict()
    for group in spec.groups.values():
        size, blocks = group.size, group.blocks
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise SpecError(f"group {group.name!r}: size must be a positive integer, not {size!r}")
        if group.kind not in GROUP_KINDS:  # reports name groups by kind
            raise SpecError(f"group {group.name!r}: kind must be one of {', '.join(GROUP_KINDS)}, not {group.kind!r}")
        if not isinstance(blocks, int) or blocks < 1 or size % blocks:
            raise SpecError(f"group {group.name!r}: blocks must be a positive integer dividing its size {size}, "
                            f"not {blocks!r}")
        if not group.members:
            raise SpecError(f"group {group.name!r} has no members")
        for member in group.members:
            key, axis = member[0], member[1]
            if key not in state:
                raise SpecError(f"group {group.name!r}: the model has no tensor {key!r}")
            shape = state[key].shape
            if not isinstance(axis, int) or not 0 <= axis < len(shape):
                raise SpecError(f"group {group.name!r}: {key} has no axis {axis!r} (shape {tuple(shape)})")
            if shape[axis] < size or (len(member) == 2 and shape[axis] != size):
                raise SpecError(f"group {group.name!r}: {size} units do not fit axis {axis} of {key} "
                                f"(length {shape[axis]})")
            if len(member) > 2:
                try:
                    where = positions(size, *_block(member))
                except (TypeError, ValueError, RuntimeError) as error:
                    raise SpecError(f"group {group.name!r}: the block pattern of {key} axis {axis} is not one "
                                    f"({error})") from error
                if where.numel() and not 0 <= int(where.min()) <= int(where.max()) < shape[axis]:
                    raise SpecError(f"group {group.name!r}: its block pattern reaches past axis {axis} of {key} "
                                    f"(length {shape[axis]})")
    for key, axis in spec.fixed:
        if key not in state:
            raise SpecError(f"fixed axis {key!r}: the model has no such tensor")
    modules = dict(model.named_modules())
    for site in spec.sites:
        where = f"activation site {site.module!r}"
        if site.module not in modules:
            raise SpecError(f"{where}: the model has no such module")
        # A site of a group left out of the spec keeps its units in place (still corrected); a
        # layout must name groups the spec has (a loaded spec drops a layout of left-out groups only).
        for name in [block[0] for block in site.layout or []]:
            if name not in spec.groups:
                raise SpecError(f"{where}: its layout names group {name!r}, which the spec does not have")
        if site.batchnorm is not None and not isinstance(modules.get(site.batchnorm), nn.modules.batchnorm._BatchNorm):
            raise SpecError(f"{where}: the model has no BatchNorm {site.batchnorm!r}")
        for key in (site.weight, site.bias):
            if key is not None and key not in state:
                raise SpecError(f"{where}: the model has no tensor {key!r}")
            # Its own layer's tensors: a correction folded into another layer's would change that one.
            if key is not None and not key.startswith(f"{site.module}."):
                raise SpecError(f"{where}: {key!r} is not a tensor of {site.module!r}")
        group = spec.groups.get(site.group)
        if group is not None and site.weight is not None and not any(m[0] == site.weight for m in group.members):
            raise SpecError(f"{where}: its group {site.group!r} does not permute its weight {site.weight!r} "
                            "(the site of another group?)")


def function_tolerance(model: nn.Module) -> float:
    """How far a correctly permuted ``model``'s outputs may move, relative to their scale:
    1e-5 in float32 and float64, 16 rounding steps of a half-precision dtype (float16:
    0.016, bfloat16: 0.125), where reordering a sum moves the outputs by more than float32's
    whole tolerance."""
    return max(1e-5, 16 * torch.finfo(floating_dtype(model) or torch.float32).eps)


@torch.no_grad()
def check_function_preserved(
    model: nn.Module,
    permuted_state_dict: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    atol: float | None = None,
    workspace: nn.Module | None = None,
) -> float:
    """Max abs difference between the outputs of ``model`` and of its permuted weights.

    Raises :class:`SpecError` above ``atol`` (relative to the logits' scale, at least 1;
    by default :func:`function_tolerance`). ``workspace``: a copy of the architecture to
    load the permuted weights into, instead of a new deep copy.
    """
    atol = function_tolerance(model) if atol is None else atol
    with kept_modes(model):
        reference = model_outputs(model, inputs).float()
    if not torch.isfinite(reference).all():
        raise SpecError("the model's outputs on the example inputs are not finite (NaN or inf): check the inputs "
                        "and the weights")
    permuted = (load_into(workspace, permuted_state_dict) if workspace is not None
                else with_state_dict(model, permuted_state_dict)).eval()
    diff = (model_outputs(permuted, inputs).float() - reference).abs().max().item()
    scale = max(1.0, reference.abs().max().item())
    if not diff <= atol * scale:
        raise SpecError(
            f"permuted model changed its outputs (max abs diff {diff:.3g} > {atol * scale:.3g}); "
            "the permutation spec is wrong for this model: pass a corrected spec by hand"
        )
    return diff


@torch.no_grad()
def verify_spec(
    model: nn.Module, spec: PermutationSpec, inputs: torch.Tensor, atol: float | None = None, seed: int = 0
) -> dict[str, float]:
    """Check that ``spec`` is right for ``model``.

    It must fit the model's tensors and modules (:func:`check_spec_fits`); a random
    permutation per group must leave outputs unchanged (``max_abs_diff``), and permuting only
    part of one group must change them (``inconsistent_diff``: a control that the check can
    fail). Raises :class:`SpecError` otherwise. ``atol`` defaults to
    :func:`function_tolerance`.
    """
    check_spec_fits(model, spec)
    atol = function_tolerance(model) if atol is None else atol
    generator = torch.Generator().manual_seed(seed)
    state = model.state_dict()
    perms = random_permutations(spec, generator)
    diff = check_function_preserved(model, permute_state_dict(state, spec, perms), inputs, atol)
    # Control: permuting one tensor of a group alone must change the outputs. Some groups
    # barely matter at random init (ConvNeXt's layer scale starts at 1e-6), so try the
    # largest groups first until one shows.
    with kept_modes(model):
        reference = model_outputs(model, inputs)
    control = 0.0
    for group in sorted(spec.groups.values(), key=lambda g: -g.size * len(g.members)):
        member = max(group.members, key=lambda m: state[m[0]].float().std().item())
        partial = PermutationSpec({group.name: PermutationGroup(group.name, group.size, [member], group.kind)})
        shift = torch.roll(torch.arange(group.size), 1)
        broken = with_state_dict(model, permute_state_dict(state, partial, {group.name: shift})).eval()
        control = (model_outputs(broken, inputs) - reference).abs().max().item()
        if control > atol:
            break
    if spec.groups and control <= atol:
        raise SpecError("no group changed the outputs when permuted inconsistently")
    return {"max_abs_diff": diff, "inconsistent_diff": control}
