"""Calibration glue: capture what enters an MLP site, and the compensated collapse of its consumer."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from hf_fibration.core.compensate import (
    RIDGE_CANDIDATES,
    PrefixHeldErrors,
    RidgeStats,
    UnitScale,
    UnitStats,
    mlp_hidden,
    reconstruction_error,
)
from hf_fibration.core.modules import FiberLinear
from hf_fibration.models.architectures import mlp_activation
from hf_fibration.models.sites import Site
from hf_fibration.models.surgery import get_module, linear_weight, set_module

REFIT_CHUNK_TOKENS = 1024  # the refit reads its tokens this many at a time: memory ∝ chunk × width, not tokens


class _Captured(Exception):
    """Raised by the capture hook: the forward pass stops once the site's input is recorded."""


@dataclass
class Calibration:
    """Tokens × d_in entering a site, and the sequence each token came from (whole sequences are held out
    together when a refit is validated: tokens of one sentence are too alike to test each other).

    The tokens are kept in the dtype they were captured in (a search keeps one calibration per MLP site until it
    applies its cuts: float32 or bfloat16 halves or quarters that memory, and loses nothing, since those are the
    values the model computed); ``inputs`` and ``rows`` give them in float64, where the refits compute.
    ``original_stats`` keeps the per-cell sums of the site's original hidden units once computed: the span fibers
    and every refit of the site read them (one pass over the tokens for both); a caller that reads nothing else
    after them lets go of the rows (``drop_rows``)."""

    stored: torch.Tensor | None
    sequence: torch.Tensor
    batch: torch.Tensor | None = None  # the eval batch each token came from (for cross-fitting)
    _stats: UnitStats | None = field(default=None, repr=False, compare=False)
    _stats_parity: bool = field(default=False, repr=False, compare=False)

    @property
    def inputs(self) -> torch.Tensor:
        return self._stored().to(torch.float64)

    def rows(self, rows: slice, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """``inputs[rows]`` without converting the other rows."""
        return self._stored()[rows].to(dtype)

    def _stored(self) -> torch.Tensor:
        if self.stored is None:
            raise RuntimeError("This calibration's token rows were dropped once its statistics were formed; "
                               "capture the site's calibration again to refit from rows.")
        return self.stored

    def drop_rows(self) -> None:
        """Free the token rows, keeping the sequence and batch of each token and the statistics already formed."""
        self.stored = None

    @classmethod
    def from_tokens(cls, inputs: torch.Tensor, block: int = 32) -> Calibration:
        return cls(inputs, torch.arange(inputs.shape[0]) // block)

    def held_out(self, every: int = 4) -> torch.Tensor:
        """Tokens of every ``every``-th sequence (a seeded hash, so it does not follow batch order)."""
        return (self.sequence * 2654435761 + 97) % 2**32 % every == 0

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def original_stats(self, site: Site, model: nn.Module, parity: bool = False) -> UnitStats:
        """``UnitStats`` of the site's original hidden units on these tokens, in the cells of ``_cells`` — split by
        batch parity when ``parity`` (a cross-fitting refit needs it; two cells hold half the memory of four) —
        computed once, and again only when parity is asked of sums kept without it."""
        if self._stats is None or (parity and not self._stats_parity):
            self._stats = None  # freed before the new sums are accumulated
            self._stats, self._stats_parity = _unit_stats(site, model, self, parity), parity
        return self._stats

    def has_original_stats(self) -> bool:
        return self._stats is not None

    def release(self) -> None:
        self._stats = None


class CalibrationRecorder:
    """What enters a module, call by call, up to ``max_tokens`` rows (in the dtype captured, moved to the CPU), with
    each row's sequence and the index of the batch it came from (``batch``, set by the caller): the hook of
    ``capture_calibration``, and of any pass that runs the site's block anyway (the block search's reference run)."""

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens, self.batch = max_tokens, 0
        self.tokens = 0
        self._rows: list[torch.Tensor] = []
        self._sequences: list[torch.Tensor] = []
        self._batches: list[torch.Tensor] = []

    @property
    def full(self) -> bool:
        return self.tokens >= self.max_tokens

    def record(self, x: torch.Tensor) -> None:
        if self.full:
            return
        rows = x.detach().reshape(-1, x.shape[-1])[:self.max_tokens - self.tokens].to("cpu", copy=True)
        start = int(self._sequences[-1].max()) + 1 if self._sequences else 0
        per_sequence = x.shape[-2] if x.dim() == 3 else 1
        self._rows.append(rows)
        self._sequences.append(start + torch.arange(rows.shape[0]) // per_sequence)
        self._batches.append(torch.full((rows.shape[0],), self.batch))
        self.tokens += rows.shape[0]

    def hook(self, module: nn.Module, args: tuple) -> None:
        self.record(args[0])

    def calibration(self) -> Calibration:
        """The recorded rows as one ``Calibration`` (the recorder lets go of its pieces: one copy, not two)."""
        calibration = Calibration(torch.cat(self._rows), torch.cat(self._sequences), torch.cat(self._batches))
        self._rows.clear()
        return calibration


def capture_calibration(model: nn.Module, site: Site, run_batch: Callable[[int], object], num_batches: int,
                        max_tokens: int) -> Calibration:
    """What enters the site's first module, from up to ``num_batches`` batches (forward cut short), in order."""
    recorder = CalibrationRecorder(max_tokens)

    def hook(module: nn.Module, args: tuple) -> None:
        recorder.record(args[0])
        raise _Captured

    handle = get_module(model, site.modules[0]).register_forward_pre_hook(hook)
    try:
        for i in range(num_batches):
            recorder.batch = i
            try:
                with torch.no_grad():
                    run_batch(i)
            except _Captured:
                pass
            if recorder.full:
                break
    finally:
        handle.remove()
    return recorder.calibration()


def capture_inputs(model: nn.Module, site: Site, run_batch: Callable[[int], object], num_batches: int,
                   max_tokens: int) -> torch.Tensor:
    """Tokens × d_in entering the site's first module (``capture_calibration`` without the sequence ids)."""
    return capture_calibration(model, site, run_batch, num_batches, max_tokens).inputs


def original_sums(site: Site, model: nn.Module, cal: Calibration
                  ) -> tuple[torch.Tensor | tuple[torch.Tensor, ...], torch.Tensor, int]:
    """HᵀH and ΣH (float64) of the uncompressed site's hidden units over the calibration tokens (read a chunk at a
    time: memory ∝ chunk × width, not tokens × width), and the token count; from ``cal.original_stats`` where the
    site is narrow enough for the refits to read them too (``GRAM_BYTES_MAX``): then HᵀH is the statistics' cells
    that sum to it, shared rather than summed into another units × units matrix."""
    if _stats_fit(site, model):
        return cal.original_stats(site, model).parts()
    gram = total = None
    for _, h in _original_hidden_chunks(site, model, cal):
        gram = h.T @ h if gram is None else gram.addmm_(h.T, h)
        total = h.sum(0) if total is None else total.add_(h.sum(0))
    return gram, total, len(cal)


def _original_hidden_chunks(site: Site, model: nn.Module, cal: Calibration, dtype: torch.dtype = torch.float64
                            ) -> Iterator[tuple[slice, torch.Tensor]]:
    """(token rows, H of the uncompressed site on them) for ``REFIT_CHUNK_TOKENS`` calibration tokens at a time."""
    inputs, act = _input_weights(site, site.originals(model), dtype), mlp_activation(model)[1]
    for start in range(0, len(cal), REFIT_CHUNK_TOKENS):
        rows = slice(start, start + REFIT_CHUNK_TOKENS)
        yield rows, mlp_hidden(cal.rows(rows, dtype), inputs, act)


def original_hidden(site: Site, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """H of the uncompressed site (its original modules) on the calibration inputs."""
    return mlp_hidden(x, _input_weights(site, site.originals(model)), mlp_activation(model)[1])


def compensate_mlp(site: Site, model: nn.Module, calibration: torch.Tensor | Calibration, ridge: float | None = None,
                   min_tokens_per_unit: float = 4.0, cross_fit: bool = False,
                   targets: dict[tuple[str, int], torch.Tensor] | None = None, scale: UnitScale | None = None
                   ) -> dict[str, object]:
    """After ``site.apply``: refit the consumer's columns and bias so its output matches the original's.

    The refit is validated on held-out calibration sequences so that it cannot simply memorize them: λ is chosen
    there (unless ``ridge`` fixes it), the plain collapse is kept when the refit is no better there (so exact
    fibers stay exact), and no refit is tried with fewer than ``min_tokens_per_unit`` fitting tokens per kept
    unit. The accepted refit is then solved on all tokens. Returns what was decided, with held-out errors; with
    ``cross_fit``, also ``folds``: the consumer refit without the even, and without the odd, calibration batches
    (so a search can score each batch with a refit that never saw it). λ is relative to the original units'
    ``UnitScale``. ``targets`` caches the original output per calibration chunk and ``scale`` that scale, for a
    caller that refits many cuts of one site (``Refitter``)."""
    cal = calibration if isinstance(calibration, Calibration) else Calibration.from_tokens(calibration)
    out_name = site.modules[-1]
    originals = site.originals(model)
    w_orig, b_orig = (t if t is None else t.to(torch.float64).cpu() for t in linear_weight(originals[out_name]))
    original_in = _input_weights(site, originals)
    current_in = _input_weights(site, {m: get_module(model, m) for m in site.modules})
    act = mlp_activation(model)[1]
    scale = UnitScale(4) if scale is None else scale
    filling, cell = scale.empty, _cells(cal, True)

    def chunks() -> Iterator[tuple[slice, torch.Tensor, torch.Tensor]]:
        for start in range(0, len(cal), REFIT_CHUNK_TOKENS):
            rows = slice(start, start + REFIT_CHUNK_TOKENS)
            x = cal.rows(rows)
            target = None if targets is None else targets.get((out_name, start))
            if target is None or filling:
                original = mlp_hidden(x, original_in, act)
                if filling:
                    scale.add(original, cell[rows])
                target = original @ w_orig.T
                if b_orig is not None:
                    target += b_orig
                if targets is not None:
                    targets[(out_name, start)] = target
            yield rows, mlp_hidden(x, current_in, act), target

    data = _RefitData.collect(chunks(), cal, min_tokens_per_unit, cross_fit, scale)
    return _refit(model, out_name, data, cal, ridge, cross_fit)


class Refitter:
    """The compensation ``Site.apply`` runs after each collapse: ``compensate_mlp`` on one calibration with the
    config's ridge settings, for a caller that may refit many cuts of a site. It keeps what every cut of a site
    shares: the original output per calibration chunk and the original units' scale, and — when the site's units
    are few enough (``GRAM_BYTES_MAX``) and it refits many cuts (``many_cuts``) or the calibration already holds them
    (the span fibers read them) — the per-cell sums of the original hidden units (``Calibration.original_stats``),
    from which a cut that keeps its representatives' rows (span, activations) is refit with no pass over the
    tokens. ``release`` frees them."""

    def __init__(self, calibration: Calibration, ridge: float | None, min_tokens_per_unit: float,
                 cross_fit: bool = False, many_cuts: bool = False) -> None:
        self.calibration, self.ridge, self.min_tokens_per_unit = calibration, ridge, min_tokens_per_unit
        self.cross_fit, self.many_cuts = cross_fit, many_cuts
        self.targets: dict[tuple[str, int], torch.Tensor] = {}
        self.scale = UnitScale(4)

    def __call__(self, site: Site, model: nn.Module) -> dict[str, object]:
        kept = site.kept_units() if self.many_cuts or self.calibration.has_original_stats() else None
        if kept is None or not _stats_fit(site, model):
            return compensate_mlp(site, model, self.calibration, self.ridge, self.min_tokens_per_unit,
                                  cross_fit=self.cross_fit, targets=self.targets, scale=self.scale)
        stats = self.calibration.original_stats(site, model, self.cross_fit)
        data = _RefitData.of_kept(stats, kept, self.calibration, self.min_tokens_per_unit)
        return _refit(model, site.modules[-1], data, self.calibration, self.ridge, self.cross_fit)

    def prefixes(self, site: Site, model: nn.Module, order: torch.Tensor, counts: list[int] | None = None,
                 drop_rows: bool = False) -> PrefixRefits | None:
        """The refits of the cuts that keep a prefix of ``order`` (nested cuts: span) of ``counts`` units (default:
        every prefix), priced at once; None where the statistics path does not apply (a wide site, a ridge fixed at
        0, no held-out tokens). ``drop_rows``: free the calibration's token rows before pricing, for a caller whose
        every later refit of the site reads the statistics alone."""
        if not _stats_fit(site, model) or self.ridge == 0:
            return None
        stats = self.calibration.original_stats(site, model, self.cross_fit)
        if not any(stats.n[c] for c in (2, 3)) or not any(stats.n[c] for c in (0, 1)):
            return None
        if drop_rows:
            self.calibration.drop_rows()
        return PrefixRefits(self, site, model, order, counts)

    def release(self) -> None:
        self.targets.clear()
        self.scale = UnitScale(4)
        self.calibration.release()


class PrefixRefits:
    """The held-out error of the refit of every prefix of a unit order at the candidate λ's (``PrefixHeldErrors``),
    so a caller pricing many nested cuts of a site decides each cut as ``Refitter`` would (the same λ, the same
    plain-or-refit choice, the same held-out error) without a solve per cut; ``install`` then solves only the cuts
    it applies. The λ's are factored outward from the middle of the grid while a cut in ``counts`` (default: every
    prefix) is best at the outermost one factored: the whole grid's choice wherever a cut's held-out error is
    unimodal in λ, a ridge's usual shape, at a fraction of its factorizations (a prefix outside ``counts`` may
    miss its best λ; the λ's not factored read +inf)."""

    def __init__(self, refitter: Refitter, site: Site, model: nn.Module, order: torch.Tensor,
                 counts: list[int] | None = None) -> None:
        self.refitter = refitter
        self.stats = refitter.calibration.original_stats(site, model, refitter.cross_fit)
        self.ridges = RIDGE_CANDIDATES if refitter.ridge is None else (refitter.ridge,)
        self.held = self.stats.merged((2, 3))
        tokens = max(sum(self.held.n) * self.stats.weight.shape[0], 1)  # as ``_RefitData.held_error`` divides
        at = PrefixHeldErrors(self.stats, order, (0, 1), (2, 3), max(counts) if counts else None)
        m = at.size
        self.errors = torch.full((len(self.ridges), m), math.inf, dtype=torch.float64)
        columns = torch.tensor([c - 1 for c in counts if 0 < c <= m] if counts else range(m), dtype=torch.long)
        lo = hi = max(len(self.ridges) // 2 - 1, 0)
        self.errors[lo] = at(self.ridges[lo]) / tokens
        while True:
            best = self.errors[:, columns].argmin(0)
            if lo > 0 and bool((best == lo).any()):
                lo -= 1
                self.errors[lo] = at(self.ridges[lo]) / tokens
            elif hi < len(self.ridges) - 1 and bool((best == hi).any()):
                hi += 1
                self.errors[hi] = at(self.ridges[hi]) / tokens
            else:
                break

    def decide(self, site: Site, model: nn.Module) -> dict[str, object]:
        """For the cut just applied without a refit (its kept units a prefix of the order): what ``Refitter``
        decides, with ``error`` the held-out error of the consumer it would install."""
        cal, kept = self.refitter.calibration, site.kept_units()
        w_now, b_now = (t if t is None else t.cpu() for t in linear_weight(get_module(model, site.modules[-1])))
        data = _RefitData(self.held.ridge_stats(kept), unit_stats=self.held)  # the held-out tokens' sums only
        plain = data.held_error(w_now, b_now)
        note = _too_few(cal, kept.numel(), self.refitter.min_tokens_per_unit)
        if note:
            return {"refit": False, "plain": plain, "note": note, "error": plain}
        column = self.errors[:, kept.numel() - 1]
        best = int(column.argmin())
        refit = float(column[best])
        if refit >= plain - data.tie():
            return {"refit": False, "plain": plain, "held_out_refit": refit, "error": plain,
                    "note": "no refit: plain collapse is better on held-out tokens"}
        return {"refit": True, "plain": plain, "held_out_refit": refit, "ridge": self.ridges[best], "error": refit,
                "note": f"refit λ={self.ridges[best]:g}: held-out error {plain:.3g} → {refit:.3g}"}

    def install(self, site: Site, model: nn.Module, decision: dict[str, object]) -> dict[str, object]:
        """Put the consumer ``decision`` chose in place (solved on every calibration token); returns the decision."""
        if decision["refit"]:
            stats = self.stats.ridge_stats(site.kept_units())
            _install(model, site.modules[-1], stats, float(decision["ridge"]), self.refitter.calibration,
                     self.refitter.cross_fit, decision)
        return decision


def _original_units(site: Site, model: nn.Module) -> int:
    return linear_weight(site.originals(model)[site.modules[0]])[0].shape[0]


GRAM_BYTES_MAX = 1 << 30  # the statistics path holds four units × units float64 sums; wider MLPs read the tokens


def _stats_fit(site: Site, model: nn.Module) -> bool:
    """Whether the site's original units are few enough for ``UnitStats`` (``GRAM_BYTES_MAX``)."""
    return 4 * _original_units(site, model) ** 2 * 8 <= GRAM_BYTES_MAX


def refitter(calibration: Calibration | None, config, cross_fit: bool = False, many_cuts: bool = False
             ) -> Refitter | None:
    """The config's ``Refitter`` on ``calibration``, or None when the config asks for no compensation."""
    if calibration is None or not config.compensate:
        return None
    return Refitter(calibration, config.ridge, config.min_tokens_per_unit, cross_fit, many_cuts)


def _cells(cal: Calibration, cross_fit: bool) -> torch.Tensor:
    """Each token's refit cell: (held out?, batch parity) — every refit is a union of them; parity only to
    cross-fit."""
    parity = cal.batch % 2 if cross_fit and cal.batch is not None else torch.zeros_like(cal.sequence)
    return cal.held_out().long() * 2 + parity


def _unit_stats(site: Site, model: nn.Module, cal: Calibration, parity: bool) -> UnitStats:
    w_orig, b_orig = (t if t is None else t.to(torch.float64).cpu()
                      for t in linear_weight(site.originals(model)[site.modules[-1]]))
    cell = _cells(cal, parity)
    stats = UnitStats(4, w_orig, b_orig)
    for rows, hidden in _original_hidden_chunks(site, model, cal, torch.float32):  # UnitStats.add: float64 sums
        stats.add(hidden, cell[rows])
    return stats


def refit_consumer(model: nn.Module, out_name: str, hidden: torch.Tensor, target: torch.Tensor, cal: Calibration,
                   ridge: float | None = None, min_tokens_per_unit: float = 4.0, cross_fit: bool = False
                   ) -> dict[str, object]:
    """Refit the consumer ``out_name`` (already narrowed) so that ``hidden`` (tokens × its kept inputs) maps to
    ``target`` (the original output on the same tokens), validated on held-out sequences as ``compensate_mlp``
    describes; returns what was decided."""
    return _refit(model, out_name, _RefitData.of(hidden, target, cal, min_tokens_per_unit, cross_fit), cal, ridge,
                  cross_fit)


@dataclass
class _RefitData:
    """What a refit reads from the calibration tokens: the ridge statistics of its cells (None, with ``note``, when
    too few tokens allow no refit) and the held-out rows, or (``of_kept``) statistics that already hold the
    held-out cells, whose errors are then read from the sums."""

    stats: RidgeStats | None
    hidden_held: torch.Tensor | None = None
    target_held: torch.Tensor | None = None
    cell_held: torch.Tensor | None = None
    note: str = ""
    unit_stats: UnitStats | None = None

    @classmethod
    def of(cls, hidden: torch.Tensor, target: torch.Tensor, cal: Calibration, min_tokens_per_unit: float,
           cross_fit: bool = False) -> _RefitData:
        return cls.collect(iter([(slice(None), hidden, target)]), cal, min_tokens_per_unit, cross_fit)

    @classmethod
    def collect(cls, chunks: Iterator[tuple[slice, torch.Tensor, torch.Tensor]], cal: Calibration,
                min_tokens_per_unit: float, cross_fit: bool = False, scale: UnitScale | None = None) -> _RefitData:
        """The statistics of the fitting tokens of (token rows, hidden, target) chunks, accumulated one chunk at a
        time, and the held-out rows (their statistics join only an accepted refit)."""
        held = cal.held_out()
        cell = _cells(cal, cross_fit)
        stats, hidden_held, target_held = None, [], []
        for rows, hidden, target in chunks:
            fit = ~held[rows]
            if stats is None:
                note = _too_few(cal, hidden.shape[1], min_tokens_per_unit)
                if note:
                    return cls(None, note=note)
                stats = RidgeStats(hidden[fit], target[fit], cell[rows][fit], 4, scale)
            else:
                stats.add(hidden[fit], target[fit], cell[rows][fit])
            hidden_held.append(hidden[~fit])
            target_held.append(target[~fit])
        return cls(stats, torch.cat(hidden_held), torch.cat(target_held), cell[held])

    @classmethod
    def of_kept(cls, unit_stats: UnitStats, kept: torch.Tensor, cal: Calibration, min_tokens_per_unit: float
                ) -> _RefitData:
        note = _too_few(cal, kept.numel(), min_tokens_per_unit)
        return cls(None, note=note) if note else cls(unit_stats.ridge_stats(kept), unit_stats=unit_stats)

    def held_error(self, weight: torch.Tensor, bias: torch.Tensor | None) -> float:
        """Mean squared error of a consumer on the held-out tokens."""
        if self.unit_stats is None:
            return reconstruction_error(self.hidden_held, weight, bias, self.target_held)
        held = (2, 3)
        tokens = sum(self.stats.n[c] for c in held)
        squares = self.unit_stats.target_squares(held)
        return self.stats.squared_error(held, weight, bias, squares) / max(tokens * weight.shape[0], 1)

    def tie(self) -> float:
        """Errors closer than this are a tie (kept plain): the sums' round-off, relative to the target's scale."""
        if self.unit_stats is None:
            return 0.0
        tokens = sum(self.stats.n[c] for c in (2, 3))
        return 1e-9 * self.unit_stats.target_squares((2, 3)) / max(tokens * self.unit_stats.weight.shape[0], 1)

    def join_held(self) -> None:
        """Let the held-out tokens into the statistics (an accepted refit is solved on every token)."""
        if self.unit_stats is None:
            self.stats.add(self.hidden_held, self.target_held, self.cell_held)
            self.hidden_held = self.target_held = None


def _too_few(cal: Calibration, units: int, min_tokens_per_unit: float) -> str:
    held = cal.held_out()
    fit_tokens = int((~held).sum())
    if fit_tokens < min_tokens_per_unit * units or not bool(held.any()):
        return f"no refit: {fit_tokens} calibration tokens < {min_tokens_per_unit:g} per kept unit ({units})"
    return ""


def _refit(model: nn.Module, out_name: str, data: _RefitData, cal: Calibration, ridge: float | None,
           cross_fit: bool) -> dict[str, object]:
    if data.stats is None:
        return {"refit": False, "note": data.note}
    stats = data.stats
    down = get_module(model, out_name)
    w_now, b_now = (t if t is None else t.cpu() for t in linear_weight(down))
    plain = data.held_error(w_now, b_now)
    ridges = RIDGE_CANDIDATES if ridge is None else (ridge,)
    errors = [data.held_error(w, b) for w, b in stats.path((0, 1), ridges)]
    best = min(range(len(ridges)), key=errors.__getitem__)
    ridge, refit = ridges[best], errors[best]
    if refit >= plain - data.tie():
        return {"refit": False, "plain": plain, "held_out_refit": refit,
                "note": "no refit: plain collapse is better on held-out tokens"}
    data.join_held()
    result = {"refit": True, "plain": plain, "held_out_refit": refit, "ridge": ridge,
              "note": f"refit λ={ridge:g}: held-out error {plain:.3g} → {refit:.3g}"}
    return _install(model, out_name, stats, ridge, cal, cross_fit, result)


def _install(model: nn.Module, out_name: str, stats: RidgeStats, ridge: float, cal: Calibration, cross_fit: bool,
             result: dict[str, object]) -> dict[str, object]:
    """Put the refit consumer (solved on every cell) in place of ``out_name``; with ``cross_fit``, add to ``result``
    the two folds that each leave out the batches of one parity."""
    down = get_module(model, out_name)

    def consumer(cells: tuple[int, ...]) -> FiberLinear:
        weight, bias = stats.solve(cells, ridge)
        return FiberLinear.from_weights(weight.to(down.weight.dtype).to(down.weight.device),
                                        bias.to(down.weight.dtype).to(down.weight.device),
                                        getattr(down, "fiber_index", None))

    set_module(model, out_name, consumer((0, 1, 2, 3)))
    if cross_fit and cal.batch is not None and len(set(cal.batch.tolist())) > 1:
        result["folds"] = [consumer((1 - p, 3 - p)) for p in (0, 1)]  # without the batches of parity p
        result["calibration_batches"] = set(cal.batch.tolist())
    return result


def _input_weights(site: Site, modules: dict[str, nn.Module], dtype: torch.dtype = torch.float64
                   ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    pairs = []
    for m in site.modules_in():
        w, b = linear_weight(modules[m])
        pairs.append((w.to(dtype).cpu(), None if b is None else b.to(dtype).cpu()))
    return pairs
