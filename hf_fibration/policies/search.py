"""Greedy per-layer ε search (seed Alg. 3): site by site, the largest ε whose loss stays ≤ base·(1+τ).

What makes it fast, without changing a single decision:
- one dendrogram per site, cut at every candidate ε (O(n) per cut), and one evaluation per distinct cut;
- the candidate module is swapped in place (no model copies);
- blocks before the one being searched are final, so their outputs are recorded once and replayed;
- an evaluation stops as soon as its running loss sum proves the mean will exceed the bound.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

from torch import nn
from tqdm.auto import tqdm

from hf_fibration.config import FibrationConfig, loss_bound
from hf_fibration.core.fibers import FiberPartition
from hf_fibration.core.modules import count_parameters
from hf_fibration.core.report import CompressionReport, LayerReport
from hf_fibration.evaluation.evalset import (
    DataError,
    EvalSet,
    batch_loss_sum,
    evaluate_loss,
    example_losses,
    join_examples,
    loss_increase,
)
from hf_fibration.integrations.memory import trim_heap
from hf_fibration.models.sites import Site, SiteSwap, build_sites, site_parameters, undo_all
from hf_fibration.models.surgery import get_module, non_embedding_parameters, set_module
from hf_fibration.pipeline.blocks import BlockReplay, block_of, stacks_of
from hf_fibration.pipeline.loop import calibrate, finish_report, start_report
from hf_fibration.policies.block_search import block_search
from hf_fibration.policies.bound import HoldoutMargin, SearchBound, Terms, search_and_holdout
from hf_fibration.repair.calibration import Calibration, refitter

MIN_HOLDOUT_EXAMPLES = 8  # below this the standard error of the held-out loss means nothing
TRIM_KEEP = 0.5  # a search cut back to a tighter bound is kept when it still saves this share of its parameters


class HoldoutError(ValueError):
    """The held-out loss broke τ in every search: the eval data is too small to compress this model safely."""


def greedy_search(
    model: nn.Module,
    config: FibrationConfig,
    evalset: EvalSet,
    progress: bool = True,
    holdout: EvalSet | None = None,
    holdout_losses: Terms | None = None,
) -> CompressionReport:
    """Compress ``model`` in place, site by site, at the largest ε that keeps the eval loss within τ.

    ``holdout_losses``: the model's per-example losses on ``holdout`` as it comes (``example_losses``), when the
    caller has measured them already (the search then skips that evaluation).

    The promise is checked on data the search never saw: ``holdout`` (or a ``config.holdout_fraction`` of
    ``evalset``) takes no part in choosing ε's or fitting refits. Every candidate must leave that check its margin
    (``HoldoutMargin``: its increase plus ``config.holdout_z`` projected standard errors), so one search usually
    suffices. When the held-out loss still breaks τ, the next attempt takes a
    tighter internal bound: first the greedy search's own sites cut back to those it accepted within that bound
    (no new search; kept when it still saves ``TRIM_KEEP`` of the parameters), else the model is restored and
    searched again (the last retry without the refit). Each attempt looks at the held-out examples once. If every
    attempt breaks τ, the model is left uncompressed and ``HoldoutError`` says how much data to pass."""
    if config.is_fixed:  # no ε to choose, no τ to promise: the losses are reported as they come
        return _search_once(model, config, evalset, progress)
    evalset, holdout = search_and_holdout(evalset, holdout, config.holdout_fraction, config.seed, holdout_losses)
    if holdout is None:
        return (block_search if config.search == "block" else _search_once)(model, config, evalset, progress)
    if holdout.num_examples < MIN_HOLDOUT_EXAMPLES:
        raise DataError(f"The held-out check needs at least {MIN_HOLDOUT_EXAMPLES} examples, got "
                        f"{holdout.num_examples}: pass more eval data (--max-samples) or holdout_fraction=0 to "
                        "search without a check on unseen data.")
    base_terms = example_losses(model, holdout) if holdout_losses is None else holdout_losses
    holdout_base = float(base_terms[0].sum() / base_terms[1].sum())
    allowed = loss_bound(holdout_base, config.tolerance, holdout.task) - holdout_base
    # the search examples' base losses come from the search's own first pass (``with_base``)
    margin = None if config.holdout_z == 0 else HoldoutMargin(
        None, holdout.num_examples, float(base_terms[1].sum()), config.holdout_z)
    attempts: list[dict] = []
    tolerance, compensate = config.tolerance, config.compensate
    trail: list[SiteSwap] = []  # the swaps of the search now in the model: undone, they give back the original
    curves: dict = {}  # the block search's error curves, measured once on the uncompressed model
    previous: CompressionReport | None = None
    for attempt in range(config.holdout_retries + 1):
        if attempt == config.holdout_retries and attempt > 0:
            compensate = False
        attempt_config = dataclasses.replace(config, tolerance=tolerance, compensate=compensate)
        report = None
        if previous is not None and compensate == config.compensate:
            report = _trimmed(model, previous, trail, loss_bound(previous.base_loss, tolerance, evalset.task), evalset)
        if report is None:
            undo_all(model, trail)
            if config.search == "block":
                report = block_search(model, attempt_config, evalset, progress, cache=curves, margin=margin,
                                      trail=trail)
            else:
                report = _search_once(model, attempt_config, evalset, progress, trail, margin)
        increase, se = loss_increase(base_terms, example_losses(model, holdout))
        attempts.append({"tolerance": tolerance, "compensate": compensate, "search_loss": report.final_loss,
                         "holdout_loss": holdout_base + increase, "holdout_se": se,
                         "non_embedding_params": report.non_embedding_params_after})
        if previous is not None and report is not previous and len(trail) > len(report.layers):
            attempts[-1]["trimmed_to_sites"] = len(report.layers)
        if increase + config.holdout_z * se <= allowed or report.non_embedding_params_after == \
                report.non_embedding_params_before:
            report.holdout_base_loss, report.holdout_final_loss = holdout_base, holdout_base + increase
            report.holdout_se = se
            report.search_examples, report.holdout_examples = evalset.num_examples, holdout.num_examples
            report.attempts = attempts
            return report
        previous = report
        spent = increase + config.holdout_z * se
        tolerance *= min(0.5, 0.8 * allowed / spent) if spent > 0 and allowed > 0 else 0.5
    undo_all(model, trail)
    raise HoldoutError(
        f"The held-out loss ({attempts[-1]['holdout_loss']:.4g} ± {attempts[-1]['holdout_se']:.2g}) broke the bound "
        f"({holdout_base + allowed:.4g}) in {len(attempts)} searches down to τ={attempts[-1]['tolerance']:.3g}: "
        f"{evalset.num_examples} search and {holdout.num_examples} held-out examples are too few for this model; "
        f"pass at least {4 * (evalset.num_examples + holdout.num_examples)} (--max-samples) or fix ε (--epsilon). "
        "The model was left uncompressed.")


def _trimmed(model: nn.Module, searched: CompressionReport, trail: list[SiteSwap], bound: float, evalset: EvalSet
             ) -> CompressionReport | None:
    """The last search cut back to the sites it had accepted while its own search loss was still ≤ ``bound`` (the
    tighter internal bound of the next attempt): what that search would keep of it, without searching again. None
    (model untouched) when that prefix saves less than ``TRIM_KEEP`` of the parameters the search saved: then a
    new search at the tighter bound spreads the cuts over every site instead."""
    if not trail or len(trail) != len(searched.layers):
        return None
    kept = 0
    while kept < len(trail) and searched.layers[kept].loss is not None and searched.layers[kept].loss <= bound:
        kept += 1
    saved = searched.non_embedding_params_before - searched.non_embedding_params_after
    for step in reversed(trail[kept:]):
        step.undo(model)
    report = CompressionReport(params_before=searched.params_before,
                               non_embedding_params_before=searched.non_embedding_params_before,
                               base_loss=searched.base_loss, layers=searched.layers[:kept])
    report.non_embedding_params_after = non_embedding_parameters(model)
    if kept == 0 or report.non_embedding_params_before - report.non_embedding_params_after < TRIM_KEEP * saved:
        for step in trail[kept:]:
            step.redo(model)
        return None
    report.final_loss = evaluate_loss(model, evalset)
    report.params_after = count_parameters(model)
    return report


def _search_once(model: nn.Module, config: FibrationConfig, evalset: EvalSet, progress: bool,
                 trail: list[SiteSwap] | None = None, margin: HoldoutMargin | None = None) -> CompressionReport:
    report = start_report(model)
    stacks, position = stacks_of(model)
    replay = BlockReplay(stacks)
    replay.install()

    cross_fit: dict = {}  # a refit site: each calibration batch is scored by the refit that did not see it

    def before_batch(i: int) -> None:
        replay.batch = i
        if cross_fit:
            unseen = cross_fit["folds"][i % 2] if i in cross_fit["batches"] else cross_fit["full"]
            set_module(model, cross_fit["module"], unseen)

    def loss(bound: SearchBound | None = None) -> tuple[float, bool]:
        try:
            if bound is None:
                return evaluate_loss(model, evalset, before_batch=before_batch), True
            return bound.check(model, evalset, before_batch)
        finally:
            if cross_fit:
                set_module(model, cross_fit["module"], cross_fit["full"])

    try:
        examples: list[Terms] | None = [] if margin is not None and margin.base_terms is None else None
        base = evaluate_loss(model, evalset, before_batch=before_batch, examples=examples)  # no refit swapped in yet
        if examples is not None:
            margin = margin.with_base(join_examples(examples))
        bound = SearchBound(loss_bound(base, config.tolerance, evalset.task), base, margin)
        report.base_loss = base
        sites = build_sites(model, config)
        if config.search_order == "backward":
            sites = sites[::-1]
        bar = tqdm(sites, desc="fibration search", disable=not progress, unit="layer")
        current = base
        for i, site in enumerate(bar):
            pos = block_of(site, position)
            if pos is not None and config.search_order == "forward":
                s, b = pos
                if b > 0:
                    replay.freeze_through(s, b - 1, loss)
            fixed = config.epsilon_for(site.part, site.name)
            site_bound = bound if config.budget == "greedy" else bound.share((i + 1) / len(sites))
            calibration = calibrate(model, config, site, evalset, lambda i: (setattr(replay, "batch", i),
                                                                             batch_loss_sum(model, evalset, i)))
            layer, current = _search_site(model, config, site, loss, site_bound, current, fixed, calibration,
                                          cross_fit, trail)
            if layer is not None:
                report.layers.append(layer)
            del calibration
            trim_heap()  # the site's calibration and trial buffers, freed: each site starts from the same size
            bar.set_postfix(loss=f"{current:.4f}", bound=f"{site_bound.limit:.4f}")
        report.final_loss = current
    finally:
        replay.remove()
    return finish_report(model, report)


def _search_site(
    model: nn.Module,
    config: FibrationConfig,
    site: Site,
    loss: Callable[[SearchBound | None], tuple[float, bool]],
    bound: SearchBound,
    current: float,
    fixed: float | None,
    calibration: Calibration | None = None,
    cross_fit: dict | None = None,
    trail: list[SiteSwap] | None = None,
) -> tuple[LayerReport | None, float]:
    units, params_before = site.units(model), site_parameters(model, site)
    cross_fit = {} if cross_fit is None else cross_fit
    dendro = site.dendrogram(model, config, calibration)
    tried: dict[int, tuple[FiberPartition, float, bool]] = {}
    notes: dict[str, str | None] = {"compensation": None}

    refit = refitter(calibration, config, cross_fit=True, many_cuts=True)

    def apply(part: FiberPartition) -> None:
        cross_fit.clear()
        result = site.apply(model, part, refit)
        if result is not None:
            notes["compensation"] = str(result["note"])
            if "folds" in result:
                cross_fit.update(module=site.modules[-1], full=get_module(model, site.modules[-1]),
                                 folds=result["folds"], batches=result["calibration_batches"])

    def trial(eps: float) -> tuple[bool, FiberPartition, float]:
        part = dendro.cut(eps)
        if part.is_trivial:
            return True, part, current
        if part.num_fibers not in tried:
            apply(part)
            tried[part.num_fibers] = (part, *loss(bound))
        part, value, ok = tried[part.num_fibers]
        return ok, part, value

    if fixed is not None:  # a user-fixed ε is applied as given; the loss is reported, not bounded
        best_part = dendro.cut(fixed)
        if not best_part.is_trivial:
            apply(best_part)
        best_eps, best_loss = fixed, loss(None)[0]
    else:
        best_eps, best_part, best_loss = None, None, current
        ok, part, value = trial(config.epsilon_max)
        if ok:
            best_eps, best_part, best_loss = config.epsilon_max, part, value
        else:
            lo, hi = config.epsilon_min, config.epsilon_max
            ok, part, value = trial(lo)
            if ok:
                best_eps, best_part, best_loss = lo, part, value
                for _ in range(config.search_steps):
                    mid = (lo + hi) / 2
                    ok, part, value = trial(mid)
                    if ok:
                        lo, best_eps, best_part, best_loss = mid, mid, part, value
                    else:
                        hi = mid
    if best_eps is None or best_part is None or best_part.is_trivial:
        site.restore(model)
        site.commit()
        return None, current
    apply(best_part)
    cross_fit.clear()
    if trail is not None:
        trail.append(SiteSwap.of(site, model))
    site.commit()
    layer = LayerReport(site.name, units, best_part.num_fibers, float(best_eps), params_before,
                        site_parameters(model, site), loss=best_loss, compensation=notes["compensation"])
    return layer, best_loss


def naive_search(model: nn.Module, config: FibrationConfig, evalset: EvalSet) -> tuple[nn.Module, list[float]]:
    """The reference the fast search is measured against (the paper code's shape): copy the model and rebuild
    the dendrogram at every bisection step, evaluate the full model on the full eval set. Same decisions.

    Returns the compressed copy and the ε chosen per site (None where the site stayed uncompressed)."""
    base = evaluate_loss(model, evalset)
    bound = base * (1 + config.tolerance) if evalset.task != "fidelity" else config.tolerance
    chosen_eps: list[float | None] = []
    current = model
    names = [s.name for s in build_sites(model, config)]
    total_bound = bound
    for i, name in enumerate(names):
        if config.budget == "uniform":
            bound = base + (total_bound - base) * (i + 1) / len(names)
        def attempt(eps: float, start: nn.Module = current, name: str = name) -> tuple[nn.Module, float, bool]:
            candidate = copy.deepcopy(start)
            site = next(s for s in build_sites(candidate, config) if s.name == name)
            part = site.dendrogram(candidate, config).cut(eps)
            if not part.is_trivial:
                site.apply(candidate, part)
                site.commit()
            return candidate, evaluate_loss(candidate, evalset), part.is_trivial

        chosen = None
        cand, value, trivial = attempt(config.epsilon_max)
        if value <= bound:
            chosen = (config.epsilon_max, cand, trivial)
        else:
            lo, hi = config.epsilon_min, config.epsilon_max
            cand, value, trivial = attempt(lo)
            if value <= bound:
                chosen = (lo, cand, trivial)
                for _ in range(config.search_steps):
                    mid = (lo + hi) / 2
                    cand, value, trivial = attempt(mid)
                    if value <= bound:
                        lo, chosen = mid, (mid, cand, trivial)
                    else:
                        hi = mid
        if chosen is None or chosen[2]:
            chosen_eps.append(None)
        else:
            chosen_eps.append(chosen[0])
            current = chosen[1]
    return current, chosen_eps
