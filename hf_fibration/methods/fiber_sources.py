"""The built-in fiber sources (``FibrationConfig.fibers_from``), each one registration in ``config.FIBER_SOURCES``.

A source turns an MLP site (and, when the run has data, the calibration activations entering it) into a
``Dendrogram``: its fibers at any ε or unit count. Every policy reads fibers only through ``Site.dendrogram``, so a
registered source works in the fixed-ε path, the τ search, the target size and Alg. 2 alike. Attention, residual
writers and embeddings always cluster their weight rows.
"""

from __future__ import annotations

from torch import nn

from hf_fibration.config import FibrationConfig, register_fiber_source
from hf_fibration.core.afde import AFDEDendrogram
from hf_fibration.core.compensate import SpanDendrogram, activation_rows
from hf_fibration.core.fibers import FiberDendrogram
from hf_fibration.core.merging import inout_rows
from hf_fibration.methods.afde_glue import afde_dendrogram
from hf_fibration.models.sites import Site
from hf_fibration.models.surgery import get_module, linear_weight
from hf_fibration.repair.calibration import Calibration, original_hidden, original_sums


def weights_dendrogram(site: Site, model: nn.Module, config: FibrationConfig,
                       calibration: Calibration | None = None) -> FiberDendrogram:
    return FiberDendrogram(site.rows(model), config.linkage, site.scale_aware, config.exact_rtol)


def inout_dendrogram(site: Site, model: nn.Module, config: FibrationConfig,
                     calibration: Calibration | None = None) -> FiberDendrogram:
    rows = inout_rows(site.rows(model), linear_weight(get_module(model, site.modules[-1]))[0])
    return FiberDendrogram(rows, config.linkage, site.scale_aware, config.exact_rtol)


def activations_dendrogram(site: Site, model: nn.Module, config: FibrationConfig,
                           calibration: Calibration | None = None) -> FiberDendrogram:
    if calibration is None:  # a run without data: the weight fibers
        return weights_dendrogram(site, model, config)
    rows = activation_rows(original_hidden(site, model, calibration.inputs))
    return FiberDendrogram(rows, config.linkage, False, config.exact_rtol)


def afde_blocks(site: Site, model: nn.Module, config: FibrationConfig,
                calibration: Calibration | None = None) -> AFDEDendrogram:
    return afde_dendrogram(site, model, None if calibration is None else calibration.inputs, config.exact_rtol)


def span_dendrogram(site: Site, model: nn.Module, config: FibrationConfig,
                    calibration: Calibration | None = None) -> SpanDendrogram:
    if calibration is None:
        raise ValueError("fibers_from='span' forms fibers from calibration activations: pass eval data (tokenizer=, "
                         "dataset= or evalset=; --dataset) or choose a data-free source such as 'weights'.")
    down = linear_weight(site.originals(model)[site.modules[-1]])[0].cpu()
    return SpanDendrogram.from_sums(*original_sums(site, model, calibration), down)


register_fiber_source(
    "weights", "Colored in-weights, cosine, agglomerative (the paper); exact at ε = 0; no data.", weights_dendrogram)
register_fiber_source(
    "activations", "Cosine of the units' calibration activations (uncompressed site), agglomerative; without data "
    "the weight fibers.", activations_dendrogram, calibrated=True)
register_fiber_source(
    "inout", "In-weights beside consumer columns (the covers view); no data; not exact at ε = 0; the best "
    "weight-only mode on the trained Llama and Marian models in results/baselines.", inout_dendrogram)
register_fiber_source(
    "afde", "Approximate forward differential equivalence (core/afde.py): blocks whose bound on the consumer's "
    "error, from in-rows, biases and consumer columns, stays ≤ ε × the layer's output scale; uses the calibration "
    "inputs when the run captures them (compensation on).", afde_blocks)
register_fiber_source(
    "span", "Data-aware: keep the units whose centered, output-weighted calibration activations span the others "
    "best (pivoted Cholesky), fold every other unit into its most collinear kept one; ε = relative residual of that "
    "span, in [0, 1]; needs data; best measured on pretrained MiniLM with compensation (results/pretrained, "
    "results/fiber_sources).", span_dendrogram, calibrated=True)
