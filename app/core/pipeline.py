"""Paper step 1 as one call: load a data set, build the net, train it, evaluate on test."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from app.core.data import Dataset, load_dataset
from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import resolve_arch
from app.core.training import EpochCallback, TrainConfig, TrainResult, evaluate, train_full

DEFAULT_ARCH = "mlp:256-256"


@dataclass
class InitialModel:
    model: DecoupledModel
    dataset: Dataset
    result: TrainResult
    test_loss: float
    test_acc: float

    def metrics(self) -> dict[str, Any]:
        return {"dataset": self.dataset.name, "test_loss": self.test_loss,
                "test_acc": self.test_acc, **self.result.summary()}


def train_initial(dataset: str, arch: str = DEFAULT_ARCH, cfg: TrainConfig | None = None,
                  on_epoch: EpochCallback | None = None, synthetic_n: int = 20_000
                  ) -> InitialModel:
    cfg = cfg or TrainConfig()
    data = load_dataset(dataset, seed=cfg.seed, synthetic_n=synthetic_n)
    spec = resolve_arch(arch, data.input_dim, data.num_classes)
    net = ReLUNet(spec, seed=cfg.seed)
    result = train_full(net, data.train, data.val, cfg, on_epoch=on_epoch)
    test = data.test.to(next(net.parameters()).device)
    test_loss, test_acc = evaluate(lambda x, _rows: net(x), test)
    model = DecoupledModel.from_net(net.cpu())
    return InitialModel(model, data, result, test_loss, test_acc)
