"""Discover a model's permutation spec from its ``torch.export`` graph.

In: a model and one example input. Out: a :class:`~hfrepair.spec.PermutationSpec`.

Every axis of every tensor in the graph is an element of a union-find. A table of rules
per ATen op says which axes an op forces to share one permutation (a conv ties its output
channels to its weight rows and bias; an add ties its operands' aligned axes; a linear
ties its input features to its weight columns ...). Axes reachable from the model's
inputs or outputs, and all axes touched by an op without a rule, are fixed. Each class
that holds state_dict axes and no fixed axis is a permutation group.

A class can be split into parts that are classes of their own: a reshape of ``H * D``
into ``H, D`` makes heads and head dims, ``split``/``cat``/``slice`` make concatenated
pieces (GPT-2's fused QKV, skip concatenations). Weights then hold a group's units in a
block pattern (see :mod:`hfrepair.spec`). The attention op names the heads and head-dim
classes; head dims laid out inside their heads in every weight get one permutation per
head. Groups get a kind (stream, heads, head_dims, mlp, channels) for reports.

We wrote this rather than use a symbolic tracer: ``torch.fx.symbolic_trace`` fails on the
transformers vision models, while ``torch.export(strict=False)`` captures them, with each
node's module path and shape.
"""

from __future__ import annotations

import inspect
import operator
import re
from collections import defaultdict
from collections.abc import Mapping

import torch
from torch import nn

from .batches import in_model_dtype
from .passes import kept_modes
from .spec import ActivationSite, PermutationGroup, PermutationSpec, StreamFold

Axis = tuple  # (tensor id, axis index)


class ExportError(RuntimeError):
    """The model could not be captured with ``torch.export``."""


class _AxisSets:
    """Union-find over tensor axes, remembering why a class is fixed and how it is split.

    A class can be split into parts, each a class of its own: a product (a reshape of
    ``H * D`` into ``H, D``) or a concatenation (``split``/``cat``/``slice`` along the
    axis). Tying two split classes ties their parts; parts that cannot be lined up (one
    split into 3 x 4, the other into 4 x 3) fix the whole class. A fixed class fixes its
    parts when groups are collected.
    """

    def __init__(self, size_of) -> None:
        self.parent: dict = {}
        self.reason: dict = {}
        self.parts: dict = {}  # root -> (kind, [elements]); kind "product" or "concat"
        self.sizes: dict = {}
        self.size_of = size_of
        self.fresh = 0

    def size(self, item) -> int:
        if item not in self.sizes:
            self.sizes[item] = self.size_of(item)
        return self.sizes[item]

    def find(self, item):
        self.parent.setdefault(item, item)
        root = item
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[item] != root:
            self.parent[item], item = root, self.parent[item]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        self.parent[rb] = ra
        if rb in self.reason:
            self.reason.setdefault(ra, self.reason.pop(rb))
        moved = self.parts.pop(rb, None)
        if moved is not None and not self._split_into(ra, *moved):
            self._conflict(ra, moved[1])

    def fix(self, item, reason: str) -> None:
        self.reason.setdefault(self.find(item), reason)

    def fixed_reason(self, item) -> str | None:
        return self.reason.get(self.find(item))

    def split(self, item, sizes: list[int], kind: str) -> list:
        """Elements standing for the parts of ``item``'s axis, in order."""
        elements = []
        for size in sizes:
            self.fresh += 1
            element = ("part", self.fresh)
            self.sizes[element] = size
            elements.append(element)
        if not self._split_into(item, kind, elements):
            self._conflict(item, elements)
        return elements

    def _conflict(self, item, elements) -> None:
        self.fix(item, "reshaped or split inconsistently")
        for element in elements:
            self.fix(element, "reshaped or split inconsistently")

    def _split_into(self, item, kind: str, elements: list) -> bool:
        root = self.find(item)
        if root not in self.parts:
            self.parts[root] = (kind, list(elements))
            return True
        known_kind, known = self.parts[root]
        return known_kind == kind and self._align(list(known), list(elements), kind)

    def _align(self, xs: list, ys: list, kind: str) -> bool:
        """Tie two splits of one axis part by part, splitting coarser parts further."""
        combine = (lambda t, s: t * s) if kind == "product" else (lambda t, s: t + s)
        while xs and ys:
            x, y = xs.pop(0), ys.pop(0)
            if self.size(x) == self.size(y):
                self.union(x, y)
                continue
            if self.size(x) > self.size(y):
                x, y, xs, ys = y, x, ys, xs
            finer, total = [x], self.size(x)
            while total < self.size(y) and xs:
                finer.append(xs.pop(0))
                total = combine(total, self.size(finer[-1]))
            if total != self.size(y) or not self._split_into(y, kind, finer):
                return False
        return not xs and not ys

    def propagate_fixes(self) -> None:
        """A fixed class fixes every part it is split into."""
        changed = True
        while changed:
            changed = False
            for root, (_, elements) in list(self.parts.items()):
                reason = self.reason.get(self.find(root))
                if reason is None:
                    continue
                for element in elements:
                    if self.find(element) not in self.reason:
                        self.reason[self.find(element)] = reason
                        changed = True

    def layout(self, item) -> list[tuple]:
        """``(root, offset, outers, inner, tags)`` blocks of the free classes that make up
        ``item``; ``tags`` names the class of each outer loop (the heads around head dims)."""
        root = self.find(item)
        if root in self.reason:
            return []
        if root not in self.parts:
            return [(root, 0, (), 1, ())]
        kind, elements = self.parts[root]
        sizes = [self.size(e) for e in elements]
        blocks = []
        for index, element in enumerate(elements):
            if kind == "concat":
                start = sum(sizes[:index])
                blocks += [(r, offset + start, *rest) for r, offset, *rest in self.layout(element)]
                continue
            after = 1
            for size in sizes[index + 1:]:
                after *= size
            loops = [loop for e in elements[:index] for loop in self._loops(e)]
            strides, stride = [], sizes[index] * after
            for count, _ in reversed(loops):
                strides.insert(0, stride)
                stride *= count
            head = tuple((count, st) for (count, _), st in zip(loops, strides))
            head_tags = tuple(tag for _, tag in loops)
            blocks += [
                (r, offset * after, head + tuple((c, st * after) for c, st in outers), inner * after, head_tags + tags)
                for r, offset, outers, inner, tags in self.layout(element)
            ]
        return blocks

    def _loops(self, item) -> list[tuple]:
        """(count, class) of each index an element stands for, product parts expanded."""
        root = self.find(item)
        kind, elements = self.parts.get(root, (None, []))
        if kind != "product":
            return [(self.size(root), root)]
        return [loop for e in elements for loop in self._loops(e)]


def _shape(value) -> tuple[int, ...] | None:
    return tuple(int(d) for d in value.shape) if isinstance(value, torch.Tensor) else None


class _GraphAxes:
    """Axis bookkeeping for one exported graph: shapes and ids of every tensor value."""

    def __init__(self, graph: torch.fx.Graph) -> None:
        self.sets = _AxisSets(lambda item: self.shapes[item[0]][item[1]])
        self.roles: list = []  # (axis class, role) of attention heads and head dims, to name groups
        self.attention: list = []  # (heads, q/k dims, v dims) axes of every attention op
        self.conv_modules: set[str] = set()
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

    def split(self, tensor, axis: int, sizes: list[int], kind: str) -> list:
        """Parts of one axis (``product``: a reshape's factors; ``concat``: pieces in order)."""
        return self.sets.split((tensor, axis % self.rank(tensor)), sizes, kind)

    def tie_part(self, part, tensor, axis: int) -> None:
        if tensor is not None:
            self.sets.union(part, (tensor, axis % self.rank(tensor)))


# ---- rules: one function per family of ATen ops -------------------------------------------

_UNARY = {
    "relu", "gelu", "silu", "sigmoid", "tanh", "hardtanh", "hardswish", "hardsigmoid", "leaky_relu",
    "elu", "selu", "celu", "mish", "softplus", "dropout", "feature_dropout", "alpha_dropout",
    "clone", "contiguous", "detach", "alias", "to", "_to_copy", "type_as", "pow", "sqrt", "rsqrt",
    "exp", "log", "neg", "abs", "erf", "reciprocal", "square", "softmax", "log_softmax",
    "zeros_like", "ones_like", "full_like", "empty_like", "clamp", "clamp_min", "clamp_max",
    "lift_fresh_copy", "_softmax", "_log_softmax", "sign", "floor", "ceil", "round", "identity",
    "cos", "sin",
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
    """G groups of C/G channels: whole groups permute, and channels within every group."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    groups = node.args[1]
    for axis in range(g.rank(src)):
        g.tie(src, axis, out, axis)
    for arg in node.args[2:4]:
        g.tie(src, 1, g.tensor(arg), 0)
    if groups not in (1, g.size(src, 1)):
        g.split(src, 1, [groups, g.size(src, 1) // groups], "product")


def _spans(sizes_a: list[int], sizes_b: list[int]):
    """Pair runs of axes with equal products: (runs of ``a``, runs of ``b``) index lists."""
    i = j = 0
    while i < len(sizes_a) and j < len(sizes_b):
        span_a, span_b = [i], [j]
        size_a, size_b = sizes_a[i], sizes_b[j]
        while size_a != size_b:
            if size_a < size_b and i + 1 < len(sizes_a):
                i += 1
                span_a.append(i)
                size_a *= sizes_a[i]
            elif size_b < size_a and j + 1 < len(sizes_b):
                j += 1
                span_b.append(j)
                size_b *= sizes_b[j]
            else:
                break
        yield span_a, span_b, size_a == size_b
        i, j = i + 1, j + 1


def _rule_reshape(g: _GraphAxes, node) -> None:
    """A reshape keeps, splits or merges axes: an axis split into ``H x D`` becomes a product
    of two classes (heads and head dims), which can each still be permuted."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    if src is None or out is None:
        _rule_unknown(g, node)
        return
    a = [i for i, d in enumerate(g.shapes[src]) if d != 1]
    b = [i for i, d in enumerate(g.shapes[out]) if d != 1]
    covered_a, covered_b = set(), set()
    for span_a, span_b, equal in _spans([g.size(src, i) for i in a], [g.size(out, j) for j in b]):
        axes_a, axes_b = [a[i] for i in span_a], [b[j] for j in span_b]
        covered_a.update(axes_a)
        covered_b.update(axes_b)
        if equal and len(axes_a) == 1 and len(axes_b) == 1:
            g.tie(src, axes_a[0], out, axes_b[0])
        elif equal and len(axes_a) == 1:
            for part, axis in zip(g.split(src, axes_a[0], [g.size(out, x) for x in axes_b], "product"), axes_b):
                g.tie_part(part, out, axis)
        elif equal and len(axes_b) == 1:
            for part, axis in zip(g.split(out, axes_b[0], [g.size(src, x) for x in axes_a], "product"), axes_a):
                g.tie_part(part, src, axis)
        else:
            for axis in axes_a:
                g.fix(src, axis, "regrouped by a reshape")
            for axis in axes_b:
                g.fix(out, axis, "regrouped by a reshape")
    for axis in set(a) - covered_a:
        g.fix(src, axis, "regrouped by a reshape")
    for axis in set(b) - covered_b:
        g.fix(out, axis, "regrouped by a reshape")


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
    """A slice is one piece of its axis (before, piece, after); a select removes the axis."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    if src is None or out is None:
        _rule_unknown(g, node)
        return
    dim = (node.args[1] if len(node.args) > 1 else 0) % g.rank(src)
    name = _op_name(node)
    for axis in range(g.rank(src)):
        if axis != dim:
            g.tie(src, axis, out, axis - 1 if name == "select" and axis > dim else axis)
    if name == "select":
        g.fix(src, dim, "select along this axis")
        return
    length, piece = g.size(src, dim), g.size(out, dim)
    start = node.args[2] if len(node.args) > 2 and node.args[2] is not None else 0
    step = node.args[4] if len(node.args) > 4 else 1
    if not isinstance(start, int) or step != 1:
        g.fix(src, dim, "strided or dynamic slice")
        g.fix(out, dim, "strided or dynamic slice")
        return
    start = max(0, min(length, start + length if start < 0 else start))
    if piece == length:
        g.tie(src, dim, out, dim)
        return
    parts = g.split(src, dim, [size for size in (start, piece, length - start - piece) if size], "concat")
    g.tie_part(parts[1 if start else 0], out, dim)


def _rule_split(g: _GraphAxes, node) -> None:
    """``split``/``chunk``: the axis is the concatenation of the pieces (GPT-2's fused QKV)."""
    src, pieces = g.tensor(node.args[0]), _outputs(g, node)
    if src is None or not pieces:
        _rule_unknown(g, node)
        return
    dim = (node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)) % g.rank(src)
    for piece in pieces:
        for axis in range(g.rank(src)):
            if axis != dim:
                g.tie(src, axis, piece, axis)
    for part, piece in zip(g.split(src, dim, [g.size(p, dim) for p in pieces], "concat"), pieces):
        g.tie_part(part, piece, dim)


def _rule_unbind(g: _GraphAxes, node) -> None:
    src, pieces = g.tensor(node.args[0]), _outputs(g, node)
    dim = (node.args[1] if len(node.args) > 1 else 0) % g.rank(src)
    g.fix(src, dim, "unbound along this axis")
    for piece in pieces:
        for axis in range(g.rank(src)):
            if axis != dim:
                g.tie(src, axis, piece, axis - (axis > dim))


def _rule_cat(g: _GraphAxes, node) -> None:
    """Concatenation: each input keeps its own classes on its slice of the output axis."""
    out = g.tensor(node)
    dim = (node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)) % g.rank(out)
    inputs = [g.tensor(arg) for arg in node.args[0]]
    inputs = [src for src in inputs if src is not None and g.rank(src) == g.rank(out) and g.size(src, dim)]
    for src in inputs:
        for axis in range(g.rank(out)):
            if axis != dim:
                g.tie(src, axis, out, axis)
    if len(inputs) == 1:
        g.tie(inputs[0], dim, out, dim)
        return
    for part, src in zip(g.split(out, dim, [g.size(src, dim) for src in inputs], "concat"), inputs):
        g.tie_part(part, src, dim)


def _rule_index_select(g: _GraphAxes, node) -> None:
    src, out = g.tensor(node.args[0]), g.tensor(node)
    dim = node.args[1] % g.rank(src)
    for axis in range(g.rank(src)):
        if axis == dim:
            g.fix(src, axis, "indexed along this axis")
            g.fix(out, axis, "indexed along this axis")
        else:
            g.tie(src, axis, out, axis)
    g.fix_all(g.tensor(node.args[2]), "index")


def _rule_pad(g: _GraphAxes, node) -> None:
    """Padding fixes the padded (spatial) axes and keeps every other axis, channels included."""
    src, out = g.tensor(node.args[0]), g.tensor(node)
    pad = list(node.args[1])
    padded = {g.rank(src) - 1 - i // 2 for i, amount in enumerate(pad) if amount}
    for axis in range(g.rank(src)):
        if axis in padded:
            g.fix(src, axis, "padded axis")
            g.fix(out, axis, "padded axis")
        else:
            g.tie(src, axis, out, axis)


def _rule_embedding(g: _GraphAxes, node) -> None:
    """An embedding's columns are the units of its output; vocabulary rows stay fixed."""
    weight, indices, out = g.tensor(node.args[0]), g.tensor(node.args[1]), g.tensor(node)
    g.fix(weight, 0, "vocabulary or position rows")
    g.tie(weight, 1, out, -1)
    for axis in range(g.rank(indices)):
        g.tie(indices, axis, out, axis)


def _rule_addmm(g: _GraphAxes, node) -> None:
    """``bias + x @ W`` (GPT-2's Conv1D stores W as (in, out))."""
    bias, src, weight, out = (g.tensor(a) for a in (*node.args[:3], node))
    g.tie(src, 0, out, 0)
    g.tie(src, 1, weight, 0)
    g.tie(weight, 1, out, 1)
    if bias is not None:
        offset = g.rank(out) - g.rank(bias)
        for axis in range(g.rank(bias)):
            if g.size(bias, axis) == g.size(out, axis + offset):
                g.tie(bias, axis, out, axis + offset)


def _rule_attention(g: _GraphAxes, node) -> None:
    """``scaled_dot_product_attention(q, k, v)`` on (..., heads, length, dims): heads are a
    batch axis shared by q, k, v and the output (under grouped-query attention the query
    heads split into kv heads x queries per kv head); q and k share their dims; v's dims are
    the output's."""
    query, key, value, out = (g.tensor(a) for a in (*node.args[:3], node))
    mask = g.tensor(node.args[3]) if len(node.args) > 3 else g.tensor(node.kwargs.get("attn_mask"))
    rank = g.rank(query)
    for axis in range(rank - 3):
        for other in (key, value, out):
            g.tie(query, axis, other, axis)
    heads, kv_heads = g.size(query, -3), g.size(key, -3)
    if heads == kv_heads:
        for other in (key, value, out):
            g.tie(query, -3, other, -3)
        g.roles.append(((query, g.rank(query) - 3), "heads"))
    else:
        g.tie(key, -3, value, -3)
        for tensor in (query, out):
            kv, per_kv = g.split(tensor, -3, [kv_heads, heads // kv_heads], "product")
            g.tie_part(kv, key, -3)
        g.tie(query, -3, out, -3)
        g.roles += [(kv, "kv_heads"), (per_kv, "query_heads")]
    g.tie(query, -2, out, -2)
    g.tie(key, -2, value, -2)
    g.tie(query, -1, key, -1)
    g.tie(value, -1, out, -1)
    g.roles += [((query, g.rank(query) - 1), "qk_dims"), ((value, g.rank(value) - 1), "v_dims")]
    g.attention.append(((query, g.rank(query) - 3), (query, g.rank(query) - 1), (value, g.rank(value) - 1)))
    if mask is not None:
        # A per-head mask (a relative-position bias: Swin, BEiT) moves with the heads.
        offset = g.rank(query) - g.rank(mask)
        for axis in range(g.rank(mask)):
            if axis >= g.rank(mask) - 2:
                g.fix(mask, axis, "attention mask")
            elif g.size(mask, axis) != 1 and axis + offset >= 0 and g.size(mask, axis) == g.size(query, axis + offset):
                g.tie(mask, axis, query, axis + offset)
            else:
                g.fix(mask, axis, "attention mask")
        g.fix(query, -2, "sequence positions")
        g.fix(key, -2, "sequence positions")


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
    "expand": _rule_expand, "slice": _rule_slice, "select": _rule_slice, "cat": _rule_cat, "concat": _rule_cat,
    "getitem": _rule_getitem, "split": _rule_split, "split_with_sizes": _rule_split, "chunk": _rule_split,
    "tensor_split": _rule_unknown, "unbind": _rule_unbind, "index_select": _rule_index_select,
    "pad": _rule_pad, "constant_pad_nd": _rule_pad, "embedding": _rule_embedding, "addmm": _rule_addmm,
    "scaled_dot_product_attention": _rule_attention,
}


# ---- the discovery itself ------------------------------------------------------------------

def _without_cache(model: nn.Module) -> dict:
    """Keyword arguments that turn a transformers model's key/value cache off: with
    ``use_cache`` on (decoders' default), the output holds a ``DynamicCache``, which
    ``torch.export`` cannot flatten. The logits are the same without it."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"use_cache": False} if "use_cache" in parameters else {}


def export_model(model: nn.Module, example_inputs) -> torch.export.ExportedProgram:
    """The graph of ``model`` on a tensor, or on a mapping of keyword inputs (a padded text
    batch: ``input_ids``, ``attention_mask``, ...)."""
    example_inputs = in_model_dtype(example_inputs, model)
    if isinstance(example_inputs, Mapping):
        args, keywords = (), {**example_inputs, **_without_cache(model)}
    else:
        args, keywords = (example_inputs,), _without_cache(model)
    # A config that asks for the cache is switched off too (for a forward that reads it
    # from the config alone) and restored afterwards.
    config = getattr(model, "config", None)
    cached = getattr(config, "use_cache", None)
    try:
        if cached:
            config.use_cache = False
        with torch.no_grad(), kept_modes(model):
            return torch.export.export(model, args, keywords, strict=False)
    except Exception as error:  # export raises many types; all mean the same to our users
        raise ExportError(
            f"torch.export could not capture {type(model).__name__} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "write a permutation spec by hand (hfrepair.PermutationSpec / --spec FILE)"
        ) from error
    finally:
        if cached:
            config.use_cache = cached


def discover_spec(model: nn.Module, example_inputs) -> PermutationSpec:
    """The permutation spec of ``model``, from its export graph on ``example_inputs`` (a
    tensor, or a mapping of keyword inputs such as a tokenizer's output)."""
    if not (isinstance(example_inputs, torch.Tensor) or (isinstance(example_inputs, Mapping) and all(
            isinstance(value, torch.Tensor) for value in example_inputs.values()))):
        raise ValueError("example_inputs must be a batch of inputs: a tensor, or a mapping of names to tensors, "
                         f"not {type(example_inputs).__name__}")
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
            try:
                _RULES.get(name, _rule_unknown)(g, node)
            except Exception:  # an argument pattern a rule does not expect: treat the op as unknown
                _rule_unknown(g, node)
        else:
            for out in _outputs(g, node):
                g.fix_all(out, f"unsupported graph node {node.op}")

    g.sets.propagate_fixes()
    groups, fixed, group_of_class = _collect_groups(g, graph, placeholder_keys, tied_state_keys(model))
    sites, site_at = _find_sites(model, graph, g, group_of_class, groups)
    streams = _stream_folds(graph, g, group_of_class, placeholder_keys, sites, site_at)
    return PermutationSpec(_name_kinds(g, groups, group_of_class, sites), fixed, sites, streams)


def tied_state_keys(model: nn.Module) -> dict[str, list[str]]:
    """state_dict key -> every key holding the same tensor (tied weights: GPT-2's ``wte`` and
    ``lm_head``). The graph has one input for them; each key must move with it."""
    by_storage = defaultdict(list)
    for key, value in model.state_dict(keep_vars=True).items():
        by_storage[(value.data_ptr(), tuple(value.shape), value.dtype)].append(key)
    return {key: keys for keys in by_storage.values() for key in keys}


def _fixed_reason(g: _GraphAxes, item) -> str:
    """Why ``item`` is fixed: its class's reason, else that of its first fixed part."""
    reason = g.sets.fixed_reason(item)
    for element in g.sets.parts.get(g.sets.find(item), (None, []))[1] if reason is None else ():
        part = _fixed_reason(g, element)
        if part != "fixed":
            return part
    return reason or "fixed"


def _collect_groups(g: _GraphAxes, graph, placeholder_keys, aliases):
    members: dict = defaultdict(list)
    fixed: dict[tuple[str, int], str] = {}
    # Tied weights can be lifted as one input per key, only one of them used (GPT-2's
    # ``wte`` and ``lm_head``): the used input decides for every alias.
    used = {alias for node in graph.nodes if node.op == "placeholder" and node.users
            for alias in aliases.get(placeholder_keys.get(node.name), ())}
    for node in graph.nodes:
        key = placeholder_keys.get(node.name) if node.op == "placeholder" else None
        tensor = g.tensor(node)
        if key is None or key not in aliases or tensor is None or (not node.users and key in used):
            continue
        for axis in range(g.rank(tensor)):
            item = (tensor, axis)
            blocks = g.sets.layout(item) if g.size(tensor, axis) > 1 else []
            covered = sum(g.sets.size(root) * inner * _copies(outers) for root, _, outers, inner, _ in blocks)
            for alias in aliases[key]:
                if g.size(tensor, axis) == 1:
                    fixed[(alias, axis)] = g.sets.fixed_reason(item) or "size 1"
                elif not blocks:
                    fixed[(alias, axis)] = _fixed_reason(g, item)
                elif covered < g.size(tensor, axis):
                    fixed[(alias, axis)] = f"partly fixed ({_fixed_reason(g, item)})"
                for block in blocks:
                    members[block[0]].append((alias, axis, g.size(tensor, axis), block))
    g.per_head = _per_head_dims(g, members)
    groups: dict[str, PermutationGroup] = {}
    group_of_class: dict = {}
    for root, raw in members.items():
        name = raw[0][0].rsplit(".", 1)[0] or raw[0][0]
        while name in groups:
            name += "'"
        axes = []
        for alias, axis, length, block in raw:
            pattern = _pattern(g, block)
            whole = pattern == (0, (), 1) and g.sets.size(root) == length
            axes.append((alias, axis) if whole else (alias, axis, *pattern))
        heads = g.sets.size(g.per_head[root]) if root in g.per_head else 1
        groups[name] = PermutationGroup(name, g.sets.size(root) * heads, axes, blocks=heads)
        group_of_class[root] = name
    return groups, fixed, group_of_class


def _per_head_dims(g: _GraphAxes, members: dict) -> dict:
    """Head-dim classes that can take one permutation per head: dims class -> heads class.

    That holds when every weight holding those dims lays them out inside the heads (each
    head's rows or columns apart), as q/k/v/o projections do; a per-dim weight shared by all
    heads (a q/k norm over head dims) keeps one permutation for all heads. Under
    grouped-query attention the dims follow the kv heads.
    """
    per_head = {}
    for heads_item, *dims_items in g.attention:
        heads = g.sets.find(heads_item)
        kind, parts = g.sets.parts.get(heads, (None, []))
        if kind == "product":
            heads = g.sets.find(parts[0])
        for item in dims_items:
            dims = g.sets.find(item)
            if dims in members and dims not in per_head and all(heads in block[4] for *_, block in members[dims]):
                per_head[dims] = heads
    # Any tensor that holds the dims without their heads (a mean over heads) mixes the heads'
    # dims: those keep one permutation for all heads.
    for tensor, shape in g.shapes.items():
        present, around = set(), set()
        for axis in range(len(shape)):
            around.add(g.sets.find((tensor, axis)))
            for root, *_, tags in g.sets.layout((tensor, axis)):
                present.add(root)
                around.update(tags)
                around.add(root)
        for dims in [d for d in per_head if d in present and per_head[d] not in around]:
            del per_head[dims]
    return per_head


def _pattern(g: _GraphAxes, block: tuple) -> tuple:
    """``(offset, outers, inner[, units])`` of a layout block, as members and sites store it;
    per-head dims take the heads' loop as their leading unit index."""
    root, offset, outers, inner, tags = block
    if root not in g.per_head:
        return offset, outers, inner
    k = tags.index(g.per_head[root])
    units = (outers[k], (g.sets.size(root), inner))
    return offset, outers[:k] + outers[k + 1:], inner, units


def _copies(outers) -> int:
    count = 1
    for number, _ in outers:
        count *= number
    return count


def _name_kinds(g: _GraphAxes, groups, group_of_class, sites) -> dict[str, PermutationGroup]:
    """Groups named and kinded by what their units are: attention heads or head dims (from
    the attention ops), a residual stream (written by layers of different blocks), conv
    channels, or hidden (MLP) units. Sites are renamed along."""
    roles: dict = {}
    pending = [(g.sets.find(item), role) for item, role in g.roles]
    while pending:  # parts inherit: the heads of grouped-query attention are kv heads x queries
        root, role = pending.pop()
        if roles.setdefault(root, role) != role:
            continue
        _, parts = g.sets.parts.get(root, (None, []))
        for index, part in enumerate(parts):
            inherited = role if role != "heads" else ("kv_heads" if index == 0 else "query_heads")
            pending.append((g.sets.find(part), inherited))
    renamed: dict[str, PermutationGroup] = {}
    new_name: dict[str, str] = {}
    for root, old in group_of_class.items():
        group = groups[old]
        writers = {s.module for s in sites if s.kind == "linear" and old in s.groups()}
        first = group.members[0][0].rsplit(".", 1)[0]
        if root in roles:
            group.kind = "head_dims" if roles[root].endswith("dims") else "heads"
            name = f"{first.rsplit('.', 1)[0]}.{roles[root]}"
        elif len({w.rsplit(".", 2)[0] for w in writers}) > 1 or (
                not writers & g.conv_modules and len({w.rsplit(".", 1)[0] for w in writers}) > 1):
            # Written in different blocks, or (a one-block transformer) by linear layers of
            # different parents (attention and MLP outputs; an MLP's gate and up projections
            # share one).
            group.kind, name = "stream", "stream"
        else:
            group.kind = "channels" if writers & g.conv_modules else "mlp"
            name = first
        while name in renamed:
            name += "'"
        group.name = name
        renamed[name] = group
        new_name[old] = name
    for site in sites:
        if site.group is not None:
            site.group = new_name[site.group]
        else:
            site.layout = [(new_name[b[0]], *b[1:]) for b in site.layout]
    return renamed


_LAYOUT_OPS = {"permute", "transpose", "view", "reshape", "contiguous", "clone", "to", "_to_copy", "dropout", "alias"}


def _through_layout_ops(node):
    """The node a tensor comes from once permutes, reshapes and casts are looked through."""
    while node.op == "call_function" and _op_name(node) in _LAYOUT_OPS and node.all_input_nodes:
        node = node.all_input_nodes[0]
    return node


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): a linear layer whose weight is stored (in, out)."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def _module_kind(module: nn.Module) -> str | None:
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or _is_conv1d(module):
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


def _unit_axis(g: _GraphAxes, tensor, group_of_class) -> tuple[int, list] | None:
    """``(axis, blocks)`` of a tensor's one axis that carries group units, or None when none or
    several of its axes do."""
    axes = []
    for axis in range(g.rank(tensor)):
        blocks = [b for b in g.sets.layout((tensor, axis)) if b[0] in group_of_class]
        if blocks:
            axes.append((axis, blocks))
    return axes[0] if len(axes) == 1 else None


def _whole_group(g: _GraphAxes, tensor, axis: int, blocks: list) -> bool:
    """Whether ``axis`` holds exactly one group's units, one per position."""
    return len(blocks) == 1 and _pattern(g, blocks[0]) == (0, (), 1) and \
        g.sets.size(blocks[0][0]) == g.size(tensor, axis)


def _find_sites(model, graph, g: _GraphAxes, group_of_class, groups) -> tuple[list[ActivationSite], dict]:
    """Module outputs whose one permutable axis belongs to a group, and each site by its
    module's output node."""
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
    exit_of = {}  # output node of each site's module
    site_at = {}
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
        sources = {a for n in nodes for a in n.all_input_nodes if a not in inside and a.op == "call_function"}
        found = _unit_axis(g, out, group_of_class)
        if found is None:
            continue
        axis, blocks = found
        if _whole_group(g, out, axis, blocks):
            site = ActivationSite(module=path, axis=axis, group=group_of_class[blocks[0][0]], kind=kind)
        else:
            # Per-head dims last: they are applied after the heads they sit in have moved.
            blocks = sorted(blocks, key=lambda b: b[0] in g.per_head)
            layout = [(group_of_class[b[0]], *_pattern(g, b)) for b in blocks]
            site = ActivationSite(module=path, axis=axis, group=None, kind=kind, layout=layout)
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            g.conv_modules.add(path)
        group = site.group
        if kind == "linear":
            site.weight = f"{path}.weight"
            site.weight_axis = 1 if _is_conv1d(module) else 0
            site.bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
            users = list(exits[-1].users)
            if group is not None and len(users) == 1 and _leaf(users[0]) is not None:
                path_bn = _leaf(users[0])[0]
                consumer = modules.get(path_bn)
                # Only a BatchNorm over this layer's own units (the same group) corrects it.
                if isinstance(consumer, nn.modules.batchnorm._BatchNorm) and consumer.affine and (
                    (f"{path_bn}.weight", 0) in groups[group].members
                ):
                    site.batchnorm = path_bn
        elif kind == "norm" and group is not None:
            # A per-unit affine after the normalisation: a correction of this output folds into
            # it (with a bias: scale and shift; weight only, as RMSNorm: the scale).
            affine = {name: getattr(module, name, None) for name in ("weight", "bias")}
            if all(isinstance(p, torch.Tensor) and p.dim() == 1 and (f"{path}.{name}", 0) in groups[group].members
                   for name, p in affine.items() if p is not None) and affine["weight"] is not None:
                site.weight = f"{path}.weight"
                site.bias = f"{path}.bias" if affine["bias"] is not None else None
            if len(sources) == 1:
                site.source = exit_of.get(_through_layout_ops(next(iter(sources))))
        exit_of[exits[-1]] = path
        site_at[exits[-1]] = site
        sites.append(site)
    return sites, site_at


# Ops that read a tensor through a weight: op -> (index of the input, index of the weight).
_READERS = {"conv1d": (0, 1), "conv2d": (0, 1), "conv3d": (0, 1), "convolution": (0, 1), "linear": (0, 1),
            "addmm": (1, 2)}


def _module_exits(graph) -> dict:
    """Output node -> the innermost module (called once, at any depth) whose only output it is:
    where a forward hook sees that node's value (a residual block's sum)."""
    nodes_of: dict[str, set] = defaultdict(set)
    calls_of: dict[str, set] = defaultdict(set)
    for node in graph.nodes:
        if node.op == "call_function":
            for key, (path, _) in (node.meta.get("nn_module_stack") or {}).items():
                nodes_of[path].add(node)
                calls_of[path].add(key)
    owner: dict = {}
    for path, nodes in nodes_of.items():
        exits = [n for n in nodes if any(user not in nodes for user in n.users)]
        if path and len(calls_of[path]) == 1 and len(exits) == 1 and len(path) > len(owner.get(exits[0], "")):
            owner[exits[0]] = path
    return owner


def _stream_folds(graph, g: _GraphAxes, group_of_class, placeholder_keys, sites, site_at) -> list[StreamFold]:
    """Stretches of residual streams whose sums' corrections fold into the weights.

    A sum ``t_k = t_{k-1} + branch`` qualifies when its branch ends in a conv/linear with a
    bias (through layout ops and at most one per-unit parameter product, a layer scale) and
    its hook point is a module's only output. A stretch starts at the output of a conv/linear
    with a bias or of a norm with an affine, and goes on while every other reader of the
    stream is a conv/linear reading it through its weight (which can take the inverse of a
    per-unit scale: the next branch's depthwise or pointwise conv); it ends at a sum read by
    anything else (a LayerNorm, a ReLU, pooling). ConvNeXt stages qualify. Pre-LN transformers
    read every sum through a LayerNorm, which no per-unit rescaling passes; BERT's post-LN
    sums are computed inside the module that normalises them, where no hook sees them; a
    ResNet applies a ReLU to its sums. Sum sites (kind ``sum``) are added to ``sites``.
    """
    owner = _module_exits(graph)
    sum_at: dict = {}  # add node -> its ActivationSite
    chains: list[list] = []  # [entry node, sum nodes...]

    def whole_group(node):
        """``(axis, class root)`` when one axis of ``node`` holds exactly one group's units."""
        tensor = g.tensor(node)
        found = _unit_axis(g, tensor, group_of_class) if tensor is not None else None
        return (found[0], found[1][0][0]) if found and _whole_group(g, tensor, *found) else None

    def in_group(node, root) -> bool:
        unit = whole_group(node)
        return unit is not None and unit[1] == root

    def upstream(node):
        while (node not in site_at and node not in sum_at and node.op == "call_function"
               and _op_name(node) in _LAYOUT_OPS and node.all_input_nodes):
            node = node.all_input_nodes[0]
        return node

    def branch_end(node, root):
        """(writer site, gain key) if ``node`` is a branch's output for the sum, else None."""
        gain = None
        while len(node.users) == 1 and node.op == "call_function":
            site = site_at.get(node)
            if site is not None:
                return (site, gain) if site.kind == "linear" and site.bias and in_group(node, root) else None
            name = _op_name(node)
            params = [a for a in node.all_input_nodes if a.op == "placeholder" and a.name in placeholder_keys]
            if name in _LAYOUT_OPS and node.all_input_nodes:
                node = node.all_input_nodes[0]
            elif name == "mul" and gain is None and len(params) == 1 and len(node.all_input_nodes) == 2 \
                    and g.rank(g.tensor(params[0])) == 1 and g.sets.size(root) == g.size(g.tensor(params[0]), 0):
                gain = placeholder_keys[params[0].name]
                node = next(a for a in node.all_input_nodes if a is not params[0])
            else:
                return None
        return None

    def entry_site(node, root):
        site = site_at.get(node)
        if site is None or not in_group(node, root):
            return None
        return site if (site.kind == "linear" and site.bias) or (site.kind == "norm" and site.weight and site.bias) \
            else None

    writers, gains = {}, {}
    for node in graph.nodes:
        operands = node.all_input_nodes if node.op == "call_function" and _op_name(node) == "add" else []
        unit = whole_group(node) if len(operands) == 2 and node.kwargs.get("alpha", 1) == 1 else None
        if unit is None or node not in owner:
            continue
        for residual, other in (operands, operands[::-1]):
            end = branch_end(other, unit[1])
            before = upstream(residual)
            if end is None or not (before in sum_at or entry_site(before, unit[1])):
                continue
            sum_at[node] = ActivationSite(module=owner[node], axis=unit[0], group=group_of_class[unit[1]], kind="sum")
            writers[node], gains[node] = end[0].module, end[1]
            chain = next((c for c in chains if c[-1] is before), None)
            if chain is None and before in sum_at:
                break  # the stream forks or its stretch was cut: this sum cannot fold
            if chain is None:
                chains.append(chain := [before])
            chain.append(node)
            break

    def readers(point, following, root):
        """[key, axis] of every weight reading ``point`` besides the next sum; None if some
        other op reads it."""
        found, pending = [], [(user, point) for user in point.users]
        while pending:
            user, value = pending.pop()
            name = _op_name(user) if user.op == "call_function" else None
            if user is following:  # the stream going on (the chain was built from this residual)
                continue
            if name in _LAYOUT_OPS and user not in site_at and user not in sum_at:
                pending += [(u, user) for u in user.users]
                continue
            if name not in _READERS or user.args[_READERS[name][0]] is not value:
                return None
            weight = user.args[_READERS[name][1]]
            key = placeholder_keys.get(getattr(weight, "name", None))
            tensor = g.tensor(weight)
            axis = 0 if name == "addmm" else 1
            if name != "linear" and name != "addmm" and g.size(tensor, 1) == 1 and g.size(tensor, 0) > 1:
                axis = 0  # a depthwise kernel: each channel's filter in its own row
            if key is None or g.sets.find((tensor, axis)) != g.sets.find(root):
                return None
            found.append([key, axis])
        return found

    folds = []
    for chain in chains:
        root = whole_group(chain[1])
        root = (g.tensor(chain[1]), root[0])
        read = []
        for k, point in enumerate(chain[:-1]):
            found = readers(point, chain[k + 1], root)
            if found is None:
                chain = chain[:k + 1]
                break
            read.append(found)
        if len(chain) < 2:
            continue
        for node in chain[1:]:
            sites.append(sum_at[node])
        folds.append(StreamFold(entry=site_at[chain[0]].module, sums=[sum_at[n].module for n in chain[1:]],
                                writers=[writers[n] for n in chain[1:]], gains=[gains[n] for n in chain[1:]],
                                readers=read[:len(chain) - 1]))
    return folds
