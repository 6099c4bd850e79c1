"""Bring your own trained network: ONNX and ``torch.export`` programs → an :class:`ArchSpec`
plus weights for :class:`app.core.network.ReLUNet` (BatchNorm folded, Dropout/Identity removed),
and the way back out (a served version → one ONNX graph).

Every importer returns an :class:`ImportedNetwork`; anything that is not piecewise linear with
linear (or not supported yet) raises :class:`UnsupportedModel` naming the op, the node and
why. Importers never unpickle anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from app.core.spec import ArchSpec


class UnsupportedModel(ValueError):
    """The model cannot be served as selector + estimator; the message names op, node and why."""


@dataclass
class ImportedNetwork:
    spec: ArchSpec  # the layers (a DAG where the model has skip connections); no input_norm
    state_dict: dict[str, torch.Tensor]  # ReLUNet keys: "blocks.{i}.weight", "blocks.{i}.bias"
    source_format: str  # "onnx" | "pt2"
    notes: list[str] = field(default_factory=list)  # what was folded or removed, for the operator
    stripped_softmax: str | None = None  # "Softmax" / "LogSoftmax" when --strip-softmax dropped one
    class_names: list[str] | None = None  # class labels the file carries (skl2onnx), in output order

    def build(self):  # -> ReLUNet
        from app.core.network import ReLUNet

        net = ReLUNet(self.spec)
        net.load_state_dict(self.state_dict)
        return net.eval()
