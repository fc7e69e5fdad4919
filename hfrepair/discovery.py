"""Discover a model's permutation spec from its ``torch.export`` graph.

In: a model and one example input. Out: a :class:`~hfrepair.spec.PermutationSpec`.

Every axis of every tensor in the graph is an element of a union-find. A table of rules
per ATen op says which axes an op forces to share one permutation (a conv ties its output
channels to its weight rows and bias; an add ties its operands' aligned axes; a linear
ties its input features to its weight columns ...). Axes reachable from the model's
inputs or outputs, and all axes touched by an op without a rule, are fixed. Each class
that holds state_dict axes and no fixed axis is a permutation group.

We wrote this rather than use a symbolic tracer: ``torch.fx.symbolic_trace`` fails on the
transformers vision models, while ``torch.export(strict=False)`` captures them, with each
node's module path and shape.
"""

from __future__ import annotations

import operator
import re
from collections import defaultdict

import torch
from torch import nn

from .spec import ActivationSite, PermutationGroup, PermutationSpec

Axis = tuple  # (tensor id, axis index)


class ExportError(RuntimeError):
    """The model could not be captured with ``torch.export``."""


class _AxisSets:
    """Union-find over tensor axes, remembering why a class is fixed."""

    def __init__(self) -> None:
        self.parent: dict[Axis, Axis] = {}
        self.reason: dict[Axis, str] = {}

    def find(self, item: Axis) -> Axis:
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a: Axis, b: Axis) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
            if rb in self.reason:
                self.reason.setdefault(ra, self.reason.pop(rb))

    def fix(self, item: Axis, reason: str) -> None:
        self.reason.setdefault(self.find(item), reason)

    def fixed_reason(self, item: Axis) -> str | None:
        return self.reason.get(self.find(item))


def _shape(value) -> tuple[int, ...] | None:
    return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


class _GraphAxes:
    """Axis bookkeeping for one exported graph: shapes and ids of every tensor value."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.sets = _AxisSets()
        self.shapes: dict[tuple[str, int], tuple[int, ...]] = {}
        for node in graph.nodes:
            value = node.meta.get("val")
            values = value if isinstance(value, (tuple, list)) else [value]
            for index, item in enumerate(values):
                shape = _shape(item)
                if shape is not None:
                    self.shapes[(node.name, index)] = shape

    def tensor(self, arg, index: int = 0) -> tuple[str, int] | None:
        """The tensor id of a node argument (None for scalars, lists, missing tensors)."""
        if isinstance(arg, torch.fx.Node) and (arg.name, index) in self.shapes:
            return (arg.name, index)
        return None

    def rank(self, tensor) -> int:
        return len(self.shapes[tensor])

    def size(self, tensor, axis: int) -> int:
        return self.shapes[tensor][axis]

    def tie(self, a, axis_a: int, b, axis_b: int) -> None:
        if a is None or b is None:
            return
        self.sets.union((a, axis_a % self.rank(a)), (b, axis_b % self.rank(b)))

    def fix(self, tensor, axis: int, reason: str) -> None:
        if tensor is not None and self.rank(tensor):
            self.sets.fix((tensor, axis % self.rank(tensor)), reason)

    def fix_all(self, tensor, reason: str) -> None:
        if tensor is not None:
            for axis in range(self.rank(tensor)):
                self.fix(tensor, axis, reason)


# ---- rules: one function per family of ATen ops -------------------------------------------

_UNARY = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "dropout", "feature_dropout", "alpha_dropout",
    "clone", "contiguous", "detach", "alias", "to", "_to_copy", "type_as", "pow", "sqrt", "rsqrt",
    "exp", "log", "neg", "abs", "erf", "reciprocal", "square", "softmax", "log_softmax",
    "zeros_like", "ones_like", "full_like", "empty_like", "clamp", "clamp_min", "clamp_max",
    "lift_fresh_copy", "_softmax", "_log_softmax", "sign", "floor", "ceil", "round", "identity",
}
_BROADCAST = {"add", "sub", "mul", "div", "where", "maximum", "minimum", "rsub", "addcmul", "addcdiv", "lerp"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "logsumexp"}
_POOL = {
    "adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d", "avg_pool1d", "avg_pool2d",
    "avg_pool3d", "max_pool1d", "max_pool2d", "max_pool3d", "adaptive_max_pool2d",
    "max_pool2d_with_indices", "upsample_nearest2d", "upsample_bilinear2d",
}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unflatten", "squeeze", "unsqueeze", "view_as", "reshape_as"}
# Ops with no tensor output that only inspect their inputs.
_IGNORED = {"_assert_tensor_metadata", "_assert_scalar", "sym_size", "sym_numel", "sym_stride", "_assert_async"}


def _op_name(node: torch.fx.Node) -> str:
    if node.target is operator.getitem:
        return "getitem"
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    # In-place variants (``add_``) behave like their functional op in the graph.
    return name[:-1] if name.endswith("_") and not name.startswith("_") else name


def _outputs(g: _GraphAxes, node) -> list:
    outputs = []
    while (node.name, len(outputs)) in g.shapes:
        outputs.append((node.name, len(outputs)))
    return outputs


def _rule_unary(g: _GraphAxes, node) -> None:
    out = g.tensor(node)
    src = g.tensor(node.args[0]) if node.args else None
    others = [a for a in list(node.args[1:]) + list(node.kwargs.values()) if g.tensor(a) is not None]
    if out is None or src is None or others or g.shapes[src] != g.shapes[out]:
        # A second tensor operand (clamp(min=t), pow(x, t)) broadcasts like a binary op.
        _rule_broadcast(g, node)
        return
    for axis in range(g.rank(out)):
        g.tie(src, axis, out, axis)


def _rule_broadcast(g: _GraphAxes, node) -> None:
    """Elementwise ops: operands align from the right; size-1 (broadcast) axes tie nothing."""
    out = g.tensor(node)
    if out is None:
        _rule_unknown(g, node)
        return
    for arg in list(node.args) + list(node.kwargs.values()):
        src = g.tensor(arg)
        if src is None:
            continue
        offset = g.rank(out) - g.rank(src)
        for axis in range(g.rank(src)):
            if g.size(src, axis) == g.size(out, axis + offset):
                g.tie(src, axis, out, axis + offset)
            elif g.size(src, axis) != 1:
                g.fix(src, axis, f"{_op_name(node)} with mismatched shapes")


def _dims(arg, rank: int) -> list[int]:
    if arg is None:
        return list(range(rank))
    dims = [arg] if isinstance(arg, int) else list(arg)
    return sorted(d % rank for d in dims) or list(range(rank))


def _rule_reduce(g: _GraphAxes, node) -> None:
    """Sums, means and norms over an axis do not care how it is permuted."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    if src is None or out is None:
        _rule_unknown(g, node)
        return
    dims = _dims(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim"), g.rank(src))
    kept = [a for a in range(g.rank(src)) if a not in dims]
    keepdim = g.rank(out) == g.rank(src)
    for position, axis in enumerate(kept):
        g.tie(src, axis, out, axis if keepdim else position)


def _rule_pool(g: _GraphAxes, node) -> None:
    """Spatial pooling: batch and channel axes pass through, spatial axes stay fixed."""
    src = g.tensor(node.args[0])
    spatial = int(re.search(r"(\d)d", _op_name(node)).group(1))
    for out in _outputs(g, node):
        leading = g.rank(src) - spatial
        for axis in range(leading):
            g.tie(src, axis, out, axis)
        for axis in range(leading, g.rank(src)):
            g.fix(src, axis, "spatial axis")
            g.fix(out, axis, "spatial axis")


def _rule_conv(g: _GraphAxes, node) -> None:
    name = _op_name(node)
    args = list(node.args)
    src, weight = g.tensor(args[0]), g.tensor(args[1])
    bias = g.tensor(args[2]) if len(args) > 2 else g.tensor(node.kwargs.get("bias"))
    transposed = name == "convolution" and len(args) > 6 and args[6]
    groups = (args[8] if len(args) > 8 else 1) if name == "convolution" else (args[6] if len(args) > 6 else 1)
    out = g.tensor(node)
    if transposed or src is None or weight is None:
        _rule_unknown(g, node)
        return
    g.tie(src, 0, out, 0)
    g.tie(out, 1, weight, 0)
    g.tie(out, 1, bias, 0)
    in_channels = g.size(src, 1)
    if groups == 1:
        g.tie(src, 1, weight, 1)
    elif groups == in_channels and g.size(weight, 0) == in_channels:
        # Depthwise: each channel keeps its own filter, so in and out channels move together.
        g.tie(src, 1, out, 1)
    else:
        g.fix(src, 1, f"grouped convolution ({groups} groups)")
        g.fix(out, 1, f"grouped convolution ({groups} groups)")
    for axis in range(2, g.rank(out)):
        g.fix(out, axis, "spatial axis")
        g.fix(src, axis, "spatial axis")
        g.fix(weight, axis, "kernel axis")
    if groups != 1:
        g.fix(weight, 1, "grouped convolution kernel")


def _rule_linear(g: _GraphAxes, node) -> None:
    src, weight, out = g.tensor(node.args[0]), g.tensor(node.args[1]), g.tensor(node)
    bias = g.tensor(node.args[2]) if len(node.args) > 2 else g.tensor(node.kwargs.get("bias"))
    for axis in range(g.rank(src) - 1):
        g.tie(src, axis, out, axis)
    g.tie(src, -1, weight, 1)
    g.tie(out, -1, weight, 0)
    g.tie(out, -1, bias, 0)


def _rule_matmul(g: _GraphAxes, node) -> None:
    a, b, out = g.tensor(node.args[0]), g.tensor(node.args[1]), g.tensor(node)
    if a is None or b is None or out is None or g.rank(a) < 2 or g.rank(b) < 2:
        _rule_unknown(g, node)
        return
    g.tie(a, -1, b, -2)
    g.tie(a, -2, out, -2)
    g.tie(b, -1, out, -1)
    for src in (a, b):
        offset = g.rank(out) - g.rank(src)
        for axis in range(g.rank(src) - 2):
            if g.size(src, axis) == g.size(out, axis + offset):
                g.tie(src, axis, out, axis + offset)


def _rule_batch_norm(g: _GraphAxes, node) -> None:
    src = g.tensor(node.args[0])
    for out in _outputs(g, node)[:1]:
        for axis in range(g.rank(src)):
            g.tie(src, axis, out, axis)
    for arg in node.args[1:5]:
        g.tie(src, 1, g.tensor(arg), 0)


def _rule_layer_norm(g: _GraphAxes, node) -> None:
    """Normalising over an axis is permutation-equivariant if its affine moves along."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    normalized = len(node.args[1])
    for axis in range(g.rank(src)):
        g.tie(src, axis, out, axis)
    for arg in node.args[2:4]:
        param = g.tensor(arg)
        if param is not None:
            for axis in range(normalized):
                g.tie(param, axis, src, g.rank(src) - normalized + axis)


def _rule_group_norm(g: _GraphAxes, node) -> None:
    src, out = g.tensor(node.args[0]), g.tensor(node)
    groups = node.args[1]
    for axis in range(g.rank(src)):
        g.tie(src, axis, out, axis)
    for arg in node.args[2:4]:
        g.tie(src, 1, g.tensor(arg), 0)
    if groups not in (1, g.size(src, 1)):
        g.fix(src, 1, f"group_norm with {groups} groups")


def _rule_reshape(g: _GraphAxes, node) -> None:
    """Tie axes that a reshape keeps whole; axes it merges or splits stay fixed."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    if src is None or out is None:
        _rule_unknown(g, node)
        return
    a = [i for i, d in enumerate(g.shapes[src]) if d != 1]
    b = [i for i, d in enumerate(g.shapes[out]) if d != 1]
    i = j = 0
    while i < len(a) and j < len(b):
        size_a, size_b = g.size(src, a[i]), g.size(out, b[j])
        if size_a == size_b:
            g.tie(src, a[i], out, b[j])
            i, j = i + 1, j + 1
            continue
        span_a, span_b = [a[i]], [b[j]]
        while size_a != size_b and i < len(a) and j < len(b):
            if size_a < size_b:
                i += 1
                if i < len(a):
                    span_a.append(a[i])
                    size_a *= g.size(src, a[i])
            else:
                j += 1
                if j < len(b):
                    span_b.append(b[j])
                    size_b *= g.size(out, b[j])
        for axis in span_a:
            g.fix(src, axis, "merged or split by a reshape")
        for axis in span_b:
            g.fix(out, axis, "merged or split by a reshape")
        i, j = i + 1, j + 1
    for axis in a[i:]:
        g.fix(src, axis, "merged or split by a reshape")
    for axis in b[j:]:
        g.fix(out, axis, "merged or split by a reshape")


def _rule_permute(g: _GraphAxes, node) -> None:
    src, out = g.tensor(node.args[0]), g.tensor(node)
    rank = g.rank(src)
    name = _op_name(node)
    if rank < 2:
        _rule_unary(g, node)
        return
    if name == "permute":
        order = [d % rank for d in node.args[1]]
    else:
        order = list(range(rank))
        d0, d1 = (node.args[1] % rank, node.args[2] % rank) if name == "transpose" else (0, 1)
        order[d0], order[d1] = order[d1], order[d0]
    for axis, source_axis in enumerate(order):
        g.tie(out, axis, src, source_axis)


def _rule_expand(g: _GraphAxes, node) -> None:
    _rule_broadcast(g, node)


def _rule_slice(g: _GraphAxes, node) -> None:
    """A slice or select keeps axes it does not cut; the cut axis is fixed."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % g.rank(src)
    removed = _op_name(node) == "select"
    for axis in range(g.rank(src)):
        target = axis - 1 if removed and axis > dim else axis
        if axis == dim and (removed or g.size(src, axis) != g.size(out, axis)):
            g.fix(src, axis, f"{_op_name(node)} along this axis")
            if not removed:
                g.fix(out, axis, f"{_op_name(node)} along this axis")
        else:
            g.tie(src, axis, out, target)


def _rule_cat(g: _GraphAxes, node) -> None:
    out = g.tensor(node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % g.rank(out)
    for arg in node.args[0]:
        src = g.tensor(arg)
        for axis in range(g.rank(out)):
            if axis == dim:
                g.fix(src, axis, "concatenated along this axis")
            else:
                g.tie(src, axis, out, axis)
    g.fix(out, dim, "concatenated along this axis")


def _rule_getitem(g: _GraphAxes, node) -> None:
    source, index = node.args
    src, out = g.tensor(source, index), g.tensor(node)
    if src is None or out is None:
        return
    for axis in range(g.rank(out)):
        g.tie(src, axis, out, axis)


def _rule_unknown(g: _GraphAxes, node) -> None:
    reason = f"unsupported op {node.target}"
    for arg in list(node.args) + list(node.kwargs.values()):
        for item in arg if isinstance(arg, (list, tuple)) else [arg]:
            g.fix_all(g.tensor(item), reason)
    for out in _outputs(g, node):
        g.fix_all(out, reason)


_RULES = {
    **{name: _rule_unary for name in _UNARY},
    **{name: _rule_broadcast for name in _BROADCAST},
    **{name: _rule_reduce for name in _REDUCE},
    **{name: _rule_pool for name in _POOL},
    **{name: _rule_reshape for name in _RESHAPE},
    "conv1d": _rule_conv, "conv2d": _rule_conv, "conv3d": _rule_conv, "convolution": _rule_conv,
    "linear": _rule_linear, "matmul": _rule_matmul, "mm": _rule_matmul, "bmm": _rule_matmul,
    "batch_norm": _rule_batch_norm, "_native_batch_norm_legit_no_training": _rule_batch_norm,
    "layer_norm": _rule_layer_norm, "group_norm": _rule_group_norm,
    "permute": _rule_permute, "transpose": _rule_permute, "t": _rule_permute,
    "expand": _rule_expand, "slice": _rule_slice, "select": _rule_slice, "cat": _rule_cat,
    "getitem": _rule_getitem,
}


# ---- the discovery itself ------------------------------------------------------------------

def export_model(model: nn.Module, example_inputs: torch.Tensor) -> torch.export.ExportedProgram:
    model.eval()
    try:
        with torch.no_grad():
            return torch.export.export(model, (example_inputs,), strict=False)
    except Exception as error:  # export raises many types; all mean the same to our users
        raise ExportError(
            f"torch.export could not capture {type(model).__name__} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "write a permutation spec by hand (hfrepair.PermutationSpec / --spec FILE)"
        ) from error


def discover_spec(model: nn.Module, example_inputs: torch.Tensor) -> PermutationSpec:
    """The permutation spec of ``model``, from its export graph on ``example_inputs``."""
    program = export_model(model, example_inputs)
    graph = program.graph
    signature = program.graph_signature
    state_keys = set(model.state_dict().keys())
    placeholder_keys = {**signature.inputs_to_parameters, **signature.inputs_to_buffers}
    g = _GraphAxes(graph)

    for node in graph.nodes:
        if node.op == "placeholder":
            key = placeholder_keys.get(node.name)
            if key is None:
                g.fix_all(g.tensor(node), "model input or constant")
            elif key not in state_keys:
                g.fix_all(g.tensor(node), "not in the state_dict (non-persistent buffer)")
            elif not node.users:
                g.fix_all(g.tensor(node), "not used by the forward pass")
        elif node.op == "output":
            for leaf in torch.utils._pytree.tree_leaves(node.args):
                g.fix_all(g.tensor(leaf), "model output")
        elif node.op == "call_function":
            name = _op_name(node)
            if name in _IGNORED:
                continue
            _RULES.get(name, _rule_unknown)(g, node)
        else:
            for out in _outputs(g, node):
                g.fix_all(out, f"unsupported graph node {node.op}")

    groups, fixed, group_of_class = _collect_groups(g, graph, placeholder_keys, state_keys)
    sites = _find_sites(model, graph, g, group_of_class, groups)
    return PermutationSpec(groups, fixed, sites)


def _collect_groups(g: _GraphAxes, graph, placeholder_keys, state_keys):
    members: dict[Axis, list[tuple[str, int]]] = defaultdict(list)
    fixed: dict[tuple[str, int], str] = {}
    for node in graph.nodes:
        key = placeholder_keys.get(node.name) if node.op == "placeholder" else None
        tensor = g.tensor(node)
        if key is None or key not in state_keys or tensor is None:
            continue
        for axis in range(g.rank(tensor)):
            reason = g.sets.fixed_reason((tensor, axis))
            if g.size(tensor, axis) == 1:
                reason = reason or "size 1"
            if reason is not None:
                fixed[(key, axis)] = reason
            else:
                members[g.sets.find((tensor, axis))].append((key, axis))
    groups: dict[str, PermutationGroup] = {}
    group_of_class: dict[Axis, str] = {}
    for root, axes in members.items():
        name = axes[0][0].rsplit(".", 1)[0] or axes[0][0]
        while name in groups:
            name += "'"
        size = g.size(g.tensor(_node_named(graph, placeholder_keys, axes[0][0])), axes[0][1])
        groups[name] = PermutationGroup(name, size, axes)
        group_of_class[root] = name
    return groups, fixed, group_of_class


def _node_named(graph, placeholder_keys, key):
    for node in graph.nodes:
        if node.op == "placeholder" and placeholder_keys.get(node.name) == key:
            return node
    raise KeyError(key)


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return "linear"
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return "batchnorm"
    if "Norm" in type(module).__name__:
        return "norm"
    if type(module).__module__ in ("torch.nn.modules.activation", "transformers.activations"):
        return "activation"
    return None


def _leaf(node) -> tuple[str, str] | None:
    """(module path, call key) of the innermost module a node was traced in."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    key, (path, _) = list(stack.items())[-1]
    return path, key


def _find_sites(model, graph, g: _GraphAxes, group_of_class, groups) -> list[ActivationSite]:
    """Module outputs whose one permutable axis belongs to a group."""
    modules = dict(model.named_modules())
    nodes_of: dict[str, list] = defaultdict(list)
    calls_of: dict[str, set] = defaultdict(set)
    for node in graph.nodes:
        if node.op != "call_function" or _leaf(node) is None:
            continue
        path, key = _leaf(node)
        nodes_of[path].append(node)
        calls_of[path].add(key)
    sites = []
    for path, nodes in nodes_of.items():
        module = modules.get(path)
        kind = _module_kind(module) if module is not None else None
        # A module called twice has two outputs; a forward hook could not tell them apart.
        if kind is None or len(calls_of[path]) != 1 or any(True for _ in module.children()):
            continue
        inside = set(nodes)
        exits = [n for n in nodes if any(user not in inside for user in n.users)]
        out = g.tensor(exits[-1]) if exits else None
        if out is None:
            continue
        axes = [
            (axis, group_of_class[g.sets.find((out, axis))])
            for axis in range(g.rank(out))
            if g.sets.fixed_reason((out, axis)) is None and g.sets.find((out, axis)) in group_of_class
        ]
        if len(axes) != 1:
            continue
        axis, group = axes[0]
        site = ActivationSite(module=path, axis=axis, group=group, kind=kind)
        if kind == "linear":
            site.weight = f"{path}.weight"
            site.bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
            users = list(exits[-1].users)
            if len(users) == 1 and _leaf(users[0]) is not None:
                path_bn = _leaf(users[0])[0]
                consumer = modules.get(path_bn)
                # Only a BatchNorm over this layer's own units (the same group) corrects it.
                if isinstance(consumer, nn.modules.batchnorm._BatchNorm) and consumer.affine and (
                    (f"{path_bn}.weight", 0) in groups[group].members
                ):
                    site.batchnorm = path_bn
        elif kind == "norm" and all(
            getattr(module, name, None) is not None and (f"{path}.{name}", 0) in groups[group].members
            and getattr(module, name).dim() == 1 for name in ("weight", "bias")
        ):
            # A per-unit affine after the normalisation: a correction of this output folds into it.
            site.weight, site.bias = f"{path}.weight", f"{path}.bias"
        sites.append(site)
    return sites
