"""ReLU networks and their decoupled pair: a frozen PathSelector and a gated Estimator.

For hidden layer l the selector computes its own pre-activation z_l^S and the gate
g_l = 1[z_l^S > 0]; the estimator computes h_l = g_l ⊙ (W_l^E h_{l-1} + b_l^E) from its own
previous layer. Max-pools in the estimator gather at the selector's argmax indices. Given
the structure, nothing in the estimator depends non-linearly on x. Other piecewise-linear
activations (LeakyReLU, PReLU, ReLU6/Hardtanh) generalise the gate to the index of the
linear piece each unit is on (:mod:`app.core.pieces`); plain ReLU keeps its own code path.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from app.core import pieces
from app.core.spec import (
    ACTIVATION_TYPES,
    ArchSpec,
    StructureLayout,
    Window,
    layer_inputs,
    pool_geometry,
    window,
)
from app.core.structure import PackedStructure, Structure, pack, unpack


class ReLUNet(nn.Module):
    """A plain piecewise-linear network (ReLU unless the spec says otherwise) from an :class:`ArchSpec`."""

    def __init__(self, spec: ArchSpec, seed: int | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.layout = StructureLayout.of(spec)
        generator_state = torch.random.get_rng_state()
        if seed is not None:
            torch.manual_seed(seed)
        blocks: list[nn.Module] = []
        shapes = spec.shapes()
        self.inputs = [layer_inputs(i, layer) for i, layer in enumerate(spec.layers)]
        self._last_use = {j: i for i, ins in enumerate(self.inputs) for j in ins}  # last reader of j
        for i, layer in enumerate(spec.layers):
            j = self.inputs[i][0]
            prev = spec.tensor_shape if j == -1 else shapes[j]
            if layer["type"] == "linear":
                blocks.append(nn.Linear(prev[0], int(layer["out"])))
            elif layer["type"] == "conv":
                g = window(layer)
                if g.simple:
                    blocks.append(nn.Conv2d(prev[0], int(layer["out"]), g.kh, stride=g.sh, padding=g.pt,
                                            groups=int(layer.get("groups", 1))))
                else:  # asymmetric padding is applied with F.pad before the conv (see _windowed)
                    blocks.append(nn.Conv2d(prev[0], int(layer["out"]), (g.kh, g.kw), stride=(g.sh, g.sw),
                                            padding=(g.pt, g.pl) if g.symmetric else 0,
                                            dilation=(g.dh, g.dw), groups=int(layer.get("groups", 1))))
            elif layer["type"] in ACTIVATION_TYPES:
                blocks.append(pieces.make_block(layer, prev[0]))
            else:
                blocks.append(nn.Identity())  # keeps layer indices aligned with the spec
        if seed is not None:
            torch.random.set_rng_state(generator_state)
        self.blocks = nn.ModuleList(blocks)
        # per layer: the window when it is not the plain square one (None: today's fast path)
        windowed = ("conv", "maxpool", "avgpool")
        self._windows: list[Window | None] = [
            (g if not (g := window(layer)).simple else None) if layer["type"] in windowed else None
            for layer in spec.layers]
        self._out_hw = [tuple(s[1:]) for s in shapes]
        # Fixed affine maps of the spec (input normalisation, output scale): buffers, not
        # parameters (never trained), and not persistent (the weights files stay as they were).
        self.has_input_norm = spec.input_norm is not None
        self.has_output_affine = spec.output_affine is not None
        if spec.input_norm is not None:
            mean, std = (torch.tensor(v, dtype=torch.float32) for v in spec.input_norm)
            self.register_buffer("in_mean", mean, persistent=False)
            self.register_buffer("in_inv_std", 1.0 / std, persistent=False)
        if spec.output_affine is not None:
            shift, scale = (torch.tensor(v, dtype=torch.float32) for v in spec.output_affine)
            self.register_buffer("out_shift", shift, persistent=False)
            self.register_buffer("out_scale", scale, persistent=False)

    @property
    def readout(self) -> nn.Module:
        """The last layer: a linear map of the penultimate (gated) features."""
        return self.blocks[-1]  # one block per spec layer

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        """Raw flat features → the first layer's input (normalised, reshaped)."""
        if self.has_input_norm:
            x = (x - self.in_mean.to(x.dtype)) * self.in_inv_std.to(x.dtype)
        return x.reshape(x.shape[0], *self.spec.tensor_shape)

    def finish_output(self, h: torch.Tensor) -> torch.Tensor:
        """The last layer's output → the model's output (regression: original target units)."""
        if self.has_output_affine:
            return h * self.out_scale.to(h.dtype) + self.out_shift.to(h.dtype)
        return h

    def to_layer_space(self, y: torch.Tensor) -> torch.Tensor:
        """Targets in output units → the last layer's units (inverse of ``finish_output``)."""
        if self.has_output_affine:
            return (y - self.out_shift.to(y.dtype)) / self.out_scale.to(y.dtype)
        return y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.finish_output(self.plain_layers(self.prepare_input(x), len(self.blocks)))

    def plain_layers(self, h: torch.Tensor, stop: int) -> torch.Tensor:
        """The ordinary ReLU forward of layers [0, stop) on an already prepared input."""
        return self.run_layers(h, 0, stop)

    def forward_with_structure(self, x: torch.Tensor) -> tuple[torch.Tensor, Structure]:
        """Plain forward that also records every gate and every max-pool argmax."""
        structure = Structure([], [])
        h = self.run_layers(self.prepare_input(x), 0, len(self.blocks), record=structure)
        return self.finish_output(h), structure

    def gated_forward(self, x: torch.Tensor, structure: Structure,
                      taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Forward with every ReLU replaced by the given gate and every max-pool by a gather."""
        h = self.run_layers(self.prepare_input(x), 0, len(self.blocks), structure.gates,
                            structure.pool_indices, taps=taps)
        return self.finish_output(h)

    def run_layers(self, h: torch.Tensor, start: int, stop: int, gates: list[torch.Tensor] | None = None,
                   pools: list[torch.Tensor] | None = None, record: Structure | None = None,
                   taps: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Layers [start, stop) on ``h`` (the output of layer start − 1, or the prepared input).

        The one loop behind every pass: plain (ReLU and max-pool decide), recording (the same,
        appending each gate and argmax to ``record``), or gated (``gates``/``pools`` given: the
        ReLUs and max-pools of this slice, in order, are replaced by those masks and gathers).
        Returns the output of layer stop − 1. ``taps``, if given, receives what each structural
        layer decides on, in order: a ReLU's input (pre-activation), a max-pool's input
        (app.core.explain reads them for the certified radius).
        """
        outs: dict[int, torch.Tensor] = {start - 1: h}
        gi = pi = 0
        for i in range(start, stop):
            layer, block = self.spec.layers[i], self.blocks[i]
            try:
                ins = [outs[j] for j in self.inputs[i]]
            except KeyError:
                raise ValueError(f"layer {i} reads a layer before {start - 1}; "
                                 "run this net from layer 0") from None
            h = ins[0]
            kind = layer["type"]
            win = self._windows[i]
            # what each structural layer decides on, in structure order (every activation's
            # pre-activation, every max-pool's input)
            if taps is not None and (kind in ACTIVATION_TYPES or kind == "maxpool"):
                taps.append(h)
            if kind == "relu":
                if gates is not None:
                    h = h * gates[gi].to(h.dtype)
                elif record is not None:
                    gate = h > 0
                    record.gates.append(gate)
                    h = h * gate
                else:
                    h = F.relu(h)
                gi += 1
            elif kind in ACTIVATION_TYPES:  # the other piecewise-linear activations
                if gates is not None:
                    h = pieces.gated(layer, block, h, gates[gi])
                else:
                    if record is not None:
                        record.gates.append(pieces.piece(layer, h))
                    h = pieces.plain(layer, block, h)
                gi += 1
            elif win is not None:  # rectangular / dilated / asymmetric / ceil_mode windows
                idx = pools[pi] if pools is not None and kind == "maxpool" else None
                h = self._windowed(i, kind, win, block, h, idx, record)
                pi += kind == "maxpool"
            elif kind == "maxpool":
                k, s, p = pool_geometry(layer)
                if pools is not None:
                    idx = pools[pi]
                    n, c = idx.shape[:2]
                    h = h.flatten(2).gather(2, idx.flatten(2)).view(n, c, *idx.shape[2:])
                elif record is not None:
                    h, idx = F.max_pool2d(h, k, s, p, return_indices=True)
                    record.pool_indices.append(idx)
                else:
                    h = F.max_pool2d(h, k, s, p)
                pi += 1
            elif kind == "avgpool":  # linear: no structure
                k, s, p = pool_geometry(layer)
                h = F.avg_pool2d(h, k, s, p, count_include_pad=bool(layer.get("count_include_pad", True)))
            elif kind == "gap":
                h = h.mean(dim=(2, 3), keepdim=bool(layer.get("keepdim", True)))
            elif kind == "flatten":
                h = h.flatten(1)
            elif kind == "add":
                h = ins[0] + ins[1]
            else:
                h = block(h)
            outs[i] = h
            for j in self.inputs[i]:  # free what no later layer reads (skip connections keep theirs)
                if self._last_use[j] == i:
                    outs.pop(j, None)
        return outs[stop - 1]

    def _windowed(self, i: int, kind: str, g: Window, block: nn.Module, h: torch.Tensor,
                  idx: torch.Tensor | None, record: Structure | None) -> torch.Tensor:
        """Conv / pools whose window is not square-symmetric (1-D nets, ceil_mode, ONNX pads)."""
        ho, wo = self._out_hw[i]
        if kind == "conv":
            return block(h if g.symmetric else F.pad(h, g.pads))
        if kind == "maxpool":
            if idx is not None:  # gather at the selector's argmax (padding values are never chosen)
                if not g.symmetric:
                    h = F.pad(h, g.pads)
                n, c = idx.shape[:2]
                return h.flatten(2).gather(2, idx.flatten(2)).view(n, c, *idx.shape[2:])
            pad = (g.pt, g.pl)
            if not g.symmetric:
                h, pad = F.pad(h, g.pads, value=-torch.inf), (0, 0)
            out, ind = F.max_pool2d(h, (g.kh, g.kw), (g.sh, g.sw), pad, ceil_mode=g.ceil, return_indices=True)
            out, ind = out[..., :ho, :wo], ind[..., :ho, :wo]
            if record is not None:
                record.pool_indices.append(ind)
            return out
        include = bool(self.spec.layers[i].get("count_include_pad", True))
        if g.symmetric:
            return F.avg_pool2d(h, (g.kh, g.kw), (g.sh, g.sw), (g.pt, g.pl), ceil_mode=g.ceil,
                                count_include_pad=include)
        # asymmetric: window sums over the zero-padded plane ÷ the count of the elements that count
        ones = torch.ones(1, 1, *h.shape[2:], dtype=h.dtype, device=h.device)
        total = F.avg_pool2d(F.pad(h, g.pads), (g.kh, g.kw), (g.sh, g.sw), 0, ceil_mode=g.ceil,
                             divisor_override=1)
        count = F.avg_pool2d(F.pad(ones, g.pads, value=float(include)), (g.kh, g.kw), (g.sh, g.sw), 0,
                             ceil_mode=g.ceil, divisor_override=1)
        return (total / count)[..., :ho, :wo]

    def param_vector(self) -> torch.Tensor:
        return torch.cat([p.detach().reshape(-1) for p in self.parameters()])


class PathSelector(nn.Module):
    """A frozen ReLU net used only for its structure (gates + max-pool choices)."""

    def __init__(self, net: ReLUNet) -> None:
        super().__init__()
        self.net = copy.deepcopy(net)
        self.net.requires_grad_(False)
        self.net.eval()

    @property
    def spec(self) -> ArchSpec:
        return self.net.spec

    @property
    def layout(self) -> StructureLayout:
        return self.net.layout

    def train(self, mode: bool = True) -> PathSelector:  # always stays frozen/eval
        return super().train(False)

    @torch.no_grad()
    def structure(self, x: torch.Tensor) -> Structure:
        return self.net.forward_with_structure(x)[1]

    @torch.no_grad()
    def packed_structure(self, x: torch.Tensor, batch_size: int = 4096) -> PackedStructure:
        """Packed structure of many samples, computed in chunks to bound memory."""
        parts = [pack(self.structure(x[i:i + batch_size]), self.layout)
                 for i in range(0, x.shape[0], batch_size)]
        return PackedStructure.concat(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.net(x)


class Estimator(nn.Module):
    """Same architecture as the selector, its own weights; forward takes the structure."""

    def __init__(self, net: ReLUNet) -> None:
        super().__init__()
        self.net = net

    @property
    def spec(self) -> ArchSpec:
        return self.net.spec

    @property
    def layout(self) -> StructureLayout:
        return self.net.layout

    def forward(self, x: torch.Tensor, structure: Structure | PackedStructure) -> torch.Tensor:
        if isinstance(structure, PackedStructure):
            structure = unpack(structure, self.layout)
        return self.net.gated_forward(x, structure)


class DecoupledModel(nn.Module):
    """The serving pair: selector gates → estimator outputs."""

    def __init__(self, selector: PathSelector, estimator: Estimator) -> None:
        super().__init__()
        if selector.spec.to_dict() != estimator.spec.to_dict():
            raise ValueError("selector and estimator must share one architecture")
        self.selector = selector
        self.estimator = estimator

    @property
    def spec(self) -> ArchSpec:
        return self.selector.spec

    @classmethod
    def from_net(cls, net: ReLUNet) -> DecoupledModel:
        """Paper step 2: copy a trained net into a frozen selector and an initial estimator."""
        return cls(PathSelector(net), Estimator(copy.deepcopy(net)))

    def shares_hidden_layers(self) -> bool:
        """Whether every layer below the readout holds bit-identical weights in both nets.

        True right after step 2, an import or a full retrain, and after every readout-only QK
        retrain: then the gated estimator and the plain selector agree up to the readout.
        """
        sel, est = self.selector.net, self.estimator.net
        return all(torch.equal(a, b) for i in range(len(sel.blocks) - 1)
                   for a, b in zip(sel.blocks[i].parameters(), est.blocks[i].parameters(), strict=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.estimator(x, self.selector.structure(x))
