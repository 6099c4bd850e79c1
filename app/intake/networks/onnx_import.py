"""ONNX graph → :class:`ArchSpec` + ReLUNet weights, and a plain onnxruntime runner for checks.

The graph is read with the ``onnx`` package only (nothing is executed except the constant
sub-graphs, through ``onnx.reference``). Three passes:

1. walk the nodes (ONNX keeps them in topological order), turning each into a spec layer, an
   alias (Identity/Dropout/flatten of a flat tensor) or a constant; BatchNormalization and
   "Add a constant" become per-channel affine pseudo-layers;
2. fold every affine pseudo-layer into the Conv/Gemm/MatMul that feeds it (refused where that
   layer's output is read elsewhere, or where there is no such layer, e.g. BN after a ReLU);
3. drop what the output does not depend on and write the spec (``inputs`` only where a layer
   does not read the one before it).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from app.core.spec import ArchSpec, _layer_shape
from app.intake.networks import ImportedNetwork, UnsupportedModel
from app.intake.networks.refusals import SOFTMAX_FLAG_HINT, why_not_piecewise

MIN_OPSET = 13
# Ops that are smooth or otherwise not ReLU-gated: refused before anything else, so the message
# names the real culprit (GELU at opset < 20 is Div/Erf/Add/Mul: "Erf" beats "Div").
NOT_PIECEWISE = {
    "Sigmoid", "Tanh", "Gelu", "Erf", "Softmax", "LogSoftmax", "Exp", "Log", "Sqrt", "Reciprocal",
    "Pow", "Elu", "Selu", "Celu", "Softplus", "Softsign", "HardSigmoid", "HardSwish", "Mish",
    "Sin", "Cos", "LSTM", "GRU", "RNN", "Attention", "MultiHeadAttention", "LayerNormalization",
    "GroupNormalization", "InstanceNormalization", "LpNormalization",
}
HEAD_OPS = {"Softmax", "LogSoftmax"}
# what converters (skl2onnx) put after the probabilities: labels, maps; dropped with the softmax
LABEL_OPS = {"ArgMax", "ZipMap", "ArrayFeatureExtractor", "Reshape", "Identity", "Cast", "Squeeze",
             "Flatten"}


@dataclass
class _Layer:
    """One spec layer in the making (``kind`` "affine" is BN / a constant Add, folded away)."""

    kind: str
    op: str  # the ONNX op it came from, for notes and messages
    node: str
    inputs: list[str]
    output: str
    shape: tuple[int, ...]  # per-sample output shape
    attrs: dict[str, Any] = field(default_factory=dict)
    weight: np.ndarray | None = None  # affine: per-channel scale
    bias: np.ndarray | None = None  # affine: per-channel shift


def _refuse(node: onnx.NodeProto, why: str) -> UnsupportedModel:
    return UnsupportedModel(f"{node.op_type} node {_name(node)!r}: {why}")


def _name(node: onnx.NodeProto) -> str:
    return node.name or (node.output[0] if node.output else node.op_type)


def _attrs(node: onnx.NodeProto) -> dict[str, Any]:
    out = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    return {k: v.decode() if isinstance(v, bytes) else v for k, v in out.items()}


class _Reader:
    """Pass 1: the node walk. Activations are tracked by (canonical) name with per-sample shapes."""

    def __init__(self, model: onnx.ModelProto, input_name: str, input_shape: tuple[int, ...],
                 fixed_batch: int | None, opset: int) -> None:
        self.model, self.opset, self.fixed_batch = model, opset, fixed_batch
        self.const: dict[str, np.ndarray] = {
            t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        self.alias: dict[str, str] = {}
        self.one_d = len(input_shape) == 2  # (C, L) signals run as (C, 1, L)
        self.shapes: dict[str, tuple[int, ...]] = {
            input_name: (input_shape[0], 1, input_shape[1]) if self.one_d else tuple(input_shape)}
        self.layers: list[_Layer] = []
        self.notes: list[str] = []
        g = model.graph
        self.read = Counter(n for node in g.node for n in node.input if n) + Counter(o.name for o in g.output)

    # ---- tensors -------------------------------------------------------------------------
    def resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def act(self, node: onnx.NodeProto, name: str) -> tuple[str, tuple[int, ...]]:
        name = self.resolve(name)
        if name not in self.shapes:
            raise _refuse(node, f"input {name!r} is neither the network input nor a supported layer's "
                                "output (not supported yet)")
        return name, self.shapes[name]

    def is_act(self, name: str) -> bool:
        return self.resolve(name) in self.shapes

    def constant(self, node: onnx.NodeProto, name: str, what: str) -> np.ndarray:
        if name not in self.const:
            raise _refuse(node, f"{what} must be a constant (initializer or Constant node); it is computed "
                                "from the input (not piecewise linear with ReLU gates)")
        return self.const[name]

    def add(self, node: onnx.NodeProto, kind: str, inputs: list[str], shape: tuple[int, ...] | None,
            **kw: Any) -> None:
        if shape is None:  # the spec's own shape rule (windows, ceil_mode, 1-D)
            try:
                shape = _layer_shape(len(self.layers), {"type": kind, **kw.get("attrs", {})},
                                     [self.shapes[n] for n in inputs])
            except ValueError as exc:
                raise _refuse(node, str(exc)) from None
            known = getattr(self, "value_shapes", {}).get(node.output[0])
            if known is not None and [d for d in known if d != 1] != [d for d in shape if d != 1]:
                # ONNX's ceil_mode rule differs from torch's where the last window would start in
                # the end padding; serving the other shape would not be exact
                raise _refuse(node, f"output shape {known} by ONNX shape inference, {shape} by torch's "
                                    "rule (a ceil_mode window starting in the padding?): not supported yet")
        self.layers.append(_Layer(kind, node.op_type, _name(node), inputs, node.output[0], shape, **kw))
        self.shapes[node.output[0]] = shape

    def drop(self, node: onnx.NodeProto, source: str, why: str) -> None:
        self.alias[node.output[0]] = source
        self.notes.append(f"removed {node.op_type} node {_name(node)!r} ({why})")

    def unused_extra_outputs(self, node: onnx.NodeProto, what: str) -> None:
        if any(self.read[o] for o in node.output[1:] if o):
            raise _refuse(node, f"its {what} output is used (not supported yet)")

    # ---- the walk --------------------------------------------------------------------------
    def run(self, nodes: list[onnx.NodeProto] | None = None) -> None:
        for node in self.model.graph.node if nodes is None else nodes:
            if node.domain not in ("", "ai.onnx"):
                raise _refuse(node, f"custom-domain op ({node.domain}) not supported yet")
            if node.op_type == "Constant":
                self.const[node.output[0]] = _constant_value(node)
            elif node.input and all(n in self.const for n in node.input if n):
                self.fold_constant(node)
            else:
                handler = getattr(self, f"op_{node.op_type}", None)
                if handler is None:
                    raise _refuse(node, "not supported yet")
                handler(node)

    def fold_constant(self, node: onnx.NodeProto) -> None:
        """A node that reads only constants (shape arithmetic, weight transposes) is a constant."""
        from onnx.reference import ReferenceEvaluator

        try:
            values = ReferenceEvaluator(node).run(None, {n: self.const[n] for n in node.input if n})
        except Exception as exc:  # any failure means we cannot read it
            raise _refuse(node, f"could not evaluate this constant sub-graph ({exc})") from exc
        for name, value in zip(node.output, values, strict=False):
            self.const[name] = np.asarray(value)

    # ---- structural no-ops -------------------------------------------------------------------
    def op_Identity(self, node: onnx.NodeProto) -> None:
        self.drop(node, self.act(node, node.input[0])[0], "identity")

    def op_Cast(self, node: onnx.NodeProto) -> None:
        """float32 → float32 (what converters emit around the input) is a no-op; others are refused."""
        src, _ = self.act(node, node.input[0])
        to = int(_attrs(node).get("to", 0))
        if to != onnx.TensorProto.FLOAT:
            raise _refuse(node, f"casts the activations to {onnx.TensorProto.DataType.Name(to)}; only a cast "
                                "to float32 (a no-op here) is supported")
        self.drop(node, src, "cast to float32, the type it already has")

    def op_Squeeze(self, node: onnx.NodeProto) -> None:
        self.same_shape(node, "squeeze")

    def op_Unsqueeze(self, node: onnx.NodeProto) -> None:
        self.same_shape(node, "unsqueeze")

    def same_shape(self, node: onnx.NodeProto, what: str) -> None:
        """A squeeze/unsqueeze of an activation is only accepted where the output shape says it changes
        nothing per sample (the graph's shape inference must know it)."""
        src, shape = self.act(node, node.input[0])
        out = self.value_shapes.get(node.output[0]) if hasattr(self, "value_shapes") else None
        if out is None or math.prod(out) != math.prod(shape):
            raise _refuse(node, f"{what} of an activation of per-sample shape {shape}: not supported yet")
        self.drop(node, src, f"{what} of size-1 axes")

    def op_Dropout(self, node: onnx.NodeProto) -> None:
        if len(node.input) > 2 and node.input[2] and bool(self.const.get(node.input[2], True)):
            raise _refuse(node, "training_mode is on; export the model in eval mode")
        self.unused_extra_outputs(node, "mask")
        self.drop(node, self.act(node, node.input[0])[0], "dropout is the identity at inference")

    def op_Flatten(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        axis = int(_attrs(node).get("axis", 1))
        if axis % (len(shape) + 1) != 1:
            raise _refuse(node, f"axis {axis}: only flattening everything after the batch (axis 1) "
                                "is supported")
        self.flatten(node, src, shape)

    def op_Reshape(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        target = [int(v) for v in self.constant(node, node.input[1], "the target shape").reshape(-1)]
        size = math.prod(shape)
        per_sample = target[1:]
        if target and target[0] in (-1, 0, self.fixed_batch) and all(d > 0 for d in per_sample) and (
                per_sample == list(shape) or (self.one_d and per_sample == [shape[0], shape[2]])):
            self.drop(node, src, "reshape to the shape it already has")
            return
        batch_ok = {-1, 0} | ({self.fixed_batch} if self.fixed_batch else set())
        flat = len(target) == 2 and ((target[1] == size and target[0] in batch_ok)
                                     or (target[1] == -1 and target[0] in batch_ok - {-1}))
        if not flat:
            raise _refuse(node, f"reshape to {target}: only flattening to [N, -1] is supported yet")
        self.flatten(node, src, shape)

    def flatten(self, node: onnx.NodeProto, src: str, shape: tuple[int, ...]) -> None:
        if len(shape) == 1:
            self.drop(node, src, "the tensor is already flat")
        else:
            self.add(node, "flatten", [src], (math.prod(shape),))

    # ---- linear layers ---------------------------------------------------------------------------
    def op_Gemm(self, node: onnx.NodeProto) -> None:
        a = _attrs(node)
        if int(a.get("transA", 0)):
            raise _refuse(node, "transA=1 (the batch would not be the rows) not supported yet")
        src, shape = self.linear_input(node)
        b = self.constant(node, node.input[1], "B (the weight)").astype(np.float64)
        w = float(a.get("alpha", 1.0)) * (b if int(a.get("transB", 0)) else b.T)  # → [out, in]
        bias = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2]:
            c = self.constant(node, node.input[2], "C (the bias)").astype(np.float64)
            bias = float(a.get("beta", 1.0)) * self.per_channel(node, c, (w.shape[0],))
        self.linear(node, src, shape, w, bias)

    def op_MatMul(self, node: onnx.NodeProto) -> None:
        if not self.is_act(node.input[0]) or self.is_act(node.input[1]):
            raise _refuse(node, "a product of two activations (or constant × activation) is "
                                "not piecewise linear with ReLU gates")
        src, shape = self.linear_input(node)
        b = self.constant(node, node.input[1], "the weight")
        if b.ndim != 2:
            raise _refuse(node, f"weight of rank {b.ndim}: only a 2-D weight is supported yet")
        w = b.astype(np.float64).T
        self.linear(node, src, shape, w, np.zeros(w.shape[0]))

    def linear_input(self, node: onnx.NodeProto) -> tuple[str, tuple[int, ...]]:
        src, shape = self.act(node, node.input[0])
        if len(shape) != 1:
            raise _refuse(node, f"input of per-sample shape {shape}: only flat [N, features] inputs "
                                "are supported (flatten first)")
        return src, shape

    def linear(self, node: onnx.NodeProto, src: str, shape: tuple[int, ...], w: np.ndarray,
               bias: np.ndarray) -> None:
        if w.shape[1] != shape[0]:
            raise _refuse(node, f"weight expects {w.shape[1]} features, input has {shape[0]}")
        self.add(node, "linear", [src], (w.shape[0],), attrs={"out": int(w.shape[0])}, weight=w, bias=bias)

    def op_Conv(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        w = self.constant(node, node.input[1], "the weight").astype(np.float64)
        if len(shape) != 3 or w.ndim != (3 if self.one_d else 4):
            raise _refuse(node, f"a {w.ndim - 2}-D convolution on per-sample shape {shape}: only 1-D on "
                                "(C, L) and 2-D on (C, H, W) are supported")
        a = _attrs(node)
        geom = self.window(node, a, tuple(a.get("kernel_shape", w.shape[2:])), conv=True)
        groups = int(a.get("group", 1))
        if w.shape[1] * groups != shape[0]:
            raise _refuse(node, f"weight {w.shape} with group {groups} does not fit {shape[0]} channels")
        if self.one_d:
            w = w[:, :, None, :]  # (O, I, k) → (O, I, 1, k)
        bias = np.zeros(w.shape[0])
        if len(node.input) > 2 and node.input[2]:
            bias = self.constant(node, node.input[2], "the bias").astype(np.float64).reshape(-1)
        self.add(node, "conv", [src], None, attrs={"out": int(w.shape[0]), **geom, "groups": groups},
                 weight=w, bias=bias)

    def window(self, node: onnx.NodeProto, a: dict[str, Any], kernel: tuple[int, ...], conv: bool = False
               ) -> dict[str, Any]:
        """Spec window keys from ONNX attributes (1-D windows become 1×k)."""
        if a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            raise _refuse(node, f"auto_pad={a['auto_pad']}: write explicit pads (not supported yet)")
        rank = len(kernel)
        if rank != (1 if self.one_d else 2):
            raise _refuse(node, f"a {rank}-D window on {'a 1-D' if self.one_d else 'a 2-D'} signal")
        strides = [int(v) for v in a.get("strides", [1] * rank)]
        pads = [int(v) for v in a.get("pads", [0] * 2 * rank)]
        dilations = [int(v) for v in a.get("dilations", [1] * rank)]
        kernel = tuple(int(k) for k in kernel)
        if rank == 1:
            kernel, strides, dilations = (1, kernel[0]), [1, strides[0]], [1, dilations[0]]
            pads = [0, pads[0], 0, pads[1]]
        if not conv and any(d != 1 for d in dilations):
            raise _refuse(node, f"dilations {dilations[-rank:]}: dilated pools are not supported yet")
        out: dict[str, Any] = {"kernel": list(kernel), "stride": strides, "padding": pads}
        if any(d != 1 for d in dilations):
            out["dilation"] = dilations
        if int(a.get("ceil_mode", 0)):
            out["ceil_mode"] = True
        return out

    # ---- non-linearity and pools ---------------------------------------------------------------
    def op_Relu(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        self.add(node, "relu", [src], shape)

    def op_LeakyRelu(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        self.add(node, "leaky_relu", [src], shape, attrs={"alpha": float(_attrs(node).get("alpha", 0.01))})

    def op_PRelu(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        slope = self.constant(node, node.input[1], "the slope").astype(np.float64)
        flat = slope.reshape(-1)
        if flat.size != 1:  # per channel: broadcast as [C, 1, 1] / [C] → one value per channel
            flat = self.per_channel(node, slope, shape)
        self.add(node, "prelu", [src], shape, attrs={"num_parameters": int(flat.size)}, weight=flat)

    def op_Clip(self, node: onnx.NodeProto) -> None:
        """Clip with constant bounds: ReLU6 / Hardtanh / clamp (3 pieces), or a ReLU (min 0, no max)."""
        src, shape = self.act(node, node.input[0])
        a = _attrs(node)
        lo, hi = a.get("min"), a.get("max")  # opset < 11
        for i, what in ((1, "min"), (2, "max")):
            if len(node.input) > i and node.input[i]:
                value = self.constant(node, node.input[i], f"the {what} bound").reshape(-1)
                if value.size != 1:
                    raise _refuse(node, f"a {what} bound of shape {value.shape}: only scalar bounds")
                lo, hi = (float(value[0]), hi) if i == 1 else (lo, float(value[0]))
        if lo is not None and hi is None and float(lo) == 0.0:
            self.add(node, "relu", [src], shape)
            return
        if lo is not None and hi is not None and not float(lo) < float(hi):
            raise _refuse(node, f"bounds [{lo}, {hi}] leave nothing to clip between")
        self.add(node, "hardtanh", [src], shape, attrs={"min": None if lo is None else float(lo),
                                                        "max": None if hi is None else float(hi)})

    def pool_input(self, node: onnx.NodeProto) -> tuple[str, tuple[int, ...], dict[str, Any]]:
        src, shape = self.act(node, node.input[0])
        if len(shape) != 3:
            raise _refuse(node, f"needs a (C, L) or (C, H, W) input, got {shape}")
        return src, shape, _attrs(node)

    def op_MaxPool(self, node: onnx.NodeProto) -> None:
        src, _shape, a = self.pool_input(node)
        self.unused_extra_outputs(node, "Indices")
        self.add(node, "maxpool", [src], None, attrs=self.window(node, a, tuple(a["kernel_shape"])))

    def op_AveragePool(self, node: onnx.NodeProto) -> None:
        src, _shape, a = self.pool_input(node)
        include = bool(a.get("count_include_pad", 0))  # ONNX's default differs from torch's
        self.add(node, "avgpool", [src], None,
                 attrs={**self.window(node, a, tuple(a["kernel_shape"])), "count_include_pad": include})

    def op_GlobalAveragePool(self, node: onnx.NodeProto) -> None:
        src, shape, _ = self.pool_input(node)
        self.add(node, "gap", [src], (shape[0], 1, 1), attrs={"keepdim": True})

    def op_ReduceMean(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        a = _attrs(node)
        axes = a.get("axes")
        if len(node.input) > 1 and node.input[1]:
            axes = self.constant(node, node.input[1], "axes").reshape(-1).tolist()
        actual = getattr(self, "value_shapes", {}).get(node.input[0])
        rank = len(actual) + 1 if actual else len(shape) + (0 if self.one_d else 1)
        want = [2] if rank == 3 else [2, 3]
        if len(shape) != 3 or axes is None or sorted(int(x) % rank for x in axes) != want:
            raise _refuse(node, f"mean over axes {axes} of a rank-{rank} tensor: only the global "
                                f"average over the spatial axes {want} is supported")
        keep = bool(a.get("keepdims", 1))
        self.add(node, "gap", [src], (shape[0], 1, 1) if keep else (shape[0],), attrs={"keepdim": keep})

    # ---- BatchNorm and additions ---------------------------------------------------------------
    def op_BatchNormalization(self, node: onnx.NodeProto) -> None:
        src, shape = self.act(node, node.input[0])
        if int(_attrs(node).get("training_mode", 0)):
            raise _refuse(node, "training_mode=1; export the model in eval mode")
        self.unused_extra_outputs(node, "running mean/var")
        scale, b, mean, var = (self.constant(node, n, what).astype(np.float64).reshape(-1) for n, what in
                               zip(node.input[1:5], ("scale", "B", "mean", "var"), strict=True))
        s = scale / np.sqrt(var + float(_attrs(node).get("epsilon", 1e-5)))
        self.add(node, "affine", [src], shape, weight=s, bias=b - mean * s)

    def op_Add(self, node: onnx.NodeProto) -> None:
        left, right = node.input[0], node.input[1]
        if self.is_act(left) and self.is_act(right):
            (a, sa), (b, sb) = self.act(node, left), self.act(node, right)
            if sa != sb:
                raise _refuse(node, f"adds shapes {sa} and {sb}: broadcasting adds are not supported yet")
            self.add(node, "add", [a, b], sa)
            return
        act, const = (left, right) if self.is_act(left) else (right, left)
        src, shape = self.act(node, act)
        shift = self.per_channel(node, self.constant(node, const, "the addend").astype(np.float64), shape)
        self.add(node, "affine", [src], shape, weight=np.ones_like(shift), bias=shift)

    def per_channel(self, node: onnx.NodeProto, c: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
        """A constant broadcast against [N, *shape] that is the same for every sample and position
        → one value per channel (feature)."""
        try:
            full = np.broadcast_to(c, (1, *shape))[0]
        except ValueError:
            raise _refuse(node, f"constant of shape {c.shape} does not broadcast to {shape}") from None
        per = full.reshape(shape[0], -1)
        if not np.all(per == per[:, :1]):
            raise _refuse(node, "constant varies across positions, not a bias (not supported yet)")
        return per[:, 0].copy()

    def op_CastLike(self, node: onnx.NodeProto) -> None:
        """A constant cast to the activations' type (float32): torch's unoptimised exports do this."""
        if node.input[0] not in self.const:
            raise _refuse(node, "casting an activation is not supported yet")
        self.const[node.output[0]] = self.const[node.input[0]].astype(np.float32)

    # ---- refusals with a better message --------------------------------------------------------
    def op_Mul(self, node: onnx.NodeProto) -> None:
        if all(self.is_act(n) for n in node.input):
            raise _refuse(node, "a product of two activations is not piecewise linear (SiLU/Swish, GELU "
                                "and gating write x·f(x)); use ReLU, LeakyReLU, PReLU, ReLU6 or Hardtanh")
        raise _refuse(node, "scaling by a constant is not supported yet")


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    (attr,) = node.attribute
    if attr.name == "value":
        return numpy_helper.to_array(attr.t)
    return np.asarray(helper.get_attribute_value(attr))  # value_float(s) / value_int(s)


# ---- pass 2 and 3 -----------------------------------------------------------------------------
def _fold_affines(layers: list[_Layer], read: Counter[str], notes: list[str]) -> list[_Layer]:
    """Fold each BN / constant Add into the Conv/Gemm/MatMul that alone feeds it."""
    by_output = {layer.output: layer for layer in layers}
    kept: list[_Layer] = []
    for layer in layers:
        if layer.kind != "affine":
            kept.append(layer)
            continue
        src = layer.inputs[0]
        prod = by_output.get(src)
        if prod is None or prod.kind not in ("linear", "conv") or read[src] != 1:
            where = "the network input" if prod is None else f"{prod.op} node {prod.node!r}"
            why = (f"it reads {where}, not a Conv/Gemm/MatMul output" if prod is None or prod.kind not in
                   ("linear", "conv") else f"{where} also feeds other nodes")
            raise UnsupportedModel(
                f"{layer.op} node {layer.node!r}: cannot be folded: {why}. It is only folded into the "
                "linear layer directly before it when nothing else reads that layer's output; a "
                "standalone per-channel affine (e.g. BatchNorm after a ReLU) has no spec layer "
                "(not supported yet)")
        scale = layer.weight.reshape(-1, *([1] * (prod.weight.ndim - 1)))
        prod.weight = prod.weight * scale
        prod.bias = prod.bias * layer.weight + layer.bias
        prod.output = layer.output
        by_output[layer.output] = prod
        read.pop(src)  # the producer now writes the folded tensor (its readers are counted already)
        notes.append(f"folded {layer.op} node {layer.node!r} into {prod.op} node {prod.node!r}")
    return kept


def _live(layers: list[_Layer], output: str, notes: list[str]) -> list[_Layer]:
    """The layers the output depends on (in order)."""
    needed = {output}
    for layer in reversed(layers):
        if layer.output in needed:
            needed.update(layer.inputs)
    live = [layer for layer in layers if layer.output in needed]
    notes.extend(f"removed {lr.op} node {lr.node!r} (the output does not depend on it)"
                 for lr in layers if lr.output not in needed)
    return live


def _to_spec(layers: list[_Layer], input_name: str, input_shape: tuple[int, ...], name: str
             ) -> tuple[ArchSpec, dict[str, torch.Tensor]]:
    index = {input_name: -1} | {layer.output: i for i, layer in enumerate(layers)}
    spec_layers: list[dict[str, Any]] = []
    state: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        d: dict[str, Any] = {"type": layer.kind, **layer.attrs}
        ins = [index[n] for n in layer.inputs]
        if ins != [i - 1] or layer.kind == "add":
            d["inputs"] = ins
        spec_layers.append(d)
        if layer.kind in ("linear", "conv"):
            state[f"blocks.{i}.weight"] = torch.tensor(layer.weight, dtype=torch.float32)
            state[f"blocks.{i}.bias"] = torch.tensor(layer.bias, dtype=torch.float32)
        elif layer.kind == "prelu":
            state[f"blocks.{i}.weight"] = torch.tensor(layer.weight, dtype=torch.float32)
    spec = ArchSpec(tuple(input_shape), tuple(spec_layers), name=name)
    try:
        shapes = spec.shapes()
    except ValueError as exc:
        raise UnsupportedModel(f"the imported layers do not form a valid spec: {exc}") from exc
    # our shape tracking and the spec's must agree
    if [tuple(s) for s in shapes] != [tuple(layer.shape) for layer in layers]:
        raise UnsupportedModel("internal: imported shapes disagree with the spec's")
    return spec, state


# ---- entry points ------------------------------------------------------------------------------
def _opset(model: onnx.ModelProto) -> int:
    versions = [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")]
    if not versions:
        raise UnsupportedModel("the model declares no default-domain opset")
    if versions[0] < MIN_OPSET:
        raise UnsupportedModel(f"opset {versions[0]} is older than {MIN_OPSET}; re-export with "
                               f"opset_version >= {MIN_OPSET}")
    return int(versions[0])


def _graph_input(model: onnx.ModelProto) -> onnx.ValueInfoProto:
    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    if len(real) != 1:
        raise UnsupportedModel(f"the model has {len(real)} inputs; exactly one (the features) is supported")
    return real[0]


def _shape_of(value: onnx.ValueInfoProto, override: tuple[int, ...] | None
              ) -> tuple[tuple[int, ...], int | None]:
    """(per-sample input shape, fixed batch size or None)."""
    dims = value.type.tensor_type.shape.dim
    if value.type.tensor_type.elem_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.UNDEFINED):
        raise UnsupportedModel(f"input {value.name!r} is not float32")
    batch = dims[0].dim_value if dims and dims[0].HasField("dim_value") else None
    if override is not None:
        if dims and len(dims) - 1 != len(override):
            raise UnsupportedModel(f"input_shape {override} has rank {len(override)}; the graph input "
                                   f"{value.name!r} has rank {len(dims) - 1} after the batch")
        return tuple(int(v) for v in override), batch
    if len(dims) < 2 or not all(d.HasField("dim_value") for d in dims[1:]):
        raise UnsupportedModel(f"input {value.name!r} has no fixed per-sample shape; pass input_shape")
    return tuple(int(d.dim_value) for d in dims[1:]), batch


def _head(model: onnx.ModelProto) -> onnx.NodeProto | None:
    """The final Softmax/LogSoftmax: one, whose output only feeds label/probability outputs."""
    heads = [n for n in model.graph.node if n.op_type in HEAD_OPS]
    return heads[0] if len(heads) == 1 else None


def _prescan(model: onnx.ModelProto, strip_softmax: bool) -> onnx.NodeProto | None:
    """Refuse what cannot be decoupled, naming what the user wrote; returns the softmax to strip."""
    head = _head(model)
    for node in model.graph.node:
        if node.op_type in HEAD_OPS:
            if node is head and strip_softmax:
                continue
            if node is head:
                raise _refuse(node, f"a final {node.op_type} is not piecewise linear{SOFTMAX_FLAG_HINT}")
            raise _refuse(node, "not piecewise linear (a softmax inside the network)")
        if node.op_type in NOT_PIECEWISE:
            raise _refuse(node, why_not_piecewise(node.op_type, [n.op_type for n in model.graph.node]))
    return head if strip_softmax else None


def _ancestor_indices(model: onnx.ModelProto, target: str) -> list[int]:
    """Positions of the nodes ``target`` depends on, in graph order."""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output}
    needed: set[int] = set()
    stack = [target]
    while stack:
        i = producer.get(stack.pop())
        if i is not None and i not in needed:
            needed.add(i)
            stack.extend(x for x in nodes[i].input if x)
    return sorted(needed)


def _ancestors(model: onnx.ModelProto, target: str) -> list[onnx.NodeProto]:
    nodes = list(model.graph.node)
    return [nodes[i] for i in _ancestor_indices(model, target)]


def class_labels(model: onnx.ModelProto) -> list[str] | None:
    """The class labels a converter (skl2onnx) wrote next to the probabilities, in output order."""
    for node in model.graph.node:
        if node.op_type == "ZipMap":
            a = _attrs(node)
            labels = a.get("classlabels_strings") or a.get("classlabels_int64s")
            if labels:
                return [v.decode() if isinstance(v, bytes) else str(v) for v in labels]
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "ArrayFeatureExtractor" and node.input[0] in inits:
            values = numpy_helper.to_array(inits[node.input[0]]).reshape(-1)
            return [v.decode() if isinstance(v, bytes) else str(v) for v in values.tolist()]
    return None


def logits_model(model: onnx.ModelProto, head: onnx.NodeProto) -> onnx.ModelProto:
    """A copy of ``model`` whose only output is the softmax's input (the reference for the check)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.append(helper.make_tensor_value_info(head.input[0], onnx.TensorProto.FLOAT, None))
    keep = set(_ancestor_indices(model, head.input[0]))
    nodes = [onnx.NodeProto.FromString(n.SerializeToString()) for i, n in enumerate(model.graph.node)
             if i in keep]
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def import_onnx(path: str | Path, input_shape: tuple[int, ...] | None = None,
                strip_softmax: bool = False) -> ImportedNetwork:
    """Read an ONNX piecewise-linear network (Conv/Gemm/MatMul, ReLU/LeakyReLU/PReLU/Clip, pools,
    residual Adds, foldable BN); with ``strip_softmax`` a final Softmax/LogSoftmax and whatever
    follows it (labels, ZipMap) are dropped and the network outputs the logits."""
    model = onnx.load(str(path))
    opset = _opset(model)
    head = _prescan(model, strip_softmax)
    graph_in = _graph_input(model)
    shape, batch = _shape_of(graph_in, input_shape)
    if not model.graph.output:
        raise UnsupportedModel("the model has no outputs")
    reader = _Reader(model, graph_in.name, shape, batch, opset)
    reader.value_shapes = _value_shapes(model)
    notes = reader.notes
    if head is not None:
        reader.run(_ancestors(model, head.input[0]))
        out = reader.resolve(head.input[0])
        dropped = sorted({n.op_type for n in model.graph.node} - {n.op_type for n in _ancestors(
            model, head.input[0])})
        notes.append(f"--strip-softmax: removed {head.op_type} node {_name(head)!r} and what follows it "
                     f"({', '.join(dropped)}); the outputs are the logits (same predictions)")
    else:
        reader.run()
        if len(model.graph.output) > 1:
            notes.append(f"using the first of {len(model.graph.output)} outputs "
                         f"({model.graph.output[0].name!r})")
        out = reader.resolve(model.graph.output[0].name)
    layers = _fold_affines(reader.layers, reader.read, notes)
    by_output = {layer.output: layer for layer in layers}
    last = by_output.get(out)
    if last is None or last.kind != "linear":
        what = "the input" if last is None else f"{last.op} node {last.node!r}"
        raise UnsupportedModel(f"the output comes from {what}; the output layer must be a linear layer "
                               "(Gemm or MatMul [+ Add]) — export the logits")
    layers = _live(layers, out, notes)
    name = f"onnx:{Path(path).stem}"
    spec, state = _to_spec(layers, graph_in.name, shape, name)
    labels = class_labels(model) if head is not None else None
    return ImportedNetwork(spec=spec, state_dict=state, source_format="onnx", notes=notes,
                           stripped_softmax=head.op_type if head is not None else None, class_names=labels)


def _value_shapes(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """Per-sample shapes that ONNX shape inference knows (for squeeze/unsqueeze no-ops)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # inference is a help, not a requirement
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for v in list(inferred.graph.value_info) + list(inferred.graph.output):
        dims = v.type.tensor_type.shape.dim
        if len(dims) >= 1 and all(d.HasField("dim_value") for d in dims[1:]):
            out[v.name] = tuple(int(d.dim_value) for d in dims[1:])
    return out


def run_onnx(path: str | Path | onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's first output on ``x`` (flat rows or already shaped) with onnxruntime on CPU.

    A graph with a fixed batch size is run in chunks of that size (the last one zero-padded).
    """
    import onnxruntime as ort

    source = path.SerializeToString() if isinstance(path, onnx.ModelProto) else str(path)
    sess = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    meta = sess.get_inputs()[0]
    x = np.asarray(x, dtype=np.float32)
    n = x.shape[0]
    rest = meta.shape[1:]
    if x.ndim != len(meta.shape):
        if not all(isinstance(d, int) for d in rest):
            raise ValueError(f"input {meta.name!r} has symbolic dims {meta.shape}; pass shaped inputs")
        x = x.reshape(n, *rest)
    batch = meta.shape[0] if isinstance(meta.shape[0], int) and meta.shape[0] > 0 else None
    if batch is None or batch == n:
        return np.asarray(sess.run(None, {meta.name: x})[0], dtype=np.float32).reshape(n, -1)
    parts = []
    for i in range(0, n, batch):
        chunk = x[i:i + batch]
        pad = np.zeros((batch - chunk.shape[0], *chunk.shape[1:]), dtype=np.float32)
        out = sess.run(None, {meta.name: np.concatenate([chunk, pad])})[0]
        parts.append(np.asarray(out, dtype=np.float32).reshape(batch, -1)[:chunk.shape[0]])
    return np.concatenate(parts)
