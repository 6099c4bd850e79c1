"""Declarative, JSON-serialisable specs of ReLU networks (MLPs and small CNNs).

A spec is an input shape plus an ordered list of layers. The non-linearities are piecewise
linear activations (``relu``, ``leaky_relu``, ``prelu``: 2 pieces; ``hardtanh``, which covers
ReLU6 and clip with constant bounds: 3 pieces, see :mod:`app.core.pieces`); ``maxpool`` is the
only other structural (input-dependent) choice. Inputs always arrive as flat feature vectors
and are reshaped to ``input_shape`` first; a rank-2 ``input_shape`` (C, L) is a 1-D signal,
run as (C, 1, L) with 1×k windows (so 1-D CNNs reuse the 2-D layers exactly).

Conv and pool windows: ``kernel``/``stride``/``dilation`` are an int (square) or [h, w];
``padding`` an int, [h, w] (symmetric per axis) or [top, left, bottom, right] (ONNX order);
pools may set ``ceil_mode``. Square symmetric windows keep the exact code path they always had.

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

ACTIVATION_TYPES = {"relu", "leaky_relu", "prelu", "hardtanh"}
LAYER_TYPES = {"linear", "conv", "maxpool", "avgpool", "gap", "flatten", "add"} | ACTIVATION_TYPES
POOL_TYPES = {"maxpool", "avgpool"}


def layer_inputs(index: int, layer: dict[str, Any]) -> list[int]:
    """The nodes a layer reads: ``layer["inputs"]`` (−1 = the network input), else the previous one.

    Without any ``inputs`` key a spec is the plain layer list it always was; with them it is a
    small DAG in topological order (residual blocks: ``{"type": "add", "inputs": [a, b]}``).
    """
    return [int(j) for j in layer.get("inputs", [index - 1])]


def pool_geometry(layer: dict[str, Any]) -> tuple[int, int, int]:
    """(kernel, stride, padding) of a max/avg pool layer (square windows; rows for others)."""
    g = window(layer)
    return g.kh, g.sh, g.pt


def _pair2(v: Any, default: int) -> tuple[int, int]:
    if v is None:
        return default, default
    if isinstance(v, (list, tuple)):
        if len(v) == 1:
            return int(v[0]), int(v[0])
        if len(v) != 2:
            raise ValueError(f"expected an int or [h, w], got {v}")
        return int(v[0]), int(v[1])
    return int(v), int(v)


@dataclass(frozen=True)
class Window:
    """The geometry of a conv or pool window, per axis (h, w)."""

    kh: int
    kw: int
    sh: int
    sw: int
    pt: int  # padding top, left, bottom, right
    pl: int
    pb: int
    pr: int
    dh: int = 1
    dw: int = 1
    ceil: bool = False

    @property
    def symmetric(self) -> bool:
        return self.pt == self.pb and self.pl == self.pr

    @property
    def simple(self) -> bool:
        """Square, symmetric, undilated, floor: the layout every spec had before (fast path)."""
        return (self.kh == self.kw and self.sh == self.sw and self.pt == self.pl == self.pb == self.pr
                and self.dh == self.dw == 1 and not self.ceil)

    @property
    def pads(self) -> tuple[int, int, int, int]:
        """For ``F.pad``: (left, right, top, bottom)."""
        return self.pl, self.pr, self.pt, self.pb

    def out(self, h: int, w: int) -> tuple[int, int]:
        return (_axis_out(h, self.kh, self.sh, self.pt, self.pb, self.dh, self.ceil),
                _axis_out(w, self.kw, self.sw, self.pl, self.pr, self.dw, self.ceil))


def _axis_out(size: int, k: int, s: int, p0: int, p1: int, d: int, ceil: bool) -> int:
    span = size + p0 + p1 - d * (k - 1) - 1
    if not ceil:
        return span // s + 1
    out = -(-span // s) + 1
    if (out - 1) * s >= size + p0:  # torch/ONNX: the last window must start inside input or left pad
        out -= 1
    return out


def window(layer: dict[str, Any]) -> Window:
    """The window of a conv/maxpool/avgpool layer (pools: stride defaults to the kernel)."""
    kh, kw = _pair2(layer["kernel"], 1)
    if layer.get("stride") is None:
        sh, sw = (1, 1) if layer["type"] == "conv" else (kh, kw)
    else:
        sh, sw = _pair2(layer["stride"], 1)
    pad = layer.get("padding", 0)
    if isinstance(pad, (list, tuple)) and len(pad) == 4:
        pt, pl, pb, pr = (int(v) for v in pad)
    else:
        pt, pl = _pair2(pad, 0)
        pb, pr = pt, pl
    dh, dw = _pair2(layer.get("dilation"), 1)
    return Window(kh, kw, sh, sw, pt, pl, pb, pr, dh, dw, bool(layer.get("ceil_mode", False)))


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
    def tensor_shape(self) -> tuple[int, ...]:
        """The first layer's per-sample input: ``input_shape``, a 1-D (C, L) as (C, 1, L)."""
        if len(self.input_shape) == 2:
            return (self.input_shape[0], 1, self.input_shape[1])
        return tuple(self.input_shape)

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
            ins = [self.tensor_shape if j == -1 else out[j] for j in inputs]
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
        g = window(layer)
        groups = int(layer.get("groups", 1))
        if shape[0] % groups or int(layer["out"]) % groups:
            raise ValueError(f"layer {i}: channels {shape[0]}→{layer['out']} not divisible by "
                             f"groups {groups}")
        if g.ceil:
            raise ValueError(f"layer {i}: ceil_mode is for pools only")
        if g.simple:
            k, s, p = g.kh, g.sh, g.pt
            return (int(layer["out"]), _conv_out(shape[1], k, s, p), _conv_out(shape[2], k, s, p))
        return (int(layer["out"]), *g.out(shape[1], shape[2]))
    if kind in POOL_TYPES:
        g = window(layer)
        if g.dh != 1 or g.dw != 1:
            raise ValueError(f"layer {i}: dilated pools are not supported")
        if g.simple:
            k, s, p = g.kh, g.sh, g.pt
            if p > k // 2:
                raise ValueError(f"layer {i}: pool padding {p} must be at most half the kernel {k}")
            return (shape[0], _conv_out(shape[1], k, s, p), _conv_out(shape[2], k, s, p))
        if g.symmetric and (2 * g.pt > g.kh or 2 * g.pl > g.kw):
            raise ValueError(f"layer {i}: pool padding must be at most half the kernel")
        if max(g.pt, g.pb) >= g.kh or max(g.pl, g.pr) >= g.kw:
            raise ValueError(f"layer {i}: pool padding must be smaller than the kernel")
        if kind == "maxpool" and g.kh * g.kw > 256:
            raise ValueError(f"layer {i}: max-pool windows above 256 elements are not supported")
        return (shape[0], *g.out(shape[1], shape[2]))
    if kind == "gap":
        return (shape[0], 1, 1) if layer.get("keepdim", True) else (shape[0],)
    if kind == "flatten":
        return (math.prod(shape),)
    if kind == "add":
        if ins[0] != ins[1]:
            raise ValueError(f"layer {i}: add needs equal shapes, got {ins[0]} and {ins[1]}")
        return shape
    if kind == "prelu":
        n = int(layer.get("num_parameters", 1))
        if n not in (1, shape[0]):
            raise ValueError(f"layer {i}: prelu has {n} slopes for {shape[0]} channels (use 1 or C)")
    if kind == "hardtanh":
        lo, hi = layer.get("min"), layer.get("max")
        if lo is not None and hi is not None and not float(lo) < float(hi):
            raise ValueError(f"layer {i}: hardtanh needs min < max, got [{lo}, {hi}]")
    if kind == "leaky_relu" and not math.isfinite(float(layer.get("alpha", 0.01))):
        raise ValueError(f"layer {i}: leaky_relu alpha must be finite")
    return shape  # activations keep the shape


def _pair(d: dict[str, Any] | None, a: str, b: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    if not d:
        return None
    return tuple(float(v) for v in d[a]), tuple(float(v) for v in d[b])


def activation_layer(text: str | None) -> dict[str, Any]:
    """``relu`` | ``leaky_relu[:ALPHA]`` | ``prelu`` | ``relu6`` | ``hardtanh[:A,B]`` → a spec layer."""
    text = (text or "relu").strip().lower()
    name, _, arg = text.partition(":")
    name = name.replace("-", "_")
    try:
        if name == "relu" and not arg:
            return {"type": "relu"}
        if name in ("leaky_relu", "leakyrelu"):
            return {"type": "leaky_relu", "alpha": float(arg) if arg else 0.01}
        if name == "prelu" and not arg:
            return {"type": "prelu", "num_parameters": 1}
        if name == "relu6" and not arg:
            return {"type": "hardtanh", "min": 0.0, "max": 6.0}
        if name in ("hardtanh", "clip"):
            lo, hi = (float(v) for v in arg.split(",")) if arg else (-1.0, 1.0)
            if not lo < hi:
                raise ValueError
            return {"type": "hardtanh", "min": lo, "max": hi}
    except ValueError:
        pass
    raise ValueError(f"unknown activation {text!r}; use relu, leaky_relu:ALPHA, prelu, relu6 or "
                     "hardtanh:MIN,MAX")


def _activation_suffix(act: dict[str, Any]) -> str:
    if act["type"] == "relu":
        return ""
    if act["type"] == "hardtanh":
        bounds = (act["min"], act["max"])
        return "+relu6" if bounds == (0.0, 6.0) else f"+hardtanh:{bounds[0]:g},{bounds[1]:g}"
    return f"+leaky_relu:{act['alpha']:g}" if act["type"] == "leaky_relu" else "+prelu"


def _relu_stack(widths: list[int], act: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    act = act or {"type": "relu"}
    layers: list[dict[str, Any]] = []
    for i, w in enumerate(widths):
        layers.append({"type": "linear", "out": w})
        if i < len(widths) - 1:
            layers.append(dict(act))
    return layers


def mlp(widths: list[int], activation: str | None = None) -> ArchSpec:
    """``mlp([784, 256, 256, 10])``: input width, hidden widths, output width."""
    if len(widths) < 2:
        raise ValueError("an MLP needs at least an input and an output width")
    act = activation_layer(activation)
    return ArchSpec(input_shape=(widths[0],), layers=tuple(_relu_stack(widths[1:], act)),
                    name="mlp:" + "-".join(map(str, widths)) + _activation_suffix(act))


def cnn1d(channels: int, length: int, conv_widths: list[int], num_outputs: int,
          activation: str | None = None, kernel: int = 5) -> ArchSpec:
    """A 1-D CNN on (channels, length) signals: per width a conv (kernel 5, same padding), the
    activation and a max-pool of 2 (while the length allows), then global average pooling and
    a linear head."""
    act = activation_layer(activation)
    layers: list[dict[str, Any]] = []
    size = length
    for w in conv_widths:
        layers += [{"type": "conv", "out": w, "kernel": [1, kernel], "padding": [0, kernel // 2]}, dict(act)]
        if size >= 4:
            layers.append({"type": "maxpool", "kernel": [1, 2], "ceil_mode": True})
            size = -(-size // 2)
    layers += [{"type": "gap", "keepdim": False}, {"type": "linear", "out": num_outputs}]
    return ArchSpec(input_shape=(channels, length), layers=tuple(layers),
                    name="cnn1d:" + "-".join(map(str, conv_widths)) + _activation_suffix(act))


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


def resolve_arch(arch: str, input_dim: int, num_classes: int, activation: str | None = None,
                 input_shape: tuple[int, ...] | None = None) -> ArchSpec:
    """Turn a CLI/API architecture name into a spec for the given data shape.

    Accepted: ``mlp:784-256-256-10`` (full widths), ``mlp:256-256`` (hidden widths only),
    ``lenet5``, ``vgg-small`` (square single-channel images), ``cnn1d:16-32`` (conv widths of a
    1-D CNN on ``input_shape`` (C, L), default (1, D); ``cnn1d:16-32@C,L`` names it), or a JSON
    spec. ``activation`` (see
    :func:`activation_layer`) replaces every ReLU of a named architecture; a suffix
    ``+leaky_relu:0.1`` on the name does the same.
    """
    arch = arch.strip()
    if not arch.startswith("{") and "+" in arch:
        arch, _, suffix = arch.partition("+")
        activation = activation or suffix
    if not arch.startswith("{") and "@" in arch:  # cnn1d:16-32@C,L (the CLI's --input-shape)
        arch, _, shape_text = arch.partition("@")
        try:
            input_shape = tuple(int(v) for v in shape_text.split(","))
        except ValueError:
            raise ValueError(f"bad input shape {shape_text!r}; write C,L") from None
    if arch.startswith("{"):
        spec = ArchSpec.from_json(arch)
        if activation and activation_layer(activation)["type"] != "relu":
            raise ValueError("--activation applies to named architectures; write it into the JSON spec")
    elif arch.startswith("mlp:"):
        widths = [int(w) for w in arch[4:].split("-") if w]
        if len(widths) >= 2 and widths[0] == input_dim and widths[-1] == num_classes:
            spec = mlp(widths, activation)
        else:
            spec = mlp([input_dim, *widths, num_classes], activation)
    elif arch.startswith("cnn1d:"):
        widths = [int(w) for w in arch[6:].split("-") if w]
        shape = tuple(input_shape) if input_shape else (1, input_dim)
        if len(shape) != 2 or math.prod(shape) != input_dim:
            raise ValueError(f"cnn1d needs an input shape C,L with C·L = {input_dim} features, got {shape}")
        spec = cnn1d(shape[0], shape[1], widths, num_classes, activation)
    elif arch in ("lenet5", "vgg-small"):
        side = math.isqrt(input_dim)
        if side * side != input_dim:
            raise ValueError(f"{arch} needs square single-channel images; {input_dim} features")
        spec = (lenet5 if arch == "lenet5" else vgg_small)(side, num_classes)
        act = activation_layer(activation)
        if act["type"] != "relu":
            spec = ArchSpec(spec.input_shape, tuple(dict(act) if layer["type"] == "relu" else layer
                                                    for layer in spec.layers),
                            spec.name + _activation_suffix(act))
    else:
        raise ValueError(f"unknown architecture {arch!r}; use mlp:W-W-…, cnn1d:W-W-…, lenet5 or vgg-small")
    if spec.input_dim != input_dim or spec.num_outputs != num_classes:
        raise ValueError(f"spec {spec.name} is {spec.input_dim}→{spec.num_outputs}, "
                         f"data is {input_dim}→{num_classes}")
    return spec


@dataclass
class StructureLayout:
    """Where each activation's pieces and each max-pool's choices sit, per sample.

    ``gate_pieces[l]`` is the number of linear pieces of activation layer l (2: one bit per
    unit, as plain ReLU always had; 3: two bits). ``pool_in_shapes`` are the planes the argmax
    indexes (a pool with asymmetric padding: the explicitly padded plane, and no padding).
    """

    gate_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pool_in_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pool_out_shapes: list[tuple[int, ...]] = field(default_factory=list)
    pool_windows: list[tuple[int, int, int]] = field(default_factory=list)  # (kernel, stride, padding)
    gate_pieces: list[int] = field(default_factory=list)
    pool_geoms: list[Window] = field(default_factory=list)

    @property
    def num_units(self) -> int:
        return sum(math.prod(s) for s in self.gate_shapes)

    @property
    def num_gates(self) -> int:
        """Bits per sample for the activations (one per unit of a 2-piece layer, two of a 3-piece)."""
        pieces = self.gate_pieces or [2] * len(self.gate_shapes)
        return sum(math.prod(s) * (1 if p == 2 else 2) for s, p in zip(self.gate_shapes, pieces, strict=True))

    @property
    def single_bit(self) -> bool:
        return all(p == 2 for p in self.gate_pieces)

    @classmethod
    def of(cls, spec: ArchSpec) -> StructureLayout:
        from app.core.pieces import num_pieces

        layout = cls()
        shapes = spec.shapes()
        for i, (layer, shape) in enumerate(zip(spec.layers, shapes, strict=True)):
            if layer["type"] in ACTIVATION_TYPES:
                layout.gate_shapes.append(shape)
                layout.gate_pieces.append(num_pieces(layer))
            elif layer["type"] == "maxpool":
                j = layer_inputs(i, layer)[0]
                plane = spec.tensor_shape if j == -1 else shapes[j]
                g = window(layer)
                if not g.symmetric:  # gathered from the explicitly padded plane
                    plane = (plane[0], plane[1] + g.pt + g.pb, plane[2] + g.pl + g.pr)
                    g = Window(g.kh, g.kw, g.sh, g.sw, 0, 0, 0, 0, 1, 1, g.ceil)
                layout.pool_in_shapes.append(plane)
                layout.pool_out_shapes.append(shape)
                layout.pool_windows.append((g.kh, g.sh, g.pt))
                layout.pool_geoms.append(g)
        return layout
