"""Approximate Forward Differential Equivalence (AFDE): a layer as a polynomial ODE, its units lumped up to ε.

The seed (approximate-differential-equivalence.txt, Dhiman, Passarella, Tribastone, Valerio 2026) gives no
formulas; the encoding and the criterion below are derived here from the definitions of Cardelli, Tribastone,
Tschaikowski, Vandin (POPL 2016, PNAS 2017) and Cardelli et al. (JLAMP 2023, ε-FDE).

**Encoding.** Follow the input along the ray x(s) = s·x, s ∈ [0, 1]. The pre-activations z = b + s·Wx have
z' = a := Wx (constant in s), and an activation that solves a polynomial ODE makes the units solve one too:

- tanh:    h' = (1 − h²)·a,  h(0) = tanh(b)          sigmoid: h' = h(1 − h)·a,  h(0) = σ(b)
- GELU:    auxiliaries z, Φ, φ (normal cdf and pdf): z' = a, Φ' = φ·a, φ' = −z·φ·a, h = z·Φ, h' = a·(Φ + z·φ)
- SiLU:    auxiliaries z, p: z' = a, p' = p(1 − p)·a, h = z·p, h' = a·(p + z·p(1 − p))
- ReLU:    h' = 1[z > 0]·a is piecewise, not polynomial: it is integrated as that switched ODE (the induced
  trajectory), and the criterion uses GELU's constants (its smooth neighbour), so its bound is a heuristic.

Layers chain (the next layer's a is W h', polynomial again); the linear output layer has y' = V h'. The initial
condition (s = 0) is the network at the zero input, i.e. the biases. The solution at s is the forward pass at
s·x, so the encoding is exact — nothing is fitted; ``encoding_error`` measures the integrator against the
forward pass (the check the seed's referee asked for), ``trajectory_mismatch`` the lumped against the original.

**FDE on this encoding.** A partition is a forward differential equivalence when the block sums H_B = Σ_{j∈B} h_j
obey a closed ODE. For a layer:

1. On the whole state space no block of ≥ 2 tanh units is an FDE: Σ_B h_j' = Σ_B a_j − Σ_B a_j h_j², and
   Σ_B a_j h_j² is not a function of Σ_B h_j (the cross terms 2 h_j h_l are missing) unless every a_j ≡ 0.
2. On the reachable set — the trajectories from the encoding's initial condition, the only states a network
   visits — H_B closes as |B| copies of one unit's dynamics (so the lumped system is again such a layer) iff
   the units' induced dynamics match: equal rhs coefficients w_j (in-weights) and equal initial conditions
   σ(b_j) (biases); degenerate blocks aside (a tanh pair θ_l = −θ_j sums to 0: core/lossless.py handles those).
   Then h_j = h_B for all s, H_B = |B|·h_B, H_B' = |B|·(1 − (H_B/|B|)²)·a_B.
3. The consumer y = Σ_j v_j h_j + c (v_j = its column j) depends on the whole space only through block sums iff
   its columns match on each block (out-weights). On the reachable set of 2 it needs nothing more:
   y = Σ_B (Σ_{j∈B} v_j)·h_B. So the exact criterion (ε = 0) is equal (w_j, b_j) — the paper's exact fibers —
   and the lumping is sum aggregation: one representative carries H_B; the consumer gets the summed column.
4. Approximately: the representative takes the block's mean coefficients θ̄_B (θ_j = (w_j, b_j)), the consumer
   the summed column. With δz_j = z_j − z̄ (Σ_B δz_j = 0) and δv_j = v_j − v̄_B, Taylor gives

       y − ŷ = Σ_B [σ'(z̄)·Σ_{j∈B} δv_j δz_j + ½ Σ_{j∈B} v_j σ''(ξ_j) δz_j²].

   The first-order term is the covariance of the out-weight and the dynamics mismatches: it vanishes when the
   dynamics match (2) *or* when the out-weights match (3: the consumer sees only H_B, and the mean
   representative reproduces H_B to second order — the forward, sum-closing half of FDE). Matching out-weights
   is what lets units with different dynamics lump; this is where AFDE differs from fibers (in-weights only).

**Criterion.** With L1 = sup|σ'|, L2 = ½·sup|σ''| and the path metric M = E[(x,1)(x,1)ᵀ] + e_b e_bᵀ
(calibration inputs; without data, unit-variance inputs: M = diag(1, …, 1, 2)), E[δz_j(s)²] ≤ ‖δθ_j‖²_M for every
s ∈ [0, 1] (δz(s)² is convex in s: the e_b term is the initial condition, E[(x,1)(x,1)ᵀ] the end point). By
Cauchy–Schwarz, for every s,

    E_x ‖y(s) − ŷ(s)‖₂ ≤ Σ_B e_B,   e_B = L1·√(SSv_B·SSθ_B) + L2·WSS_B,

SSθ_B = Σ_B ‖θ_j − θ̄_B‖²_M, SSv_B = Σ_B ‖v_j − v̄_B‖², WSS_B = Σ_B ‖v_j‖·‖θ_j − θ̄_B‖²_M. ε is e_B relative to
the first-order size of the whole layer's output to the consumer, u = L1·(Σ_j ‖v_j‖²‖θ_j‖²_M)^½ (units taken as
uncorrelated): a block joins only while e_B ≤ ε·u. The partition is agglomerative on the blocks
themselves (merge the two blocks whose union has the smallest e; all statistics are additive, as in Ward's
method), not a pairwise linkage; the merge heights, made monotone, form a scipy linkage, so ``FiberDendrogram``'s
O(n) cuts at any ε or unit count apply, and more ε never gives more blocks. Gated units (act(gate)·up) use
θ = (gate row, up row) and the gate activation's constants: a heuristic, the product has no uniform L2.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np
import torch
from torch.nn import functional as F

from .collapse import collapse_weight
from .fibers import FiberDendrogram, FiberPartition

Layer = tuple[torch.Tensor, torch.Tensor | None]
ENCODINGS = ("tanh", "sigmoid", "gelu", "silu", "relu")
_SQRT_2PI = float(np.sqrt(2.0 * np.pi))


# ---------------------------------------------------------------------------------------------- the ODE encoding
def _phi(z: torch.Tensor) -> torch.Tensor:
    return torch.exp(-0.5 * z * z) / _SQRT_2PI


def _init(act: str, z0: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The unit state at s = 0 from the pre-activation z(0) = b (+ W·h_prev(0))."""
    if act == "tanh":
        return (torch.tanh(z0),)
    if act == "sigmoid":
        return (torch.sigmoid(z0),)
    if act == "gelu":
        return z0, 0.5 * (1 + torch.erf(z0 / np.sqrt(2.0))), _phi(z0)
    if act == "silu":
        return z0, torch.sigmoid(z0)
    if act == "relu":
        return (z0,)
    raise ValueError(f"No ODE encoding for activation {act!r}; choose one of {', '.join(ENCODINGS)}.")


def _value(act: str, state: tuple[torch.Tensor, ...]) -> torch.Tensor:
    if act in ("tanh", "sigmoid"):
        return state[0]
    if act == "gelu":
        return state[0] * state[1]
    if act == "silu":
        return state[0] * state[1]
    return state[0].clamp_min(0)


def _rhs(act: str, state: tuple[torch.Tensor, ...], a: torch.Tensor) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    """(d state/ds, dh/ds) of one layer's units given a = W·(d input/ds): polynomial in the state (not for ReLU)."""
    if act == "tanh":
        (h,) = state
        dh = (1 - h * h) * a
        return (dh,), dh
    if act == "sigmoid":
        (h,) = state
        dh = h * (1 - h) * a
        return (dh,), dh
    if act == "gelu":
        z, cdf, pdf = state
        return (a, pdf * a, -z * pdf * a), a * (cdf + z * pdf)
    if act == "silu":
        z, p = state
        dp = p * (1 - p) * a
        return (a, dp), a * p + z * dp
    (z,) = state
    return (a,), (z > 0).to(a) * a


def _linear(x: torch.Tensor, layer: Layer, bias: bool = True) -> torch.Tensor:
    w, b = layer
    return F.linear(x, w.to(x), b.to(x) if (bias and b is not None) else None)


def mlp_forward(layers: Sequence[Layer], activation: str, x: torch.Tensor) -> torch.Tensor:
    """The network: σ after every layer but the last (linear output)."""
    act = {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu, "relu": F.relu}[activation]
    h = x
    for layer in layers[:-1]:
        h = act(_linear(h, layer))
    return _linear(h, layers[-1])


def ode_trajectory(layers: Sequence[Layer], activation: str, x: torch.Tensor, steps: int = 128) -> torch.Tensor:
    """The encoding integrated by RK4 over s ∈ [0, 1]: the output y(s) at s = 0, 1/steps, …, 1 (steps+1, batch, out).

    State: every hidden layer's unit state (see the module docstring) and y; initial condition from the biases."""
    x = x.to(torch.float64)
    hidden, out = list(layers[:-1]), layers[-1]
    states, h0 = [], torch.zeros_like(x)
    for layer in hidden:
        st = _init(activation, _linear(h0, layer))
        states.append(st)
        h0 = _value(activation, st)
    flat = [t for st in states for t in st] + [_linear(h0, out)]
    sizes = [len(st) for st in states]

    def rhs(flat_state: list[torch.Tensor]) -> list[torch.Tensor]:
        d_in, derivs, k = x, [], 0
        for layer, size in zip(hidden, sizes, strict=True):
            d_state, d_in = _rhs(activation, tuple(flat_state[k:k + size]), _linear(d_in, layer, bias=False))
            derivs.extend(d_state)
            k += size
        return derivs + [_linear(d_in, out, bias=False)]

    ds = 1.0 / steps
    path = [flat[-1]]
    for _ in range(steps):
        k1 = rhs(flat)
        k2 = rhs([s + 0.5 * ds * d for s, d in zip(flat, k1, strict=True)])
        k3 = rhs([s + 0.5 * ds * d for s, d in zip(flat, k2, strict=True)])
        k4 = rhs([s + ds * d for s, d in zip(flat, k3, strict=True)])
        flat = [s + ds / 6 * (a + 2 * b + 2 * c + d) for s, a, b, c, d in zip(flat, k1, k2, k3, k4, strict=True)]
        path.append(flat[-1])
    return torch.stack(path)


def encoding_error(layers: Sequence[Layer], activation: str, x: torch.Tensor, steps: int = 128) -> float:
    """max over s on the grid, inputs and outputs of |y_ODE(s) − network(s·x)|: the encoding's own verification."""
    x = x.to(torch.float64)
    traj = ode_trajectory(layers, activation, x, steps)
    s = torch.linspace(0, 1, steps + 1, dtype=torch.float64)
    direct = torch.stack([mlp_forward(_f64(layers), activation, t * x) for t in s])
    return float((traj - direct).abs().max())


def trajectory_mismatch(layers: Sequence[Layer], lumped: Sequence[Layer], activation: str, x: torch.Tensor,
                        steps: int = 128) -> float:
    """max over s, inputs and outputs of |y(s) − ŷ(s)|, both systems integrated as ODEs (0 for the identity)."""
    return float((ode_trajectory(layers, activation, x, steps) - ode_trajectory(lumped, activation, x, steps))
                 .abs().max())


def lump_mlp(layers: Sequence[Layer], partitions: Sequence[FiberPartition | None]) -> list[Layer]:
    """Sum aggregation of every hidden layer ℓ by ``partitions[ℓ]`` (None: untouched; label −1 drops a unit):
    a block's representative gets the mean row and bias, its consumer the summed columns."""
    if len(partitions) != len(layers) - 1:
        raise ValueError(f"{len(layers) - 1} hidden layers need as many partitions, got {len(partitions)}.")
    out, previous = [], None
    for i, (w, b) in enumerate(layers):
        part = partitions[i] if i < len(partitions) else None
        out.append(collapse_weight(w, b, part, previous))
        previous = part
    return out


def _f64(layers: Sequence[Layer]) -> list[Layer]:
    return [(w.to(torch.float64), None if b is None else b.to(torch.float64)) for w, b in layers]


# ---------------------------------------------------------------------------------------------- the ε-criterion
@lru_cache(maxsize=32)
def _constants_by_name(name: str) -> tuple[float, float]:
    return activation_constants(
        {"tanh": torch.tanh, "sigmoid": torch.sigmoid, "gelu": F.gelu, "silu": F.silu, "relu": F.relu}[name])


def activation_constants(activation: str | Callable[[torch.Tensor], torch.Tensor]) -> tuple[float, float]:
    """(L1, L2) = (sup|σ'|, ½·sup|σ''|) on a fine grid of [−12, 12] (autograd). A piecewise-linear activation (σ''
    zero but σ' not constant: ReLU, LeakyReLU) gets GELU's constants, its smooth neighbour."""
    if isinstance(activation, str):
        return _constants_by_name(activation)
    z = torch.linspace(-12, 12, 48001, dtype=torch.float64, requires_grad=True)
    (d1,) = torch.autograd.grad(activation(z).sum(), z, create_graph=True)
    d2 = None
    if d1.requires_grad:
        (d2,) = torch.autograd.grad(d1.sum(), z, allow_unused=True)
    d2 = torch.zeros_like(d1) if d2 is None else d2  # piecewise linear: no second derivative
    l1, l2 = float(d1.detach().abs().max()), 0.5 * float(d2.abs().max())
    if l2 == 0.0 and float(d1.detach().max() - d1.detach().min()) > 1e-9:
        g1, g2 = _constants_by_name("gelu")
        return max(l1, g1), g2
    return l1, l2


def path_metric(inputs: torch.Tensor | None, d_in: int) -> torch.Tensor:
    """M = E[(x,1)(x,1)ᵀ] + e_b e_bᵀ over calibration inputs (tokens × d_in); None: unit-variance inputs."""
    if inputs is None:
        metric = torch.eye(d_in + 1, dtype=torch.float64)
    else:
        x = inputs.detach().reshape(-1, d_in).to("cpu", torch.float64)
        x1 = torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)
        metric = x1.T @ x1 / x1.shape[0]
    metric[d_in, d_in] += 1.0
    return metric


def unit_coefficients(in_layers: Sequence[Layer]) -> torch.Tensor:
    """θ_j: every input module's row and bias (0 where there is none), units × modules × (d_in + 1)."""
    rows = []
    for w, b in in_layers:
        w = w.detach().to("cpu", torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64) if b is None else b.detach().to("cpu", torch.float64)
        rows.append(torch.cat([w, b[:, None]], dim=1))
    return torch.stack(rows, dim=1)


class AFDEDendrogram(FiberDendrogram):
    """Agglomerative ε-FDE blocks of one layer's units; cut at any ε (relative bound, see the module docstring) or
    unit count exactly like a ``FiberDendrogram``. ε = 0 merges units with equal (w_j, b_j) (``exact_rtol``)."""

    def __init__(self, in_layers: Sequence[Layer], out_weight: torch.Tensor,
                 activation: str | Callable[[torch.Tensor], torch.Tensor] = "tanh",
                 inputs: torch.Tensor | None = None, exact_rtol: float = 1e-6) -> None:
        theta = unit_coefficients(in_layers)
        n, _, d1 = theta.shape
        self.l1, self.l2 = activation_constants(activation)
        self.metric = path_metric(inputs, d1 - 1)
        self.theta = theta
        self.out = out_weight.detach().to("cpu", torch.float64).T.contiguous()  # units × consumers
        if self.out.shape[0] != n:
            raise ValueError(f"The consumer reads {self.out.shape[0]} units, the layer has {n}.")
        self.rows = theta.reshape(n, -1)
        self.scale_aware = False
        self.exact_rtol = exact_rtol
        self.norms = self.rows.norm(dim=1)
        gram_theta = torch.einsum("nkd,de,mke->nm", theta, self.metric, theta)
        gram_out = self.out @ self.out.T
        weights = self.out.norm(dim=1)
        self.unit = self.l1 * float((weights ** 2 * gram_theta.diagonal()).sum().sqrt())
        if self.unit <= 0:
            self.unit = 1.0
        self.linkage = None if n < 2 else _agglomerate(gram_theta.numpy(), gram_out.numpy(), weights.numpy(),
                                                       self.l1, self.l2, self.unit)
        self._exact = None

    def block_bound(self, partition: FiberPartition) -> float:
        """Σ_B e_B in the consumer's units: the bound on E_x‖y(s) − ŷ(s)‖₂ for every s (module docstring)."""
        total = 0.0
        for c in range(partition.num_fibers):
            members = torch.nonzero(partition.labels == c).flatten()
            th, v = self.theta[members], self.out[members]
            dth, dv = th - th.mean(0), v - v.mean(0)
            sq = torch.einsum("nkd,de,nke->n", dth, self.metric, dth)
            ss_theta, ss_out = float(sq.sum()), float((dv ** 2).sum())
            total += self.l1 * (ss_theta * ss_out) ** 0.5 + self.l2 * float((v.norm(dim=1) * sq).sum())
        return total


def _agglomerate(gram_theta: np.ndarray, gram_out: np.ndarray, weights: np.ndarray, l1: float, l2: float,
                 unit: float) -> np.ndarray:
    """Greedy block merging by the smallest e(A ∪ B)/unit from additive statistics; a scipy linkage matrix with
    the heights made monotone (cumulative maximum)."""
    n = weights.shape[0]
    kss = gram_theta.copy()                  # ⟨S_A, S_B⟩_M, S = Σ θ_j
    kst = gram_theta * weights[None, :]      # ⟨S_A, T_B⟩_M, T = Σ ‖v_j‖·θ_j
    kvv = gram_out.copy()                    # ⟨V_A, V_B⟩,   V = Σ v_j
    q, qv = gram_theta.diagonal().copy(), gram_out.diagonal().copy()
    a, w, cnt = weights * q, weights.copy(), np.ones(n)

    def cost(i: np.ndarray | int, j: np.ndarray) -> np.ndarray:
        m = cnt[i] + cnt[j]
        s2 = kss[i, i] + 2 * kss[i, j] + kss[j, j]
        ss_theta = np.clip(q[i] + q[j] - s2 / m, 0, None)
        ss_out = np.clip(qv[i] + qv[j] - (kvv[i, i] + 2 * kvv[i, j] + kvv[j, j]) / m, 0, None)
        st = kst[i, i] + kst[i, j] + kst[j, i] + kst[j, j]
        wss = np.clip(a[i] + a[j] - 2 * st / m + (w[i] + w[j]) * s2 / m ** 2, 0, None)
        return (l1 * np.sqrt(ss_out * ss_theta) + l2 * wss) / unit

    idx = np.arange(n)
    costs = cost(idx[:, None], idx[None, :])
    np.fill_diagonal(costs, np.inf)
    row_min, row_arg = costs.min(1), costs.argmin(1)
    ids, active = idx.copy(), np.ones(n, dtype=bool)
    merges = np.zeros((n - 1, 4))
    for t in range(n - 1):
        i = int(row_min.argmin())
        j = int(row_arg[i])
        i, j = min(i, j), max(i, j)
        merges[t] = (ids[i], ids[j], costs[i, j], cnt[i] + cnt[j])
        for mat in (kss, kst, kvv):
            mat[i, :] += mat[j, :]
            mat[:, i] += mat[:, j]
        q[i] += q[j]
        qv[i] += qv[j]
        a[i] += a[j]
        w[i] += w[j]
        cnt[i] += cnt[j]
        ids[i], active[j] = n + t, False
        costs[j, :] = costs[:, j] = np.inf
        row_min[j] = np.inf
        others = np.flatnonzero(active)
        others = others[others != i]
        costs[i, :] = np.inf
        if others.size == 0:
            break
        new = cost(i, others)
        costs[i, others] = costs[others, i] = new
        row_min[i], row_arg[i] = new.min(), others[new.argmin()]
        stale = others[(row_arg[others] == i) | (row_arg[others] == j)]
        if stale.size:
            row_min[stale], row_arg[stale] = costs[stale].min(1), costs[stale].argmin(1)
        better = others[new < row_min[others]]
        row_min[better], row_arg[better] = costs[better, i], i
    merges[:, 2] = np.maximum.accumulate(merges[:, 2])
    return merges
