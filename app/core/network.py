"""ReLU networks and their decoupled pair: a frozen PathSelector and a gated Estimator.

For hidden layer l the selector computes its own pre-activation z_l^S and the gate
g_l = 1[z_l^S > 0]; the estimator computes h_l = g_l ⊙ (W_l^E h_{l-1} + b_l^E) from its own
previous layer. Max-pools in the estimator gather at the selector's argmax indices. Given
the structure, nothing in the estimator depends non-linearly on x.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn import functional as F

from app.core.spec import ArchSpec, StructureLayout, layer_inputs, pool_geometry
from app.core.structure import PackedStructure, Structure, pack, unpack


class ReLUNet(nn.Module):
    """A plain ReLU network built from an :class:`ArchSpec`."""

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
            prev = tuple(spec.input_shape) if j == -1 else shapes[j]
            if layer["type"] == "linear":
                blocks.append(nn.Linear(prev[0], int(layer["out"])))
            elif layer["type"] == "conv":
                blocks.append(nn.Conv2d(prev[0], int(layer["out"]), int(layer["kernel"]),
                                        stride=int(layer.get("stride", 1)),
                                        padding=int(layer.get("padding", 0)),
                                        groups=int(layer.get("groups", 1))))
            else:
                blocks.append(nn.Identity())  # keeps layer indices aligned with the spec
        if seed is not None:
            torch.random.set_rng_state(generator_state)
        self.blocks = nn.ModuleList(blocks)
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
        return x.reshape(x.shape[0], *self.spec.input_shape)

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
            if kind in ("relu", "maxpool") and taps is not None:
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
