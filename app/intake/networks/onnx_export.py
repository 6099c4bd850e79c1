"""A served version (selector + estimator) → one ONNX graph with a dynamic batch.

The graph computes the selector's gates (ReLU pre-activations > 0) and max-pool argmaxes and
the estimator's outputs under them (masks and gathers), with the spec's input normalisation
and output affine map, exactly like ``DecoupledModel.forward``. It is traced with torch's
TorchScript-based exporter, which writes MaxPool's Indices output and the gathers directly.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from app.core.network import DecoupledModel


class _Served(nn.Module):
    """Shaped input [N, *input_shape] → the served outputs (the model itself takes flat rows)."""

    def __init__(self, model: DecoupledModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.flatten(1))


def export_onnx(model: DecoupledModel, path: str | Path, output_name: str = "logits", opset: int = 17,
                check: bool = True) -> None:
    """Write ``model`` as ONNX: input ``input`` [N, *spec.input_shape] float32 → ``output_name`` [N, K].

    With ``check`` the file is run once with onnxruntime on a few random inputs and compared with
    the model (≤ 1e-4 × max(1, max|out|)), so a bad export fails here, not in a client.
    """
    served = _Served(copy.deepcopy(model).float().cpu().eval()).eval()
    shape = tuple(model.spec.input_shape)
    dummy = torch.zeros(2, *shape)
    with torch.no_grad(), warnings.catch_warnings():
        # the TorchScript exporter is deprecated upstream but is the one that writes MaxPool indices
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(served, (dummy,), str(path), dynamo=False, opset_version=opset,
                          input_names=["input"], output_names=[output_name],
                          dynamic_axes={"input": {0: "batch"}, output_name: {0: "batch"}})
    if check:
        _check(served, path, shape)


def _check(served: nn.Module, path: str | Path, shape: tuple[int, ...]) -> None:
    import onnxruntime as ort

    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = served(x).numpy()
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = sess.run(None, {"input": x.numpy()})[0]
    err = float(np.abs(got - ref).max())
    if err > 1e-4 * max(1.0, float(np.abs(ref).max())):
        raise RuntimeError(f"exported ONNX graph differs from the model by {err:.3g}")
