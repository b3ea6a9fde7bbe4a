"""What a compression did, layer by layer."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .lossless import LosslessLayer, LosslessReport


@dataclass
class LayerReport:
    name: str
    units_before: int
    units_after: int
    epsilon: float
    params_before: int
    params_after: int
    loss: float | None = None
    compensation: str | None = None


@dataclass
class CompressionReport:
    layers: list[LayerReport] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    non_embedding_params_before: int | None = None
    non_embedding_params_after: int | None = None
    base_loss: float | None = None
    final_loss: float | None = None
    holdout_base_loss: float | None = None
    holdout_final_loss: float | None = None
    holdout_se: float | None = None
    search_examples: int | None = None
    holdout_examples: int | None = None
    attempts: list[dict] = field(default_factory=list)
    lossless: LosslessReport | None = None  # lossless mode: units removed per rule and layer, max |Δ output|

    @property
    def ratio(self) -> float:
        return self.params_before / max(self.params_after, 1)

    @property
    def non_embedding_ratio(self) -> float | None:
        if self.non_embedding_params_before is None or self.non_embedding_params_after is None:
            return None
        return self.non_embedding_params_before / max(self.non_embedding_params_after, 1)

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.lossless is not None:
            data["lossless"] = self.lossless.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> CompressionReport:
        data = dict(data)
        data["layers"] = [LayerReport(**layer) for layer in data.get("layers", [])]
        if data.get("lossless") is not None:
            lossless = {k: v for k, v in data["lossless"].items() if k != "removed_total"}
            lossless["layers"] = [LosslessLayer(**layer) for layer in lossless.get("layers", [])]
            data["lossless"] = LosslessReport(**lossless)
        return cls(**data)

    def table(self) -> str:
        header = f"{'layer':<48} {'eps':>7} {'units':>13} {'params':>21} {'loss':>9}"
        lines = [header, "-" * len(header)]
        for r in self.layers:
            units = f"{r.units_before}->{r.units_after}"
            params = f"{r.params_before}->{r.params_after}"
            loss = "" if r.loss is None else f"{r.loss:.4f}"
            lines.append(f"{r.name:<48} {r.epsilon:>7.4f} {units:>13} {params:>21} {loss:>9}")
        lines.append(f"parameters: {self.params_before} -> {self.params_after} ({self.ratio:.2f}x)")
        if self.non_embedding_ratio is not None:
            lines.append(
                f"non-embedding parameters: {self.non_embedding_params_before} -> "
                f"{self.non_embedding_params_after} ({self.non_embedding_ratio:.2f}x)"
            )
        if self.base_loss is not None and self.final_loss is not None:
            where = "" if self.search_examples is None else f" on the {self.search_examples} search examples"
            lines.append(f"loss{where}: {_change(self.base_loss, self.final_loss)}")
        if self.holdout_base_loss is not None and self.holdout_final_loss is not None:
            se = "" if self.holdout_se is None else f" (± {self.holdout_se:.2g} s.e.)"
            lines.append(f"held-out loss on {self.holdout_examples} examples the search never saw: "
                         f"{_change(self.holdout_base_loss, self.holdout_final_loss)}{se}")
        if len(self.attempts) > 1:
            lines.append("searches: " + "; ".join(_attempt(a) for a in self.attempts))
        return "\n".join(lines)

    __str__ = table


def _attempt(a: dict) -> str:
    refit = "" if a["compensate"] else " no refit"
    trimmed = "" if a.get("trimmed_to_sites") is None else f" trimmed to {a['trimmed_to_sites']} sites"
    return f"τ={a['tolerance']:.4g}{refit}{trimmed} → held-out {a['holdout_loss']:.4f}"


def _change(before: float, after: float) -> str:
    change = f" ({100.0 * (after / before - 1.0):+.2f}%)" if before > 1e-6 else ""
    return f"{before:.4f} -> {after:.4f}{change}"
