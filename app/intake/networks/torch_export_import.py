"""``torch.export`` programs (``.pt2`` from ``torch.export.save``) → :class:`ImportedNetwork`.

The program is loaded with ``torch.export.load`` from an archive that
:mod:`app.intake.networks.pt2_archive` checked first (nothing in it can run code) and its
ATen graph is walked node by node. Every activation becomes a spec layer; constants
(parameters, buffers, lifted tensors) are carried as tensors and folded eagerly, so weight
transposes (``permute`` before ``addmm``) and BatchNorm statistics end up inside the
preceding linear/conv. Anything that is not piecewise linear with ReLU gates is refused with
the op and the node named.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx

from app.core.spec import ArchSpec, _layer_shape
from app.intake.networks import ImportedNetwork, UnsupportedModel
from app.intake.networks.refusals import SOFTMAX_FLAG_HINT, why_not_piecewise

# Ops that only copy or re-label their first argument in eval mode.
_ALIASES = {"clone", "alias", "contiguous", "detach", "detach_", "dropout", "feature_dropout",
            "alpha_dropout", "lift_fresh_copy", "_to_copy", "to"}
# Ops known not to be piecewise linear with ReLU gates (refused outright, no retry).
_NOT_PL = {"gelu", "sigmoid", "tanh", "softmax", "_softmax", "log_softmax", "_log_softmax", "silu",
           "elu", "selu", "celu", "mish", "softplus", "exp", "log", "sqrt", "rsqrt", "pow", "erf",
           "hardswish", "hardsigmoid", "lstm", "gru", "rnn_tanh", "rnn_relu", "sin", "cos", "abs",
           "reciprocal", "var_mean", "native_layer_norm", "layer_norm", "group_norm"}
_BATCH_NORMS = {"batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm",
                "_native_batch_norm_legit", "_native_batch_norm_legit_functional", "cudnn_batch_norm"}
_IGNORED = {"_assert_scalar", "_assert_tensor_metadata", "sym_constrain_range_for_size",
            "sym_constrain_range", "_assert_async"}


class _NotYet(UnsupportedModel):
    """A refusal that a decomposed program might avoid (the op may lower to supported ones)."""


@dataclass(frozen=True)
class _Act:
    """An activation: the output of spec layer ``layer`` (−1 = the network input)."""

    layer: int


class _Symbolic:
    """A symbolic size (dynamic batch); never a tensor value."""


_SYM = _Symbolic()


def _op(node: fx.Node) -> str:
    target = node.target
    if target is operator.getitem:
        return "getitem"
    return str(getattr(target, "_opname", getattr(target, "__name__", target)))


def _full_op(node: fx.Node) -> str:
    target = node.target
    return str(target) if isinstance(target, torch._ops.OpOverload) else _op(node)


def _refuse(node: fx.Node, why: str, cls: type[UnsupportedModel] = UnsupportedModel) -> UnsupportedModel:
    return cls(f"{_full_op(node)} node {node.name!r}: {why}")


def _readers(node: fx.Node) -> list[fx.Node]:
    """The nodes that really consume ``node``: aliases and tuple projections are looked through."""
    out: list[fx.Node] = []
    for user in node.users:
        if _op(user) in _ALIASES or _op(user) == "getitem":
            out.extend(_readers(user))
        else:
            out.append(user)
    return out


def _pair(node: fx.Node, value: Any, what: str, default: int, one_d: bool) -> list[int]:
    """[h, w] from an int or a list (a 1-D op's [k] becomes [1, k])."""
    if value is None or (isinstance(value, (list, tuple)) and len(value) == 0):
        return [1 if one_d else default, default]
    if isinstance(value, (list, tuple)):
        values = [int(v) for v in value]
        if one_d:
            if len(values) != 1:
                raise _refuse(node, f"{what} {values} on a 1-D signal", _NotYet)
            return [1 if what != "padding" else 0, values[0]]
        if len(values) == 1:
            return values * 2
        if len(values) != 2:
            raise _refuse(node, f"{what} {values}: only 1-D and 2-D windows are supported", _NotYet)
        return values
    return [1 if one_d and what != "padding" else (0 if one_d else int(value)), int(value)]


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    """The raw fx argument by position or keyword."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _static(shape: Iterable[Any]) -> tuple[int | None, ...]:
    """Per-dim ints, None where symbolic."""
    return tuple(d if isinstance(d, int) else None for d in shape)


@dataclass
class _Walk:
    """The state of one pass over the graph: layers, weights, and what each node stands for."""

    input_shape: tuple[int, ...]
    input_node: fx.Node
    layers: list[dict[str, Any]] = field(default_factory=list)
    shapes: list[tuple[int, ...]] = field(default_factory=list)
    weights: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # float64
    producer: dict[int, fx.Node] = field(default_factory=dict)  # the node whose value is layer i
    env: dict[fx.Node, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    prelu: dict[int, torch.Tensor] = field(default_factory=dict)  # PReLU slopes by layer
    strip_softmax: bool = False
    stripped: str | None = None

    # ---- values --------------------------------------------------------------------------
    def value(self, node: fx.Node, arg: Any) -> Any:
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(node, a) for a in arg)
        return arg

    def act(self, node: fx.Node, arg: Any) -> _Act:
        v = self.value(node, arg)
        if not isinstance(v, _Act):
            raise _refuse(node, "expected an activation input here; not supported yet", _NotYet)
        return v

    def const(self, node: fx.Node, arg: Any) -> torch.Tensor | None:
        v = self.value(node, arg)
        if v is None or isinstance(v, torch.Tensor):
            return v
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return torch.tensor(float(v), dtype=torch.float64)
        raise _refuse(node, "expected a constant weight here; not supported yet", _NotYet)

    def shape_of(self, a: _Act) -> tuple[int, ...]:
        if a.layer == -1:  # a 1-D (C, L) input runs as (C, 1, L)
            shape = self.input_shape
            return (shape[0], 1, shape[1]) if len(shape) == 2 else shape
        return self.shapes[a.layer]

    @property
    def one_d(self) -> bool:
        return len(self.input_shape) == 2

    # ---- layers --------------------------------------------------------------------------
    def add_layer(self, node: fx.Node, layer: dict[str, Any], ins: list[_Act],
                  weights: tuple[torch.Tensor, torch.Tensor] | None = None) -> _Act:
        index = len(self.layers)
        if [a.layer for a in ins] != [index - 1]:
            layer = {**layer, "inputs": [a.layer for a in ins]}
        try:
            shape = _layer_shape(index, layer, [self.shape_of(a) for a in ins])
        except ValueError as e:
            raise _refuse(node, f"{e}; not supported yet", _NotYet) from None
        _check_meta_shape(node, shape)
        self.layers.append(layer)
        self.shapes.append(shape)
        if weights is not None:
            w, b = weights
            self.weights[index] = (w.detach().to(torch.float64), b.detach().to(torch.float64))
        self.producer[index] = node
        return _Act(index)

    def foldable(self, node: fx.Node, a: _Act) -> bool:
        """``a`` is a linear/conv output that nothing but ``node`` reads (so it may absorb an affine)."""
        if a.layer < 0 or self.layers[a.layer]["type"] not in ("linear", "conv"):
            return False
        return _readers(self.producer[a.layer]) == [node]

    def fold_affine(self, node: fx.Node, a: _Act, scale: torch.Tensor, shift: torch.Tensor) -> _Act:
        """Per-output-channel y = x·scale + shift, absorbed into the layer that made ``a``."""
        w, b = self.weights[a.layer]
        view = (-1,) + (1,) * (w.dim() - 1)
        self.weights[a.layer] = (w * scale.reshape(view), b * scale + shift)
        self.producer[a.layer] = node
        return a


def _check_meta_shape(node: fx.Node, shape: tuple[int, ...]) -> None:
    """The spec's shape must agree with what torch traced (catches ceil_mode, odd paddings, …)."""
    val = node.meta.get("val")
    if isinstance(val, (tuple, list)):
        val = val[0]
    if not isinstance(val, torch.Tensor):
        return
    traced = _static(val.shape[1:])
    if len(traced) != len(shape):  # a 1-D tensor (C, L) is (C, 1, L) here
        traced, shape = tuple(t for t in traced if t != 1), tuple(s for s in shape if s != 1)
    agree = len(traced) == len(shape) and all(t in (None, s) for t, s in zip(traced, shape, strict=True))
    if not agree:
        raise _refuse(node, f"output shape {tuple(val.shape[1:])} differs from the layer's {shape} "
                      "(ceil_mode or asymmetric padding?); not supported yet", _NotYet)


# ---- handlers: one per op family -----------------------------------------------------------
def _linear(w: _Walk, node: fx.Node) -> _Act:
    x = w.act(node, node.args[0])
    weight, bias = w.const(node, node.args[1]), w.const(node, _arg(node, 2, "bias"))
    return _linear_layer(w, node, x, weight, bias)


def _linear_layer(w: _Walk, node: fx.Node, x: _Act, weight: torch.Tensor | None,
                  bias: torch.Tensor | None) -> _Act:
    shape = w.shape_of(x)
    if weight is None or weight.dim() != 2 or len(shape) != 1 or weight.shape[1] != shape[0]:
        raise _refuse(node, f"a matrix product on a per-sample shape {shape} (needs a flat input); "
                      "not supported yet", _NotYet)
    out = weight.shape[0]
    b = torch.zeros(out, dtype=torch.float64) if bias is None else torch.broadcast_to(bias, (out,))
    return w.add_layer(node, {"type": "linear", "out": int(out)}, [x], (weight, b))


def _addmm(w: _Walk, node: fx.Node) -> _Act:
    if _arg(node, 3, "beta", 1) != 1 or _arg(node, 4, "alpha", 1) != 1:
        raise _refuse(node, "beta/alpha ≠ 1: not supported yet", _NotYet)
    bias, x, wt = w.const(node, node.args[0]), w.act(node, node.args[1]), w.const(node, node.args[2])
    return _linear_layer(w, node, x, None if wt is None else wt.T, bias)


def _mm(w: _Walk, node: fx.Node) -> _Act:
    x, wt = w.act(node, node.args[0]), w.const(node, node.args[1])
    return _linear_layer(w, node, x, None if wt is None or wt.dim() != 2 else wt.T, None)


def _conv(w: _Walk, node: fx.Node) -> _Act:
    op = _op(node)
    x, weight = w.act(node, node.args[0]), w.const(node, node.args[1])
    bias = w.const(node, _arg(node, 2, "bias"))
    if op == "convolution":
        if _arg(node, 6, "transposed", False):
            raise _refuse(node, "transposed convolution: not supported yet", _NotYet)
        stride, padding, dilation = node.args[3], node.args[4], node.args[5]
        groups = _arg(node, 8, "groups", 1)
    else:
        stride, padding = _arg(node, 3, "stride", 1), _arg(node, 4, "padding", 0)
        dilation, groups = _arg(node, 5, "dilation", 1), _arg(node, 6, "groups", 1)
    one_d = w.one_d
    if weight is None or weight.dim() != (3 if one_d else 4):
        raise _refuse(node, "only 1-D convolutions on (C, L) and 2-D on (C, H, W) inputs are supported yet",
                      _NotYet)
    if one_d:
        weight = weight.unsqueeze(2)  # (O, I, k) → (O, I, 1, k)
    k = [int(v) for v in weight.shape[2:]]
    d = _pair(node, dilation, "dilation", 1, one_d)
    s = _pair(node, stride, "stride", 1, one_d)
    if isinstance(padding, str):  # conv2d.padding overload: 'valid' / 'same'
        if padding == "same" and (s != [1, 1] or any((kk - 1) * dd % 2 for kk, dd in zip(k, d, strict=True))):
            raise _refuse(node, "padding='same' with an even kernel or a stride: not supported yet", _NotYet)
        p = [0, 0] if padding == "valid" else [(kk - 1) * dd // 2 for kk, dd in zip(k, d, strict=True)]
    else:
        p = _pair(node, padding, "padding", 0, one_d)
    out = int(weight.shape[0])
    b = torch.zeros(out, dtype=torch.float64) if bias is None else bias
    if k[0] == k[1] and s[0] == s[1] and p[0] == p[1] and d == [1, 1]:  # the plain square window
        layer = {"type": "conv", "out": out, "kernel": k[0], "stride": s[0], "padding": p[0],
                 "groups": int(groups)}
    else:
        layer = {"type": "conv", "out": out, "kernel": k, "stride": s, "padding": p, "groups": int(groups)}
        if d != [1, 1]:
            layer["dilation"] = d
    return w.add_layer(node, layer, [x], (weight, b))


def _relu(w: _Walk, node: fx.Node) -> _Act:
    src = node.args[0]
    out = w.add_layer(node, {"type": "relu"}, [w.act(node, src)])
    if _op(node).endswith("_") and isinstance(src, fx.Node):
        w.env[src] = out  # in place: later readers of the argument see the rectified value
    return out


def _leaky_relu(w: _Walk, node: fx.Node) -> _Act:
    alpha = float(_arg(node, 1, "negative_slope", 0.01))
    return _activation(w, node, {"type": "leaky_relu", "alpha": alpha})


def _hardtanh(w: _Walk, node: fx.Node) -> _Act:
    op = _op(node).rstrip("_")
    if op == "relu6":
        lo, hi = 0.0, 6.0
    elif op == "hardtanh":
        lo, hi = float(_arg(node, 1, "min_val", -1.0)), float(_arg(node, 2, "max_val", 1.0))
    else:  # clamp / clip / clamp_min / clamp_max with constant bounds
        lo_arg = None if op == "clamp_max" else _arg(node, 1, "min")
        hi_arg = (_arg(node, 1, "max") if op == "clamp_max" else
                  None if op == "clamp_min" else _arg(node, 2, "max"))
        for v in (lo_arg, hi_arg):
            if v is not None and not isinstance(v, (int, float)):
                raise _refuse(node, "clamp with tensor bounds: only constant scalar bounds are supported",
                              _NotYet)
        lo = None if lo_arg is None else float(lo_arg)
        hi = None if hi_arg is None else float(hi_arg)
        if lo == 0.0 and hi is None:
            return _activation(w, node, {"type": "relu"})
    return _activation(w, node, {"type": "hardtanh", "min": lo, "max": hi})


def _prelu(w: _Walk, node: fx.Node) -> _Act:
    x = w.act(node, node.args[0])
    slope = w.const(node, node.args[1])
    if slope is None:
        raise _refuse(node, "PReLU without a constant slope: not supported yet", _NotYet)
    flat = slope.reshape(-1)
    channels = w.shape_of(x)[0]
    if flat.numel() not in (1, channels):
        raise _refuse(node, f"PReLU with {flat.numel()} slopes for {channels} channels", _NotYet)
    out = w.add_layer(node, {"type": "prelu", "num_parameters": int(flat.numel())}, [x])
    w.prelu[out.layer] = flat.detach().to(torch.float32)
    return out


def _activation(w: _Walk, node: fx.Node, layer: dict[str, Any]) -> _Act:
    src = node.args[0]
    out = w.add_layer(node, layer, [w.act(node, src)])
    if _op(node).endswith("_") and isinstance(src, fx.Node):
        w.env[src] = out  # in place: later readers of the argument see the activated value
    return out


def _batch_norm(w: _Walk, node: fx.Node) -> Any:
    op = _op(node)
    training = {"batch_norm": 5, "native_batch_norm": 5, "cudnn_batch_norm": 5}.get(op)
    if op in ("_native_batch_norm_legit", "_native_batch_norm_legit_functional") or (
            training is not None and _arg(node, training, "training", False)):
        raise _refuse(node, "BatchNorm in training mode (batch statistics); call model.eval() before "
                      "torch.export.export")
    eps_index = {"_native_batch_norm_legit_no_training": 6}.get(op, 7)
    eps = float(_arg(node, eps_index, "eps", 1e-5))
    x = w.act(node, node.args[0])
    gamma, beta = w.const(node, node.args[1]), w.const(node, node.args[2])
    mean, var = w.const(node, node.args[3]), w.const(node, node.args[4])
    if mean is None or var is None:
        raise _refuse(node, "BatchNorm without running statistics cannot be folded")
    if not w.foldable(node, x):
        what = "the network input" if x.layer == -1 else f"a {w.layers[x.layer]['type']} output"
        if x.layer >= 0 and w.layers[x.layer]["type"] in ("linear", "conv"):
            what += " that is also read elsewhere"
        raise _refuse(node, f"BatchNorm reads {what}; it can only be folded into a linear/conv output "
                      "read by nothing else (a BatchNorm after a ReLU is not foldable)")
    inv = 1.0 / torch.sqrt(var.to(torch.float64) + eps)
    scale = inv if gamma is None else gamma.to(torch.float64) * inv
    shift = -mean.to(torch.float64) * scale + (0.0 if beta is None else beta.to(torch.float64))
    out = w.fold_affine(node, x, scale, shift)
    w.notes.append(f"folded BatchNorm {node.name!r} into layer {x.layer} ({w.layers[x.layer]['type']})")
    return out if op == "batch_norm" else (out, None, None)


def _pool_window(w: _Walk, node: fx.Node, ceil_index: int) -> dict[str, Any]:
    """kernel/stride/padding (+ ceil_mode) of a 1-D or 2-D pool; square ones keep int keys."""
    one_d = _op(node).startswith(("max_pool1d", "avg_pool1d"))
    if one_d != w.one_d:
        raise _refuse(node, "a pool whose rank differs from the input's: not supported yet", _NotYet)
    k = _pair(node, node.args[1], "kernel", 1, one_d)
    stride = _arg(node, 2, "stride")
    s = k if stride is None or (isinstance(stride, (list, tuple)) and not stride) else \
        _pair(node, stride, "stride", 1, one_d)
    p = _pair(node, _arg(node, 3, "padding", 0), "padding", 0, one_d)
    ceil = bool(_arg(node, ceil_index, "ceil_mode", False))
    if k[0] == k[1] and s[0] == s[1] and p[0] == p[1] and not ceil:
        return {"kernel": k[0], "stride": s[0], "padding": p[0]}
    return {"kernel": k, "stride": s, "padding": p, **({"ceil_mode": True} if ceil else {})}


def _maxpool(w: _Walk, node: fx.Node) -> Any:
    x = w.act(node, node.args[0])
    dilation = _arg(node, 4, "dilation", 1)
    if any(int(v) != 1 for v in (dilation if isinstance(dilation, (list, tuple)) else [dilation])):
        raise _refuse(node, "dilation ≠ 1: not supported yet", _NotYet)
    out = w.add_layer(node, {"type": "maxpool", **_pool_window(w, node, 5)}, [x])
    return (out, None) if _op(node).endswith("_with_indices") else out


def _avgpool(w: _Walk, node: fx.Node) -> _Act:
    x = w.act(node, node.args[0])
    if _arg(node, 6, "divisor_override") is not None:
        raise _refuse(node, "divisor_override: not supported yet", _NotYet)
    include = _arg(node, 5, "count_include_pad", True)
    layer = {"type": "avgpool", **_pool_window(w, node, 4), "count_include_pad": bool(include)}
    return w.add_layer(node, layer, [x])


def _adaptive_avgpool(w: _Walk, node: fx.Node) -> _Act:
    x = w.act(node, node.args[0])
    size = node.args[1]
    target = (int(size), int(size)) if isinstance(size, int) else tuple(int(v) for v in size)
    shape = w.shape_of(x)
    if all(t == 1 for t in target):  # global pooling (1-D: over L)
        return w.add_layer(node, {"type": "gap", "keepdim": True}, [x])
    if len(shape) == 3 and target[0] == target[1] and shape[1] == shape[2] and shape[1] % target[0] == 0:
        k = shape[1] // target[0]  # evenly dividing windows: a plain average pool
        return w.add_layer(node, {"type": "avgpool", "kernel": k, "stride": k, "padding": 0,
                                  "count_include_pad": True}, [x])
    raise _refuse(node, f"adaptive average pool {shape} → {target}: not supported yet", _NotYet)


def _mean(w: _Walk, node: fx.Node) -> _Act:
    x = w.act(node, node.args[0])
    src = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    ndim = src.dim() if isinstance(src, torch.Tensor) else len(w.shape_of(x)) + 1
    dims = _arg(node, 1, "dim")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if len(w.shape_of(x)) != 3 or sorted(d % ndim for d in dims) != ([2] if ndim == 3 else [2, 3]):
        raise _refuse(node, f"mean over dims {dims} of a rank-{ndim} tensor: not supported yet", _NotYet)
    return w.add_layer(node, {"type": "gap", "keepdim": bool(_arg(node, 2, "keepdim", False))}, [x])


def _reshape(w: _Walk, node: fx.Node) -> _Act:
    """flatten / view / reshape: only [N, …] → [N, -1] (a flatten), or a no-op."""
    x = w.act(node, node.args[0])
    shape = w.shape_of(x)
    val, src = node.meta.get("val"), node.args[0].meta.get("val")
    if not isinstance(val, torch.Tensor) or not isinstance(src, torch.Tensor):
        raise _refuse(node, "a reshape without traced shapes: not supported yet", _NotYet)
    out = tuple(val.shape[1:])
    if str(val.shape[0]) != str(src.shape[0]):
        raise _refuse(node, f"reshape {tuple(src.shape)} → {tuple(val.shape)} mixes the batch "
                      "dimension: not supported yet", _NotYet)
    if _static(out) == _static(src.shape[1:]):
        return x  # nothing changes per sample
    if len(out) > 1 and [d for d in _static(out) if d != 1] == [d for d in shape if d != 1]:
        return x  # only size-1 axes come or go (1-D pools are unsqueeze → 2-D pool → squeeze)
    if len(out) == 1:
        return w.add_layer(node, {"type": "flatten"}, [x])
    if x.layer == -1 and not w.layers and all(isinstance(d, int) for d in out) and \
            math.prod(out) == math.prod(shape) and _readers(w.input_node) == [node]:
        w.input_shape = tuple(int(d) for d in out)  # served inputs are reshaped to input_shape anyway
        w.notes.append(f"input reshape {node.name!r} → per-sample shape {w.input_shape}")
        return x
    raise _refuse(node, f"reshape {shape} → {out}: not supported yet", _NotYet)


def _arith(w: _Walk, node: fx.Node) -> Any:
    """add/sub/mul/div: activation + activation → residual add; activation ∘ constant → folded."""
    op = _op(node)
    a, b = w.value(node, node.args[0]), w.value(node, node.args[1])
    alpha = _arg(node, 2, "alpha", 1)
    acts = [isinstance(v, _Act) for v in (a, b)]
    if all(acts):
        if op in ("add", "add_") and alpha == 1:
            return w.add_layer(node, {"type": "add"}, [a, b])
        if op in ("mul", "mul_", "div", "div_"):
            raise _refuse(node, "not piecewise linear with ReLU gates (product of two activations)")
        raise _refuse(node, f"{op} of two activations: not supported yet", _NotYet)
    act, c = (a, b) if acts[0] else (b, a)
    c = w.const(node, c)
    if c is None:
        raise _refuse(node, "an operand is neither an activation nor a constant; not supported yet", _NotYet)
    scale, shift = _affine_of(node, c.to(torch.float64) * (alpha if op.startswith(("add", "sub")) else 1),
                              constant_first=not acts[0])
    if not w.foldable(node, act):
        raise _refuse(node, f"{op} with a constant onto something other than a linear/conv output read by "
                      "nothing else: not supported yet", _NotYet)
    per_channel = [_per_channel(node, t, w.shape_of(act)) for t in (scale, shift)]
    part = "weights and bias" if op.startswith(("mul", "div")) else "bias"
    w.notes.append(f"folded constant {op} {node.name!r} into the {part} of layer {act.layer} "
                   f"({w.layers[act.layer]['type']})")
    return w.fold_affine(node, act, *per_channel)


def _affine_of(node: fx.Node, c: torch.Tensor, constant_first: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift) of x ↦ x op c (or c op x)."""
    one, zero = torch.ones_like(c), torch.zeros_like(c)
    base = _op(node).rstrip("_")
    if base == "add":
        return one, c
    if base == "sub":
        return (-one, c) if constant_first else (one, -c)
    if base == "mul":
        return c, zero
    if constant_first:  # c / x is not affine
        raise _refuse(node, "not piecewise linear with ReLU gates (constant / activation)")
    return 1.0 / c, zero


def _per_channel(node: fx.Node, c: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """A constant broadcast onto a per-sample activation → one value per channel (else refused)."""
    try:
        full = torch.broadcast_to(c, (1, *shape))[0] if c.dim() <= len(shape) + 1 else None
    except RuntimeError:
        full = None
    if full is None or (c.dim() == len(shape) + 1 and c.shape[0] != 1):
        raise _refuse(node, f"constant of shape {tuple(c.shape)} does not broadcast per sample", _NotYet)
    channel = full.reshape(shape[0], -1)
    if not torch.equal(channel, channel[:, :1].expand_as(channel)):
        raise _refuse(node, "a constant that varies over spatial positions: not supported yet", _NotYet)
    return channel[:, 0].clone()


def _getitem(w: _Walk, node: fx.Node) -> Any:
    src = w.value(node, node.args[0])
    v = src[node.args[1]]
    if v is None and node.users:  # unused projections (BatchNorm statistics) are harmless
        raise _refuse(node, f"uses output {node.args[1]} of {node.args[0].name!r} (indices / batch "
                      "statistics): not supported yet", _NotYet)
    return v


_HANDLERS: dict[str, Callable[[_Walk, fx.Node], Any]] = {
    "linear": _linear, "addmm": _addmm, "mm": _mm, "matmul": _mm,
    "conv2d": _conv, "convolution": _conv, "_convolution": _conv,
    "relu": _relu, "relu_": _relu, "leaky_relu": _leaky_relu, "leaky_relu_": _leaky_relu,
    "prelu": _prelu, "_prelu_kernel": _prelu,
    **dict.fromkeys(["hardtanh", "hardtanh_", "relu6", "relu6_", "clamp", "clamp_", "clip", "clip_",
                     "clamp_min", "clamp_min_", "clamp_max", "clamp_max_"], _hardtanh),
    "conv1d": _conv,
    "max_pool2d": _maxpool, "max_pool2d_with_indices": _maxpool,
    "max_pool1d": _maxpool, "max_pool1d_with_indices": _maxpool, "avg_pool1d": _avgpool,
    "adaptive_avg_pool1d": _adaptive_avgpool,
    "squeeze": _reshape, "unsqueeze": _reshape,
    "avg_pool2d": _avgpool, "adaptive_avg_pool2d": _adaptive_avgpool,
    "_adaptive_avg_pool2d": _adaptive_avgpool, "mean": _mean,
    "flatten": _reshape, "view": _reshape, "reshape": _reshape, "_unsafe_view": _reshape,
    "add": _arith, "add_": _arith, "sub": _arith, "sub_": _arith, "mul": _arith, "mul_": _arith,
    "div": _arith, "div_": _arith,
    "getitem": _getitem,
    **dict.fromkeys(_BATCH_NORMS, _batch_norm),
}


# ---- the walk ---------------------------------------------------------------------------------
def _placeholders(ep: torch.export.ExportedProgram) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Constant tensors by placeholder name, and the user inputs' names."""
    sig = ep.graph_signature
    consts: dict[str, torch.Tensor] = {}
    names = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
             **sig.inputs_to_lifted_tensor_constants}
    for name, fqn in names.items():
        tensor = ep.state_dict[fqn] if fqn in ep.state_dict else ep.constants[fqn]
        consts[name] = tensor.detach().clone()  # in-place ops on constants must not touch the program
    return consts, [str(n) for n in sig.user_inputs]


def _program_input_shape(node: fx.Node, override: tuple[int, ...] | None) -> tuple[int, ...]:
    """The per-sample input shape: traced where static (an override must then only agree in size,
    since served inputs arrive flat anyway); the override fills dims exported as dynamic."""
    val = node.meta.get("val")
    traced = _static(val.shape[1:]) if isinstance(val, torch.Tensor) else None
    if override is not None:
        override = tuple(int(v) for v in override)
    if traced is None:
        if override is None:
            raise UnsupportedModel(f"input {node.name!r}: no traced shape; pass input_shape")
        return override
    if all(d is not None for d in traced):
        shape = tuple(int(d) for d in traced)  # type: ignore[arg-type]
        if override is not None and math.prod(override) != math.prod(shape):
            raise UnsupportedModel(f"input_shape {override} has {math.prod(override)} features; the "
                                   f"program's input {node.name!r} has shape {shape}")
        return shape  # inputs arrive flat and are reshaped to the program's own shape
    if override is None or len(override) != len(traced) or any(
            t is not None and t != o for t, o in zip(traced, override, strict=True)):
        raise UnsupportedModel(f"input {node.name!r} has dynamic per-sample dims "
                               f"{tuple(val.shape[1:])}; pass a matching input_shape (got {override})")
    return override


def _walk(ep: torch.export.ExportedProgram, input_shape: tuple[int, ...] | None,
          strip_softmax: bool = False) -> _Walk:
    graph = ep.graph_module.graph
    consts, user_inputs = _placeholders(ep)
    inputs = [n for n in graph.nodes if n.op == "placeholder" and n.name in user_inputs]
    if len(inputs) != 1:
        raise UnsupportedModel(f"the program takes {len(inputs)} inputs; exactly one tensor is supported")
    walk = _Walk(_program_input_shape(inputs[0], input_shape), inputs[0], strip_softmax=strip_softmax)
    for node in graph.nodes:
        if node.op == "placeholder":
            walk.env[node] = _Act(-1) if node is inputs[0] else consts.get(node.name)
        elif node.op == "get_attr":
            walk.env[node] = getattr(ep.graph_module, str(node.target))
        elif node.op == "call_function":
            walk.env[node] = _call(walk, node)
        elif node.op == "output":
            _finish(walk, node)
        else:
            raise _refuse(node, f"{node.op} nodes: not supported yet")
    return walk


def _call(w: _Walk, node: fx.Node) -> Any:
    op = _op(node)
    if op in _IGNORED:
        return None
    if op in ("sym_size", "sym_numel", "sym_stride") or not isinstance(node.meta.get("val"), (
            torch.Tensor, tuple, list, type(None))):
        return _SYM  # size arithmetic of a dynamic batch
    args = w.value(node, list(node.args))
    kwargs = {k: w.value(node, v) for k, v in node.kwargs.items()}
    if not _mentions_act(args) and not _mentions_act(list(kwargs.values())):
        return _constant_fold(node, args, kwargs)
    if op in _ALIASES:
        if op in ("dropout", "feature_dropout", "alpha_dropout") and _arg(node, 2, "train", False):
            raise _refuse(node, "dropout in training mode; call model.eval() before export")
        w.notes.append(f"removed {op} {node.name!r}")
        return args[0]
    if op in ("softmax", "_softmax", "log_softmax", "_log_softmax"):
        final = [u.op for u in node.users] == ["output"]
        if final and w.strip_softmax:
            w.stripped = "LogSoftmax" if "log" in op else "Softmax"
            w.notes.append(f"--strip-softmax: removed {op} {node.name!r}; the outputs are the logits")
            return w.act(node, node.args[0])
        raise _refuse(node, f"a {'final ' if final else ''}{op} is not piecewise linear"
                      + (SOFTMAX_FLAG_HINT if final else ""))
    if op in _NOT_PL:
        raise _refuse(node, why_not_piecewise(op))
    handler = _HANDLERS.get(op)
    if handler is None:
        raise _refuse(node, "not supported yet", _NotYet)
    return handler(w, node)


def _mentions_act(values: Any) -> bool:
    if isinstance(values, (_Act, _Symbolic)):
        return True
    if isinstance(values, (list, tuple)):
        return any(_mentions_act(v) for v in values)
    return False


def _constant_fold(node: fx.Node, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """Ops on weights only (transposes, lifted-constant copies) are evaluated right away."""
    try:
        with torch.no_grad():
            return node.target(*args, **kwargs)  # type: ignore[operator]
    except Exception as e:  # any failure: not a constant we can fold
        raise _refuse(node, f"could not evaluate on constants ({e}); not supported yet", _NotYet) from None


def _finish(w: _Walk, node: fx.Node) -> None:
    outs = node.args[0]
    outs = list(outs) if isinstance(outs, (list, tuple)) else [outs]
    if len(outs) != 1 or not isinstance(outs[0], fx.Node):
        raise UnsupportedModel(f"the program returns {len(outs)} outputs; exactly one tensor is supported")
    out = w.env[outs[0]]
    last = len(w.layers) - 1
    if not isinstance(out, _Act) or out.layer < 0:
        raise UnsupportedModel(f"output {outs[0].name!r} is not computed from the input by layers")
    kind = w.layers[out.layer]["type"]
    if kind != "linear":
        raise UnsupportedModel(f"output {outs[0].name!r} comes from a {kind} layer; the output layer must "
                               "be linear (export the logits)")
    if out.layer != last or w.layers[last].get("inputs", [last - 1]) != [last - 1]:
        raise UnsupportedModel(f"output {outs[0].name!r}: the output linear must be the last layer and read "
                               "the layer just before it; not supported yet")


def _to_imported(w: _Walk) -> ImportedNetwork:
    spec = ArchSpec(input_shape=w.input_shape, layers=tuple(w.layers), name="pt2")
    try:
        spec.shapes()
    except ValueError as e:
        raise UnsupportedModel(f"the imported layers do not form a valid spec: {e}") from None
    state: dict[str, torch.Tensor] = {}
    for i, (weight, bias) in sorted(w.weights.items()):
        state[f"blocks.{i}.weight"] = weight.to(torch.float32).contiguous()
        state[f"blocks.{i}.bias"] = bias.to(torch.float32).contiguous()
    for i, slope in w.prelu.items():
        state[f"blocks.{i}.weight"] = slope.contiguous()
    return ImportedNetwork(spec, state, "pt2", w.notes, stripped_softmax=w.stripped)


def _programs(ep: torch.export.ExportedProgram) -> Iterable[tuple[str, torch.export.ExportedProgram]]:
    """The program as saved, then (only if needed) lowered ATen forms whose ops may be supported."""
    yield "as exported", ep
    yield "run_decompositions({})", ep.run_decompositions({})
    yield "core ATen", ep.run_decompositions()


def import_pt2(path: str | Path, input_shape: tuple[int, ...] | None = None,
               strip_softmax: bool = False) -> ImportedNetwork:
    """A ``torch.export.save`` program → spec + ReLUNet weights (BatchNorm folded, Dropout removed)."""
    ep = _load(path)
    first: _NotYet | None = None
    for label, program in _programs(ep):
        try:
            imported = _to_imported(_walk(program, input_shape, strip_softmax))
        except _NotYet as e:
            first = first or e
            continue
        if label != "as exported":
            imported.notes.append(f"walked the program after {label}")
        return imported
    assert first is not None
    raise UnsupportedModel(str(first)) from None


def _load(path: str | Path) -> torch.export.ExportedProgram:
    from app.intake.networks.pt2_archive import checked_archive, weights_only_loads

    archive = checked_archive(path)  # raises UnsupportedModel before torch unpickles anything
    try:
        with weights_only_loads():
            return torch.export.load(archive)
    except Exception as e:  # a corrupt or foreign file: say so, with the cause
        raise UnsupportedModel(f"{Path(path).name}: not a torch.export program ({e})") from None


def run_pt2(path: str | Path, x: np.ndarray) -> np.ndarray:
    """The source program's outputs on flat (or already shaped) inputs: float32 [N, K].

    A program exported with a fixed batch size is run in chunks of that size (the last one padded).
    """
    ep = _load(path)
    node = next(n for n in ep.graph_module.graph.nodes
                if n.op == "placeholder" and n.name in [str(u) for u in ep.graph_signature.user_inputs])
    val = node.meta["val"]
    xt = torch.as_tensor(np.asarray(x, dtype=np.float32))
    if xt.dim() <= 2 and all(isinstance(d, int) for d in val.shape[1:]):
        xt = xt.reshape(xt.shape[0], *val.shape[1:])
    batch = val.shape[0] if isinstance(val.shape[0], int) else xt.shape[0]
    module = ep.module()
    outs = []
    with torch.no_grad():
        for start in range(0, xt.shape[0], max(batch, 1)):
            chunk = xt[start:start + batch]
            n = chunk.shape[0]
            if n < batch:
                chunk = torch.cat([chunk, chunk[-1:].expand(batch - n, *chunk.shape[1:])])
            out = module(chunk.to(val.dtype))
            out = out[0] if isinstance(out, (tuple, list)) else out
            outs.append(out[:n].reshape(n, -1))
    if not outs:
        return np.zeros((0, 0), dtype=np.float32)
    return torch.cat(outs).to(torch.float32).numpy()
