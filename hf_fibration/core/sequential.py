"""Fibration compression of plain torch models: ``nn.Sequential`` MLPs and CNNs, and an LSTM with its head.

The coloring runs forward (seed Alg.: input units own colors; each weighted layer's fibers come from its
colored in-weights), every hidden layer is collapsed onto its fibers, and the final layer keeps its outputs.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch
from torch import nn

from .collapse import collapse_weight
from .fibers import FiberDendrogram, FiberPartition, colored_in_weights, relabel
from .modules import conv2d_like, count_parameters, linear_from_weights
from .report import CompressionReport, LayerReport

Partitioner = Callable[[str, torch.Tensor], FiberPartition]

ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.Softplus, nn.Identity,
               nn.Dropout, nn.Dropout2d, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
POSITIVELY_HOMOGENEOUS = (nn.ReLU, nn.LeakyReLU, nn.Identity, nn.Dropout, nn.Dropout2d, nn.MaxPool2d,
                          nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def epsilon_for(epsilon: float | Mapping[str, float], name: str) -> float:
    if isinstance(epsilon, Mapping):
        return float(epsilon.get(name, epsilon.get("default", 0.0)))
    return float(epsilon)


def dendrogram_partitioner(
    epsilon: float | Mapping[str, float], linkage: str = "complete", scale_aware: bool = False,
    exact_rtol: float = 1e-6,
) -> Partitioner:
    """The paper's partitioner: one dendrogram per layer, cut at that layer's ε."""

    def partition(name: str, rows: torch.Tensor) -> FiberPartition:
        return FiberDendrogram(rows, linkage, scale_aware, exact_rtol).cut(epsilon_for(epsilon, name))

    return partition


def compress_sequential(
    model: nn.Sequential,
    epsilon: float | Mapping[str, float] = 0.0,
    *,
    linkage: str = "complete",
    scale_aware: bool = False,
    exact_rtol: float = 1e-6,
    partitioner: Partitioner | None = None,
) -> tuple[nn.Sequential, CompressionReport]:
    """Collapse every hidden Linear/Conv2d layer of ``model`` onto its fibers; returns (new model, report).

    ``epsilon`` is one ε for all layers or a mapping from layer index (as a string) to ε. ``scale_aware``
    merges rows that are positive multiples (exact for ReLU/LeakyReLU; refused for other activations).
    ``partitioner`` replaces the dendrogram cut (the baselines use it to choose units by other criteria).
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError("compress_sequential takes an nn.Sequential; wrap your layers or use the HF entry points.")
    layers = list(model.children())
    weighted = [i for i, m in enumerate(layers) if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not weighted:
        raise ValueError("The model has no Linear or Conv2d layer to compress.")
    _check_supported(layers, scale_aware)
    partitioner = partitioner or dendrogram_partitioner(epsilon, linkage, scale_aware, exact_rtol)
    new_layers = [copy.deepcopy(m) for m in layers]
    report = CompressionReport(params_before=count_parameters(model))
    in_partition: FiberPartition | None = None
    pending_flatten = False
    for i in weighted:
        layer = layers[i]
        if pending_flatten and in_partition is not None:
            in_partition = _flatten_partition(in_partition, layer.in_features)
        pending_flatten = False
        is_last = i == weighted[-1]
        if is_last:
            out_partition = None
        else:
            rows = colored_in_weights(layer.weight, layer.bias, *_labels_scales(in_partition))
            out_partition = partitioner(str(i), rows)
        w, b = collapse_weight(layer.weight.to(torch.float64), _f64(layer.bias), out_partition, in_partition)
        w, b = w.to(layer.weight.dtype), None if b is None else b.to(layer.weight.dtype)
        new_layers[i] = linear_from_weights(w, b) if isinstance(layer, nn.Linear) else conv2d_like(layer, w, b)
        units = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
        report.layers.append(LayerReport(
            name=str(i), units_before=units,
            units_after=units if out_partition is None else out_partition.num_fibers,
            epsilon=0.0 if is_last else epsilon_for(epsilon, str(i)),
            params_before=count_parameters(layer), params_after=count_parameters(new_layers[i]),
        ))
        in_partition = out_partition
        following = layers[i + 1: weighted[weighted.index(i) + 1]] if not is_last else []
        pending_flatten = any(isinstance(m, nn.Flatten) for m in following)
    compressed = nn.Sequential(*new_layers)
    report.params_after = count_parameters(compressed)
    return compressed, report


def _f64(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(torch.float64)


def _labels_scales(partition: FiberPartition | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    return (None, None) if partition is None else (partition.labels, partition.scales)


def _check_supported(layers: list[nn.Module], scale_aware: bool) -> None:
    for m in layers:
        if isinstance(m, (nn.Linear, nn.Conv2d, nn.Flatten)):
            continue
        if not isinstance(m, ELEMENTWISE):
            raise ValueError(
                f"{type(m).__name__} is not supported between collapsed layers; use Linear/Conv2d with "
                "elementwise activations, pooling and Flatten (fold BatchNorm into the preceding layer first)."
            )
        if scale_aware and not isinstance(m, POSITIVELY_HOMOGENEOUS):
            raise ValueError(
                f"scale_aware merging is exact only for positively homogeneous activations (ReLU, LeakyReLU), "
                f"not {type(m).__name__}; set scale_aware=False."
            )


def _flatten_partition(partition: FiberPartition, in_features: int) -> FiberPartition:
    """Channel fibers → fibers of the flattened features: (fiber, position) pairs share a color."""
    channels = partition.num_units
    if in_features % channels:
        raise ValueError(f"Cannot map {channels} channels onto {in_features} flattened features.")
    positions = in_features // channels
    labels = partition.labels.repeat_interleave(positions)
    offsets = torch.arange(positions).repeat(channels)
    labels = torch.where(labels >= 0, labels * positions + offsets, labels)
    return FiberPartition(labels, partition.scales.repeat_interleave(positions))


def compress_lstm(
    lstm: nn.LSTM,
    head: nn.Linear,
    epsilon: float = 0.0,
    *,
    linkage: str = "complete",
    exact_rtol: float = 1e-6,
    max_iterations: int = 50,
) -> tuple[nn.LSTM, nn.Linear, FiberPartition]:
    """Collapse the hidden units of a one-layer LSTM and sum the head's columns over the hidden fibers.

    A hidden unit's fiber is one across the four gates (its concatenated gate rows are clustered); the
    recurrent input is colored by the hidden fibers, so the coloring is refined until it stops changing.
    """
    if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size:
        raise ValueError("compress_lstm supports a single-layer, unidirectional LSTM without projection.")
    hidden = lstm.hidden_size
    w_ih = lstm.weight_ih_l0.detach().to(torch.float64)
    w_hh = lstm.weight_hh_l0.detach().to(torch.float64)
    bias = (lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().to(torch.float64) if lstm.bias else None
    partition = FiberPartition(torch.zeros(hidden, dtype=torch.long), torch.ones(hidden, dtype=torch.float64))
    for _ in range(max_iterations):
        rows = torch.cat([
            colored_in_weights(
                torch.cat([w_ih[g * hidden:(g + 1) * hidden], w_hh[g * hidden:(g + 1) * hidden]], dim=1),
                None if bias is None else bias[g * hidden:(g + 1) * hidden],
                torch.cat([torch.arange(w_ih.shape[1]), w_ih.shape[1] + partition.labels]),
            )
            for g in range(4)
        ], dim=1)
        refined = _meet(partition, FiberDendrogram(rows, linkage, False, exact_rtol).cut(epsilon))
        if refined.num_fibers == partition.num_fibers:
            break
        partition = refined
    new = nn.LSTM(lstm.input_size, partition.num_fibers, bias=lstm.bias, batch_first=lstm.batch_first,
                  dtype=lstm.weight_ih_l0.dtype, device=lstm.weight_ih_l0.device)
    gates = lambda t: t.detach().to(torch.float64).reshape(4, hidden, *t.shape[1:])  # noqa: E731
    with torch.no_grad():
        new.weight_ih_l0.copy_(torch.cat([collapse_weight(g, None, partition)[0] for g in gates(lstm.weight_ih_l0)]))
        new.weight_hh_l0.copy_(torch.cat([
            collapse_weight(g, None, partition, partition)[0] for g in gates(lstm.weight_hh_l0)
        ]))
        if lstm.bias:
            for name in ("bias_ih_l0", "bias_hh_l0"):
                collapsed = [collapse_weight(g.unsqueeze(1), None, partition)[0].squeeze(1)
                             for g in gates(getattr(lstm, name))]
                getattr(new, name).copy_(torch.cat(collapsed))
    w_head, b_head = collapse_weight(head.weight.to(torch.float64), _f64(head.bias), None, partition)
    dtype = head.weight.dtype
    new_head = linear_from_weights(w_head.to(dtype), None if b_head is None else b_head.to(dtype))
    return new, new_head, partition


def _meet(a: FiberPartition, b: FiberPartition) -> FiberPartition:
    """Coarsest common refinement of two partitions (keeps the LSTM coloring monotone, so it terminates)."""
    pairs = a.labels * (int(b.labels.max()) + 1) + b.labels
    return FiberPartition(relabel(pairs), torch.ones_like(a.scales))
