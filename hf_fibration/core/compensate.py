"""Data-aware fibration: activation-aware fibers, unit-importance criteria, and the compensated collapse.

All on calibration tensors: X (tokens × d_in) entering an MLP, H = act(up X) (tokens × units) the hidden units,
and the consumer's weight W_down (d_out × units). Pure torch.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from scipy.linalg import lapack

from .fibers import EPSILON_MAX, FiberDendrogram, FiberPartition

Activation = Callable[[torch.Tensor], torch.Tensor]


def mlp_hidden(x: torch.Tensor, inputs: list[tuple[torch.Tensor, torch.Tensor | None]], act: Activation
               ) -> torch.Tensor:
    """H = act(x W_upᵀ + b) for one input matrix, or act(x W_gateᵀ) ⊙ (x W_upᵀ) for a gated (gate, up) pair.

    Biases and the gate's product are applied in place (the same values, one tokens × units matrix fewer)."""
    outs = []
    for w, b in inputs:
        outs.append(x @ w.T)
        if b is not None:
            outs[-1] += b
    hidden = act(outs.pop(0))
    if outs:
        hidden *= outs.pop()
    return hidden


def ridge_refit(hidden: torch.Tensor, target: torch.Tensor, ridge: float = 1e-3
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """argmin_{W,b} ‖H Wᵀ + b − Y‖² + λ‖W‖²: the consumer's columns and bias refit in closed form.

    λ is relative to the mean diagonal of the Gram matrix, so it does not depend on the activation scale."""
    h = hidden.to(torch.float64)
    y = target.to(torch.float64)
    h_mean, y_mean = h.mean(0, keepdim=True), y.mean(0, keepdim=True)
    hc, yc = h - h_mean, y - y_mean
    gram = hc.T @ hc
    lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
    weight = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), hc.T @ yc).T
    bias = (y_mean - h_mean @ weight.T).squeeze(0)
    return weight, bias


RIDGE_CANDIDATES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


PREFIX_ROW_BLOCK = 128  # rows of L⁻¹AL⁻ᵀ and of ZZᵀ formed at a time (row block × units floats, not units²)

class UnitScale:
    """Per-cell Σh² and Σh of every hidden unit of the uncompressed site: the ridge's scale over a union of cells is
    the mean of the units' centered Σ(h − h̄)², so λ means the same penalty whichever units a cut keeps (and the
    refits of nested cuts share one factorization per λ, ``prefix_held_errors``)."""

    def __init__(self, cells: int) -> None:
        self.squares: dict[int, torch.Tensor] = {}
        self.sums: dict[int, torch.Tensor] = {}
        self.n = [0] * cells

    @property
    def empty(self) -> bool:
        return not self.sums

    def add(self, hidden: torch.Tensor, cell: torch.Tensor) -> None:
        h = hidden.to(torch.float64)
        for c, rows in _cell_rows(cell, len(self.n)):
            _add(self.squares, c, h[rows].pow(2).sum(0))
            _add(self.sums, c, h[rows].sum(0))
            self.n[c] += int(rows.sum())

    def __call__(self, cells: tuple[int, ...]) -> torch.Tensor:
        cells = tuple(c for c in cells if c in self.sums)
        n = max(sum(self.n[c] for c in cells), 1)
        total = _total(self.sums, cells)
        return (_total(self.squares, cells) - total * total / n).mean().clamp_min(1e-12)


class RidgeStats:
    """Sufficient statistics of a ridge refit (Σhhᵀ, Σh, Σhyᵀ, Σy, n) for disjoint cells of tokens, so that a refit
    on any union of cells costs one k×k solve instead of a pass over the tokens. λ is relative to ``scale`` (the
    site's original units, ``UnitScale``) or, without it, to the mean diagonal of the kept units' centered Gram."""

    def __init__(self, hidden: torch.Tensor, target: torch.Tensor, cell: torch.Tensor, cells: int,
                 scale: UnitScale | None = None) -> None:
        self.hh: dict[int, torch.Tensor] = {}  # a cell's statistics exist once it has tokens
        self.h: dict[int, torch.Tensor] = {}
        self.hy: dict[int, torch.Tensor] = {}
        self.y: dict[int, torch.Tensor] = {}
        self.n = [0] * cells
        self.scale = scale
        self.add(hidden, target, cell)

    def add(self, hidden: torch.Tensor, target: torch.Tensor, cell: torch.Tensor) -> None:
        """Accumulate more tokens (so the statistics of many tokens never need all their activations at once)."""
        h, y = hidden.to(torch.float64), target.to(torch.float64)
        for c, rows in _cell_rows(cell, len(self.n)):
            hc, yc = h[rows], y[rows]
            _add_product(self.hh, c, hc.T, hc)
            _add_product(self.hy, c, hc.T, yc)
            _add(self.h, c, hc.sum(0))
            _add(self.y, c, yc.sum(0))
            self.n[c] += int(rows.sum())

    def _centered(self, cells: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cells = tuple(c for c in cells if c in self.hh)
        n = max(sum(self.n[c] for c in cells), 1)
        h_mean = sum(self.h[c] for c in cells) / n
        y_mean = sum(self.y[c] for c in cells) / n
        gram = _total(self.hh, cells)
        gram -= torch.outer(h_mean, h_mean).mul_(n)
        cross = _total(self.hy, cells)
        cross -= torch.outer(h_mean, y_mean).mul_(n)
        return gram, cross, h_mean, y_mean

    def solve(self, cells: tuple[int, ...], ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``ridge_refit`` on the tokens of ``cells``."""
        gram, cross, h_mean, y_mean = self._centered(cells)
        gram.diagonal().add_(ridge * self._scale(cells, gram))
        weight = torch.linalg.solve(gram, cross).T
        return weight, y_mean - weight @ h_mean

    def path(self, cells: tuple[int, ...], ridges: tuple[float, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``solve`` at every λ from one eigendecomposition."""
        gram, cross, h_mean, y_mean = self._centered(cells)
        scale = self._scale(cells, gram)
        evals, evecs = torch.linalg.eigh(gram)
        projected = evecs.T @ cross
        fits = []
        for ridge in ridges:
            weight = (evecs @ (projected / (evals.clamp_min(0) + ridge * scale).unsqueeze(1))).T
            fits.append((weight, y_mean - weight @ h_mean))
        return fits

    def _scale(self, cells: tuple[int, ...], gram: torch.Tensor) -> torch.Tensor:
        """What λ is relative to on ``cells`` (``gram``: the kept units' centered Gram there)."""
        return gram.diagonal().mean().clamp_min(1e-12) if self.scale is None else self.scale(cells)

    @classmethod
    def from_sums(cls, hh: dict[int, torch.Tensor], h: dict[int, torch.Tensor], hy: dict[int, torch.Tensor],
                  y: dict[int, torch.Tensor], n: list[int], scale: UnitScale | None = None) -> RidgeStats:
        """The statistics from per-cell sums already at hand (``UnitStats.ridge_stats``)."""
        stats = cls.__new__(cls)
        stats.hh, stats.h, stats.hy, stats.y, stats.n, stats.scale = hh, h, hy, y, list(n), scale
        return stats

    def squared_error(self, cells: tuple[int, ...], weight: torch.Tensor, bias: torch.Tensor | None,
                      target_squares: float) -> float:
        """Σ‖W h + b − y‖² over the tokens of ``cells``, from the sums (``target_squares`` = Σ‖y‖² there)."""
        cells = tuple(c for c in cells if c in self.hh)
        w = weight.to(torch.float64)
        b = None if bias is None else bias.to(torch.float64)
        n = sum(self.n[c] for c in cells)
        hh, h, hy, y = (_total(m, cells) for m in (self.hh, self.h, self.hy, self.y))
        error = _prediction_squares(hh, h, n, w, b) - 2 * (w * hy.T).sum()
        if b is not None:
            error = error - 2 * b @ y
        return float(error + target_squares)


class UnitStats:
    """Per-cell sums of an uncompressed MLP's hidden units on calibration tokens (Σhhᵀ, Σh, n over all its units)
    with its consumer (W, b), whose output is the refit's target: the ridge statistics of ANY subset of kept units
    follow from them without another pass over the tokens. A partition that keeps its representatives' input rows
    (a fold: span, activations) is refit from these at every cut for the cost of a k × k solve."""

    def __init__(self, cells: int, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        self.weight = weight.to(torch.float64)
        self.bias = None if bias is None else bias.to(torch.float64)
        self._gram: dict[int, torch.Tensor] = {}
        self._pending: dict[int, tuple[torch.Tensor, int]] = {}  # cell → (Σ(h − shift), n) not yet in its Gram
        self.sum: dict[int, torch.Tensor] = {}
        self.n = [0] * cells
        self._squares: dict[tuple[int, ...], float] = {}
        self._gram_weight: dict[int, torch.Tensor] = {}  # Σ h yᵀ of every unit, without the bias: (Σ hhᵀ) Wᵀ
        self._shift: torch.Tensor | None = None
        self._scale = UnitScale(cells)

    def add(self, hidden: torch.Tensor, cell: torch.Tensor) -> None:
        """Add a chunk of tokens' hidden units. A float32 chunk's products are taken in float32 about a fixed shift
        (the first chunk's mean: the centered sums keep float32's relative precision, where raw products of
        units with large means would cancel) and summed in float64: half the cost of float64 products. The shift's
        terms are linear in the chunks' shifted sums, so they are added once, when the sums are first read."""
        if hidden.dtype == torch.float64:
            shift, h = None, hidden
        else:
            if self._shift is None:
                self._shift = hidden.mean(0)
            shift, h = self._shift.to(torch.float64), hidden - self._shift
        for c, rows in _cell_rows(cell, len(self.n)):
            hc, count = h[rows], int(rows.sum())
            total = hc.sum(0, dtype=torch.float64)
            _add(self._gram, c, (hc.T @ hc).to(torch.float64))
            if shift is not None:  # Σ h hᵀ = Σ (h − s)(h − s)ᵀ + s Σ(h − s)ᵀ + Σ(h − s) sᵀ + n s sᵀ
                pending, n = self._pending.get(c, (0.0, 0))
                self._pending[c] = (total + pending, n + count)
                total = total + shift * count
            _add(self.sum, c, total)
            self.n[c] += count
            scale = self._scale  # the same sums: the diagonal of each cell's Gram
            scale.squares[c], scale.sums[c], scale.n[c] = self._gram[c].diagonal(), self.sum[c], self.n[c]
        self._squares.clear()
        self._gram_weight.clear()

    @property
    def gram(self) -> dict[int, torch.Tensor]:
        """Per-cell Σ h hᵀ (float64)."""
        self._settle()
        return self._gram

    @property
    def scale(self) -> UnitScale:
        self._settle()  # its Σh² are the Grams' diagonals
        return self._scale

    def _settle(self) -> None:
        """Add the shift's terms of the chunks summed since the last read."""
        if not self._pending:
            return
        shift = self._shift.to(torch.float64)
        for c, (total, n) in self._pending.items():
            cross = torch.outer(shift, total)
            self._gram[c].add_(cross).add_(cross.T).add_(torch.outer(shift, shift).mul_(n))
        self._pending.clear()

    def merged(self, cells: tuple[int, ...]) -> UnitStats:
        """The sums of ``cells`` held in the first of them, the other cells empty (a caller scoring many consumers
        on those tokens reads one Gram, with the same cell numbers)."""
        cells = tuple(c for c in cells if c in self.gram)
        merged = UnitStats(len(self.n), self.weight, self.bias)  # one cell is shared, not copied (nothing writes)
        merged.gram[cells[0]] = self.gram[cells[0]] if len(cells) == 1 else _total(self.gram, cells)
        merged.sum[cells[0]] = _total(self.sum, cells)
        merged.n[cells[0]] = sum(self.n[c] for c in cells)
        return merged

    def total(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """HᵀH, ΣH and the token count over every cell."""
        cells = tuple(self.gram)
        return _total(self.gram, cells), _total(self.sum, cells), sum(self.n)

    def parts(self) -> tuple[tuple[torch.Tensor, ...], torch.Tensor, int]:
        """``total`` with HᵀH left as the cells' Grams that sum to it (shared, not copied)."""
        cells = tuple(self.gram)
        return tuple(self.gram[c] for c in cells), _total(self.sum, cells), sum(self.n)

    def centered_gram(self, cells: tuple[int, ...], mean: torch.Tensor | None = None, rows: torch.Tensor | None = None,
                      columns: torch.Tensor | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
        """Σ (h − m)(h − m)ᵀ over the tokens of ``cells``, m = ``mean`` or those tokens' own mean: over all units, or
        the block of units ``rows`` × ``columns`` (index tensors), written into ``out`` when given."""
        cells = tuple(c for c in cells if c in self.gram)
        units = torch.arange(self.weight.shape[1])
        rows, columns, whole = (units if rows is None else rows, units if columns is None else columns,
                                rows is None and columns is None and out is None)
        if not cells:
            return self.weight.new_zeros(rows.numel(), columns.numel()) if out is None else out.zero_()
        n, total = sum(self.n[c] for c in cells), _total(self.sum, cells)
        mean = total / max(n, 1) if mean is None else mean
        if whole:
            gram = _total(self.gram, cells)
        else:
            gram = torch.index_select(self.gram[cells[0]][rows], 1, columns, out=out)
            for c in cells[1:]:
                gram += self.gram[c][rows[:, None], columns[None, :]]
        gram.sub_(torch.outer(total[rows], mean[columns])).sub_(torch.outer(mean[rows], total[columns]))
        return gram.add_(torch.outer(mean[rows], mean[columns]).mul_(n))

    def mean(self, cells: tuple[int, ...]) -> torch.Tensor:
        cells = tuple(c for c in cells if c in self.gram)
        return _total(self.sum, cells) / max(sum(self.n[c] for c in cells), 1)

    def ridge_stats(self, kept: torch.Tensor) -> RidgeStats:
        """``RidgeStats`` of the units ``kept`` (in that order) against the original output y = W h + b."""
        hh, h, hy, y = {}, {}, {}, {}
        for c, gram in self.gram.items():
            hh[c] = gram[kept][:, kept]
            h[c] = self.sum[c][kept]
            if c not in self._gram_weight:
                self._gram_weight[c] = gram @ self.weight.T
            hy[c] = self._gram_weight[c][kept]
            y[c] = self.weight @ self.sum[c]
            if self.bias is not None:
                hy[c] += torch.outer(h[c], self.bias)
                y[c] += self.n[c] * self.bias
        return RidgeStats.from_sums(hh, h, hy, y, self.n, self.scale)

    def target_squares(self, cells: tuple[int, ...]) -> float:
        """Σ‖y‖² of the original output over the tokens of ``cells``."""
        if cells in self._squares:
            return self._squares[cells]
        total = sum(float(_prediction_squares(self.gram[c], self.sum[c], self.n[c], self.weight, self.bias))
                    for c in cells if c in self.gram)
        self._squares[cells] = total
        return total


class PrefixHeldErrors:
    """Σ‖W_k h + b_k − y‖² over the ``held`` cells' tokens, where (W_k, b_k) is the ridge refit on the ``fit`` cells
    (λ relative to ``stats.scale``) of the consumer reading only the units ``order[:k]``: called with a λ > 0, the
    errors of every k = 1..m as an m-vector, m = ``upto`` or all of ``order`` — what ``RidgeStats.path`` and
    ``squared_error`` give one kept set at a time.

    Nested cuts (span) keep prefixes of one order, and a prefix's Gram is the leading block of the permuted Gram:
    the Cholesky factor L of G + μI factors every prefix at once. With Z = L⁻¹C (C = G Wᵀ, the fit cross-products),
    W_kᵀ = L_k⁻ᵀ Z_k, so the held-out error tr(W_k A W_kᵀ) − 2 tr(W_k B) + c (A, B the held-out Gram and
    cross-products at the fit mean) is a prefix sum over i, j ≤ k of (L⁻¹AL⁻ᵀ)_ij (ZZᵀ)_ij and over i ≤ k of
    ⟨Z_i, (L⁻¹B)_i⟩: O(n³) per λ for all n cuts, instead of O(k³) for each.

    Memory: two m × m float64 buffers, the factor and L⁻¹A (solved in place), each written ``PREFIX_ROW_BLOCK``
    rows at a time from ``stats``' own cells (the ridged G into the first, A into the second) at every λ rather
    than kept as a copy beside them; L⁻¹AL⁻ᵀ and ZZᵀ are formed a row block at a time."""

    def __init__(self, stats: UnitStats, order: torch.Tensor, fit: tuple[int, ...], held: tuple[int, ...],
                 upto: int | None = None) -> None:
        weight, mean = stats.weight, stats.mean(fit)
        order = order.to(torch.long)[:upto]  # the prefixes up to m read only the leading m × m block
        gram = stats.centered_gram(fit, mean)  # one units × units Gram at a time
        self.cross_fit = (gram @ weight.T)[order]
        del gram
        gram = stats.centered_gram(held, mean)  # the held-out tokens centered at the fit mean (the refit's bias)
        self.cross_held = (gram @ weight.T)[order]
        self.constant = float(((weight @ gram) * weight).sum())
        del gram
        self._stats, self._order, self._mean, self._fit, self._held = stats, order, mean, fit, held
        self.size = m = order.numel()
        self.mu = stats.scale(fit)
        self._factor, self._solved = (torch.empty(m, m, dtype=torch.float64) for _ in range(2))
        self._info = torch.empty((), dtype=torch.int32)

    def _gram_into(self, out: torch.Tensor, cells: tuple[int, ...]) -> torch.Tensor:
        """``stats.centered_gram(cells, fit mean)`` on the order's m × m, into ``out`` a row block at a time."""
        for rows in _row_blocks(out.shape[0]):
            self._stats.centered_gram(cells, self._mean, self._order[rows], self._order, out=out[rows])
        return out

    def __call__(self, ridge: float) -> torch.Tensor:
        if ridge <= 0:
            raise ValueError("PrefixHeldErrors needs a ridge > 0 (a factorization per λ).")
        factor = self._gram_into(self._factor, self._fit)
        factor.diagonal().add_(ridge * self.mu)
        torch.linalg.cholesky_ex(factor, out=(factor, self._info))
        if int(self._info):
            raise ValueError(f"The ridged Gram is not positive definite at λ = {ridge:g} (its units carry no signal).")
        z = torch.linalg.solve_triangular(factor, self.cross_fit, upper=False)
        b_hat = torch.linalg.solve_triangular(factor, self.cross_held, upper=False)
        linear = (z * b_hat).sum(1).cumsum(0)
        del b_hat  # freed before the row blocks' temporaries
        solved = self._gram_into(self._solved, self._held)
        torch.linalg.solve_triangular(factor, solved, upper=False, out=solved)  # L⁻¹A, in place
        quadratic = torch.empty(z.shape[0], dtype=torch.float64)
        for rows in _row_blocks(z.shape[0]):
            # rows of L⁻¹AL⁻ᵀ = (L⁻¹ (L⁻¹A)[rows]ᵀ)ᵀ; only their lower triangle (j ≤ i) is summed
            a_hat = torch.linalg.solve_triangular(factor, solved[rows].T.contiguous(), upper=False).T
            products = (z[rows] @ z.T).mul_(a_hat)
            diagonal = products.diagonal(offset=rows.start).clone()
            quadratic[rows] = 2 * products.tril_(rows.start - 1).sum(1) + diagonal
        return quadratic.cumsum_(0) - 2 * linear + self.constant


def _row_blocks(m: int) -> Iterator[slice]:
    return (slice(start, min(start + PREFIX_ROW_BLOCK, m)) for start in range(0, m, PREFIX_ROW_BLOCK))


def prefix_held_errors(stats: UnitStats, order: torch.Tensor, fit: tuple[int, ...], held: tuple[int, ...],
                       ridges: tuple[float, ...], upto: int | None = None) -> torch.Tensor:
    """``PrefixHeldErrors`` at every λ of ``ridges``: a (ridges × m) tensor."""
    errors = PrefixHeldErrors(stats, order, fit, held, upto)
    return torch.stack([errors(ridge) for ridge in ridges])


def _cell_rows(cell: torch.Tensor, cells: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Each cell that has tokens here, with the mask of its rows."""
    for c in range(cells):
        rows = cell == c
        if bool(rows.any()):
            yield c, rows


def _add_product(sums: dict[int, torch.Tensor], c: int, left: torch.Tensor, right: torch.Tensor) -> None:
    if c in sums:
        sums[c].addmm_(left, right)
    else:
        sums[c] = left @ right


def _add(sums: dict[int, torch.Tensor], c: int, value: torch.Tensor) -> None:
    if c in sums:
        sums[c] += value
    else:
        sums[c] = value


def _prediction_squares(gram: torch.Tensor, total: torch.Tensor, n: int, weight: torch.Tensor,
                        bias: torch.Tensor | None) -> torch.Tensor:
    """Σ‖W h + b‖² over tokens whose hidden units sum to ``total`` with Gram ``gram`` (Σ h hᵀ), n of them."""
    squares = ((weight @ gram) * weight).sum()
    if bias is not None:
        squares = squares + 2 * bias @ (weight @ total) + n * bias @ bias
    return squares


def _total(mats: dict[int, torch.Tensor], cells: tuple[int, ...]) -> torch.Tensor:
    """``sum(mats[c] for c in cells)`` accumulated in place (the same values, no k × k temporaries)."""
    total = mats[cells[0]] + 0
    for c in cells[1:]:
        total += mats[c]
    return total


def reconstruction_error(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         target: torch.Tensor) -> float:
    pred = hidden.to(torch.float64) @ weight.to(torch.float64).T
    if bias is not None:
        pred += bias.to(torch.float64)
    pred -= target.to(torch.float64)
    return float(pred.pow_(2).mean())  # in place: the same values, no further tokens × d_out copies


def activation_rows(hidden: torch.Tensor, weight_rows: torch.Tensor | None = None, blend: float = 1.0
                    ) -> torch.Tensor:
    """Rows to cluster for activation-aware fibers: each unit's activations over the calibration tokens,
    normalized, optionally blended with its normalized colored in-weights (cosine of the concatenation is the
    ``blend``-weighted mean of the two cosines)."""
    act = hidden.to(torch.float64).T
    act = act / act.norm(dim=1, keepdim=True).clamp_min(1e-30)
    if weight_rows is None or blend >= 1.0:
        return act
    w = weight_rows.to(torch.float64)
    w = w / w.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return torch.cat([act * blend ** 0.5, w * (1 - blend) ** 0.5], dim=1)


def importance(criterion: str, up_rows: torch.Tensor, down_weight: torch.Tensor, hidden: torch.Tensor | None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Per-unit scores for pruning baselines: random, l2 / l1 (input rows), magnitude (‖input row‖·‖output column‖),
    wanda-sp (Σ_j |W_down[j,i]|·‖H_i‖), flap (Var(H_i)·‖W_down[:,i]‖², the fluctuation metric)."""
    n = up_rows.shape[0]
    if criterion == "random":
        return torch.rand(n, generator=generator, dtype=torch.float64)
    if criterion == "l2":
        return up_rows.to(torch.float64).norm(dim=1)
    if criterion == "l1":
        return up_rows.to(torch.float64).abs().sum(dim=1)
    if criterion == "magnitude":
        return up_rows.to(torch.float64).norm(dim=1) * down_weight.to(torch.float64).norm(dim=0)
    if hidden is None:
        raise ValueError(f"The {criterion!r} criterion needs calibration activations.")
    h = hidden.to(torch.float64)
    w = down_weight.to(torch.float64)
    if criterion == "wanda-sp":
        return w.abs().sum(dim=0) * h.norm(dim=0)
    if criterion == "flap":
        return h.var(dim=0) * (w ** 2).sum(dim=0)
    raise ValueError(f"Unknown criterion {criterion!r}; choose random, l2, l1, magnitude, wanda-sp or flap.")


def activation_fibers(hidden: torch.Tensor, scores: torch.Tensor, k: int, linkage: str = "average",
                      representatives: torch.Tensor | None = None) -> tuple[FiberPartition, torch.Tensor]:
    """Fibers of units whose calibration activations are (nearly) collinear, each kept as its best-scoring
    member (its input row unchanged) with the others folded into it: h_j ≈ a_j·h_rep, so the consumer's column
    of the representative becomes Σ_j a_j·col_j.

    With ``representatives`` given (e.g. ``span_representatives``), every unit joins the nearest one
    (``fold_into``). Returns the partition (representatives labeled 0..k-1, other units −1) and the fold matrix F
    (k × units) with F[c, j] = a_j for the members of fiber c, so the new consumer weight is W_down Fᵀ (also the
    partition's ``fold``, which ``Site.apply`` honours)."""
    h = hidden.to(torch.float64)
    if representatives is not None:
        return fold_into(h.T @ h, representatives)
    fibers = FiberDendrogram(activation_rows(h), linkage).cut_to_count(k).labels
    num = int(fibers.max()) + 1
    reps = torch.full((num,), -1, dtype=torch.long)
    for j in torch.argsort(scores.to(torch.float64), descending=True).tolist():  # best-scoring member first
        c = int(fibers[j])
        if reps[c] < 0:
            reps[c] = j
    coef = (h * h[:, reps[fibers]]).sum(0) / (h[:, reps] ** 2).sum(0).clamp_min(1e-30)[fibers]
    return _folded_partition(fibers, reps, coef)


def fold_into(gram: torch.Tensor | tuple[torch.Tensor, ...], representatives: torch.Tensor
              ) -> tuple[FiberPartition, torch.Tensor]:
    """``activation_fibers`` around given representatives, from the Gram HᵀH of the activations (units × units; or
    the parts it sums, read without forming it): each unit joins the representative of largest cosine and folds
    into it by a_j = ⟨h_j, h_rep⟩ / ‖h_rep‖², so cutting one site at many counts reads one Gram instead of the
    tokens at every count."""
    reps = representatives.to(torch.long)
    parts = _gram_parts(gram)
    columns = parts[0][:, reps]  # a copy: the other parts add into it
    diagonal = parts[0].diagonal().clone()
    for part in parts[1:]:
        columns += part[:, reps]
        diagonal += part.diagonal()
    norms = diagonal.clamp_min(0).sqrt().clamp_min(1e-30)
    fibers = (columns / norms[reps]).argmax(dim=1)  # cosine up to each row's own (positive) norm
    fibers[reps] = torch.arange(reps.numel())
    coef = columns[torch.arange(columns.shape[0]), fibers] / diagonal[reps].clamp_min(1e-30)[fibers]
    return _folded_partition(fibers, reps, coef)


def _gram_parts(gram: torch.Tensor | tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """The matrices that sum to a Gram given whole or as the parts it sums (``UnitStats.parts``)."""
    return (gram,) if isinstance(gram, torch.Tensor) else tuple(gram)


def _folded_partition(fibers: torch.Tensor, reps: torch.Tensor, coef: torch.Tensor
                      ) -> tuple[FiberPartition, torch.Tensor]:
    """The partition and fold matrix (sparse, k × units) of fibers (a fiber per unit), their representatives and
    fold coefficients."""
    n, num = fibers.numel(), reps.numel()
    coef = coef.clone()
    coef[reps] = 1.0
    order = torch.argsort(reps)
    new_label = torch.empty(num, dtype=torch.long)
    new_label[order] = torch.arange(num)
    labels = torch.full((n,), -1, dtype=torch.long)
    labels[reps] = new_label
    # one coefficient per unit: sparse, so a search that keeps many cuts of a wide MLP holds O(units) per cut
    fold = torch.sparse_coo_tensor(torch.stack([new_label[fibers], torch.arange(n)]), coef, (num, n),
                                   check_invariants=True).coalesce()
    return FiberPartition(labels, torch.ones(n, dtype=torch.float64), fold), fold


def span_representatives(hidden: torch.Tensor, down_weight: torch.Tensor, k: int) -> torch.Tensor:
    """The k units whose (centered, output-weighted) activations span the others best: the first k pivots of a
    pivoted Cholesky of the Gram of Φ = H·diag(‖W_down[:, i]‖) (the pivots of a column-pivoted QR of Φ). Units in
    their span are linear fibers of them."""
    n = hidden.shape[1]
    return _span_pivots(_span_grams(hidden, down_weight)[1])[0][: max(1, min(k, n))]


def _span_grams(hidden: torch.Tensor, down_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """HᵀH, and ΦᵀΦ from it with Φ = (H − mean H)·diag(‖W_down[:, i]‖): one pass over the tokens for both."""
    h = hidden.to(torch.float64)
    gram = h.T @ h
    return gram, _weighted_gram(gram, h.sum(0), h.shape[0], down_weight)


def _weighted_gram(gram: torch.Tensor | tuple[torch.Tensor, ...], total: torch.Tensor, n: int,
                   down_weight: torch.Tensor) -> torch.Tensor:
    """ΦᵀΦ of ``_span_grams`` from the sums HᵀH (or the parts it sums), ΣH over n tokens: a new matrix, formed in
    place (one units × units temporary besides it)."""
    parts = _gram_parts(gram)
    weighted = parts[0].clone()
    for part in parts[1:]:
        weighted += part
    mean = total / max(n, 1)
    scale = down_weight.to(torch.float64).norm(dim=0)
    return weighted.sub_(torch.outer(mean, mean).mul_(n)).mul_(torch.outer(scale, scale))


def _span_pivots(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every unit in pivot order (the greedy choice of a pivoted Cholesky of ``gram``: the unit with the largest
    residual next, LAPACK's ?pstrf) and the relative residual ‖Φ − P_t Φ‖_F / ‖Φ‖_F after the first t of them,
    t = 0..n. Once nothing is left to explain (round-off), the remaining units follow in index order with
    residual 0."""
    n = gram.shape[0]
    total = float(gram.diagonal().sum())
    # the transpose of the symmetric Gram is its Fortran-ordered view: LAPACK factors it in place, no copy (callers
    # pass a Gram made for this call)
    factor, piv, rank, info = lapack.dpstrf(gram.numpy().T, tol=SPAN_ROUNDOFF * total, lower=1, overwrite_a=1)
    if info < 0:
        raise ValueError(f"LAPACK dpstrf rejected argument {-info} of the span Gram.")
    piv = torch.from_numpy(piv.astype("int64") - 1)
    pivots = torch.cat([piv[:rank], piv[rank:].sort().values])
    # L's first rank columns are the rows of the C-ordered transpose: squared and summed in place (L is not needed
    # after; copies would double the units × rank floats at the site's peak)
    explained = torch.from_numpy(factor[:, :rank].T).triu_().pow_(2).sum(1).cumsum(0)
    energy = torch.zeros(n + 1, dtype=torch.float64)
    energy[0] = total
    energy[1:rank + 1] = (total - explained).clamp_min(0)
    relative = (energy / max(total, 1e-300)).sqrt()
    return pivots, torch.cummin(relative, 0).values


SPAN_ROUNDOFF = 1e-13  # a pivot's residual below this fraction of the trace is round-off, not signal


class SpanDendrogram:
    """``fibers_from="span"``: the nested span fibers of an MLP site, cut at any count or ε like a dendrogram.

    The t-th representative is the t-th pivot of ``span_representatives`` (the pivots do not depend on how many
    are asked for); every other unit folds into its most collinear representative (``activation_fibers``), so the
    partition carries the consumer's fold. ε is the relative residual ‖Φ − P_k Φ‖_F / ‖Φ‖_F of the output-weighted
    activations outside the span of the k kept units: in [0, 1], and a cut at ε keeps the fewest units within it
    (ε = 0 keeps every unit unless the activations are rank-deficient)."""

    nested = True  # every cut keeps a prefix of ``order`` (``prefix_held_errors`` prices them all at once)

    def __init__(self, hidden: torch.Tensor, down_weight: torch.Tensor) -> None:
        self.gram, weighted = _span_grams(hidden, down_weight)  # every cut folds from self.gram (``fold_into``)
        self.order, self.residual = _span_pivots(weighted)

    @classmethod
    def from_sums(cls, gram: torch.Tensor | tuple[torch.Tensor, ...], total: torch.Tensor, n: int,
                  down_weight: torch.Tensor) -> SpanDendrogram:
        """The same dendrogram from the sums HᵀH (float64) and ΣH over n tokens, which a caller may accumulate a
        chunk of tokens at a time. ``gram`` may be the parts HᵀH sums (cells of ``UnitStats``): the cuts read them
        as they are, and the dendrogram holds no sum of its own (nothing may write them while it is cut)."""
        dendrogram = cls.__new__(cls)
        dendrogram.gram = gram
        dendrogram.order, dendrogram.residual = _span_pivots(_weighted_gram(gram, total, n, down_weight))
        return dendrogram

    @property
    def num_units(self) -> int:
        return int(self.order.numel())

    def cut(self, epsilon: float) -> FiberPartition:
        if not 0.0 <= epsilon < EPSILON_MAX:
            raise ValueError(f"epsilon must lie in [0, 2), got {epsilon}.")
        within = (self.residual[1:] <= epsilon).nonzero().flatten()
        return self.cut_to_count(int(within[0]) + 1 if within.numel() else self.num_units)

    def cut_to_count(self, num_fibers: int) -> FiberPartition:
        k = max(1, min(num_fibers, self.num_units))
        return fold_into(self.gram, self.order[:k])[0]

    def epsilon_for_count(self, num_fibers: int) -> float:
        return float(self.residual[max(1, min(num_fibers, self.num_units))])
