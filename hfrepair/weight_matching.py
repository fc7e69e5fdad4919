"""Weight matching: B's units matched to A's from the weights alone (Git Re-Basin).

In: a spec and both endpoints' state dicts. Out: one permutation per group, as
:func:`hfrepair.matching.match_permutations` gives, with no data. The objective is the
inner product ``sum <W_A, P(W_B)>`` over every tensor the spec permutes, i.e. the squared
weight distance ``|W_A - P(W_B)|^2`` it leaves; it is raised by coordinate descent: in a
random order, each group in turn takes the assignment that is best with every other
group held where it is, until a round changes nothing.

A unit's weights are all the numbers its member axes hold for it (rows of the layer that
writes it, columns of the layers that read it, its norm and BatchNorm entries; for a head,
every dim of it in the q, k, v and output projections), so heads and the transformer
stream are matched like any other group. The dims of each head (a block-diagonal group)
stay with their head while the heads are re-matched.
"""

from __future__ import annotations

import torch

from .matching import assignment, blockwise_assignment
from .spec import (PermutationGroup, PermutationSpec, _block, block_diagonal, identity_permutations,
                   permute_state_dict, positions)


def _unit_weights(tensor: torch.Tensor, member: tuple, size: int) -> torch.Tensor:
    """(size, numbers) float64: every number ``member``'s axis of ``tensor`` holds for each unit."""
    moved = tensor.detach().movedim(member[1], 0).double()
    if len(member) == 2:
        return moved.reshape(size, -1)
    where = positions(size, *_block(member))  # (copies, size, inner)
    return moved[where].transpose(0, 1).reshape(size, -1)


def _cost(spec: PermutationSpec, name: str, state_a: dict, state_b: dict, skip: set = frozenset()) -> torch.Tensor:
    """``cost[i, j]``: the inner product of A's unit ``i`` with B's unit ``j`` over the
    group's member axes (except those in ``skip``), B as given."""
    group = spec.groups[name]
    cost = torch.zeros(group.size, group.size, dtype=torch.float64)
    for member in group.members:
        key = member[0]
        if (key, member[1]) in skip or key not in state_a:
            continue
        cost += _unit_weights(state_a[key], member, group.size) @ _unit_weights(state_b[key], member, group.size).T
    return cost


def _within_units(inner: PermutationGroup, outer: PermutationGroup) -> bool:
    """Whether each block of ``inner`` lies inside one unit of ``outer`` (block ``k`` in unit
    ``k``) on every axis they share: the dims of each head inside that head."""
    outer_members = {(m[0], m[1]): m for m in outer.members}
    shared = [(m, outer_members[(m[0], m[1])]) for m in inner.members if (m[0], m[1]) in outer_members]
    if inner.blocks != outer.size or inner is outer or not shared:
        return False
    step = inner.size // inner.blocks
    for inner_member, outer_member in shared:
        units = positions(outer.size, *_block(outer_member)).transpose(0, 1).reshape(outer.size, -1)
        blocks = positions(inner.size, *_block(inner_member)).transpose(0, 1).reshape(inner.blocks, -1)
        if not all(set(blocks[k].tolist()) <= set(units[k].tolist()) for k in range(outer.size)):
            return False
    return True


def _nested(spec: PermutationSpec) -> dict[str, list[str]]:
    """For each group, the block-diagonal groups whose blocks are its units (a heads group:
    the dims of each head)."""
    return {name: [inner for inner, g in spec.groups.items() if _within_units(g, group)]
            for name, group in spec.groups.items()}


def _reorder_blocks(perm: torch.Tensor, blocks: int, order: torch.Tensor) -> torch.Tensor:
    """A block-diagonal permutation whose block ``i`` is ``perm``'s block ``order[i]``."""
    step = len(perm) // blocks
    parts = [perm[k * step:(k + 1) * step] - k * step for k in range(blocks)]
    return block_diagonal([parts[int(k)] for k in order])


def objective(spec: PermutationSpec, state_a: dict, state_b: dict, perms: dict[str, torch.Tensor]) -> float:
    """``sum <W_A, P(W_B)>`` over the tensors of ``state_a`` the spec permutes."""
    keys = _permuted_keys(spec, state_a)
    permuted = permute_state_dict(state_b, spec, perms, keys)
    return float(sum((state_a[k].detach().double() * permuted[k].detach().double()).sum() for k in keys))


def weight_distance(spec: PermutationSpec, state_a: dict, state_b: dict, perms: dict[str, torch.Tensor]) -> float:
    """``|W_A - P(W_B)| / |W_A|`` over the tensors of ``state_a`` the spec permutes (0 when
    it permutes none)."""
    keys = _permuted_keys(spec, state_a)
    if not keys:
        return 0.0
    permuted = permute_state_dict(state_b, spec, perms, keys)
    gap = sum(float((state_a[k].detach().double() - permuted[k].detach().double()).square().sum()) for k in keys)
    size = sum(float(state_a[k].detach().double().square().sum()) for k in keys)
    return (gap / max(size, 1e-300)) ** 0.5


def _permuted_keys(spec: PermutationSpec, state: dict) -> set[str]:
    return {m[0] for group in spec.groups.values() for m in group.members} & set(state)


def _step(spec: PermutationSpec, name: str, inner_groups: list[str], perms: dict, state_a: dict,
          state_b: dict) -> bool:
    """Re-match one group with every other held; True if that raised the objective.

    A group with inner groups (heads, whose dims are block-diagonal groups) is matched
    coarse to fine: the cost of pairing A's head ``i`` with B's head ``j`` counts each inner
    group at its best pairing of the two heads' dims, and the chosen heads bring those
    pairings with them. Matching heads with their dims as they stand would compare dims
    that belong to other heads, and stall at the first heads found.
    """
    group = spec.groups[name]
    size = group.size
    held = {**perms, name: torch.arange(size), **{inner: torch.arange(spec.groups[inner].size) for inner in inner_groups}}
    keys = {m[0] for group_name in (name, *inner_groups) for m in spec.groups[group_name].members} & set(state_b)
    permuted = permute_state_dict(state_b, spec, held, keys)
    skip = {(m[0], m[1]) for inner in inner_groups for m in spec.groups[inner].members}
    cost = _cost(spec, name, state_a, permuted, skip)
    current = cost[torch.arange(size), perms[name]].sum()
    by_b_unit = torch.argsort(perms[name])  # the inner blocks as they go with B's units
    pairings = {}
    for inner in inner_groups:
        step = spec.groups[inner].size // size
        blocks = _cost(spec, inner, state_a, permuted).view(size, step, size, step)
        following = _reorder_blocks(perms[inner], size, by_b_unit).view(size, step) % step
        for i in range(size):
            j = int(perms[name][i])
            current += blocks[i, :, j][torch.arange(step), following[j]].sum()
        pairings[inner] = [[assignment(blocks[i, :, j]) for j in range(size)] for i in range(size)]
        cost += torch.tensor([[float(blocks[i, :, j][torch.arange(step), pairings[inner][i][j]].sum())
                               for j in range(size)] for i in range(size)], dtype=torch.float64)
    best = blockwise_assignment(cost, group.blocks)
    if cost[torch.arange(size), best].sum() <= current + 1e-9 * cost.abs().max():
        return False
    perms[name] = best
    for inner in inner_groups:
        perms[inner] = block_diagonal([pairings[inner][i][int(best[i])] for i in range(size)])
    return True


def match_weights(spec: PermutationSpec, state_a: dict, state_b: dict, max_rounds: int = 100,
                  seed: int = 0) -> dict[str, torch.Tensor]:
    """One permutation per group maximising ``sum <W_A, P(W_B)>`` (coordinate descent) over
    the tensors given: pass the parameters (``dict(model.named_parameters())``), since
    buffers such as BatchNorm's running statistics are measurements of the data, on another
    scale, and would outweigh the weights."""
    state_a = {k: v.detach().cpu() for k, v in state_a.items()}
    state_b = {k: v.detach().cpu() for k, v in state_b.items()}
    perms = identity_permutations(spec)
    nested = _nested(spec)
    generator = torch.Generator().manual_seed(seed)
    names = list(spec.groups)
    for _ in range(max_rounds):
        order = torch.randperm(len(names), generator=generator).tolist()
        changed = [_step(spec, names[i], nested[names[i]], perms, state_a, state_b) for i in order]
        if not any(changed):
            break
    return perms
