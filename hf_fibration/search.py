"""Greedy per-layer ε search (seed Alg. 3): site by site, the largest ε whose loss stays ≤ base·(1+τ).

What makes it fast, without changing a single decision:
- one dendrogram per site, cut at every candidate ε (O(n) per cut), and one evaluation per distinct cut;
- the candidate module is swapped in place (no model copies);
- blocks before the one being searched are final, so their outputs are recorded once and replayed;
- an evaluation stops as soon as its running loss sum proves the mean will exceed the bound.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import architecture_for
from .calibration import capture_inputs, compensate_mlp, original_hidden
from .config import FibrationConfig
from .core.compensate import activation_rows
from .core.fibers import FiberDendrogram, FiberPartition
from .core.modules import count_parameters
from .core.report import CompressionReport, LayerReport
from .data import EvalSet, batch_loss_sum, evaluate_loss
from .patch import Site, build_sites, model_type_of, non_embedding_parameters


@dataclass
class BlockReplay:
    """Replays the recorded outputs of the final blocks of each stack (encoder, decoder, ...)."""

    stacks: list[list[nn.Module]]
    batch: int = 0
    frozen: dict[int, int] = field(default_factory=dict)  # stack → number of leading blocks replayed
    outputs: dict[tuple[int, int], object] = field(default_factory=dict)  # (stack, batch) → last frozen output
    recording: tuple[int, int] | None = None  # (stack, block) whose outputs the next pass records
    _wrapped: list[nn.Module] = field(default_factory=list)

    def install(self) -> None:
        for s, blocks in enumerate(self.stacks):
            for b, block in enumerate(blocks):
                self._wrapped.append(block)
                block.forward = self._wrap(s, b, block.forward)

    def remove(self) -> None:
        for block in self._wrapped:
            block.__dict__.pop("forward", None)
        self._wrapped = []
        self.outputs.clear()

    def _wrap(self, s: int, b: int, forward: Callable) -> Callable:
        def replay_or_run(*args, **kwargs):
            if b < self.frozen.get(s, 0):
                return self.outputs[(s, self.batch)]
            out = forward(*args, **kwargs)
            if self.recording == (s, b):
                self.outputs[(s, self.batch)] = out
            return out

        return replay_or_run

    def freeze_through(self, s: int, b: int, record_pass: Callable[[], None]) -> None:
        """Make blocks 0..b of stack s replayed: one pass records block b's outputs."""
        if self.frozen.get(s, 0) > b:
            return
        self.recording = (s, b)
        record_pass()
        self.recording = None
        self.frozen[s] = b + 1


def _stacks(model: nn.Module) -> tuple[list[list[nn.Module]], dict[str, tuple[int, int]]]:
    """Blocks grouped by their parent list, and each block name's (stack, index)."""
    arch = architecture_for(model_type_of(model))
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block in arch.blocks(model):
        stacks.setdefault(name.rpartition(".")[0], []).append((name, block))
    position = {name: (s, b) for s, blocks in enumerate(stacks.values()) for b, (name, _) in enumerate(blocks)}
    return [[m for _, m in blocks] for blocks in stacks.values()], position


def _block_of(site: Site, position: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    for name, pos in position.items():
        if site.name.startswith(name + "."):
            return pos
    return None


def greedy_search(
    model: nn.Module,
    config: FibrationConfig,
    evalset: EvalSet,
    progress: bool = True,
) -> CompressionReport:
    """Compress ``model`` in place, site by site, at the largest ε that keeps the eval loss within τ."""
    report = CompressionReport(params_before=count_parameters(model),
                               non_embedding_params_before=non_embedding_parameters(model))
    stacks, position = _stacks(model)
    replay = BlockReplay(stacks)
    replay.install()

    def loss(bound: float | None = None) -> float:
        return evaluate_loss(model, evalset, bound, before_batch=lambda i: setattr(replay, "batch", i))

    try:
        base = loss()
        bound = base * (1 + config.tolerance) if evalset.task != "fidelity" else config.tolerance
        report.base_loss = base
        sites = build_sites(model, config)
        if config.search_order == "backward":
            sites = sites[::-1]
        bar = tqdm(sites, desc="fibration search", disable=not progress, unit="layer")
        current = base
        for i, site in enumerate(bar):
            pos = _block_of(site, position)
            if pos is not None and config.search_order == "forward":
                s, b = pos
                if b > 0:
                    replay.freeze_through(s, b - 1, loss)
            fixed = config.epsilon_for(site.part, site.name)
            site_bound = bound if config.budget == "greedy" else base + (bound - base) * (i + 1) / len(sites)
            calibration = None
            if site.kind == "mlp" and (config.compensate or config.fibers_from == "activations"):
                calibration = _calibrate(model, config, site, evalset, replay)
            layer, current = _search_site(model, config, site, loss, site_bound, current, fixed, calibration)
            if layer is not None:
                report.layers.append(layer)
            bar.set_postfix(loss=f"{current:.4f}", bound=f"{site_bound:.4f}")
        report.final_loss = current
    finally:
        replay.remove()
    report.params_after = count_parameters(model)
    report.non_embedding_params_after = non_embedding_parameters(model)
    return report


def _search_site(
    model: nn.Module,
    config: FibrationConfig,
    site: Site,
    loss: Callable[[float | None], float],
    bound: float,
    current: float,
    fixed: float | None,
    calibration: torch.Tensor | None = None,
) -> tuple[LayerReport | None, float]:
    units, params_before = site.units(model), _site_params(model, site)
    if calibration is not None and config.fibers_from == "activations":
        site._dendrogram = FiberDendrogram(activation_rows(original_hidden(site, model, calibration)),
                                           config.linkage, False, config.exact_rtol)
    dendro = site.dendrogram(model, config)
    tried: dict[int, tuple[FiberPartition, float]] = {}

    def apply(part: FiberPartition) -> None:
        site.apply(model, part)
        if calibration is not None and config.compensate:
            compensate_mlp(site, model, calibration, config.ridge)

    def trial(eps: float) -> tuple[bool, FiberPartition, float]:
        part = dendro.cut(eps)
        if part.is_trivial:
            return True, part, current
        if part.num_fibers not in tried:
            apply(part)
            tried[part.num_fibers] = (part, loss(bound))
        part, value = tried[part.num_fibers]
        return value <= bound, part, value

    if fixed is not None:  # a user-fixed ε is applied as given; the loss is reported, not bounded
        best_part = dendro.cut(fixed)
        if not best_part.is_trivial:
            apply(best_part)
        best_eps, best_loss = fixed, loss(None)
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
    site.commit()
    layer = LayerReport(site.name, units, best_part.num_fibers, float(best_eps), params_before,
                        _site_params(model, site), loss=best_loss)
    return layer, best_loss


def _calibrate(model: nn.Module, config: FibrationConfig, site: Site, evalset: EvalSet, replay: BlockReplay
               ) -> torch.Tensor:
    """Activations entering the MLP site, from the first eval batches (the search's own data)."""

    def run(i: int) -> None:
        replay.batch = i
        batch_loss_sum(model, evalset, i)

    return capture_inputs(model, site, run, len(evalset.batches), config.calibration_tokens)


def _site_params(model: nn.Module, site: Site) -> int:
    if site.kind == "embedding":
        return model.get_input_embeddings().weight.numel()
    return site.params(model)


def naive_search(model: nn.Module, config: FibrationConfig, evalset: EvalSet) -> tuple[nn.Module, list[float]]:
    """The reference the fast search is measured against (the paper code's shape): copy the model and rebuild
    the dendrogram at every bisection step, evaluate the full model on the full eval set. Same decisions.

    Returns the compressed copy and the ε chosen per site (None where the site stayed uncompressed)."""
    import copy

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
