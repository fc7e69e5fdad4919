"""Orthogonal alignment of a pre-norm transformer's residual stream and attention value dims.

A permutation is one orthogonal map among many. A residual stream read only through norms
(LayerNorm, RMSNorm) can be carried in any orthogonal basis once each norm's affine is
folded into the linear layers that read it: the norm then commutes with the map (LayerNorm's
centring needs the map to keep the all-ones direction; RMSNorm needs nothing), writers'
output rows take ``Q`` and readers' input columns ``Q^T``. Each attention head's value dims
can be rotated the same way (value rows ``M``, output-projection columns ``M^T``). Fitting
``Q`` and each ``M`` by orthogonal Procrustes on the endpoints' activations aligns B to A
better than the best permutation: on two ViT pairs trained on the digits, 67.9% -> 75.3% and
70.1% -> 77.0% at the REPAIRed midpoint (``examples/transformers/vit_orthogonal_stream.py``,
which measures the same maps step by step).

In: a spec, both endpoints (B already permuted), calibration batches. Out: both endpoints'
state dicts with the norms folded, B's rotated; whether a model can be rotated at all is
decided by trying it on random maps (:func:`rotation_plan`), never by its class.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from torch.func import functional_call

from .batches import counted_rows, model_outputs
from .evaluate import IGNORED_LABEL
from .interpolate import interpolate
from .passes import Tap, run_pass
from .spec import PermutationSpec, _block, function_tolerance, load_into, positions


class RotationError(ValueError):
    """A model whose stream cannot be rotated; the message names the reason."""


@dataclass
class RotationPlan:
    """What rotates: the stream group, its norms with the linear layers reading each one, and
    the value-dims groups (with the value projection whose output the map is fitted on)."""

    stream: str
    norms: dict[str, list[str]]
    centred: bool  # LayerNorm-style norms: the map keeps the all-ones direction
    values: dict[str, str] = field(default_factory=dict)  # group -> value module

    def describe(self, spec: PermutationSpec) -> dict:
        """What a merge record says was rotated."""
        heads = {spec.groups[name].blocks for name in self.values}
        dims = {spec.groups[name].size // spec.groups[name].blocks for name in self.values}
        return {"stream": {"group": self.stream, "units": spec.groups[self.stream].size,
                           "keeps_ones_direction": self.centred, "norms_folded": len(self.norms)},
                "value_dims": {"groups": len(self.values), "heads": sorted(heads), "dims_per_head": sorted(dims)}}

    def note(self, spec: PermutationSpec) -> str:
        """The sentence results and cards carry about the rotation."""
        record = self.describe(spec)
        values = record["value_dims"]
        head_text = (f" and the value dims of {values['groups']} attention layers "
                     f"({'/'.join(map(str, values['heads']))} heads x {'/'.join(map(str, values['dims_per_head']))})"
                     if values["groups"] else "")
        return (f"after the permutations, B's residual stream ({record['stream']['units']} units){head_text} were "
                "aligned to A's by orthogonal maps (Procrustes on the calibration activations); the stream's "
                f"{len(self.norms)} norms had their affines folded into the layers that read them before "
                "interpolating (the merged model's norms carry REPAIR's corrections, or weight 1 and bias 0)")


def _norm_readers(model: nn.Module, norms: list[str], example) -> dict[str, list[str]]:
    """The ``nn.Linear`` modules whose input is each norm's output (the same storage: the
    output itself or a view of it, such as a classifier reading the first token). Outputs
    and inputs are held until the forward ends, so that no tensor reuses another's memory."""
    modules = dict(model.named_modules())
    held, inputs, handles = {}, {}, []
    for name in norms:
        handles.append(modules[name].register_forward_hook(
            lambda _m, _a, out, name=name: held.__setitem__(name, out)))
    for name, module in modules.items():
        if isinstance(module, nn.Linear):
            handles.append(module.register_forward_hook(
                lambda _m, args, _o, name=name: inputs.__setitem__(name, args[0])))
    try:
        with torch.no_grad():
            model_outputs(model, example)
    finally:
        for handle in handles:
            handle.remove()
    outputs = {norm: tensor.untyped_storage().data_ptr() for norm, tensor in held.items()}
    pointers = {name: tensor.untyped_storage().data_ptr() for name, tensor in inputs.items()}
    return {norm: [name for name, pointer in pointers.items() if pointer == outputs.get(norm)] for norm in norms}


def rotation_plan(model: nn.Module, spec: PermutationSpec, example, workspace: nn.Module | None = None
                  ) -> RotationPlan:
    """The rotations ``model`` admits, checked on random maps: folding its norms and rotating
    its stream and value dims at random must leave its outputs unchanged. ``workspace``: a
    copy of the architecture to load the rotated weights into, instead of a new deep copy."""
    stream = next((name for name, group in spec.groups.items() if group.kind == "stream"), None)
    if stream is None:
        raise RotationError(f"{type(model).__name__} has no residual stream group to rotate")
    sites = [s for s in spec.sites if s.kind == "norm" and s.group == stream and s.weight]
    if not sites:
        raise RotationError(f"no norm reads the residual stream of {type(model).__name__}: it cannot be rotated")
    norms = _norm_readers(model, [s.module for s in sites], example)
    if any(not readers for readers in norms.values()):
        missing = next(name for name, readers in norms.items() if not readers)
        raise RotationError(f"the norm {missing!r} is not read by linear layers alone: the stream cannot be rotated")
    values = {}
    for name, group in spec.groups.items():
        rows = [m for m in group.members if m[0].endswith(".weight") and m[1] == 0]
        if group.kind == "head_dims" and any(m[1] == 1 for m in group.members) and len(rows) == 1:
            values[name] = rows[0][0].removesuffix(".weight")
    workspace = workspace if workspace is not None else copy.deepcopy(model)
    # Norms without centring (RMSNorm) commute with any map; LayerNorm's centring with those
    # that keep the all-ones direction.
    for centred in (False, True):
        plan = RotationPlan(stream, norms, centred, values)
        if _commutes(model, spec, plan, example, workspace):
            return plan
    raise RotationError(f"rotating the stream of {type(model).__name__} changes its outputs (norms that do not "
                        "commute with a rotation, or a reader outside the spec): it cannot be rotated")


def _commutes(model: nn.Module, spec: PermutationSpec, plan: RotationPlan, example, workspace: nn.Module) -> bool:
    """Whether ``model`` folded and rotated at random by ``plan`` computes what it did, to
    ten times the rounding a permutation may cause, relative to the outputs' scale (a
    random-init model's logits can be small)."""
    generator = torch.Generator().manual_seed(0)
    maps = {name: random_rotation(spec.groups[name].size, spec.groups[name].blocks,
                                  plan.centred and name == plan.stream, generator)
            for name in [plan.stream, *plan.values]}
    rotated = rotate_state_dict(fold_norms(model.state_dict(), plan, spec), spec, plan, maps)
    with torch.no_grad():
        want = model_outputs(model, example).float()
        got = model_outputs(load_into(workspace, rotated), example).float()
    return float((got - want).abs().max()) <= 10 * function_tolerance(model) * float(want.abs().max())


def random_rotation(size: int, blocks: int, keep_ones: bool, generator: torch.Generator) -> torch.Tensor:
    """A random block-diagonal orthogonal matrix (one block per head), keeping the all-ones
    direction when asked."""
    width = size // blocks
    matrix = torch.block_diag(*torch.linalg.qr(torch.randn(blocks, width, width, dtype=torch.float64,
                                                           generator=generator))[0])
    return procrustes(matrix[None], keep_ones=True) if keep_ones else matrix  # the nearest that keeps it


def _ones_complement(width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The unit all-ones vector and an orthonormal basis of its complement (columns)."""
    ones = torch.full((width, 1), width ** -0.5, dtype=torch.float64)
    basis = torch.linalg.qr(torch.cat([ones, torch.eye(width, dtype=torch.float64)[:, : width - 1]], 1))[0]
    return ones, basis[:, 1:]


def procrustes(cross: torch.Tensor, keep_ones: bool = False) -> torch.Tensor:
    """The block-diagonal orthogonal ``Q`` maximising ``tr(Q^T cross)`` block by block: the map
    taking B's units onto A's, from ``cross`` (blocks x width x width) ``= sum a b^T`` per
    block; with ``keep_ones`` (one block), among maps with ``Q 1 = 1``."""
    if keep_ones:
        ones, complement = _ones_complement(cross.shape[-1])
        u, _, vh = torch.linalg.svd(complement.T @ cross[0] @ complement)
        return complement @ (u @ vh) @ complement.T + ones @ ones.T
    u, _, vh = torch.linalg.svd(cross)
    return torch.block_diag(*(u @ vh))


def fold_norms(state: dict[str, torch.Tensor], plan: RotationPlan, spec: PermutationSpec) -> dict:
    """``state`` with each stream norm's affine moved into the linear layers reading it
    (``W diag(gamma)``, ``b + W beta``), the norm left at weight 1 and bias 0."""
    out = dict(state)
    sites = {s.module: s for s in spec.sites if s.kind == "norm"}
    for norm, readers in plan.norms.items():
        site = sites[norm]
        gamma = state[site.weight].double()
        beta = state[site.bias].double() if site.bias else None
        for reader in readers:
            weight = state[f"{reader}.weight"].double()
            if beta is not None:
                bias_key = f"{reader}.bias"
                if bias_key not in state:
                    raise RotationError(f"{reader} has no bias to take the shift of {norm}")
                out[bias_key] = (state[bias_key].double() + weight @ beta).to(state[bias_key].dtype)
            out[f"{reader}.weight"] = (weight * gamma).to(state[f"{reader}.weight"].dtype)
        out[site.weight] = torch.ones_like(state[site.weight])
        if site.bias:
            out[site.bias] = torch.zeros_like(state[site.bias])
    return out


def _apply_along(tensor: torch.Tensor, member: tuple, size: int, matrix: torch.Tensor) -> torch.Tensor:
    """``tensor`` with ``matrix`` applied to the units of ``member`` on its axis:
    ``new[u_i] = sum_j matrix[i, j] old[u_j]`` (writers' rows and readers' columns alike)."""
    axis = member[1]
    moved = tensor.double().movedim(axis, -1).clone()
    where = positions(size, *_block(member))  # (copies, units, inner)
    for block in where:
        for index in block.T:
            moved[..., index] = moved[..., index] @ matrix.T
    return moved.movedim(-1, axis).to(tensor.dtype)


def rotate_state_dict(state: dict[str, torch.Tensor], spec: PermutationSpec, plan: RotationPlan,
                      maps: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A folded ``state`` carrying each group of ``maps`` through its matrix; the stream's norm
    affines (1 and 0 after folding) stay as they are."""
    norm_params = {key for s in spec.sites if s.module in plan.norms for key in (s.weight, s.bias) if key}
    out = dict(state)
    for name, matrix in maps.items():
        group = spec.groups[name]
        for member in group.members:
            if member[0] not in norm_params:
                out[member[0]] = _apply_along(out[member[0]], member, group.size, matrix)
    return out


class _ProcrustesSums(Tap):
    """For two models run on the same batches: ``sum n_A n_B^T`` of the per-token normalised
    stream at every stream norm's input, and ``sum v_A v_B^T`` per head of each value group
    (blocks x width x width, float64, on the models' device; padded positions of a text batch
    never enter)."""

    def __init__(self, plan: RotationPlan, spec: PermutationSpec) -> None:
        self.plan = plan
        width = spec.groups[plan.stream].size
        self.stream = torch.zeros(1, width, width, dtype=torch.float64)
        self.values = {name: torch.zeros(spec.groups[name].blocks, spec.groups[name].size // spec.groups[name].blocks,
                                         spec.groups[name].size // spec.groups[name].blocks, dtype=torch.float64)
                       for name in plan.values}
        self._held: dict[str, torch.Tensor] = {}

    def _stream_hook(self, index: int, norm: str):
        def hook(_module, args):
            x = counted_rows(args[0]).double()
            if self.plan.centred:
                x = x - x.mean(-1, keepdim=True)
            x = x / x.pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)
            self._pair(index, f"stream:{norm}", x[:, None], self.stream)
        return hook

    def _value_hook(self, index: int, group: str):
        def hook(_module, _args, output):
            heads = self.values[group].shape[0]
            x = counted_rows(output).double()
            self._pair(index, f"value:{group}", x.view(len(x), heads, -1), self.values[group])
        return hook

    def _pair(self, index: int, key: str, x: torch.Tensor, total: torch.Tensor) -> None:
        if index == 0:
            self._held[key] = x
        else:
            total += torch.einsum("nhd,nhe->hde", self._held.pop(key), x)

    def attach(self, models):
        device = next(models[0].parameters()).device
        self.stream = self.stream.to(device)
        self.values = {name: total.to(device) for name, total in self.values.items()}
        handles = []
        for index, model in enumerate(models):
            modules = dict(model.named_modules())
            handles += [modules[norm].register_forward_pre_hook(self._stream_hook(index, norm))
                        for norm in self.plan.norms]
            handles += [modules[module].register_forward_hook(self._value_hook(index, group))
                        for group, module in self.plan.values.items()]
        return handles

    def sums(self):
        return [self.stream, *self.values.values()]

    def set_sums(self, sums):
        self.stream = sums[0]
        self.values = dict(zip(self.values, sums[1:]))


def fit_rotations(model_a: nn.Module, model_b: nn.Module, spec: PermutationSpec, plan: RotationPlan,
                  batches: Iterable, limit: int | None = None, accelerator: Accelerator | None = None
                  ) -> dict[str, torch.Tensor]:
    """The maps taking (already permuted, folded) B's stream and value dims onto A's: one pass
    of both models over ``batches``, then Procrustes per group."""
    sums = _ProcrustesSums(plan, spec)
    run_pass([model_a, model_b], [sums], batches, limit=limit, accelerator=accelerator, desc="rotations")
    crosses = {plan.stream: sums.stream, **sums.values}
    return {name: procrustes(cross.cpu(), keep_ones=plan.centred and name == plan.stream)
            for name, cross in crosses.items()}


# Adam's step on the maps' skew parameters (radians, roughly): on the digits ViT pairs 40 full-batch
# steps at 0.01 took the REPAIRed midpoint from 75-77% to 88-89%; 80 steps at 0.005 gained under a
# point more (on the plain midpoint, 90.6% against 89.8%).
REFINE_LEARNING_RATE = 0.01
# The endpoints' mixed predictions on the refinement's examples are kept after its first pass
# when they fit in this many bytes (a classifier's always; a language model's vocabulary-wide
# ones rarely): later steps then run the midpoint alone, a third of the forwards.
TARGET_CACHE_BYTES = 2**30


def targets_fit(model: nn.Module, example, examples: int | None) -> bool:
    """Whether the mixed predictions of ``examples`` examples fit :data:`TARGET_CACHE_BYTES`,
    from ``model``'s outputs on ``example`` (a few examples); unknown counts do not."""
    if examples is None:
        return False
    with torch.no_grad():
        logits = model_outputs(model, example)
    per_example = logits.numel() // len(logits) * 4  # kept in float32
    return examples * per_example <= TARGET_CACHE_BYTES


class _Midpoint(nn.Module):
    """The network interpolated at ``alpha`` between folded A and folded, rotated B, as a
    function of the maps: each is its Procrustes fit times the exponential of a skew matrix
    (so it stays orthogonal, and a centred stream's keeps the ones direction). ``correctors``
    (module name -> REPAIR's corrector in train mode) replace those modules' outputs, so
    that it is the REPAIRed network. Its forward also keeps the endpoints' mixed predictions
    on the same inputs (:attr:`target`)."""

    def __init__(self, model_a: nn.Module, model_b: nn.Module, folded_a: dict, folded_b: dict,
                 spec: PermutationSpec, plan: RotationPlan, maps: dict[str, torch.Tensor], alpha: float,
                 correctors: dict[str, nn.Module] | None = None, keep_targets: bool = False) -> None:
        super().__init__()
        self.keep_targets, self.kept, self.replaying, self.position = keep_targets, [], False, 0
        self.model_a, self.model_b = model_a, model_b
        # A plain dict, not submodules: the pass puts its models in eval mode, the correctors stay measuring.
        self.correctors = {name: c.requires_grad_(False) for name, c in (correctors or {}).items()}
        self.folded_a, self.folded_b, self.spec, self.plan, self.alpha = folded_a, folded_b, spec, plan, alpha
        self.modules_a = dict(model_a.named_modules())
        self.aliases = tied_aliases(model_a)
        self.fitted = dict(maps)
        # The stream's turn of a centred stream acts on the complement of the ones direction only.
        self.ones = {name: tuple(t.to(matrix.device) for t in _ones_complement(len(matrix)))
                     for name, matrix in maps.items() if plan.centred and name == plan.stream}
        self.skews = nn.ParameterList()
        for name, matrix in maps.items():
            blocks = self.spec.groups[name].blocks
            width = len(matrix) // blocks - (1 if name in self.ones else 0)
            self.skews.append(nn.Parameter(torch.zeros(blocks, width, width, dtype=torch.float64,
                                                       device=matrix.device)))
        self.target: torch.Tensor | None = None

    def maps(self) -> dict[str, torch.Tensor]:
        out = {}
        for (name, fitted), skew in zip(self.fitted.items(), self.skews):
            turn = torch.linalg.matrix_exp(skew - skew.transpose(-1, -2))
            if name in self.ones:
                ones, complement = self.ones[name]
                turn = complement @ turn[0] @ complement.T + ones @ ones.T
            else:
                turn = torch.block_diag(*turn)
            out[name] = fitted @ turn
        return out

    @property
    def forwards_per_example(self) -> int:
        """What the pass engine counts per example: the endpoints' and the midpoint's forwards,
        or the midpoint's alone once the targets are kept."""
        return 1 if self.replaying else 3

    def start_pass(self) -> None:
        """Before each pass: replay the targets kept by the previous one, if any."""
        self.replaying, self.position = self.keep_targets and bool(self.kept), 0

    def forward(self, *args, **kwargs):
        inputs = kwargs if kwargs else args[0]
        if self.replaying:  # the same batches, in the same order, every pass
            self.target = self.kept[self.position]
            self.position += 1
        else:
            with torch.no_grad():
                a, b = (F.softmax(model_outputs(model, inputs).float(), -1) for model in (self.model_a, self.model_b))
                self.target = torch.lerp(a, b, self.alpha)
            if self.keep_targets:
                self.kept.append(self.target)
        rotated = rotate_state_dict(self.folded_b, self.spec, self.plan, self.maps())
        handles = [self.modules_a[name].register_forward_hook(lambda _m, _i, out, c=corrector: c(out))
                   for name, corrector in self.correctors.items()]
        try:
            state = {k: v for k, v in interpolate(self.folded_a, rotated, self.alpha).items() if k not in self.aliases}
            return functional_call(self.model_a, state, args, kwargs)
        finally:
            for handle in handles:
                handle.remove()


def tied_aliases(model: nn.Module) -> set[str]:
    """Every name of a shared tensor but its first (tied input and output embeddings):
    ``functional_call`` takes one value per tied tensor and refuses a second. Rotation is
    admitted for a tied model only where folding leaves the tied copies equal."""
    seen, aliases = set(), set()
    for name, tensor in [*model.named_parameters(remove_duplicate=False),
                         *model.named_buffers(remove_duplicate=False)]:
        if id(tensor) in seen:
            aliases.add(name)
        seen.add(id(tensor))
    return aliases


class _Distillation(Tap):
    """KL divergence of the midpoint's predictions from the endpoints' mixed predictions,
    summed over the pass (every predicted position of a text batch not marked ignored), with
    its gradient on the maps' skew parameters; both are reduced over processes, then the
    optimizer steps (when given one)."""

    wants_outputs = True

    def __init__(self, midpoint: _Midpoint, optimizer: torch.optim.Optimizer | None) -> None:
        self.midpoint, self.optimizer = midpoint, optimizer
        self.params = list(midpoint.skews)
        self.grads = [torch.zeros_like(p) for p in self.params]
        self.totals = torch.zeros(2, dtype=torch.float64)  # loss, predictions
        self.loss: float | None = None

    def observe(self, model_index, logits, labels):
        target = self.midpoint.target
        if labels is not None and labels.dim() == 2 and logits.dim() == 3:
            keep = labels != IGNORED_LABEL
            logits, target = logits[keep], target[keep]
        logits, target = logits.reshape(-1, logits.shape[-1]), target.reshape(-1, target.shape[-1])
        loss = F.kl_div(F.log_softmax(logits.float(), -1), target, reduction="sum")
        if self.optimizer is not None:
            grads = torch.autograd.grad(loss, self.params, allow_unused=True)
            for total, grad in zip(self.grads, grads):
                if grad is not None:
                    total += grad
        self.totals += torch.tensor([loss.item(), len(logits)], dtype=torch.float64)

    def sums(self):
        return [*self.grads, self.totals]

    def set_sums(self, sums):
        *self.grads, self.totals = sums
        self.totals = self.totals.cpu()

    def finish(self):
        loss, predictions = self.totals.tolist()
        self.loss = loss / predictions
        if self.optimizer is not None:
            for param, grad in zip(self.params, self.grads):
                param.grad = grad / predictions
            self.optimizer.step()
            self.optimizer.zero_grad()


def refine_rotations(model_a: nn.Module, model_b: nn.Module, folded_a: dict, folded_b: dict, spec: PermutationSpec,
                     plan: RotationPlan, maps: dict[str, torch.Tensor], batches: Iterable, steps: int, alpha: float,
                     limit: int | None = None, accelerator: Accelerator | None = None,
                     correctors: dict[str, nn.Module] | None = None, keep_targets: bool = False
                     ) -> tuple[dict[str, torch.Tensor], dict]:
    """The maps after ``steps`` of Adam on the KL divergence of the network interpolated at
    ``alpha`` from the endpoints' mixed predictions, each step over all of ``batches``
    (a full-batch gradient: any number of processes takes the same steps); B's function is
    untouched, only the orthogonal basis it is carried in changes. With REPAIR's
    ``correctors`` (:func:`~hfrepair.repair.exact_correctors`) the network refined for is the
    REPAIRed one: refined without them, the maps fit a midpoint that REPAIR then disturbs (on a
    digits ViT pair 89.5% before REPAIR, 84.4% after; with them 82.2% before, 88.2% after:
    ``examples/transformers/vit_orthogonal_stream.py``).
    ``keep_targets`` (see :func:`targets_fit`): the endpoints run in the first pass only.
    Also returns what a merge record says of it: steps, examples, and the loss with the
    fitted and the refined maps (``steps + 1`` passes, the last without gradient)."""
    midpoint = _Midpoint(model_a, model_b, folded_a, folded_b, spec, plan, maps, alpha, correctors, keep_targets)
    optimizer = torch.optim.Adam(midpoint.skews.parameters(), lr=REFINE_LEARNING_RATE)
    losses = []
    for step in range(steps + 1):
        learning = step < steps
        tap = _Distillation(midpoint, optimizer if learning else None)
        midpoint.start_pass()
        examples = run_pass([midpoint], [tap], batches, limit=limit, accelerator=accelerator, grad=learning,
                            desc=f"refining rotations, step {step + 1} of {steps}" if learning else "refined rotations")
        losses.append(tap.loss)
    record = {"steps": steps, "examples": examples, "alpha": alpha, "learning_rate": REFINE_LEARNING_RATE,
              "repair_correctors": len(midpoint.correctors),
              "distillation_loss": {"fitted": losses[0], "refined": losses[-1]}}
    with torch.no_grad():
        return {name: matrix.detach() for name, matrix in midpoint.maps().items()}, record


def refinement_note(record: dict) -> str:
    """The sentence results and cards carry about a refinement (:func:`refine_rotations`'s record)."""
    loss = record["distillation_loss"]
    repaired = (f", with REPAIR's corrections at its {record['repair_correctors']} sites measured by batch,"
                if record["repair_correctors"] else "")
    return (f"the maps were then refined by {record['steps']} steps of Adam, each over the first "
            f"{record['examples']:,} calibration examples, so that the network interpolated at "
            f"alpha={record['alpha']:g}{repaired} predicts the endpoints' mixed predictions (KL divergence "
            f"{loss['fitted']:.4f} with the fitted maps, {loss['refined']:.4f} refined)")
