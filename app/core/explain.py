"""Exact explanations from the frozen structure, with a certified region around each input.

For an input x the selector fixes the structure S(x) (every gate, every max-pool choice).
Under a fixed structure the estimator is an affine map of the *raw* input (the input
normalisation and the output scale are affine too): y = A(x)·x + c(x). So an explanation is
exact: feature j contributes A_j(x)·(x_j − r_j) for a reference input r, and
output = (A(x)·r + c(x)) + Σ_j contributions_j.

The certified radius is the distance from x to the nearest point where S changes: for each
selector unit, |z_k(x)| / ‖∇ₓ z_k‖ (a ReLU's pre-activation), and for each max-pool window and
each competitor, (z_winner − z_other) / ‖∇ₓ(z_winner − z_other)‖; the minimum over all. The
gradients are those of the selector's affine piece at x, so inside that radius (L2 with
‖·‖₂, L∞ with the dual norm ‖·‖₁) no gate and no choice changes and A(x), c(x) are the
model there. A constraint whose gradient is zero never binds (the quantity is constant on
the piece, so the decision cannot change): ratio = ∞.

How A is computed (batched, no per-row Python loop): the *linear part* of a net is a copy
with every bias, the input mean and the output shift set to zero; its gated forward under
S(x) is exactly x ↦ A(x)·x. Running it on the D unit vectors of every row (a batch of N·D
rows, each with its row's structure) gives A and, through ``taps`` on the network's own
``run_layers``, the Jacobian of every selector unit. Cost: about D forward passes per row,
memory rows × D × widest layer (``cost_per_row``: what the serving cap is counted in).

Generalising to piece indices (LeakyReLU/ReLU6/Hardtanh): the gated forward then applies
slope[piece]·h + const[piece]; the linear part must zero ``const`` as well, and the radius
needs, per unit, the distance to *both* breakpoints of its piece (|z − t| for each threshold
t bounding the piece) instead of |z| alone (``_relu_radius``), ``_spread`` must keep piece
indices as they are (it casts boolean gates to the working dtype), and ``_explain_fast`` needs
nothing new. ``run_layers``'s ``taps`` must keep handing over each unit's input.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from app.core.network import DecoupledModel, ReLUNet
from app.core.spec import ACTIVATION_TYPES, ArchSpec, pool_geometry
from app.core.structure import Structure

CHUNK_ELEMENTS = 1 << 23  # per internal chunk: rows × D × widest layer (≈ 32 MiB at float32)


@dataclass
class Explanation:
    """Exact local affine maps of N rows, and their certified radii."""

    outputs: torch.Tensor  # [N, K] the model's output at x
    jacobian: torch.Tensor  # [N, K, D] A(x), in raw input units
    offset: torch.Tensor  # [N, K] c(x): the same affine piece evaluated at x = 0
    active_units: torch.Tensor  # [N] int64: gates that are on
    radius_l2: torch.Tensor  # [N]
    radius_linf: torch.Tensor  # [N]
    direction_l2: torch.Tensor  # [N, D] unit vector to the nearest structure change (L2)
    direction_linf: torch.Tensor  # [N, D] its L∞ counterpart (entries ±1, 0 where irrelevant)

    def contributions(self, x: torch.Tensor, reference: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(contributions [N, K, D] = A_j·(x_j − r_j), intercepts [N, K] = A·r + c)."""
        reference = reference.to(self.jacobian.dtype).expand_as(x)
        contrib = self.jacobian * (x.to(self.jacobian.dtype) - reference)[:, None, :]
        intercept = torch.einsum("nkd,nd->nk", self.jacobian, reference) + self.offset
        return contrib, intercept

    @staticmethod
    def concat(parts: list[Explanation]) -> Explanation:
        return Explanation(*(torch.cat([getattr(p, f) for p in parts]) for f in
                             ("outputs", "jacobian", "offset", "active_units", "radius_l2", "radius_linf",
                              "direction_l2", "direction_linf")))


def linear_part(net: ReLUNet) -> ReLUNet:
    """A copy whose gated forward is x ↦ A·x: biases, input mean and output shift zeroed."""
    lin = copy.deepcopy(net).requires_grad_(False).eval()
    with torch.no_grad():
        for block in lin.blocks:
            bias = getattr(block, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.zero_()
        if lin.has_input_norm:
            lin.in_mean.zero_()  # (x − 0)·inv_std: the normalisation's linear part
        if lin.has_output_affine:
            lin.out_shift.zero_()
    return lin


def total_units(spec: ArchSpec) -> int:
    """Gates of the net (what ``active_units`` counts out of)."""
    shapes = spec.shapes()
    return sum(math.prod(shapes[i]) for i, layer in enumerate(spec.layers)
               if layer["type"] in ACTIVATION_TYPES)


def cost_per_row(spec: ArchSpec) -> int:
    """Tensor elements one row's explanation holds at most: D × (widest layer + every tapped unit).

    The gradients of every ReLU and max-pool input are kept until the radius is taken; a
    max-pool's competitor margins count once per window element (k² × its output).
    """
    shapes = spec.shapes()
    widest, tapped = spec.input_dim, 0
    for i, layer in enumerate(spec.layers):
        size = math.prod(shapes[i])
        widest = max(widest, size)
        if layer["type"] == "relu":
            tapped += size
        elif layer["type"] == "maxpool":
            k, _, _ = pool_geometry(layer)
            tapped += size * k * k
    return spec.input_dim * (widest + tapped)


class Explainer:
    """Explanations of one (frozen) model; build once per served version and reuse."""

    def __init__(self, model: DecoupledModel) -> None:
        self.model = model
        self.selector = model.selector.net
        self.estimator = model.estimator.net
        # equal hidden weights (the usual case): the estimator's tangent pass also yields the
        # selector units' gradients, exactly; one pass of N·D rows instead of two
        self.shared = model.shares_hidden_layers()
        self.lin_estimator = linear_part(self.estimator)
        self.lin_selector = None if self.shared else linear_part(self.selector)
        self.spec = model.spec
        self.input_dim = self.spec.input_dim
        self.total_units = total_units(self.spec)
        self.cost_per_row = cost_per_row(self.spec)
        self.relu_only = all(layer["type"] == "relu" for layer in self.spec.layers
                             if layer["type"] in ACTIVATION_TYPES)
        self.pools = [layer for layer in self.spec.layers if layer["type"] == "maxpool"]

    def chunk_rows(self, budget: int = CHUNK_ELEMENTS) -> int:
        return max(1, budget // self.cost_per_row)

    @torch.no_grad()
    def explain(self, x: torch.Tensor, chunk_rows: int | None = None, radius: bool = True) -> Explanation:
        """x: [N, D] raw rows (the model's dtype and device) → their exact explanations.

        ``radius=False`` skips the certified radius (NaN) and with it every hidden unit's
        gradient: A(x) then comes from one reverse pass per output (about 2 forward passes
        each instead of D), for clients that only want the contributions.
        """
        if not radius or not self.relu_only:
            # other piecewise-linear activations: exact A(x) and offset (the gated forward is affine
            # under the frozen pieces); the certified radius is not generalised yet (NaN)
            return self._explain_fast(x)
        step = chunk_rows or self.chunk_rows()
        parts = [self._explain(x[i:i + step]) for i in range(0, x.shape[0], step)]
        return parts[0] if len(parts) == 1 else Explanation.concat(parts)

    def _explain_fast(self, x: torch.Tensor) -> Explanation:
        n, d = x.shape
        structure = Structure([], [])
        self.selector.run_layers(self.selector.prepare_input(x), 0, len(self.selector.blocks),
                                 record=structure)
        est = self.estimator
        offset = est.gated_forward(torch.zeros_like(x), structure)
        with torch.enable_grad():  # the piece is affine in x: its gradient is A(x) exactly
            xg = x.detach().clone().requires_grad_(True)
            outputs = est.gated_forward(xg, structure)
            k = outputs.shape[1]
            rows = [torch.autograd.grad(outputs[:, j].sum(), xg, retain_graph=j + 1 < k)[0] for j in range(k)]
        jacobian = torch.stack(rows, 1)  # [N, K, D]
        active = sum((_on(g).reshape(n, -1).sum(1) for g in structure.gates),
                     torch.zeros(n, dtype=torch.int64, device=x.device))
        nan = torch.full((n,), math.nan, dtype=jacobian.dtype, device=x.device)
        none = torch.zeros(n, d, dtype=jacobian.dtype, device=x.device)
        return Explanation(outputs.detach(), jacobian, offset, active, nan, nan.clone(), none, none.clone())

    def _explain(self, x: torch.Tensor) -> Explanation:
        n, d = x.shape
        sel, est = self.selector, self.estimator
        # values: the selector's recording pass, tapping each unit's decision input
        structure, values = Structure([], []), []
        sel.run_layers(sel.prepare_input(x), 0, len(sel.blocks), record=structure, taps=values)
        outputs = est.gated_forward(x, structure)
        offset = est.gated_forward(torch.zeros_like(x), structure)
        # tangents: the D unit vectors of every row, each under its row's structure
        basis = torch.eye(d, dtype=x.dtype, device=x.device).repeat(n, 1)  # [N·D, D]
        # gates as the working dtype: the gated pass multiplies by them (bool would convert per layer)
        spread = Structure([_spread(g.to(x.dtype), d) for g in structure.gates],
                           [_spread(p, d) for p in structure.pool_indices])
        grads: list[torch.Tensor] = []
        jac = self.lin_estimator.gated_forward(basis, spread, taps=grads if self.shared else None)
        if not self.shared:
            assert self.lin_selector is not None
            self.lin_selector.gated_forward(basis, spread, taps=grads)
        del spread, basis
        jacobian = jac.view(n, d, -1).transpose(1, 2)  # [N, K, D]
        r2, rinf, d2, dinf = self._radius(n, d, values, [g.view(n, d, *g.shape[1:]) for g in grads],
                                          structure)
        active = sum((g.reshape(n, -1).sum(1) for g in structure.gates),
                     torch.zeros(n, dtype=torch.int64, device=x.device))
        return Explanation(outputs, jacobian, offset, active, r2, rinf, d2, dinf)

    def _radius(self, n: int, d: int, values: list[torch.Tensor], grads: list[torch.Tensor],
                structure: Structure) -> Ratios:
        """The minimum over every ReLU and max-pool of the net, with its direction."""
        ref = self.lin_estimator.readout.weight
        r2 = torch.full((n,), math.inf, dtype=ref.dtype, device=ref.device)
        rinf = r2.clone()
        d2, dinf = r2.new_zeros(n, d), r2.new_zeros(n, d)
        pi = 0
        kinds = [layer["type"] for layer in self.spec.layers if layer["type"] in ("relu", "maxpool")]
        for layer, (kind, z, g) in enumerate(zip(kinds, values, grads, strict=True)):
            if kind == "relu":
                g = g.reshape(n, d, -1)
                if layer == 0:  # nothing structural before it: its gradient is the same for every row
                    g = g[:1].expand(n, -1, -1)
                a, b, da, db = _relu_radius(z.reshape(n, -1), g)
            else:
                a, b, da, db = _pool_radius(z, g, structure.pool_indices[pi], pool_geometry(self.pools[pi]))
                pi += 1
            d2 = torch.where((a < r2)[:, None], da, d2)
            dinf = torch.where((b < rinf)[:, None], db, dinf)
            r2, rinf = torch.minimum(r2, a), torch.minimum(rinf, b)
        return r2, rinf, d2, dinf


Ratios = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


def _spread(t: torch.Tensor, d: int) -> torch.Tensor:
    """[N, …] → [N·d, …], each row d times in a row (a plain copy; repeat_interleave gathers)."""
    return t.unsqueeze(1).expand(t.shape[0], d, *t.shape[1:]).reshape(t.shape[0] * d, *t.shape[1:])


def _ratio(margin: torch.Tensor, grad: torch.Tensor) -> Ratios:
    """Over units: min |margin| / ‖grad‖₂ and / ‖grad‖₁, and the step direction to each nearest one.

    margin: [N, U] (signed: the decision flips where it crosses 0); grad: [N, D, U]. The L2
    direction is the unit vector along which the binding margin shrinks; the L∞ one its sign
    pattern (‖·‖∞ = 1). A margin exactly at 0 counts as "off" (as ``z > 0`` gates): it grows.
    """
    n = grad.shape[0]
    if grad.stride(0) == 0:  # one gradient for every row (broadcast): its norms once
        l2 = grad[:1].square().sum(dim=1).sqrt_().expand(n, -1)
        l1 = grad[:1].abs().sum(dim=1).expand(n, -1)
    else:
        l2 = grad.square().sum(dim=1).sqrt_()  # ~6× faster than linalg.vector_norm over a middle axis
        l1 = grad.abs().sum(dim=1)
    m = margin.abs()
    inf = torch.tensor(math.inf, dtype=m.dtype, device=m.device)
    a = torch.where(l2 > 0, m / l2, inf)
    b = torch.where(l1 > 0, m / l1, inf)
    ia, ib = a.argmin(1, keepdim=True), b.argmin(1, keepdim=True)  # [N, 1]
    toward = torch.where(margin > 0, -1.0, 1.0).to(grad.dtype)  # the sign that moves the margin to 0

    def pick(i: torch.Tensor) -> torch.Tensor:  # the binding unit's gradient, pointing to its boundary
        g = grad.gather(2, i[:, None, :].expand(n, grad.shape[1], 1)).squeeze(2)
        return g * toward.gather(1, i)

    ga, gb = pick(ia), pick(ib)
    da = ga / torch.linalg.vector_norm(ga, 2, dim=1, keepdim=True).clamp_min(torch.finfo(ga.dtype).tiny)
    return a.gather(1, ia).squeeze(1), b.gather(1, ib).squeeze(1), da, torch.sign(gb)


def _on(g: torch.Tensor) -> torch.Tensor:
    """Units on their identity piece: a 2-piece gate as is, a 3-piece unit between its bounds."""
    return g if g.dtype == torch.bool else g == 1


def _relu_radius(z: torch.Tensor, g: torch.Tensor) -> Ratios:
    """z: [N, U] pre-activations; g: [N, D, U] their gradients. The gate flips where z crosses 0."""
    return _ratio(z, g)


def _pool_radius(h: torch.Tensor, g: torch.Tensor, idx: torch.Tensor, geometry: tuple[int, int, int]
                 ) -> Ratios:
    """Max-pool margins: winner − each competitor in its window, over the gradient of that difference.

    h: [N, C, H, W] the pool's input; g: [N, D, C, H, W] its gradient; idx: [N, C, Ho, Wo] the
    winners (flat index into H·W). Padding never wins (−∞), so it imposes no constraint.
    """
    k, s, p = geometry
    n, c, hh, ww = h.shape
    d = g.shape[1]
    win_val = h.flatten(2).gather(2, idx.flatten(2))  # [N, C, L]
    padded = F.pad(h, (p, p, p, p), value=-math.inf) if p else h
    cand = F.unfold(padded.reshape(n * c, 1, *padded.shape[2:]), k, stride=s).view(n, c, k * k, -1)
    margin = win_val[:, :, None, :] - cand  # [N, C, kk, L]; +∞ at padding
    gflat = g.reshape(n, d, c, hh * ww)
    win_grad = gflat.gather(3, idx.flatten(2)[:, None].expand(n, d, c, -1))  # [N, D, C, L]
    gpad = F.pad(g.reshape(n * d * c, 1, hh, ww), (p, p, p, p)) if p else g.reshape(n * d * c, 1, hh, ww)
    gcand = F.unfold(gpad, k, stride=s).view(n, d, c, k * k, -1)
    diff = win_grad[:, :, :, None, :] - gcand  # [N, D, C, kk, L]
    # the winner against itself: margin 0, gradient 0 → no constraint (∞), as for padding
    return _ratio(margin.reshape(n, -1), diff.reshape(n, d, -1))


def group_columns(values: torch.Tensor, groups: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum the last axis (encoded input columns) into ``n_groups`` original features.

    ``groups[j]`` is the original feature of encoded column j (identity when every column is
    its own feature). Contributions add, so a one-hot block's share is the sum of its columns.
    """
    out = values.new_zeros(*values.shape[:-1], n_groups)
    return out.index_add_(values.dim() - 1, groups.to(values.device), values)
