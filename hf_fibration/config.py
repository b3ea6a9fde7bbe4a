"""FibrationConfig: every knob of a compression run, validated on construction and stored in config.json."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hf_fibration.core.fibers import EPSILON_MAX, LINKAGES, FiberPartition

PARTS = ("attention", "mlp", "embeddings")
SEARCH_ORDERS = ("forward", "backward")
SEARCHES = ("greedy", "block")
SENSITIVITIES = ("block", "loss")
BLOCK_ERRORS = ("relative", "fisher")
CUT_PRICINGS = ("forward", "local")
BUDGETS = ("uniform", "greedy")


class Dendrogram(Protocol):
    """What a fiber source builds for a site: its fibers at any threshold ε or unit count, nested."""

    def cut(self, epsilon: float) -> FiberPartition: ...

    def cut_to_count(self, num_fibers: int) -> FiberPartition: ...

    def epsilon_for_count(self, num_fibers: int) -> float: ...


@dataclass(frozen=True)
class FiberSource:
    """A way to form an MLP site's fibers, chosen by ``FibrationConfig.fibers_from``.

    ``build(site, model, config, calibration)`` returns the site's ``Dendrogram``; ``calibration`` (a
    ``calibration.Calibration`` of the tokens entering the site) is None when the run has no data or nothing asked
    for it. ``calibrated``: the source reads those activations, so every policy captures them even when nothing is
    refit."""

    name: str
    help: str
    build: Callable[[Any, Any, FibrationConfig, Any], Dendrogram]
    calibrated: bool = False


FIBER_SOURCES: dict[str, FiberSource] = {}  # name → source; methods/fiber_sources.py registers the built-ins

# The best fiber source measured for each kind of model (README "Fiber sources"): on a pretrained checkpoint
# (all-MiniLM-L6-v2, target size 0.5, results/fiber_sources) span; on models trained from scratch the paper's
# weight fibers, with which the tool's target allocation is best in every column of results/baselines/*-size.
DEFAULT_FIBERS_FROM = {"pretrained": "span", "from_scratch": "weights"}
# What `hf-fibration compress` does by default where it differs from FibrationConfig(): the command compresses
# checkpoints (hub ids, local paths) and always has eval data, so it takes the best measured on them — the main job
# (all-MiniLM-L6-v2, τ 0.01, results/cli_minilm): block search + span 1.058× at held-out 1 − cos 0.0051 in 127 CPU s,
# the greedy search of weight fibers 1.015× at 0.0092 in 1191 s. FibrationConfig() keeps the paper's data-free
# method (weight fibers, the greedy search of Alg. 3). A target size is priced by block errors: span at 0.5 on
# MiniLM, 0.8563 cosine on unseen text in 52.2 CPU s against the loss pricing's 0.8598 in 1352 (results/fiber_sources).
COMMAND_DEFAULTS = {"fibers_from": DEFAULT_FIBERS_FROM["pretrained"], "search": "block", "sensitivity": "block"}


def register_fiber_source(name: str, help: str, build: Callable[[Any, Any, FibrationConfig, Any], Dendrogram],
                          *, calibrated: bool = False) -> FiberSource:
    """Make ``fibers_from=name`` available to every policy (fixed ε, the τ search, the target size, Alg. 2)."""
    if name in FIBER_SOURCES:
        raise ValueError(f"A fiber source named {name!r} is already registered.")
    FIBER_SOURCES[name] = source = FiberSource(name, help, build, calibrated)
    return source


@dataclass
class FibrationConfig:
    """How to find fibers and how far to collapse them. Fields carry their help text in ``metadata``."""

    tolerance: float = field(
        default=0.01,
        metadata={"help": "τ: the search keeps the eval loss ≤ base_loss·(1+τ)."},
    )
    epsilon: float | None = field(
        default=None,
        metadata={"help": "A fixed ε ∈ [0, 2) for every compressed module; None runs the per-layer ε search."},
    )
    epsilons: dict[str, float] = field(
        default_factory=dict,
        metadata={"help": "Per-module ε by part ('attention', 'mlp', 'embeddings') or module name; beats epsilon."},
    )
    target_params: float | None = field(
        default=None,
        metadata={"help": "Keep this fraction of the non-embedding parameters (e.g. 0.5 for 2×), allocated across "
                          "layers by measured loss per parameter; replaces the τ search."},
    )
    sensitivity: str = field(
        default="loss",
        metadata={"help": "How the target size prices each site's cuts: 'block' (the block-output error of 16 cuts "
                          "per site on carried block inputs, one pass linear in depth) or 'loss' (the eval loss "
                          "with the site collapsed at 6 cuts: sites × full evaluations)."},
    )
    block_error: str = field(
        default="relative",
        metadata={"help": "How the block search and the target size's 'block' sensitivity price a cut's block-output "
                          "error δ: 'relative' (‖δ‖² / ‖Y‖²) or 'fisher' (½ Σ F·δ², F the sampled Fisher of the loss "
                          "with respect to the block's output, from one backward pass: the loss increase to second "
                          "order, comparable across blocks)."},
    )
    cut_pricing: str = field(
        default="local",
        metadata={"help": "How the block search and the target size's 'block' sensitivity measure each cut's block "
                          "error: 'local' (the error of the site's own output on cached inputs, scaled to the "
                          "block's error by one block run per site; the same answers as 'forward' on every model "
                          "measured, in 51–90% of its time) or 'forward' (the block run again with every cut)."},
    )
    epsilon_min: float = field(default=0.0, metadata={"help": "Lower bound of the ε binary search."})
    epsilon_max: float = field(default=1.0, metadata={"help": "Upper bound of the ε binary search (< 2)."})
    search_steps: int = field(default=8, metadata={"help": "Bisection steps per layer in the ε search."})
    budget: str = field(
        default="uniform",
        metadata={"help": "How the loss headroom τ is shared: 'greedy' (paper: each layer may use all that is "
                          "left) or 'uniform' (after the i-th of N layers the loss may have used i/N of it)."},
    )
    search: str = field(
        default="greedy",
        metadata={"help": "How the τ search decides: 'greedy' (the seed's Alg. 3: site by site, bisection on the full "
                          "loss; cost grows with sites × depth) or 'block' (block-output errors of 8 cuts per site on "
                          "carried block inputs, one allocation bisected on the full loss; linear in depth, faster, "
                          "less compression on small trained models: results/bench_block_search)."},
    )
    search_order: str = field(
        default="forward", metadata={"help": "Order in which layers are searched: 'forward' or 'backward'."}
    )
    linkage: str = field(
        default="complete", metadata={"help": "Agglomerative linkage: 'complete' (paper), 'average' or 'single'."}
    )
    exact_rtol: float = field(
        default=1e-6, metadata={"help": "Relative tolerance under which rows count as equal at ε = 0."}
    )
    scale_aware: bool = field(
        default=False,
        metadata={"help": "Merge rows that are positive multiples (exact only for ReLU/LeakyReLU activations)."},
    )
    compensate: bool = field(
        default=True,
        metadata={"help": "Compensated collapse: refit each collapsed MLP's fc2/down in closed form (ridge least "
                          "squares) on calibration activations. Used whenever data is given (the ε search)."},
    )
    fibers_from: str = field(
        default=DEFAULT_FIBERS_FROM["from_scratch"],
        metadata={"help": "How MLP units are grouped into fibers: one of FIBER_SOURCES ('weights', the paper's "
                          "colored in-weights, exact at ε = 0, the default and the best measured on models trained "
                          "from scratch; 'activations'; 'inout'; 'afde'; 'span', the best measured on pretrained "
                          "checkpoints, needs data: DEFAULT_FIBERS_FROM); each source's help is "
                          "FIBER_SOURCES[name].help."},
    )
    calibration_tokens: int = field(default=8192, metadata={"help": "Tokens of calibration activations per MLP."})
    ridge: float | None = field(
        default=None,
        metadata={"help": "Ridge strength of the refit, relative to the Gram; None picks it on held-out "
                          "calibration sequences."},
    )
    min_tokens_per_unit: float = field(
        default=4.0,
        metadata={"help": "A site is refit only with at least this many fitting calibration tokens per kept unit "
                          "(fewer would let the refit memorize them)."},
    )
    holdout_fraction: float = field(
        default=0.5,
        metadata={"help": "Fraction of the eval examples kept out of the search and calibration to confirm the "
                          "bound on (0 turns the confirmation off)."},
    )
    holdout_z: float = field(
        default=1.0,
        metadata={"help": "The held-out check passes when the loss increase plus this many standard errors (over "
                          "held-out examples) stays within τ: small held-out sets must show a clear margin."},
    )
    holdout_retries: int = field(
        default=3,
        metadata={"help": "Searches again with a tighter internal bound (the last without compensation) while the "
                          "held-out loss breaks τ; after that the search stops with an error."},
    )
    parts: tuple[str, ...] = field(
        default=PARTS, metadata={"help": "What to compress: any of 'attention', 'mlp', 'embeddings'."}
    )
    max_eval_samples: int = field(default=256, metadata={"help": "Eval examples used by the ε search."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of search evaluations."})
    max_length: int = field(default=128, metadata={"help": "Truncation length of eval examples, in tokens."})
    seed: int = field(default=0, metadata={"help": "Seed for sampling the eval split and for baselines."})
    lossless: bool = field(
        default=False,
        metadata={"help": "Lossless mode: remove only the MLP units whose removal is exact for the activation (zero "
                          "in/out weights, equal rows; negated rows for odd, scaled rows for ReLU-family ones; "
                          "rows equal up to exact_rtol) instead of the ε search."},
    )

    def __post_init__(self) -> None:
        self.parts = tuple(self.parts)
        self.epsilons = dict(self.epsilons)
        _check(math.isfinite(self.tolerance) and self.tolerance >= 0,
               f"tolerance must be a finite number ≥ 0, got {self.tolerance}.")
        if self.epsilon is not None:
            _check_epsilon("epsilon", self.epsilon)
        for name, eps in self.epsilons.items():
            _check_epsilon(f"epsilons[{name!r}]", eps)
        _check_epsilon("epsilon_min", self.epsilon_min)
        _check_epsilon("epsilon_max", self.epsilon_max)
        _check(self.epsilon_min <= self.epsilon_max,
               f"epsilon_min ({self.epsilon_min}) must not exceed epsilon_max ({self.epsilon_max}).")
        _check(self.target_params is None or 0 < self.target_params <= 1,
               f"target_params must lie in (0, 1] (the fraction of non-embedding parameters kept), got "
               f"{self.target_params}.")
        _check(self.search_steps >= 1, f"search_steps must be ≥ 1, got {self.search_steps}.")
        _check(self.fibers_from in FIBER_SOURCES,
               f"Unknown fibers_from {self.fibers_from!r}; choose one of {', '.join(FIBER_SOURCES)}.")
        _check(self.calibration_tokens >= 1, f"calibration_tokens must be ≥ 1, got {self.calibration_tokens}.")
        _check(self.ridge is None or self.ridge >= 0, f"ridge must be ≥ 0 or None, got {self.ridge}.")
        _check(self.min_tokens_per_unit >= 0, f"min_tokens_per_unit must be ≥ 0, got {self.min_tokens_per_unit}.")
        _check(0 <= self.holdout_fraction < 1, f"holdout_fraction must lie in [0, 1), got {self.holdout_fraction}.")
        _check(self.holdout_z >= 0, f"holdout_z must be ≥ 0, got {self.holdout_z}.")
        _check(self.holdout_retries >= 0, f"holdout_retries must be ≥ 0, got {self.holdout_retries}.")
        _check(self.budget in BUDGETS, f"Unknown budget {self.budget!r}; choose one of {', '.join(BUDGETS)}.")
        _check(self.block_error in BLOCK_ERRORS,
               f"Unknown block_error {self.block_error!r}; choose one of {', '.join(BLOCK_ERRORS)}.")
        _check(self.cut_pricing in CUT_PRICINGS,
               f"Unknown cut_pricing {self.cut_pricing!r}; choose one of {', '.join(CUT_PRICINGS)}.")
        _check(self.sensitivity in SENSITIVITIES,
               f"Unknown sensitivity {self.sensitivity!r}; choose one of {', '.join(SENSITIVITIES)}.")
        _check(self.search in SEARCHES, f"Unknown search {self.search!r}; choose one of {', '.join(SEARCHES)}.")
        _check(self.search_order in SEARCH_ORDERS,
               f"Unknown search_order {self.search_order!r}; choose one of {', '.join(SEARCH_ORDERS)}.")
        _check(self.linkage in LINKAGES, f"Unknown linkage {self.linkage!r}; choose one of {', '.join(LINKAGES)}.")
        _check(0 <= self.exact_rtol < 1, f"exact_rtol must lie in [0, 1), got {self.exact_rtol}.")
        unknown = [p for p in self.parts if p not in PARTS]
        _check(not unknown and self.parts, f"Unknown parts {unknown or '()'}; choose from {', '.join(PARTS)}.")
        _check(self.max_eval_samples >= 1, f"max_eval_samples must be ≥ 1, got {self.max_eval_samples}.")
        _check(self.eval_batch_size >= 1, f"eval_batch_size must be ≥ 1, got {self.eval_batch_size}.")
        _check(self.max_length >= 2, f"max_length must be ≥ 2, got {self.max_length}.")

    @property
    def is_fixed(self) -> bool:
        """Whether every part compressed has a fixed ε: nothing to search, no τ to promise."""
        return self.epsilon is not None or all(p in self.epsilons for p in self.parts)

    @property
    def calibrates_mlps(self) -> bool:
        """Whether MLP sites need the calibration activations entering them: to refit, or to form the fibers."""
        return self.compensate or FIBER_SOURCES[self.fibers_from].calibrated

    def epsilon_for(self, part: str, module_name: str) -> float | None:
        """The fixed ε of a module: its name, then its part, then the global ε (None: to be searched)."""
        if module_name in self.epsilons:
            return self.epsilons[module_name]
        return self.epsilons.get(part, self.epsilon)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["parts"] = list(self.parts)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FibrationConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"Unknown FibrationConfig fields {unknown}; valid fields are {sorted(names)}.")
        return cls(**data)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)


def _check_epsilon(name: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and 0.0 <= value < EPSILON_MAX,
           f"{name} must lie in [0, 2) (cosine distance threshold), got {value}.")


def loss_bound(base: float, tolerance: float, task: str) -> float:
    """The loss a τ search may reach: base·(1+τ), or τ itself for the fidelity loss (1 − cos, whose base is 0)."""
    return base * (1 + tolerance) if task != "fidelity" else tolerance
