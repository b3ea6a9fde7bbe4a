"""Walk a transformers model with the architecture table and swap modules for fibration-compressed ones.

A *site* is one place that collapses at one ε: an attention projection or a residual writer (rows merged, the
outputs repeated back to full width), an MLP's intermediate units (fc1/gate+up rows averaged, fc2/down columns
summed), or the input embedding's hidden dims (a tied head sums its input over the same fibers). Sites are
applied in order; each builds its dendrogram once, from the model as it stands when it is reached.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

from hf_fibration.config import FIBER_SOURCES, Dendrogram, FibrationConfig
from hf_fibration.core.collapse import collapse_weight, mean_rows
from hf_fibration.core.embedding import FiberEmbedding, FiberInputLinear
from hf_fibration.core.fibers import FiberDendrogram, FiberPartition, colored_in_weights
from hf_fibration.core.modules import FiberLinear, count_parameters
from hf_fibration.core.report import LayerReport
from hf_fibration.models.architectures import Architecture, architecture_for
from hf_fibration.models.surgery import get_module, linear_weight, model_type_of, set_module

if TYPE_CHECKING:
    from hf_fibration.repair.calibration import Calibration

HOMOGENEOUS_ACTIVATIONS = ("relu", "leaky_relu")


@dataclass
class Site:
    """One collapsible place: its modules, the units it clusters, and how to swap in a partition."""

    name: str
    part: str
    kind: str  # "rows" (repeat outputs), "mlp" (inner units) or "embedding"
    modules: tuple[str, ...]
    scale_aware: bool = False
    _originals: dict[str, nn.Module] = field(default_factory=dict, repr=False)
    _dendrogram: Dendrogram | None = field(default=None, repr=False)
    _applied: FiberPartition | None = field(default=None, repr=False)

    def units(self, model: nn.Module) -> int:
        if self.kind == "embedding":
            return model.get_input_embeddings().weight.shape[1]
        return linear_weight(get_module(model, self.modules[0]))[0].shape[0]

    def params(self, model: nn.Module) -> int:
        return sum(count_parameters(get_module(model, m)) for m in self.modules)

    def originals(self, model: nn.Module) -> dict[str, nn.Module]:
        """The site's uncompressed modules: those an ``apply`` swapped out, else the model's own."""
        return self._originals or {m: get_module(model, m) for m in self.modules}

    def dendrogram(self, model: nn.Module, config: FibrationConfig, calibration: Calibration | None = None
                   ) -> Dendrogram:
        """The site's fibers, built once: an MLP's from ``config.fibers_from`` (``config.FIBER_SOURCES``, given the
        calibration activations entering it when there are any), every other site's from its weight rows."""
        if self._dendrogram is None:
            if self.kind == "mlp":
                self._dendrogram = FIBER_SOURCES[config.fibers_from].build(self, model, config, calibration)
            else:
                self._dendrogram = FiberDendrogram(self.rows(model), config.linkage, self.scale_aware,
                                                   config.exact_rtol)
        return self._dendrogram

    def rows(self, model: nn.Module) -> torch.Tensor:
        """The units' colored in-weights (an MLP's input projections side by side; an embedding's columns)."""
        if self.kind == "embedding":
            return model.get_input_embeddings().weight.detach().to(torch.float64).T
        return torch.cat([colored_in_weights(*linear_weight(get_module(model, m))) for m in self.modules_in()], 1)

    def modules_in(self) -> tuple[str, ...]:
        return self.modules[:-1] if self.kind == "mlp" else self.modules

    def apply(self, model: nn.Module, partition: FiberPartition,
              refit: Callable[[Site, nn.Module], dict[str, object]] | None = None) -> dict[str, object] | None:
        """Swap in the collapsed modules (remembering the originals so ``restore`` can undo it); then ``refit``
        (e.g. ``calibration.refitter``) compensates them, and what it decided is returned."""
        if not self._originals:
            self._originals = {m: get_module(model, m) for m in self.modules}
        else:
            self.restore(model)
        self._applied = partition
        if self.kind == "rows":
            self._apply_rows(model, partition)
        elif self.kind == "mlp":
            self._apply_mlp(model, partition)
        else:
            self._apply_embedding(model, partition)
        return None if refit is None else refit(self, model)

    def restore(self, model: nn.Module) -> None:
        self.put(model, self._originals)
        self._applied = None

    def kept_units(self) -> torch.Tensor | None:
        """The original units whose input rows the last ``apply`` kept unchanged, in their new order (an MLP cut by
        a fold partition keeps its representatives' rows), else None."""
        part = self._applied
        if self.kind != "mlp" or part is None or part.fold is None:
            return None
        reps = (part.labels >= 0).nonzero().flatten()
        kept = torch.empty_like(reps)
        kept[part.labels[reps]] = reps
        return kept

    def swapped(self, model: nn.Module) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
        """The modules the last ``apply`` swapped out and those now in their place: ``put`` either to undo or redo
        this site after it is committed (the modules are never changed in place)."""
        before = dict(self._originals)
        if self.kind != "embedding":
            return before, {name: get_module(model, name) for name in before}
        now = {"input": model.get_input_embeddings(), "output": model.get_output_embeddings()}
        return before, {key: now[key] for key in before}

    def put(self, model: nn.Module, modules: dict[str, nn.Module]) -> None:
        if self.kind != "embedding":
            for name, module in modules.items():
                set_module(model, name, module)
        elif modules:
            model.set_input_embeddings(modules["input"])
            if "output" in modules:
                model.set_output_embeddings(modules["output"])

    def commit(self) -> None:
        """Forget the originals (and the dendrogram): the applied partition stays."""
        self._originals = {}
        self._dendrogram = None
        self._applied = None

    def _apply_rows(self, model: nn.Module, partition: FiberPartition) -> None:
        (name,) = self.modules
        original = self._originals[name]
        weight, bias = linear_weight(original)
        w, b = collapse_weight(weight, bias, partition)
        # a layer compressed before keeps its slots: slot → old row → new fiber
        previous = getattr(original, "fiber_index", None)
        index = partition.labels.clone() if previous is None else partition.labels.to(previous.device)[previous]
        set_module(model, name, FiberLinear.from_weights(w, b, index))

    def _apply_mlp(self, model: nn.Module, partition: FiberPartition) -> None:
        for name in self.modules_in():
            original = self._originals[name]
            w, b = collapse_weight(*linear_weight(original), partition)
            set_module(model, name, FiberLinear.from_weights(w, b, getattr(original, "fiber_index", None)))
        out = self._originals[self.modules[-1]]
        w, b = collapse_weight(*linear_weight(out), None, partition)
        if partition.fold is not None:  # units folded into representatives by a coefficient each
            weight = linear_weight(out)[0].to(torch.float64)
            w = torch.sparse.mm(partition.fold.to(weight), weight.T).T.to(w)
        set_module(model, self.modules[-1], FiberLinear.from_weights(w, b, getattr(out, "fiber_index", None)))

    def _apply_embedding(self, model: nn.Module, partition: FiberPartition) -> None:
        emb = model.get_input_embeddings()
        head = model.get_output_embeddings()
        self._originals = {"input": emb}
        tied = head is not None and head.weight is emb.weight
        if tied:
            self._originals["output"] = head
        table = mean_rows(emb.weight.detach().T, partition).T.contiguous()
        new = FiberEmbedding(emb.num_embeddings, partition.num_fibers, emb.embedding_dim, emb.padding_idx,
                             float(getattr(emb, "embed_scale", 1.0)), emb.weight.device, emb.weight.dtype)
        with torch.no_grad():
            new.weight.copy_(table)
            new.fiber_index.copy_(partition.labels)
        model.set_input_embeddings(new)
        if tied:
            new_head = FiberInputLinear(emb.embedding_dim, head.out_features, partition.num_fibers,
                                        head.bias is not None, head.weight.device, head.weight.dtype)
            new_head.weight = new.weight
            with torch.no_grad():
                new_head.fiber_index.copy_(partition.labels)
                if head.bias is not None:
                    new_head.bias.copy_(head.bias)
            model.set_output_embeddings(new_head)


def build_sites(model: nn.Module, config: FibrationConfig) -> list[Site]:
    """Every site of ``model`` that ``config.parts`` selects, in forward order."""
    arch = architecture_for(model_type_of(model))
    activation = str(getattr(model.config, "activation_function", getattr(model.config, "hidden_act", "")))
    if config.scale_aware and activation not in HOMOGENEOUS_ACTIVATIONS:
        raise ValueError(f"scale_aware is exact only for ReLU-family MLPs; this model uses {activation!r}. "
                         "Set scale_aware=False.")
    sites: list[Site] = []
    if "embeddings" in config.parts and _embedding_supported(model):
        sites.append(Site("embeddings", "embeddings", "embedding", ()))
    for block_name, block in arch.blocks(model):
        sites += _block_sites(arch, block_name, block, config)
    return sites


def _embedding_supported(model: nn.Module) -> bool:
    emb = model.get_input_embeddings()
    return isinstance(emb, nn.Embedding) and not isinstance(emb, FiberEmbedding)


def _block_sites(arch: Architecture, block_name: str, block: nn.Module, config: FibrationConfig) -> list[Site]:
    present = {name for name, _ in block.named_modules()}
    full = lambda n: f"{block_name}.{n}"  # noqa: E731
    sites = []
    if "attention" in config.parts:
        for attn in arch.attentions:
            for proj in (*attn.projections, attn.out):
                if proj in present:
                    sites.append(Site(full(proj), "attention", "rows", (full(proj),)))
    if "mlp" in config.parts and all(m in present for m in (*arch.mlp.inputs, arch.mlp.out)):
        modules = tuple(full(m) for m in (*arch.mlp.inputs, arch.mlp.out))
        sites.append(Site(full(arch.mlp.inputs[-1]), "mlp", "mlp", modules, scale_aware=config.scale_aware))
        sites.append(Site(full(arch.mlp.out), "mlp", "rows", (full(arch.mlp.out),)))
    return sites


def site_parameters(model: nn.Module, site: Site) -> int:
    """The parameters a site's collapse changes: its modules', or the embedding table's."""
    if site.kind == "embedding":
        return model.get_input_embeddings().weight.numel()
    return site.params(model)


def layer_report(model: nn.Module, site: Site, partition: FiberPartition, epsilon: float, before: int,
                 params_before: int) -> LayerReport:
    return LayerReport(site.name, before, partition.num_fibers, float(epsilon), params_before, site.params(model))


@dataclass
class SiteSwap:
    """One committed site: the modules its collapse swapped out (``before``) and in (``after``). Undoing a list of
    them in reverse order gives back the model they started from (the modules are never changed in place), so a
    search need not keep a copy of the whole model to restore it."""

    site: Site
    before: dict[str, nn.Module]
    after: dict[str, nn.Module]

    @classmethod
    def of(cls, site: Site, model: nn.Module) -> SiteSwap:
        return cls(site, *site.swapped(model))

    def undo(self, model: nn.Module) -> None:
        self.site.put(model, self.before)

    def redo(self, model: nn.Module) -> None:
        self.site.put(model, self.after)


def undo_all(model: nn.Module, trail: list[SiteSwap]) -> None:
    """Undo every swap of ``trail`` (latest first) and forget them."""
    for swap in reversed(trail):
        swap.undo(model)
    trail.clear()
