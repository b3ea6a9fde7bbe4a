"""The one collapse loop every policy runs: per site, calibrate → fibers → the policy's cut → collapse and refit →
``LayerReport``, in order, so each site sees the model as the sites before it left it.

A policy is the ``cut``: given a site and its fibers (``Site.dendrogram``, any registered fiber source), the
partition to collapse to and its ε, or None to leave the site alone. Fixed ε, the target size and one MLP width
are such cuts; the τ searches choose theirs by evaluating (search.py, block_search.py) and report through the same
``start_report`` / ``finish_report``.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn
from tqdm.auto import tqdm

from hf_fibration.config import Dendrogram, FibrationConfig
from hf_fibration.core.fibers import FiberPartition
from hf_fibration.core.modules import count_parameters
from hf_fibration.core.report import CompressionReport, LayerReport
from hf_fibration.evaluation.evalset import EvalSet, batch_loss_sum, evaluate_loss
from hf_fibration.integrations.memory import trim_heap
from hf_fibration.models.sites import Site, build_sites, site_parameters
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.pipeline.blocks import CalibrationPasses
from hf_fibration.repair.calibration import Calibration, capture_calibration, refitter

Cut = Callable[[Site, Dendrogram], "tuple[FiberPartition, float] | None"]


def start_report(model: nn.Module, base_loss: float | None = None) -> CompressionReport:
    return CompressionReport(params_before=count_parameters(model),
                             non_embedding_params_before=non_embedding_parameters(model), base_loss=base_loss)


def finish_report(model: nn.Module, report: CompressionReport, evalset: EvalSet | None = None,
                  holdout: EvalSet | None = None) -> CompressionReport:
    """The report's parameter counts after, and its final losses on the search and held-out examples (when given)."""
    if evalset is not None:
        report.final_loss = evaluate_loss(model, evalset)
    if holdout is not None:
        report.holdout_final_loss = evaluate_loss(model, holdout)
        report.search_examples, report.holdout_examples = evalset.num_examples, holdout.num_examples
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    return report


def calibrates(site: Site, config: FibrationConfig) -> bool:
    """Whether the site takes calibration activations: an MLP, when the config's collapse or fibers read them."""
    return site.kind == "mlp" and config.calibrates_mlps


def calibrate(model: nn.Module, config: FibrationConfig, site: Site, evalset: EvalSet | None,
              run: Callable[[int], object] | None = None) -> Calibration | None:
    """What enters an MLP site that calibrates (``config.calibrates_mlps``), from the first eval batches up to
    ``config.calibration_tokens`` tokens (``run(i)`` runs batch i; default: a plain forward pass); None for other
    sites or without data."""
    if not calibrates(site, config) or evalset is None:
        return None
    run = run or (lambda i: batch_loss_sum(model, evalset, i))
    return capture_calibration(model, site, run, len(evalset.batches), config.calibration_tokens)


def collapse_sites(model: nn.Module, config: FibrationConfig, sites: list[Site], cut: Cut,
                   evalset: EvalSet | None = None, progress: bool = False, desc: str = "collapse"
                   ) -> list[LayerReport]:
    """Collapse each site where ``cut`` says, compensated as the config says when ``evalset`` gives calibration."""
    passes = CalibrationPasses(model, sites, lambda i: batch_loss_sum(model, evalset, i))
    return [layer for site in tqdm(sites, desc=desc, disable=not progress, unit="site")
            for layer in _collapse_site(model, config, site, cut, evalset, passes)]


def _collapse_site(model: nn.Module, config: FibrationConfig, site: Site, cut: Cut, evalset: EvalSet | None,
                   passes: CalibrationPasses) -> list[LayerReport]:
    calibration = None
    if calibrates(site, config) and evalset is not None:
        with passes.capturing(site) as run:
            calibration = calibrate(model, config, site, evalset, run)
    dendrogram = site.dendrogram(model, config, calibration)
    chosen = cut(site, dendrogram)
    if chosen is None or chosen[0].is_trivial:
        site.commit()
        return []
    partition, epsilon = chosen
    units, params_before = site.units(model), site_parameters(model, site)
    result = site.apply(model, partition, refitter(calibration, config))
    layer = LayerReport(site.name, units, partition.num_fibers, float(epsilon), params_before,
                        site_parameters(model, site), compensation=None if result is None else str(result["note"]))
    site.commit()
    del calibration, dendrogram
    trim_heap()  # the site's calibration and sums, freed: the next site starts from the same resident size
    return [layer]


def compress_with_epsilons(model: nn.Module, config: FibrationConfig, evalset: EvalSet | None = None,
                           base_loss: float | None = None) -> CompressionReport:
    """Every site at its fixed ε from the config (None: left as it is). Without data, the plain collapse; with
    ``evalset``, the compensated one and the loss before (``base_loss`` skips it) and after: two evaluations."""
    report = start_report(model)
    if evalset is not None:
        report.base_loss = evaluate_loss(model, evalset) if base_loss is None else base_loss

    def fixed(site: Site, dendrogram: Dendrogram) -> tuple[FiberPartition, float] | None:
        epsilon = config.epsilon_for(site.part, site.name)
        return None if epsilon is None else (dendrogram.cut(epsilon), epsilon)

    sites = [s for s in build_sites(model, config) if config.epsilon_for(s.part, s.name) is not None]
    report.layers = collapse_sites(model, config, sites, fixed, evalset)
    return finish_report(model, report, evalset)
