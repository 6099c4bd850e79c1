"""The serving forward of piecewise-linear MLPs (the lean MLP path for LeakyReLU / ReLU6 / Hardtanh,
the shared-trunk or reference pair for PReLU) equals the reference decoupled pair, with the
estimator equal to the selector below the readout and with it moved away."""

from __future__ import annotations

import copy

import pytest
import torch

from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import resolve_arch
from app.serving.holder import MLPForward, compile_for_inference


@pytest.mark.parametrize("act", ["relu", "leaky_relu:0.1", "relu6", "hardtanh:-1,1", "prelu"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "moved"])
def test_serving_forward_equals_pair(act: str, shared: bool) -> None:
    model = DecoupledModel.from_net(ReLUNet(resolve_arch("mlp:32-32", 10, 3, act), seed=0)).eval()
    if not shared:
        with torch.no_grad():
            model.estimator.net.blocks[0].weight.mul_(1.1)
    fast = compile_for_inference(copy.deepcopy(model), torch.device("cpu"))
    assert isinstance(fast, MLPForward) == (act != "prelu")
    x = torch.randn(64, 10, generator=torch.Generator().manual_seed(0)) * 3
    with torch.no_grad():
        assert torch.allclose(fast(x), model(x), rtol=1e-5, atol=1e-5)
