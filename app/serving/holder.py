"""The model holder: which version this process serves, and hot-swapping it.

Loading a version = read its row, verify both sha256s, rebuild the nets, move them to the
device and warm them up; only then is the reference swapped (one attribute assignment, so
a reader sees either the old or the new :class:`LoadedModel`, never a mixture). Batches take
the reference once when they start, so a batch never mixes versions and in-flight work
finishes on the version it started with. A version that fails to load leaves the old one
serving and is not retried for ``retry_failed_after_s``.

``refresh()`` is the one entry point for "the active version may have changed": the
periodic poll, the embedded retrain runner after a promotion, and ``activate`` call it;
a Redis subscriber (distributed mode) only needs to call it too.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from app.core import pieces
from app.core.device import pick_device
from app.core.features import FeatureSchema
from app.core.network import DecoupledModel
from app.core.spec import ArchSpec
from app.serving.metrics import ServingMetrics
from app.serving.models import load_model, schema_of
from app.storage import Store, UnknownVersion, VersionRecord

log = logging.getLogger("skqk.holder")


class MLPForward(torch.nn.Module):
    """Selector gates → estimator outputs for MLP specs, as a handful of fused matmuls.

    Same maths as ``DecoupledModel.forward`` (gate g_l = 1[z_l^S > 0]; estimator
    h_l = g_l ⊙ (W_l^E h_{l-1} + b_l^E)), without building a ``Structure`` and without the
    selector's output layer, whose value no gate depends on.
    """

    def __init__(self, model: DecoupledModel) -> None:
        super().__init__()

        def linears(net: torch.nn.Module) -> list[torch.nn.Linear]:
            return [m for m in net.blocks if isinstance(m, torch.nn.Linear)]

        sel, est = linears(model.selector.net), linears(model.estimator.net)
        self.sel = [(m.weight.detach().t().contiguous(), m.bias.detach().clone()) for m in sel[:-1]]
        self.est = [(m.weight.detach().t().contiguous(), m.bias.detach().clone()) for m in est]
        net = model.estimator.net  # the fixed affine maps are the same in selector and estimator
        self.norm = (net.in_mean.clone(), net.in_inv_std.clone()) if net.has_input_norm else None
        self.out = (net.out_scale.clone(), net.out_shift.clone()) if net.has_output_affine else None
        # Equal hidden weights (after an import, a full retrain or a readout-only QK retrain, the
        # default) make the gated estimator's hidden activations the selector's own ReLU
        # activations: one pass instead of two, exactly.
        self.shared = model.shares_hidden_layers()
        # LeakyReLU / ReLU6 / Hardtanh MLPs: the same passes with their piece maps (None: all ReLU,
        # today's code path untouched)
        acts = [layer for layer in model.spec.layers if layer["type"] != "linear"]
        self.acts = None if all(a["type"] == "relu" for a in acts) else acts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            x = (x - self.norm[0]) * self.norm[1]
        if self.acts is not None:
            return self._piecewise(x)
        hs = he = x
        if self.shared:
            for ws, bs in self.sel:
                he = torch.addmm(bs, he, ws).clamp_min_(0)
        else:
            for (ws, bs), (we, be) in zip(self.sel, self.est, strict=False):
                zs = torch.addmm(bs, hs, ws)
                gate = zs > 0
                hs = zs.clamp_min_(0)
                he = torch.addmm(be, he, we).mul_(gate)
        we, be = self.est[-1]
        out = torch.addmm(be, he, we)
        return out if self.out is None else out.mul_(self.out[0]).add_(self.out[1])


    def _piecewise(self, x: torch.Tensor) -> torch.Tensor:
        hs = he = x
        ident = torch.nn.Identity()
        if self.shared:
            for (ws, bs), act in zip(self.sel, self.acts, strict=True):
                he = pieces.plain(act, ident, torch.addmm(bs, he, ws))
        else:
            for (ws, bs), (we, be), act in zip(self.sel, self.est, self.acts, strict=False):
                zs = torch.addmm(bs, hs, ws)
                piece = pieces.piece(act, zs)
                hs = pieces.plain(act, ident, zs)
                he = pieces.gated(act, ident, torch.addmm(be, he, we), piece)
        we, be = self.est[-1]
        out = torch.addmm(be, he, we)
        return out if self.out is None else out.mul_(self.out[0]).add_(self.out[1])


_LEAN_ACTIVATIONS = {"relu", "leaky_relu", "hardtanh"}  # no parameters (PReLU takes the general path)


def is_mlp(spec: ArchSpec) -> bool:
    kinds = [layer["type"] for layer in spec.layers]
    acts = set(kinds) - {"linear"}
    return len(spec.input_shape) == 1 and acts <= _LEAN_ACTIVATIONS and all(
        kinds[i] == "linear" and (i + 1 == len(kinds) or kinds[i + 1] in _LEAN_ACTIVATIONS)
        for i in range(0, len(kinds), 2))


class SharedTrunkForward(torch.nn.Module):
    """One pass instead of two when the estimator's hidden layers still equal the selector's.

    That is the state right after an import or a full retrain, and after every readout-only QK
    retrain (the default): with equal weights below the readout, the gated estimator and the
    plain selector compute the same penultimate activations, so the pair's output is the
    estimator's readout applied to the selector's own forward. Exact, not an approximation.
    """

    def __init__(self, model: DecoupledModel) -> None:
        super().__init__()
        self.selector = model.selector.net
        self.readout = model.estimator.net.readout
        self.estimator = model.estimator.net
        self.last = len(self.selector.spec.layers) - 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.selector.plain_layers(self.selector.prepare_input(x), self.last)
        return self.estimator.finish_output(self.readout(h))


def compile_for_inference(model: DecoupledModel, device: torch.device,
                          check_sizes: tuple[int, ...] = (1, 3, 17)) -> torch.nn.Module:
    """The module ``LoadedModel.infer`` calls: a lean MLP forward when the spec allows it, else
    one shared-trunk pass when the weights below the readout agree, else the reference pair.

    Verified against the reference ``DecoupledModel`` forward on random inputs before use; a
    mismatch serves the reference model itself.
    """
    if is_mlp(model.spec):
        candidate: type[torch.nn.Module] | None = MLPForward
    elif model.shares_hidden_layers():
        candidate = SharedTrunkForward
    else:
        return model
    try:
        fast = candidate(model)
        gen = torch.Generator().manual_seed(0)
        with torch.inference_mode():
            for n in check_sizes:
                x = torch.rand(n, model.spec.input_dim, generator=gen).to(device)
                if not torch.allclose(fast(x), model(x), rtol=1e-4, atol=1e-5):
                    raise RuntimeError(f"fast forward differs at batch size {n}")
        return fast
    except Exception as exc:
        log.warning("serving the reference forward (%s)", exc)
        return model


@dataclass(eq=False)
class LoadedModel:
    """One immutable, warmed-up version, ready for inference."""

    version: int
    model: DecoupledModel
    record: VersionRecord
    device: torch.device
    loaded_at: float = field(default_factory=time.time)
    runner: torch.nn.Module | None = None  # what infer() calls: traced when possible
    batch_seconds: float = 0.0  # one warm pass at the largest warm-up batch (the serving batch size)
    # plain attributes: read on every request, so not derived through nn.Module lookups
    spec: ArchSpec = field(init=False)
    input_dim: int = field(init=False)
    num_outputs: int = field(init=False)
    schema: FeatureSchema = field(init=False)  # names, task, classes, ranges of this version

    def __post_init__(self) -> None:
        self.spec = self.model.spec
        self.input_dim = self.spec.input_dim
        self.num_outputs = self.spec.num_outputs
        self.schema = schema_of(self.record, self.spec)

    def infer(self, x: np.ndarray) -> np.ndarray:
        """float32 [N, D] → logits float32 [N, C] (CPU numpy)."""
        with torch.inference_mode():
            out = (self.runner or self.model)(torch.from_numpy(x).to(self.device, non_blocking=True))
            return out.float().cpu().numpy()


class ModelHolder:
    def __init__(self, store: Store, device: str | None = "auto", metrics: ServingMetrics | None = None,
                 warmup_batch_sizes: tuple[int, ...] = (1, 64), version_cache_size: int = 2,
                 retry_failed_after_s: float = 30.0, compile: bool = True) -> None:
        self.store = store
        self.compile = compile
        self.device = pick_device(device)
        self.metrics = metrics
        self.warmup_batch_sizes = warmup_batch_sizes
        self.version_cache_size = version_cache_size
        self.retry_failed_after_s = retry_failed_after_s
        self._current: LoadedModel | None = None
        self._cache: OrderedDict[int, LoadedModel] = OrderedDict()  # recently served versions
        self._failed: dict[int, float] = {}
        self._lock = threading.RLock()  # one load/swap at a time

    # ---- reading --------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        return self._current

    @property
    def ready(self) -> bool:
        return self._current is not None

    # ---- loading ----------------------------------------------------------------------------
    def load(self, version: int) -> LoadedModel:
        """Load, verify and warm up a version (raises UnknownVersion, ChecksumMismatch, …)."""
        model, record = load_model(self.store, version)
        record.selector_weights = record.estimator_weights = None  # keep the summary only
        model = model.to(self.device).eval()
        runner = compile_for_inference(model, self.device) if self.compile else None
        loaded = LoadedModel(version, model, record, self.device, runner=runner)
        for n in self.warmup_batch_sizes:
            out = loaded.infer(np.zeros((n, loaded.input_dim), dtype=np.float32))
            if out.shape != (n, loaded.num_outputs) or not np.isfinite(out).all():
                raise RuntimeError(f"version {version} failed its warm-up (output {out.shape})")
        largest = np.zeros((max(self.warmup_batch_sizes, default=1), loaded.input_dim), dtype=np.float32)
        started = time.perf_counter()
        loaded.infer(largest)
        loaded.batch_seconds = time.perf_counter() - started
        return loaded

    def _cached_or_load(self, version: int) -> LoadedModel:
        current = self._current
        if current is not None and current.version == version:
            return current
        cached = self._cache.get(version)
        if cached is not None:
            self._cache.move_to_end(version)
            return cached
        return self.load(version)

    def _remember(self, loaded: LoadedModel) -> None:
        if self.version_cache_size <= 0:
            return
        self._cache[loaded.version] = loaded
        self._cache.move_to_end(loaded.version)
        while len(self._cache) > self.version_cache_size:
            self._cache.popitem(last=False)

    def get_version(self, version: int) -> LoadedModel:
        """A specific version for per-version inference (active one, cached, or loaded now)."""
        with self._lock:
            loaded = self._cached_or_load(version)
            if loaded is not self._current:
                self._remember(loaded)
            return loaded

    # ---- swapping ---------------------------------------------------------------------------
    def swap(self, loaded: LoadedModel) -> None:
        with self._lock:
            previous = self._current
            if previous is loaded:
                return
            self._current = loaded  # the atomic step
            self._cache.pop(loaded.version, None)
            if previous is not None:
                self._remember(previous)  # swapping back is instant
            if self.metrics is not None:
                self.metrics.model_version.set(loaded.version)
                self.metrics.set_model_metrics(loaded.record.metrics)
                if previous is not None:
                    self.metrics.model_swaps.inc()
        log.info("serving version %d (was %s)", loaded.version,
                 previous.version if previous is not None else "none")

    def refresh(self, force: bool = False) -> bool:
        """Swap to the store's active version if it changed; True when a swap happened.

        Never raises for a bad version: the failure is logged and counted, the old model
        keeps serving, and the version is retried after ``retry_failed_after_s``.
        """
        with self._lock:
            try:
                active = self.store.active_version()
            except Exception:
                log.warning("cannot read the active version; keeping the current model", exc_info=True)
                return False
            current = self._current
            if active is None or (current is not None and current.version == active):
                return False
            failed_at = self._failed.get(active)
            recently_failed = (failed_at is not None
                               and time.monotonic() - failed_at < self.retry_failed_after_s)
            if recently_failed and not force:
                return False
            try:
                loaded = self._cached_or_load(active)
            except Exception as exc:
                self._failed[active] = time.monotonic()
                if self.metrics is not None:
                    self.metrics.model_load_failures.inc()
                log.error("version %s failed to load (%s); still serving %s", active, exc,
                          current.version if current is not None else "nothing")
                return False
            self._failed.pop(active, None)
            self.swap(loaded)
            return True

    def activate(self, version: int, actor: str, reason: str) -> tuple[int | None, LoadedModel]:
        """Roll back / forward: verify + warm up first, then move the pointer, then swap.

        A version that does not load is never made active.
        """
        with self._lock:
            if self.store.get_version(version, weights=False) is None:
                raise UnknownVersion(version)
            loaded = self._cached_or_load(version)
            previous = self.store.activate(version, actor=actor, reason=reason)
            self.swap(loaded)
            return previous, loaded
