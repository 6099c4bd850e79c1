"""Declarative, JSON-serialisable specs of ReLU networks (MLPs and small CNNs).

A spec is an input shape plus an ordered list of layers. The only non-linearity is
``relu``; ``maxpool`` is the only other structural (input-dependent) choice. Inputs
always arrive as flat feature vectors and are reshaped to ``input_shape`` first.

Two optional fixed affine maps belong to the model too, so clients send raw values and get
raw outputs: ``input_norm`` (per-feature mean/std learnt at init: x' = (x − mean) / std)
and ``output_affine`` (regression: y = out · scale + shift, so the layers work on
standardised targets). Both are affine, so the net stays piecewise affine and the
selector/estimator decomposition is unchanged; neither is trained.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

LAYER_TYPES = {"linear", "conv", "relu", "maxpool", "avgpool", "gap", "flatten", "add"}
POOL_TYPES = {"maxpool", "avgpool"}


def layer_inputs(index: int, layer: dict[str, Any]) -> list[int]:
    """The nodes a layer reads: ``layer["inputs"]`` (−1 = the network input), else the previous one.

    Without any ``inputs`` key a spec is the plain layer list it always was; with them it is a
    small DAG in topological order (residual blocks: ``{"type": "add", "inputs": [a, b]}``).
    """
    return [int(j) for j in layer.get("inputs", [index - 1])]


def pool_geometry(layer: dict[str, Any]) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a max/avg pool layer (square windows)."""
    k = int(layer["kernel"])
    return k, int(layer.get("stride", k)), int(layer.get("padding", 0))


@dataclass(frozen=True)
class ArchSpec:
    input_shape: tuple[int, ...]
    layers: tuple[dict[str, Any], ...]
    name: str = "custom"
    input_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (mean, std) per feature
    output_affine: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # (shift, scale) per output

    # ---- derived facts -------------------------------------------------------------
    @property
    def input_dim(self) -> int:
        return math.prod(self.input_shape)

    @property
    def num_outputs(self) -> int:
        return int(self.shapes()[-1][0])

    @property
    def is_sequential(self) -> bool:
        """Every layer reads the one before it (no skip connections)."""
        return all(layer_inputs(i, layer) == [i - 1] for i, layer in enumerate(self.layers))

    def shapes(self) -> list[tuple[int, ...]]:
        """Per-sample output shape of each layer (validates the spec as it goes)."""
        out: list[tuple[int, ...]] = []
        for i, layer in enumerate(self.layers):
            kind = layer.get("type")
            if kind not in LAYER_TYPES:
                raise ValueError(f"layer {i}: unknown type {kind!r}; allowed {sorted(LAYER_TYPES)}")
            inputs = layer_inputs(i, layer)
            if any(j < -1 or j >= i for j in inputs) or len(inputs) != (2 if kind == "add" else 1):
                raise ValueError(f"layer {i} ({kind}): bad inputs {inputs} (earlier layers, −1 = input; "
                                 f"'add' takes two)")
            ins = [tuple(self.input_shape) if j == -1 else out[j] for j in inputs]
            shape = _layer_shape(i, layer, ins)
            if min(shape) <= 0:
                raise ValueError(f"layer {i}: shape collapsed to {shape}")
            out.append(shape)
        if not self.layers or self.layers[-1]["type"] != "linear":
            raise ValueError("the last layer must be linear (the output layer has no ReLU)")
        if layer_inputs(len(self.layers) - 1, self.layers[-1]) != [len(self.layers) - 2]:
            raise ValueError("the output layer must read the layer just before it")
        return out

    # ---- (de)serialisation -----------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "input_shape": list(self.input_shape),
                             "layers": [dict(layer) for layer in self.layers]}
        if self.input_norm is not None:  # absent keys keep older specs byte-identical
            d["input_norm"] = {"mean": list(self.input_norm[0]), "std": list(self.input_norm[1])}
        if self.output_affine is not None:
            d["output_affine"] = {"shift": list(self.output_affine[0]), "scale": list(self.output_affine[1])}
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArchSpec:
        norm, out = d.get("input_norm"), d.get("output_affine")
        spec = cls(input_shape=tuple(int(v) for v in d["input_shape"]),
                   layers=tuple(dict(layer) for layer in d["layers"]), name=d.get("name", "custom"),
                   input_norm=_pair(norm, "mean", "std"), output_affine=_pair(out, "shift", "scale"))
        spec.shapes()
        spec.check_affines()
        return spec

    def with_affines(self, input_norm: tuple[Any, Any] | None = None,
                     output_affine: tuple[Any, Any] | None = None) -> ArchSpec:
        """The same layers with input normalisation and/or an output affine map attached."""
        spec = ArchSpec(self.input_shape, self.layers, self.name,
                        _pair({"a": input_norm[0], "b": input_norm[1]}, "a", "b") if input_norm else None,
                        _pair({"a": output_affine[0], "b": output_affine[1]}, "a", "b")
                        if output_affine else None)
        spec.check_affines()
        return spec

    def check_affines(self) -> None:
        if self.input_norm is not None:
            mean, std = self.input_norm
            if len(mean) != self.input_dim or len(std) != self.input_dim:
                raise ValueError(f"input_norm needs {self.input_dim} means and stds")
            if not all(math.isfinite(v) and v > 0 for v in std) or not all(map(math.isfinite, mean)):
                raise ValueError("input_norm: std must be finite and > 0, mean finite")
        if self.output_affine is not None:
            shift, scale = self.output_affine
            k = self.num_outputs
            if len(shift) != k or len(scale) != k:
                raise ValueError(f"output_affine needs {k} shifts and scales")
            if not all(math.isfinite(v) and v > 0 for v in scale) or not all(map(math.isfinite, shift)):
                raise ValueError("output_affine: scale must be finite and > 0, shift finite")

    @classmethod
    def from_json(cls, s: str) -> ArchSpec:
        return cls.from_dict(json.loads(s))


def _conv_out(size: int, k: int, s: int, p: int) -> int:
    return (size + 2 * p - k) // s + 1


def _layer_shape(i: int, layer: dict[str, Any], ins: list[tuple[int, ...]]) -> tuple[int, ...]:
    kind, shape = layer["type"], ins[0]
    if kind == "linear":
        if len(shape) != 1:
            raise ValueError(f"layer {i}: linear needs a flat input, got {shape}")
        return (int(layer["out"]),)
    if kind in ("conv", "maxpool", "avgpool", "gap") and len(shape) != 3:
        raise ValueError(f"layer {i}: {kind} needs a (C,H,W) input, got {shape}")
    if kind == "conv":
        k, s, p = int(layer["kernel"]), int(layer.get("stride", 1)), int(layer.get("padding", 0))
        groups = int(layer.get("groups", 1))
        if shape[0] % groups or int(layer["out"]) % groups:
            raise ValueError(f"layer {i}: channels {shape[0]}→{layer['out']} not divisible by "
                             f"groups {groups}")
        return (int(layer["out"]), _conv_out(shape[1], k, s, p), _conv_out(shape[2], k, s, p))
    if kind in POOL_TYPES:
        k, s, p = pool_geometry(layer)
        if p > k // 2:
            raise ValueError(f"layer {i}: pool padding {p} must be at most half the kernel {k}")
        return (shape[0], _conv_out(shape[1], k, s, p), _conv_out(shape[2], k, s, p))
    if kind == "gap":
        return (shape[0], 1, 1) if layer.get("keepdim", True) else (shape[0],)
    if kind == "flatten":
        return (math.prod(shape),)
    if kind == "add":
        if ins[0] != ins[1]:
            raise ValueError(f"layer {i}: add needs equal shapes, got {ins[0]} and {ins[1]}")
        return shape
    return shape  # relu


def _pair(d: dict[str, Any] | None, a: str, b: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if not d:
        return None
    return tuple(float(v) for v in d[a]), tuple(float(v) for v in d[b])


def _relu_stack(widths: list[int]) -> list[dict[str, Any]]:
    layers: list[dict[str, Any]] = []
    for i, w in enumerate(widths):
        layers.append({"type": "linear", "out": w})
        if i < len(widths) - 1:
            layers.append({"type": "relu"})
    return layers


def mlp(widths: list[int]) -> ArchSpec:
    """``mlp([784, 256, 256, 10])``: input width, hidden widths, output width."""
    if len(widths) < 2:
        raise ValueError("an MLP needs at least an input and an output width")
    return ArchSpec(input_shape=(widths[0],), layers=tuple(_relu_stack(widths[1:])),
                    name="mlp:" + "-".join(map(str, widths)))


def _conv(out: int, k: int, p: int = 0) -> dict[str, Any]:
    return {"type": "conv", "out": out, "kernel": k, "padding": p}


_RELU = {"type": "relu"}
_POOL = {"type": "maxpool", "kernel": 2}
_FLAT = {"type": "flatten"}


def lenet5(side: int, num_classes: int) -> ArchSpec:
    """LeNet-5 (ReLU + max-pool). 28×28 uses 5×5 kernels; small inputs (8×8) use 3×3."""
    k, p1 = (5, 2) if side >= 20 else (3, 1)
    p2 = 0 if side >= 20 else 1
    feat = [_conv(6, k, p1), _RELU, _POOL, _conv(16, k, p2), _RELU, _POOL, _FLAT]
    head = [{"type": "linear", "out": 120}, _RELU, {"type": "linear", "out": 84}, _RELU,
            {"type": "linear", "out": num_classes}]
    return ArchSpec(input_shape=(1, side, side), layers=tuple(feat + head), name="lenet5")


def vgg_small(side: int, num_classes: int) -> ArchSpec:
    """A small VGG-style net: two conv-conv-pool blocks and a two-layer head."""
    c1, c2, hidden = (32, 64, 128) if side >= 20 else (16, 32, 64)
    feat = [_conv(c1, 3, 1), _RELU, _conv(c1, 3, 1), _RELU, _POOL,
            _conv(c2, 3, 1), _RELU, _conv(c2, 3, 1), _RELU, _POOL, _FLAT]
    head = [{"type": "linear", "out": hidden}, _RELU, {"type": "linear", "out": num_classes}]
    return ArchSpec(input_shape=(1, side, side), layers=tuple(feat + head), name="vgg-small")


def resolve_arch(arch: str, input_dim: int, num_classes: int) -> ArchSpec:
    """Turn a CLI/API architecture name into a spec for the given data shape.

    Accepted: ``mlp:784-256-256-10`` (full widths), ``mlp:256-256`` (hidden widths only),
    ``lenet5``, ``vgg-small`` (square single-channel images), or a JSON spec.
    """
    arch = arch.strip()
    if arch.startswith("{"):
        spec = ArchSpec.from_json(arch)
    elif arch.startswith("mlp:"):
        widths = [int(w) for w in arch[4:].split("-") if w]
        if len(widths) >= 2 and widths[0] == input_dim and widths[-1] == num_classes:
            spec = mlp(widths)
        else:
            spec = mlp([input_dim, *widths, num_classes])
    elif arch in ("lenet5", "vgg-small"):
        side = math.isqrt(input_dim)
        if side * side != input_dim:
            raise ValueError(f"{arch} needs square single-channel images; {input_dim} features")
        spec = (lenet5 if arch == "lenet5" else vgg_small)(side, num_classes)
    else:
        raise ValueError(f"unknown architecture {arch!r}; use mlp:W-W-…, lenet5 or vgg-small")
    if spec.input_dim != input_dim or spec.num_outputs != num_classes:
        raise ValueError(f"spec {spec.name} is {spec.input_dim}→{spec.num_outputs}, "
                         f"data is {input_dim}→{num_classes}")
    return spec


@dataclass
class StructureLayout:
    """Where each ReLU's gates and each max-pool's choices sit, per sample."""

    gate_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pool_in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pool_out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pool_windows: list[tuple[int, int, int]] = field(default_factory=list)  # (kernel, stride, padding)

    @property
    def num_gates(self) -> int:
        return sum(math.prod(s) for s in self.gate_shapes)

    @classmethod
    def of(cls, spec: ArchSpec) -> StructureLayout:
        layout = cls()
        shapes = spec.shapes()
        for i, (layer, shape) in enumerate(zip(spec.layers, shapes, strict=True)):
            if layer["type"] == "relu":
                layout.gate_shapes.append(shape)
            elif layer["type"] == "maxpool":
                j = layer_inputs(i, layer)[0]
                layout.pool_in_shapes.append(tuple(spec.input_shape) if j == -1 else shapes[j])
                layout.pool_out_shapes.append(shape)
                layout.pool_windows.append(pool_geometry(layer))
        return layout
