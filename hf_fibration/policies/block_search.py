"""A τ search whose cost grows linearly with depth: block-output errors on cached inputs, one global allocation,
then a bisection of that allocation on the true loss.

1. One forward pass records what enters the first block of each stack (encoder, decoder, ...). The stack's inputs
   are then carried block by block (as SparseGPT and Wanda do): at block b, every site of the block is cut at ε_min
   and at the ε's that keep 15/16, 14/16, … 1/16 of its units (``grid``), and the error of the block's output is
   measured on the carried inputs (the first ``ERROR_TOKENS`` tokens of the eval set; refits calibrate on the first
   ``calibration_tokens``): relative, ‖Y' − Y‖² / ‖Y‖², or (``block_error="fisher"``) in loss units, ½ Σ F·(Y' − Y)²
   with F the sampled Fisher of the loss at the block's output (``pipeline.fisher``: one backward pass); then the
   inputs move on through the uncompressed block.
   Cost: sites × cuts × one block.
2. The allocation: each site takes the cut that minimises (parameters kept) + λ·(error); the larger λ, the less is
   collapsed. The distinct allocations over a log-spaced ladder of λ's are bisected on the full eval loss (one
   evaluation per step, ⌈log2 #allocations⌉ ≤ 9 steps) for the most compressed one that keeps loss ≤ base·(1+τ),
   and it is applied. The sites' errors are measured independently (each
   on uncompressed inputs); the bisection on the real loss is what keeps the promise.

Compensated collapse and calibrated fiber sources (``span``) take their calibration from the same carried block
inputs, so they see the uncompressed model's activations (the greedy search sees the model as it stands); sites
outside the blocks (embeddings) are left uncompressed.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_fibration.config import FibrationConfig, loss_bound
from hf_fibration.core.modules import FiberLinear
from hf_fibration.core.report import CompressionReport
from hf_fibration.evaluation.evalset import (
    EvalSet,
    batch_example_losses,
    evaluate_loss,
    examples_loss,
    join_examples,
)
from hf_fibration.integrations.memory import trim_heap
from hf_fibration.models.architectures import mlp_activation
from hf_fibration.models.sites import Site, SiteSwap, build_sites, layer_report, site_parameters
from hf_fibration.models.surgery import get_module, linear_weight, set_module
from hf_fibration.pipeline.blocks import block_of, first_output, stacks_of
from hf_fibration.pipeline.fisher import output_fisher
from hf_fibration.pipeline.loop import calibrates, finish_report, start_report
from hf_fibration.pipeline.spill import SpillFolder
from hf_fibration.policies.bound import HoldoutMargin, SearchBound
from hf_fibration.repair.calibration import Calibration, CalibrationRecorder, refitter

GRID = 16  # cuts per site: the ε's that keep j/16 of its units, j = 15 … 1 (and ε_min)
# The τ search's cuts: 8 per site was as good as 16 at 1.8× less CPU (results/bench_block_search: MiniLM 1.0104× vs
# 1.0078×, Marian d 128 2.15× vs 2.13×); the target size keeps GRID, it interpolates between cuts.
SEARCH_GRID = 8
# Block errors are measured on the first ERROR_TOKENS carried tokens: a relative error is a mean over tokens, which
# 2k tokens estimate well enough to rank cuts, at a quarter of the cost of the 8k calibration tokens.
ERROR_TOKENS = 2048


class _StackInputs:
    """What enters the first block of each stack, per eval batch: (args, kwargs), caches switched off."""

    def __init__(self, model: nn.Module, stacks: list[list[nn.Module]], evalset: EvalSet) -> None:
        self.calls: list[list[tuple[tuple, dict]]] = [[] for _ in stacks]
        self.examples: list[tuple[torch.Tensor, torch.Tensor]] = []  # each batch's ``batch_example_losses``: the
        # pass runs the whole model anyway
        handles = [blocks[0].register_forward_pre_hook(self._hook(s), with_kwargs=True)
                   for s, blocks in enumerate(stacks)]
        try:
            with torch.no_grad():
                was_training = model.training
                model.eval()
                for i in range(len(evalset.batches)):
                    self.examples.append(batch_example_losses(model, evalset, i))
                model.train(was_training)
        finally:
            for h in handles:
                h.remove()

    def _hook(self, s: int):
        def record(module: nn.Module, args: tuple, kwargs: dict) -> None:
            kwargs = {k: (None if k in ("past_key_value", "past_key_values") else False if k == "use_cache" else v)
                      for k, v in kwargs.items()}
            self.calls[s].append((tuple(args), kwargs))

        return record


def _run(block: nn.Module, call: tuple[tuple, dict], hidden: torch.Tensor) -> torch.Tensor:
    args, kwargs = call
    if args:
        return first_output(block(hidden, *args[1:], **kwargs))
    return first_output(block(**{**kwargs, "hidden_states": hidden}))


def _hidden(call: tuple[tuple, dict]) -> torch.Tensor:
    args, kwargs = call
    return args[0] if args else kwargs["hidden_states"]


def _without_hidden(call: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """The call less its hidden states (``_run`` passes the block's input itself)."""
    args, kwargs = call
    return ((None, *args[1:]), kwargs) if args else ((), {k: v for k, v in kwargs.items() if k != "hidden_states"})


def _first_tokens(evalset: EvalSet, tokens: int) -> EvalSet:
    """The leading batches of ``evalset`` that hold about ``tokens`` input tokens (at least one batch)."""
    count, taken = 0, 0
    for batch in evalset.batches:
        if taken and count >= tokens:
            break
        count += int(batch["attention_mask"].sum()) if "attention_mask" in batch else batch["input_ids"].numel()
        taken += 1
    return evalset.head(taken)


def site_error_curves(model: nn.Module, config: FibrationConfig, evalset: EvalSet, sites: list[Site],
                      progress: bool = True, by_count: bool = False, grid: int = GRID, keep_refits: bool = True,
                      examples: list | None = None) -> dict[str, list[dict]]:
    """Per site, one entry per distinct cut of its ε grid (``by_count``: of the counts that keep (grid−1)/grid …
    1/grid of its units, whatever their ε): ε, partition, parameters after, relative block error (on the first
    ``ERROR_TOKENS`` tokens of ``evalset``), the refit that compensated it (``keep_refits``: replayed from disk when
    the cut is applied again; else None, for a caller that only reads the errors). MLP sites that calibrate
    (``config.calibrates_mlps``) take their calibration from the carried block inputs of the first
    ``config.calibration_tokens`` tokens. ``examples`` (a list) receives each batch's per-example losses of the model
    as it came (``evaluate_loss``'s ``examples``; ``examples_loss`` gives the eval loss) when the carried tokens are
    the whole of ``evalset``: their pass ran the whole model, so no evaluation of its own."""
    stacks, position = stacks_of(model)
    carried = _first_tokens(evalset, max(config.calibration_tokens, ERROR_TOKENS))
    inputs = _StackInputs(model, stacks, carried)
    if examples is not None and len(carried.batches) == len(evalset.batches):
        examples.extend(inputs.examples)
    measured = len(_first_tokens(carried, ERROR_TOKENS).batches)
    fisher = None
    if config.block_error == "fisher":
        fisher = output_fisher(model, carried.head(measured),
                               {(s, b): block for s, blocks in enumerate(stacks) for b, block in enumerate(blocks)},
                               config.seed)
        loss_terms = sum(carried.weights[:measured])
    by_block: dict[tuple[int, int], list[Site]] = {}
    for site in sites:
        pos = block_of(site, position)
        if pos is not None:
            by_block.setdefault(pos, []).append(site)
    curves: dict[str, list[dict]] = {}
    spill = SpillFolder() if keep_refits else None  # each cut's refit consumer (gone once the curves are dropped)
    carried_spill = SpillFolder()  # block outputs past the measured batches: only the next block's run reads them
    local = config.cut_pricing == "local"
    bar = tqdm(total=len(by_block), desc="block errors", disable=not progress, unit="block")
    with torch.no_grad():
        for s, blocks in enumerate(stacks):
            hidden = [_hidden(call) for call in inputs.calls[s]]
            inputs.calls[s] = [_without_hidden(call) for call in inputs.calls[s]]  # freed once block 0 has run
            for b, block in enumerate(blocks):
                calls = inputs.calls[s]
                block_sites = by_block.get((s, b), [])
                calibrating = [site for site in block_sites if calibrates(site, config)]
                with _SiteInputs(model, block_sites if local else [], measured, calibrating,
                                 config.calibration_tokens, carried_spill) as site_inputs:
                    reference = []
                    for i, (call, h) in enumerate(zip(calls, hidden, strict=True)):
                        site_inputs.start_batch(i)
                        if isinstance(h, int):  # carried on disk since the block before
                            h, key = carried_spill.load(h)["hidden"], h
                            carried_spill.drop(key)
                        y = _run(block, call, h)
                        reference.append(y if i < measured else carried_spill.save({"hidden": y}))
                        trim_heap()  # the batch's freed buffers (and the spill's I/O copies) would pile up until the
                        # block's first site trims: ~100 MB on a 576-wide model
                hidden = hidden[:measured]  # the block errors read the measured batches only
                if fisher is None:  # relative error: ‖δ‖² / ‖Y‖²
                    weights = None
                    scale = 1.0 / max(sum(float(y.double().pow(2).sum()) for y in reference[:measured]), 1e-30)
                else:  # the loss increase to second order: ½ Σ F δ², per loss term
                    weights, scale = fisher[(s, b)], 0.5 / max(loss_terms, 1)
                measure = _BlockError(block, calls[:measured], hidden, reference, weights)
                for site in block_sites:
                    # each capture and calibration let go once its site is priced (q/k/v's shared one, by the last)
                    curves[site.name] = _site_curve(model, config, site, site_inputs.calibrations.pop(site.name, None),
                                                    measure, scale, site_inputs.take(site.name) if local
                                                    else None, by_count, grid, spill)
                hidden = reference
                if (s, b) in by_block:
                    bar.update(1)
    bar.close()
    return curves


def _epsilon_grid(dendro, units: int, config: FibrationConfig, grid: int = GRID) -> list[float]:
    """ε_min, then the ε's that keep (grid−1)/grid, … 1/grid of the units (evenly spaced sizes), up to ε_max."""
    epsilons = [config.epsilon_min]
    for j in range(grid - 1, 0, -1):
        eps = max(dendro.epsilon_for_count(max(1, round(units * j / grid))), config.epsilon_min)
        if eps <= config.epsilon_max:
            epsilons.append(eps)
    return epsilons


def _count_grid(dendro, units: int, grid: int = GRID) -> list[tuple[float, object]]:
    """(ε, partition) at the counts that keep (grid−1)/grid, … 1/grid of the units."""
    counts = sorted({max(1, round(units * j / grid)) for j in range(grid - 1, 0, -1)} - {units}, reverse=True)
    return [(float(dendro.epsilon_for_count(count)), dendro.cut_to_count(count)) for count in counts]


class _BlockError:
    """Σ (Y' − Y)² (or Σ F·(Y' − Y)²) of a block's output on the measured carried inputs, the model as it stands."""

    def __init__(self, block: nn.Module, calls: list, hidden: list[torch.Tensor], reference: list[torch.Tensor],
                 weights: list[torch.Tensor] | None) -> None:
        self.block, self.calls, self.hidden, self.reference, self.weights = block, calls, hidden, reference, weights

    def __call__(self) -> float:
        error = 0.0
        for i, (call, h, y) in enumerate(zip(self.calls, self.hidden, self.reference, strict=False)):
            squares = (_run(self.block, call, h) - y).double().pow(2)
            if self.weights is not None:
                squares = squares * self.weights[i].to(squares.device)
            error += float(squares.sum())
        return error


class _SiteInputs:
    """While open, records what enters each site's first module on the first ``measured`` block runs (``take``), and
    the calibration of each site in ``calibrating`` (``calibrations``: up to ``max_tokens``, ``start_batch`` naming
    the block run in progress), so the block's reference run is also its sites' calibration pass. With ``park``,
    every capture but the first site's waits there until its site takes it: the sites are priced one at a time,
    and a site's pricing then shares memory with its own capture only."""

    def __init__(self, model: nn.Module, sites: list[Site], measured: int, calibrating: list[Site] = (),
                 max_tokens: int = 0, park: SpillFolder | None = None) -> None:
        self.rows: dict[str, torch.Tensor | int] = {}  # a capture, or its key in ``park``
        self._park, self._loaded = park, {}  # a parked capture read back while another site still waits for it
        self.calibrations: dict[str, Calibration] = {}
        self._parts: dict[str, list[torch.Tensor]] = {site.name: [] for site in sites}
        self._recorders = {site.name: CalibrationRecorder(max_tokens) for site in calibrating}
        self._model, self._sites, self._calibrating, self._measured = model, sites, calibrating, measured
        self._handles: list = []

    def start_batch(self, index: int) -> None:
        for recorder in self._recorders.values():
            recorder.batch = index

    def __enter__(self) -> _SiteInputs:
        for site in self._sites:
            self._handles.append(get_module(self._model, site.modules[0]).register_forward_pre_hook(
                self._hook(self._parts[site.name])))
        for site in self._calibrating:
            self._handles.append(get_module(self._model, site.modules[0]).register_forward_pre_hook(
                self._recorders[site.name].hook))
        return self

    def _hook(self, parts: list[torch.Tensor]):
        def record(module: nn.Module, args: tuple) -> None:
            if len(parts) < self._measured:
                parts.append(args[0].detach().reshape(-1, args[0].shape[-1]))

        return record

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        # one measured run: the recorded input itself (sites reading one tensor share it), else one copy of the runs
        self.rows = {name: parts[0] if len(parts) == 1 else torch.cat(parts)
                     for name, parts in self._parts.items() if parts}
        self._parts.clear()
        self.calibrations = {name: r.calibration() for name, r in self._recorders.items() if r.tokens}
        first = self.rows.get(self._sites[0].name) if self._sites and self._park is not None else None
        keys: dict[int, int] = {}
        for name, rows in self.rows.items():
            if first is not None and rows.data_ptr() != first.data_ptr():  # sites reading one tensor park it once
                keys.setdefault(rows.data_ptr(), self._park.save({"rows": rows}))
                self.rows[name] = keys[rows.data_ptr()]

    def take(self, name: str) -> torch.Tensor:
        """Site ``name``'s capture, which this object then lets go (read back once where sites share it)."""
        rows = self.rows.pop(name)
        if not isinstance(rows, int):
            return rows
        tensor = self._loaded.pop(rows, None)
        if tensor is None:
            tensor = self._park.load(rows)["rows"]
        if any(isinstance(key, int) and key == rows for key in self.rows.values()):  # another site reads it
            self._loaded[rows] = tensor
        else:
            self._park.drop(rows)
        return tensor


class _SiteOutput:
    """A site's own output on cached inputs: a rows site's projection, an MLP's consumer output. A rows site's error
    is read from the inputs' Gram: Σ‖ΔW x + Δb‖² = tr(ΔW G ΔWᵀ) + 2 Δbᵀ ΔW Σx + n‖Δb‖² (a d_in² product per cut
    instead of a projection of every token)."""

    def __init__(self, model: nn.Module, site: Site, inputs: torch.Tensor) -> None:
        self.site, self.inputs = site, inputs
        self.act = mlp_activation(model)[1] if site.kind == "mlp" else None
        if site.kind == "rows":  # no projection of the tokens: the original weights and the inputs' Gram suffice
            x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float64)
            self.gram, self.total, self.tokens = x.T @ x, x.sum(0), x.shape[0]
            self.weight, self.bias = _dense_weights(get_module(model, site.modules[0]))
        else:
            self.reference = self._output(model)

    def _output(self, model: nn.Module) -> torch.Tensor:
        if self.site.kind == "rows":
            return get_module(model, self.site.modules[0])(self.inputs)
        outs = [get_module(model, name)(self.inputs) for name in self.site.modules_in()]
        hidden = self.act(outs[0])
        if len(outs) > 1:
            hidden = hidden * outs[1]
        return get_module(model, self.site.modules[-1])(hidden)

    def error(self, model: nn.Module) -> float:
        if self.site.kind == "rows":
            weight, bias = _dense_weights(get_module(model, self.site.modules[0]))
            if weight.shape == self.weight.shape:
                dw, db = weight - self.weight, bias - self.bias
                return float(((dw @ self.gram) * dw).sum() + 2 * db @ (dw @ self.total) + self.tokens * db @ db)
            reference = self.inputs.to(torch.float64) @ self.weight.T + self.bias  # the original projection
            return float((self._output(model).double() - reference).pow(2).sum())
        return float((self._output(model) - self.reference).double().pow(2).sum())


def _dense_weights(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The (out, in) weight and bias (zeros when it has none) of a linear layer as one dense map, float64: a
    ``FiberLinear``'s fiber rows repeated to its full width."""
    weight, bias = linear_weight(module)
    bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    index = getattr(module, "fiber_index", None)
    if index is not None:
        weight, bias = weight[index], bias[index]
    return weight.to(torch.float64).cpu(), bias.to(torch.float64).cpu()


def _site_curve(model: nn.Module, config: FibrationConfig, site: Site, calibration: Calibration | None,
                block_error: _BlockError, scale: float, local_inputs: torch.Tensor | None, by_count: bool, grid: int,
                spill: SpillFolder | None) -> list[dict]:
    """The site's cuts with their block errors: each measured by ``block_error`` (a block run per cut), or with
    ``local_inputs`` (what entered the site on the measured block runs) each cut's local error — its site output's
    error on them, or its refit's held-out error where the cuts are nested — scaled to the block's error by the one
    cut nearest half the units (the most compressed cut whose local error is not 0, when that one is exact).
    ``calibration``: what entered the site on the block's reference run (MLP sites that calibrate)."""
    refit = refitter(calibration, config, many_cuts=True)
    dendro = site.dendrogram(model, config, calibration)
    site.commit()
    params_before = site_parameters(model, site)
    units = site.units(model)
    cuts = _count_grid(dendro, units, grid) if by_count else [(eps, dendro.cut(eps))
                                                              for eps in _epsilon_grid(dendro, units, config, grid)]
    curve: dict[int, dict] = {}
    ratio = None  # block error per unit of site-output error
    # nested cuts (span) with local pricing: each cut priced by its refit's held-out error, all cuts from one
    # factorization per λ; a consumer is solved only where a cut is applied or kept
    priced_locally = local_inputs is not None
    prefix = None if not priced_locally or refit is None or not getattr(dendro, "nested", False) else refit.prefixes(
        site, model, dendro.order, sorted({part.num_fibers for _, part in cuts}), drop_rows=True)
    # the site's own output on the captured rows is read only where no prefix pricing prices the cuts
    local = _SiteOutput(model, site, local_inputs) if priced_locally and prefix is None else None
    del local_inputs
    for eps, part in cuts:
        if part.num_fibers in curve or part.is_trivial:
            continue
        if prefix is not None:
            site.apply(model, part, None)
            result = prefix.decide(site, model)
            error = result["error"]
        else:
            result = site.apply(model, part, refit)
            error = block_error() if local is None else local.error(model)
        sets_ratio = priced_locally and ratio is None and error > 0 and part.num_fibers <= units / 2
        if prefix is not None and (spill is not None or sets_ratio):  # this cut's consumer is kept or measured
            prefix.install(site, model, result)
        if sets_ratio:
            ratio = block_error() / error
        replay = None if refit is None or spill is None else _RecordedRefit(site, model, result, spill)
        curve[part.num_fibers] = {"epsilon": eps, "partition": part, "params": site_parameters(model, site),
                                  "params_before": params_before, "error": error, "refit": replay}
        site.restore(model)
        site.commit()  # forget the originals: a later apply must take the model's modules as they are then
    if priced_locally and curve:
        changed = [cut for cut in curve.values() if cut["error"] > 0]
        if ratio is None and changed:
            cut = min(changed, key=lambda c: c["params"])
            site.apply(model, cut["partition"], cut["refit"] or refit)
            ratio = block_error() / cut["error"]
            site.restore(model)
            site.commit()
        for cut in curve.values():
            cut["error"] *= ratio or 0.0
    for cut in curve.values():
        cut["error"] *= scale
    if refit is not None:
        refit.release()  # the curves keep each cut's refit consumer, not the calibration or its statistics
    trim_heap()  # the site's row captures and sums, freed: the next site starts from the same resident size
    return sorted(curve.values(), key=lambda c: c["params"], reverse=True)


class _RecordedRefit:
    """A cut's refit as measured: re-applying the cut puts back the consumer its refit solved, read from ``spill``
    (on disk: a search holds one per cut of every MLP), so the allocation's evaluations neither keep the site's
    calibration and statistics nor solve again."""

    def __init__(self, site: Site, model: nn.Module, result: dict[str, object] | None, spill: SpillFolder) -> None:
        self.result, self.spill, self.key = result, spill, None
        if result is not None and result.get("refit"):
            consumer = get_module(model, site.modules[-1])
            tensors = {"weight": consumer.weight, "bias": consumer.bias, "fiber_index": consumer.fiber_index}
            self.key = spill.save({name: t for name, t in tensors.items() if t is not None})

    def __call__(self, site: Site, model: nn.Module) -> dict[str, object] | None:
        if self.key is not None:
            t = self.spill.load(self.key)
            set_module(model, site.modules[-1], FiberLinear.from_weights(t["weight"], t.get("bias"),
                                                                         t.get("fiber_index")))
        return self.result


def allocate(curves: dict[str, list[dict]], lam: float) -> dict[str, dict | None]:
    """Each site's cut minimising parameters + λ·error (None: leave the site uncompressed, error 0)."""
    chosen: dict[str, dict | None] = {}
    for name, curve in curves.items():
        best, best_cost = None, float(curve[0]["params_before"]) if curve else 0.0
        for cut in curve:
            cost = cut["params"] + lam * cut["error"]
            if cost < best_cost:
                best, best_cost = cut, cost
        chosen[name] = best
    return chosen


def _apply(model: nn.Module, sites: list[Site], chosen: dict[str, dict | None]) -> list[Site]:
    applied = []
    for site in sites:
        cut = chosen.get(site.name)
        if cut is not None:
            site.apply(model, cut["partition"], cut["refit"])
            applied.append(site)
    return applied


def _undo(model: nn.Module, applied: list[Site]) -> None:
    for site in reversed(applied):
        site.restore(model)
        site.commit()


def _loss_with(model: nn.Module, sites: list[Site], chosen: dict, evalset: EvalSet, bound: SearchBound
               ) -> tuple[float, bool]:
    """The eval loss with ``chosen`` applied and whether ``bound`` accepts it, the model left as it was."""
    applied = _apply(model, sites, chosen)
    try:
        return bound.check(model, evalset)
    finally:
        _undo(model, applied)
        trim_heap()


def allocation_ladder(curves: dict[str, list[dict]], lo: float, hi: float, samples: int = 256) -> list[dict]:
    """The distinct λ-allocations for log λ from ``lo`` to ``hi`` (``samples`` + 1 log-spaced λ's), most compressed
    first: a larger λ prices error higher, so every site keeps at least as many parameters."""
    ladder, seen = [], set()
    for i in range(samples + 1):
        chosen = allocate(curves, math.exp(lo + (hi - lo) * i / samples))
        key = tuple(sorted((name, None if cut is None else cut["params"]) for name, cut in chosen.items()))
        if key not in seen:
            seen.add(key)
            ladder.append(chosen)
    return ladder


def _refine(model: nn.Module, sites: list[Site], evalset: EvalSet, bound: SearchBound, passed: dict, failed: dict,
            progress: bool) -> tuple[dict, float] | None:
    """Between a passing allocation and the next one up the ladder that failed: the sites that differ, cheapest
    error per parameter saved first, and a bisection on how many of them take the failed allocation's cut."""

    def price(name: str) -> float:
        # the failed allocation is the more compressed one: a site that differs is cut there (maybe whole here)
        cut, here = failed[name], passed[name]
        kept_here, error_here = (cut["params_before"], 0.0) if here is None else (here["params"], here["error"])
        return (cut["error"] - error_here) / max(kept_here - cut["params"], 1)

    moves = sorted((name for name in passed if passed[name] is not failed[name]), key=price)
    lo, hi, best = 0, len(moves), None  # lo moves keep the bound, hi break it
    bar = tqdm(total=max(1, math.ceil(math.log2(max(len(moves), 1)))), desc="refine", disable=not progress,
               unit="eval")
    while hi - lo > 1:
        mid = (lo + hi) // 2
        chosen = {**passed, **{name: failed[name] for name in moves[:mid]}}
        value, ok = _loss_with(model, sites, chosen, evalset, bound)
        bar.update(1)
        if ok:
            lo, best = mid, (chosen, value)
        else:
            hi = mid
    bar.close()
    return best


def block_search(model: nn.Module, config: FibrationConfig, evalset: EvalSet, progress: bool = True,
                 grid: int = SEARCH_GRID, ladder: int = 256, cache: dict | None = None,
                 margin: HoldoutMargin | None = None, trail: list[SiteSwap] | None = None) -> CompressionReport:
    """Compress ``model`` in place: the most compressed λ-allocation of the block-error curves whose eval loss
    stays ≤ base·(1+τ) — a bisection over the distinct allocations of ``ladder`` log-spaced λ's, so at most
    ⌈log2(ladder + 1)⌉ full evaluations; ``grid`` cuts per site. ``cache`` keeps the curves between calls on the
    same uncompressed model (the held-out check's retries at a tighter τ redo only the bisection). With ``margin``,
    an allocation is accepted only when it leaves the held-out check its margin (``SearchBound``). ``trail`` collects
    the applied sites' swaps (undone, they give back the model as it came)."""
    report = start_report(model)
    sites = [s for s in build_sites(model, config) if s.kind != "embedding"]
    key = (config.compensate, config.fibers_from, config.linkage, grid)
    cached = None if cache is None else cache.get(key)
    if cached is None:
        examples: list = []
        curves = site_error_curves(model, config, evalset, sites, progress, grid=grid, examples=examples)
        # the base loss and per-example losses of the model as it came (a retry restores that model)
        cached = (curves, examples_loss(examples, evalset) if examples else None,
                  join_examples(examples) if examples else None)
        if cache is not None:
            cache[key] = cached
    curves, base, terms = cached
    if base is None or (margin is not None and margin.base_terms is None and terms is None):
        measured: list = []
        base, terms = evaluate_loss(model, evalset, examples=measured), join_examples(measured)
    if margin is not None and margin.base_terms is None:
        margin = margin.with_base(terms)
    bound = SearchBound(loss_bound(base, config.tolerance, evalset.task), base, margin)
    report.base_loss = base
    errors = [c["error"] for curve in curves.values() for c in curve if c["error"] > 0]
    saved = [c["params_before"] - c["params"] for curve in curves.values() for c in curve]
    if not errors:
        report.final_loss = base
        return finish_report(model, report)
    # λ from "everything collapses" (λ·max error below the smallest saving) to "nothing does"
    lo = math.log(max(min(saved), 1) / max(errors) / 10)
    hi = math.log(max(saved) / min(errors) * 10)
    candidates = allocation_ladder(curves, lo, hi, ladder)
    best: tuple[dict, float] | None = None
    first, last = 0, len(candidates) - 1  # the answer lies in [first, last]; the last keeps every site whole
    bar = tqdm(total=max(1, math.ceil(math.log2(len(candidates)))), desc="allocation", disable=not progress,
               unit="eval")
    while first < last:
        mid = (first + last) // 2
        value, ok = _loss_with(model, sites, candidates[mid], evalset, bound)
        bar.update(1)
        if ok:
            best, last = (candidates[mid], value), mid
        else:
            first = mid + 1
    bar.close()
    if last > 0:  # candidates[last - 1] failed: take what of its step fits
        best = _refine(model, sites, evalset, bound, candidates[last], candidates[last - 1], progress) or best
    current = base
    if best is not None:
        chosen, current = best
        for site in sites:
            cut = chosen.get(site.name)
            if cut is None:
                continue
            before = site.units(model)
            result = site.apply(model, cut["partition"], cut["refit"])
            layer = layer_report(model, site, cut["partition"], cut["epsilon"], before, cut["params_before"])
            layer.compensation = None if result is None else str(result["note"])
            report.layers.append(layer)
            if trail is not None:
                trail.append(SiteSwap.of(site, model))
            site.commit()
        current = evaluate_loss(model, evalset)
    report.final_loss = current
    return finish_report(model, report)

