"""When a searched model keeps the τ promise on the search examples, with the margin a held-out check will need."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from hf_fibration.evaluation.evalset import EvalSet, evaluate_loss, join_examples

Terms = tuple[torch.Tensor, torch.Tensor]  # per example: the sum of its loss terms and their count


def search_and_holdout(evalset: EvalSet, holdout: EvalSet | None, fraction: float, seed: int,
                       holdout_losses: Terms | None = None) -> tuple[EvalSet, EvalSet | None]:
    """(search examples, held-out examples or None): ``holdout`` when given, else a seeded ``fraction`` of
    ``evalset`` (none when 0). ``holdout_losses``, the losses measured on a given holdout, need that holdout."""
    if holdout_losses is not None and holdout is None:
        raise ValueError("holdout_losses are the losses on a given holdout: pass holdout= with them.")
    if holdout is None and fraction > 0:
        return evalset.split(fraction, seed)
    return evalset, holdout


@dataclass(frozen=True)
class HoldoutMargin:
    """What the held-out check will ask of the searched model, known before the search.

    The check passes when the held-out increase plus ``z`` standard errors stays within what τ allows. A search that
    only keeps its own mean within τ lands at the bound, so the check fails about every other time and a second
    search follows. This margin asks the search, candidate by candidate, for its increase on the search examples
    plus z held-out standard errors (projected from the candidate's per-example increases to the held-out count)
    plus z standard errors of the difference between the two samples' means."""

    base_terms: Terms | None  # the uncompressed model's per-example losses on the search examples (None: not yet)
    holdout_examples: int
    holdout_weight: float  # Σ loss terms of the held-out examples
    z: float

    def with_base(self, base_terms: Terms) -> HoldoutMargin:
        """This margin with the search examples' base losses, which the search measures on its first pass."""
        return dataclasses.replace(self, base_terms=base_terms)

    def needed(self, terms: Terms) -> float:
        if self.base_terms is None:
            raise ValueError("HoldoutMargin.needed before the search examples' base losses: call with_base first.")
        diff = terms[0] - self.base_terms[0]
        if len(diff) < 2:
            return math.inf
        spread = float(diff.std())
        holdout_se = spread * self.holdout_examples ** 0.5 / self.holdout_weight
        search_se = spread * len(diff) ** 0.5 / float(self.base_terms[1].sum())
        return self.z * holdout_se + self.z * math.hypot(holdout_se, search_se)


@dataclass(frozen=True)
class SearchBound:
    """A candidate is accepted when its mean loss on the search examples is ≤ ``limit`` and, with ``margin``, its
    increase over ``base`` plus that margin is ≤ ``limit − base``."""

    limit: float
    base: float
    margin: HoldoutMargin | None = None

    def share(self, fraction: float) -> SearchBound:
        """The bound that allows ``fraction`` of this one's increase (the uniform budget's per-site bound)."""
        return dataclasses.replace(self, limit=self.base + (self.limit - self.base) * fraction)

    def check(self, model: nn.Module, evalset: EvalSet,
              before_batch: Callable[[int], None] | None = None) -> tuple[float, bool]:
        """The model's eval loss (early-stopped once it must exceed ``limit``) and whether it is accepted."""
        examples: list[Terms] | None = [] if self.margin is not None else None
        value = evaluate_loss(model, evalset, self.limit, before_batch=before_batch, examples=examples)
        if value > self.limit:
            return value, False
        if self.margin is None:
            return value, True
        return value, value - self.base + self.margin.needed(join_examples(examples)) <= self.limit - self.base
