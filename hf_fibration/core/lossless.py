"""Lossless compression with a certificate (losslessly-compressible-parameters.txt, Alg. 4.1 / 4.2).

A hidden layer h = σ(W x + b) feeding y = A h + d. Its units reduce without changing the function when
(Sussmann's conditions, extended per activation):

- ``zero_in``: a unit's in-weights are zero, so it is the constant σ(b_i); its contribution A[:, i]·σ(b_i) is
  folded into the consumer's bias (needs one, unless the constant is 0),
- ``equal``: two units have equal (in-weights, bias) — exact for every activation,
- ``negated``: (w_i, b_i) = −(w_j, b_j) — exact for odd σ (tanh); σ(−z) = 1 − σ(z) makes it exact for the
  sigmoid too, with the 1 folded into the consumer's bias,
- ``scaled``: (w_i, b_i) = s·(w_j, b_j), s > 0 — exact for positively homogeneous σ (ReLU family); any s ≠ 0 for
  a linear unit,
- ``zero_out``: the merged outgoing weight Σ_{i∈C} s_i·A[:, i] of a group is zero.

``lossless_partition`` runs Alg. 4.1's three stages in that order (eliminate constants, partition by the
canonical signed row and merge with signed outgoing sums, drop merged units with zero outgoing weight); for a
single-hidden-layer tanh network the result is the optimal lossless compression and its unit count is the rank
(Theorem 4.1/4.2). For deep networks every hidden layer is reduced and the sweep repeats until nothing changes;
that is lossless but only an upper bound on the minimal width. The partition is the certificate: fiber id,
signed scale and bias offset per unit (the seed's compression trace (Ī, Π, K̄, σ)).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .collapse import collapse_weight
from .fibers import FiberPartition, relabel
from .modules import count_parameters, linear_from_weights

RULES = ("zero_in", "equal", "negated", "scaled", "zero_out")
SYMMETRIES = ("odd", "odd_offset", "positive", "linear", "none")

# name → (σ, symmetry that is exact for it)
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], str]] = {
    "tanh": (torch.tanh, "odd"),
    "sigmoid": (torch.sigmoid, "odd_offset"),
    "relu": (torch.relu, "positive"),
    "leaky_relu": (F.leaky_relu, "positive"),
    "identity": (lambda z: z, "linear"),
    "linear": (lambda z: z, "linear"),
    "gelu": (F.gelu, "none"),
    "silu": (F.silu, "none"),
    "swish": (F.silu, "none"),
    "elu": (F.elu, "none"),
    "softplus": (F.softplus, "none"),
}
MODULE_ACTIVATIONS = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu",
                      nn.Identity: "identity", nn.GELU: "gelu", nn.SiLU: "silu", nn.ELU: "elu",
                      nn.Softplus: "softplus"}
TRANSPARENT = (nn.Dropout,)


@dataclass
class LosslessPartition(FiberPartition):
    """A FiberPartition whose scales may be negative (odd σ), plus the consumer-bias offset of each unit.

    Unit i computes h_i = scales[i]·h_{labels[i]} + offsets[i] (label −1: h_i = offsets[i], a constant), so
    collapsing with ``collapse_weight`` and adding A @ offsets to the consumer's bias is exact.
    """

    offsets: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    removed: dict[str, int] = field(default_factory=dict)

    @property
    def num_removed(self) -> int:
        return sum(self.removed.values())


@dataclass
class LosslessLayer:
    name: str
    activation: str
    units_before: int
    units_after: int
    removed: dict[str, int]
    params_before: int = 0
    params_after: int = 0


@dataclass
class LosslessReport:
    """Units removed per rule and layer; ``max_abs_delta`` is the measured max |Δ output| on the given data."""

    layers: list[LosslessLayer] = field(default_factory=list)
    sweeps: int = 0
    max_abs_delta: float | None = None
    delta_data: str | None = None

    @property
    def removed(self) -> dict[str, int]:
        return {r: sum(layer.removed.get(r, 0) for layer in self.layers) for r in RULES}

    @property
    def units_before(self) -> int:
        return sum(layer.units_before for layer in self.layers)

    @property
    def units_after(self) -> int:
        return sum(layer.units_after for layer in self.layers)

    def to_dict(self) -> dict:
        return {**asdict(self), "removed_total": self.removed}

    def table(self) -> str:
        header = f"{'layer':<44} {'act':<10} {'units':>11} " + " ".join(f"{r:>8}" for r in RULES)
        lines = [header, "-" * len(header)]
        for layer in self.layers:
            units = f"{layer.units_before}->{layer.units_after}"
            lines.append(f"{layer.name:<44} {layer.activation:<10} {units:>11} "
                         + " ".join(f"{layer.removed.get(r, 0):>8}" for r in RULES))
        lines.append(f"hidden units: {self.units_before} -> {self.units_after}; removed per rule: "
                     + ", ".join(f"{r} {n}" for r, n in self.removed.items()))
        if self.max_abs_delta is not None:
            lines.append(f"max |Δ output| on {self.delta_data or 'the given data'}: {self.max_abs_delta:.3e}")
        return "\n".join(lines)

    __str__ = table


def default_rtol(dtype: torch.dtype) -> float:
    """Equal up to the rounding of the stored dtype (float32 weights: ~1e-6; float64: ~2e-15)."""
    return 8.0 * torch.finfo(dtype).eps


def symmetry_of(activation: str, out_bias: bool) -> str:
    """The reductions exact for σ; the sigmoid's negation needs a consumer bias to absorb the 1."""
    if activation not in ACTIVATIONS:
        return "none"
    sym = ACTIVATIONS[activation][1]
    return "none" if sym == "odd_offset" and not out_bias else sym


def group_rows(rows: torch.Tensor, tol: float) -> torch.Tensor:
    """Label rows that are equal within ``tol`` (max-abs), in O(n log n) plus the candidate runs.

    Rows within tol have projections (on positive weights r) within tol·Σr, so sorting by the projection puts
    them in one run of small consecutive gaps; only rows of a run are compared.
    """
    n = rows.shape[0]
    labels = torch.full((n,), -1, dtype=torch.long)
    if n == 0:
        return labels
    gen = torch.Generator().manual_seed(0)
    r = torch.rand(rows.shape[1], generator=gen, dtype=torch.float64) + 0.5
    proj = rows @ r
    slack = tol * float(r.sum()) * (1 + 1e-9) + 1e-300
    order = torch.argsort(proj)
    gaps = (proj[order[1:]] - proj[order[:-1]]) > slack
    starts = [0, *(torch.nonzero(gaps).flatten() + 1).tolist(), n]
    next_label = 0
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        members = order[a:b]
        while members.numel():
            same = (rows[members] - rows[members[0]]).abs().amax(dim=1) <= tol
            labels[members[same]] = next_label
            next_label += 1
            members = members[~same]
    return labels


def _canonical(rows: torch.Tensor, symmetry: str, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(canonical rows, s) with rows = s·canonical, s from the activation's exact symmetry."""
    scale = torch.ones(rows.shape[0], dtype=torch.float64)
    if symmetry in ("odd", "odd_offset", "linear"):
        big = rows.abs() > tol
        first = torch.where(big.any(1), big.to(torch.int8).argmax(1), torch.zeros_like(scale, dtype=torch.long))
        sign = torch.sign(rows.gather(1, first.unsqueeze(1)).squeeze(1))
        scale = torch.where(sign == 0, 1.0, sign)
    if symmetry in ("positive", "linear"):
        norm = rows.norm(dim=1)
        scale = scale * torch.where(norm > tol, norm, 1.0)
    return rows / scale.unsqueeze(1), scale


def lossless_partition(
    inputs: Sequence[tuple[torch.Tensor, torch.Tensor | None]],
    weight_out: torch.Tensor,
    activation: str = "tanh",
    *,
    out_bias: bool = True,
    act_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    rtol: float | None = None,
) -> LosslessPartition:
    """Alg. 4.1 for one hidden layer: which units to drop, merge (with signed scales) or fold into the bias.

    ``inputs`` is [(W, b)] for h = σ(W x + b), or [(W_gate, b_gate), (W_up, b_up)] for a gated unit
    h = σ(W_gate x + b_gate)·(W_up x + b_up) (then only ``zero_in``, ``equal`` and ``zero_out`` apply).
    ``weight_out`` is the consumer's (n_out, h) weight; ``out_bias`` whether the consumer has a bias to fold
    constants into. ``act_fn`` overrides σ for activations not in ``ACTIVATIONS`` (their symmetry is "none").
    """
    if not inputs or len(inputs) > 2:
        raise ValueError("lossless_partition takes [(W, b)] or a gated [(W_gate, b_gate), (W_up, b_up)].")
    rtol = default_rtol(inputs[0][0].dtype) if rtol is None else rtol
    sigma = act_fn or ACTIVATIONS.get(activation, (None, ""))[0]
    if sigma is None:
        raise ValueError(f"Unknown activation {activation!r}; pass act_fn= or use one of {', '.join(ACTIVATIONS)}.")
    gated = len(inputs) == 2
    parts = [_with_bias(w, b) for w, b in inputs]
    h = parts[0].shape[0]
    a = weight_out.detach().to(torch.float64)
    if a.shape[1] != h:
        raise ValueError(f"weight_out has {a.shape[1]} input columns but the layer has {h} units.")
    rows = torch.cat(parts, dim=1)
    tol = rtol * max(float(rows.abs().max()) if rows.numel() else 0.0, 1e-300)
    symmetry = "none" if gated else symmetry_of(activation, out_bias)

    # Stage 1: units with zero in-weights are constants.
    in_zero = [p[:, :-1].abs().amax(1) <= tol if p.shape[1] > 1 else torch.ones(h, dtype=torch.bool) for p in parts]
    with torch.no_grad():
        value = sigma(parts[0][:, -1])
        dead = torch.zeros(h, dtype=torch.bool)
        if gated:
            dead = (in_zero[0] & (value.abs() <= tol)) | (in_zero[1] & (parts[1][:, -1].abs() <= tol))
            value = value * parts[1][:, -1]
    constant = torch.stack(in_zero).all(0)
    value = torch.where(dead, 0.0, value)
    eliminated = dead | (constant & (out_bias | (value.abs() <= tol)))
    offsets = torch.where(eliminated, value, 0.0)

    # Stage 2: partition the rest by the canonical (signed / scaled) row; scales relative to a representative.
    keep = torch.nonzero(~eliminated).flatten()
    canon, scale = _canonical(rows[keep], symmetry, tol)
    groups = group_rows(canon, 4 * rtol * max(float(canon.abs().max()) if canon.numel() else 0.0, 1e-300))
    num_groups = int(groups.max()) + 1 if groups.numel() else 0
    rep = torch.full((num_groups,), -1, dtype=torch.long)
    for idx in range(groups.numel() - 1, -1, -1):
        rep[groups[idx]] = idx
    rel = scale / scale[rep[groups]] if keep.numel() else scale
    scales = torch.ones(h, dtype=torch.float64)
    scales[keep] = rel
    if symmetry == "odd_offset":
        offsets[keep] = (rel < 0).to(torch.float64)

    # Stage 3: merged units with zero outgoing weight.
    alpha = torch.zeros(a.shape[0], num_groups, dtype=torch.float64)
    contrib = a[:, keep] * rel
    alpha.index_add_(1, groups, contrib)
    a_tol = rtol * max(float(contrib.abs().max()) if contrib.numel() else 0.0, 1e-300) * 4
    zero_out = alpha.abs().amax(0) <= a_tol if num_groups else torch.zeros(0, dtype=torch.bool)

    labels = torch.full((h,), -1, dtype=torch.long)
    labels[keep] = torch.where(zero_out[groups], -1, groups)
    removed = dict.fromkeys(RULES, 0)
    removed["zero_in"] = int(eliminated.sum())
    removed["zero_out"] = int(zero_out.sum())
    member = torch.ones(keep.numel(), dtype=torch.bool)
    member[rep] = False
    close = lambda x, y: abs(x - y) <= 1e-9  # noqa: E731
    for s in rel[member].tolist():
        kind = "equal" if close(s, 1.0) else "negated" if close(s, -1.0) else "scaled"
        removed[kind] += 1
    return LosslessPartition(relabel(labels), scales, offsets=offsets, removed=removed)


def _with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    w = weight.detach().to(torch.float64).reshape(weight.shape[0], -1)
    b = torch.zeros(w.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    return torch.cat([w, b.reshape(-1, 1)], dim=1)


def folded_bias(bias: torch.Tensor | None, weight_out: torch.Tensor, partition: LosslessPartition) -> torch.Tensor:
    """The consumer's bias after the constants and sigmoid offsets are folded in: d + A @ offsets."""
    a = weight_out.detach().to(torch.float64)
    d = torch.zeros(a.shape[0], dtype=torch.float64) if bias is None else bias.detach().to(torch.float64)
    return d + a @ partition.offsets.to(torch.float64)


def collapse_layer(
    w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, b_out: torch.Tensor | None,
    partition: LosslessPartition,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
    """(W', b', A', d'): the producer collapsed onto the partition, the consumer's columns summed with the
    signed scales and its bias carrying the folded constants (float64)."""
    f64 = lambda t: None if t is None else t.detach().to(torch.float64)  # noqa: E731
    w, b = collapse_weight(f64(w_in), f64(b_in), partition)
    a, _ = collapse_weight(f64(w_out), None, None, partition)
    d = folded_bias(b_out, w_out, partition)
    if b_out is None and d.abs().max() > 0:
        raise ValueError("The partition folds a constant into a consumer without a bias.")
    return w, b, a, (None if b_out is None else d)


def rank_single_layer(
    w_in: torch.Tensor, b_in: torch.Tensor | None, w_out: torch.Tensor, activation: str = "tanh",
    *, rtol: float | None = None,
) -> int:
    """Alg. 4.2: the number of hidden units of the optimal lossless compression (tanh: the rank)."""
    return lossless_partition([(w_in, b_in)], w_out, activation, out_bias=True, rtol=rtol).num_fibers


def _hidden_layers(layers: list[nn.Module]) -> list[tuple[int, int, str, Callable]]:
    """(producer, consumer, activation name, σ) for every hidden layer of a Linear/activation stack."""
    linear = [i for i, m in enumerate(layers) if isinstance(m, nn.Linear)]
    if not linear:
        raise ValueError("The model has no nn.Linear layer.")
    for i, m in enumerate(layers):
        if not isinstance(m, (nn.Linear, *TRANSPARENT, *MODULE_ACTIVATIONS)):
            raise ValueError(f"Layer {i} ({type(m).__name__}) is not supported by lossless compression; use an "
                             "nn.Sequential of Linear layers and elementwise activations.")
    hidden = []
    for p, c in zip(linear[:-1], linear[1:], strict=True):
        acts = [m for m in layers[p + 1:c] if not isinstance(m, TRANSPARENT)]
        if len(acts) > 1:
            raise ValueError(f"Layers {p + 1}..{c - 1} stack {len(acts)} activations; use one per hidden layer.")
        act = acts[0] if acts else nn.Identity()
        hidden.append((p, c, MODULE_ACTIVATIONS[type(act)], act))
    return hidden


def compress_lossless(
    model: nn.Sequential, *, rtol: float | None = None, max_sweeps: int = 100,
) -> tuple[nn.Sequential, LosslessReport]:
    """Lossless compression of every hidden layer of an MLP, repeated until a full sweep changes nothing.

    Single hidden layer + tanh: Alg. 4.1 (optimal; the width is the rank). Deeper nets: merging in one layer
    sums the next layer's columns, which can create new duplicates there, and dropping units downstream can
    zero an upstream unit's outgoing weights, hence the sweeps.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError("compress_lossless takes an nn.Sequential of Linear layers and activations.")
    layers = [copy.deepcopy(m) for m in model]
    hidden = _hidden_layers(layers)
    report = LosslessReport(layers=[
        LosslessLayer(str(p), act, layers[p].out_features, layers[p].out_features, dict.fromkeys(RULES, 0),
                      count_parameters(layers[p]))
        for p, _, act, _ in hidden
    ])
    for sweep in range(1, max_sweeps + 1):
        changed = False
        for (p, c, act, fn), entry in zip(hidden, report.layers, strict=True):
            prod, cons = layers[p], layers[c]
            part = lossless_partition([(prod.weight, prod.bias)], cons.weight, act, out_bias=cons.bias is not None,
                                      act_fn=fn, rtol=rtol)
            if part.num_removed == 0:
                continue
            changed = True
            w, b, a, d = collapse_layer(prod.weight, prod.bias, cons.weight, cons.bias, part)
            layers[p] = linear_from_weights(*_cast(w, b, prod.weight.dtype))
            layers[c] = linear_from_weights(*_cast(a, d, prod.weight.dtype))
            entry.units_after = part.num_fibers
            for rule, n in part.removed.items():
                entry.removed[rule] += n
        report.sweeps = sweep
        if not changed:
            break
    for (p, _, _, _), entry in zip(hidden, report.layers, strict=True):
        entry.params_after = count_parameters(layers[p])
    return nn.Sequential(*layers), report


def _cast(w: torch.Tensor, b: torch.Tensor | None, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    return w.to(dtype), None if b is None else b.to(dtype)


def rank(
    model: nn.Sequential | tuple[torch.Tensor, ...], activation: str = "tanh", *, rtol: float | None = None,
) -> int:
    """Hidden units left after lossless compression: the rank (Alg. 4.2) for one tanh hidden layer given as
    a ``(W_in, b_in, W_out)`` tuple or an nn.Sequential; for deeper nets the total width, an upper bound."""
    if isinstance(model, tuple):
        w_in, b_in, w_out = model[:3]
        return rank_single_layer(w_in, b_in, w_out, activation, rtol=rtol)
    return compress_lossless(model, rtol=rtol)[1].units_after
