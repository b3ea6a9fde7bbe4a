"""Retune a compressed model with accelerate: early stopping on the eval split, checkpoints, resume.

Mixed precision, gradient accumulation and multi-GPU/DeepSpeed/FSDP come from ``Accelerator`` and the user's
``accelerate config``. Checkpoints are safetensors (model and optimizer tensors) plus JSON, never pickle.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from hf_fibration.api import compress_pretrained
from hf_fibration.config import FibrationConfig
from hf_fibration.core.modules import count_parameters
from hf_fibration.evaluation.evalset import EvalSet, evaluate_loss, task_loss
from hf_fibration.integrations.quantizer import mark_compressed
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.search import HoldoutError, greedy_search
from hf_fibration.training.distill import Distillation
from hf_fibration.training.retune_state import (
    EpochPermutation,
    complete_state,
    load_state,
    rng_state,
    save_state,
    set_rng_state,
)

EPSILON_CEILING = 1.99  # ε×q stays inside the cosine-distance range [0, 2)

STATE_DIR = "retune_state"


@dataclass
class RetuneResult:
    best_loss: float
    initial_loss: float
    steps: int
    epochs: int
    stopped_early: bool
    history: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def retune(
    model: nn.Module,
    train: EvalSet,
    evalset: EvalSet,
    *,
    epochs: int = 3,
    learning_rate: float = 5e-5,
    patience: int = 2,
    eval_every: int | None = None,
    max_steps: int | None = None,
    output_dir: str | Path | None = None,
    resume: bool = False,
    mixed_precision: str = "no",
    gradient_accumulation_steps: int = 1,
    betas: tuple[float, float] = (0.9, 0.999),
    adam_eps: float = 1e-8,
    warmup_steps: int = 0,
    schedule: str = "constant",
    seed: int = 0,
    progress: bool = True,
    teacher: nn.Module | None = None,
    distill_weight: float = 0.5,
    distill_temperature: float = 2.0,
    distill_hidden_weight: float = 0.0,
    distill_hidden_layers: str = "last",
    max_seconds: float | None = None,
) -> RetuneResult:
    """Train ``model`` on ``train``'s batches, evaluate every ``eval_every`` steps (default: each epoch), stop after
    ``patience`` evaluations without improvement, and leave the best weights in ``model``.

    With ``output_dir`` a checkpoint is written at every evaluation; ``resume=True`` continues from it to the same
    weights and history as an uninterrupted run (in one process, with evaluations on optimizer steps when
    accumulating gradients; see hf_fibration.training.retune_state).
    With ``teacher`` (the uncompressed model) the training loss is (1−distill_weight)·task +
    distill_weight·KL(teacher ‖ student)·T² (+ distill_hidden_weight·relative MSE of the hidden states of
    ``distill_hidden_layers``, "last" or "all"; for a bare encoder only this term is added); the eval
    loss, and so early stopping, stays the task loss. Memory: see training/distill.py. With ``max_seconds``
    training also ends at the first evaluation after that much wall time (``stopped_early`` stays False then).
    ``schedule="cosine"`` decays the learning rate after warmup to 0 at the last step (epochs or ``max_steps``)."""
    from accelerate import Accelerator
    from accelerate.utils import gather_object

    if not train.batches:
        raise ValueError("The retuning train split is empty; pass a split with examples.")
    distill = None
    if teacher is not None:
        distill = Distillation(teacher, distill_weight, distill_temperature, distill_hidden_weight,
                               distill_hidden_layers)
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=gradient_accumulation_steps)
    torch.manual_seed(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=learning_rate,
                                  betas=betas, eps=adam_eps)
    if schedule not in ("constant", "cosine"):
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}.")
    horizon: dict[str, int] = {}  # the cosine's length, known once accelerate has sharded the batches

    def lr_factor(step: int) -> float:
        warm = min(1.0, (step + 1) / max(warmup_steps, 1))
        if schedule == "constant" or "steps" not in horizon:
            return warm
        return warm * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(horizon["steps"], 1))))

    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # each epoch's order depends on (seed, epoch) only; accelerate gives every process its slice of it
    order = torch.utils.data.DataLoader(range(len(train.batches)), batch_size=1,
                                        sampler=EpochPermutation(len(train.batches), seed),
                                        generator=torch.Generator().manual_seed(seed))  # never the global RNG
    model, optimizer, order, warmup = accelerator.prepare(model, optimizer, order, warmup)
    device = accelerator.device
    train.to(device)
    evalset.to(device)
    unwrapped = accelerator.unwrap_model(model)
    if distill is not None:
        distill.prepare(train.task, unwrapped, device)
    state_dir = Path(output_dir) / STATE_DIR if output_dir is not None else None

    saved = complete_state(state_dir) if resume and state_dir is not None else None
    rng = None
    if saved is None:
        initial = evaluate_loss(unwrapped, evalset)
        progress_state = {"step": 0, "epoch": 0, "best": initial, "bad": 0, "history": [], "initial": initial}
    best_state = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
    if saved is not None:
        progress_state, best, rng = load_state(saved, unwrapped, optimizer, warmup, accelerator.process_index,
                                               device)
        best_state = {**best_state, **best}
        initial = progress_state.get("initial", progress_state["best"])

    per_epoch = len(order)  # this process's steps per epoch
    eval_every = eval_every or per_epoch
    total = epochs * per_epoch if max_steps is None else min(max_steps, epochs * per_epoch)
    horizon["steps"] = total
    bar = tqdm(total=total, initial=progress_state["step"], desc="retune", disable=not progress, unit="step")
    stopped = saved is not None and progress_state["bad"] >= patience
    out_of_time = False
    began = time.perf_counter()
    done = stopped or progress_state["epoch"] >= epochs or progress_state["step"] >= total
    model.train()
    if rng is not None:
        set_rng_state(rng)  # dropout continues with the draws the interrupted run would have made
    while not done:
        skip = progress_state["step"] - progress_state["epoch"] * per_epoch  # resuming mid-epoch
        accelerator.step = skip  # the gradient-accumulation phase within the epoch
        order.set_epoch(progress_state["epoch"])
        for i, index in enumerate(order):
            if i < skip:
                continue
            with accelerator.accumulate(model):
                loss = task_loss(model, train, int(index)) if distill is None else distill.loss(model, train,
                                                                                                int(index))
                accelerator.backward(loss)
                optimizer.step()
                warmup.step()
                optimizer.zero_grad()
            progress_state["step"] += 1
            bar.update(1)
            bar.set_postfix(loss=f"{float(loss.detach()):.4f}", best=f"{progress_state['best']:.4f}")
            if progress_state["step"] % eval_every == 0 or progress_state["step"] == total:
                value = evaluate_loss(unwrapped, evalset)
                progress_state["history"].append({"step": progress_state["step"], "eval_loss": value})
                if value < progress_state["best"]:
                    progress_state["best"], progress_state["bad"] = value, 0
                    best_state = {k: v.detach().clone() for k, v in unwrapped.state_dict().items()}
                else:
                    progress_state["bad"] += 1
                stopped = progress_state["bad"] >= patience
                out_of_time = max_seconds is not None and time.perf_counter() - began > max_seconds
                if state_dir is not None:
                    rngs = gather_object([rng_state()])  # every process's, in process order
                    if accelerator.is_main_process:
                        save_state(state_dir, unwrapped, optimizer, warmup, best_state, progress_state, rngs)
                model.train()
            if stopped or progress_state["step"] >= total or out_of_time:
                done = True
                break
        else:
            progress_state["epoch"] += 1
            done = progress_state["epoch"] >= epochs
    bar.close()
    model.eval()
    unwrapped.load_state_dict(best_state)
    return RetuneResult(progress_state["best"], initial, progress_state["step"], progress_state["epoch"], stopped,
                        progress_state["history"])


def compress_retune(
    model: nn.Module,
    config,
    evalset: EvalSet,
    train: EvalSet,
    *,
    rho: float = 0.041,
    quench: float = 1.05,
    max_rounds: int = 5,
    progress: bool = True,
    base_loss: float | None = None,
    on_round: Callable[[dict, nn.Module], None] | None = None,
    time_budget_s: float | None = None,
    output_dir: str | Path | None = None,
    distill: bool = True,
    **retune_kwargs,
) -> tuple[nn.Module, list[dict]]:
    """Seed Alg. 2 (Methods 5.4). L = the eval loss of ``model`` (or ``base_loss``). Each round: the greedy search
    (Alg. 3, at ``config``'s τ) on the CURRENT model gives ε's; the current model is collapsed at ε×q (over-
    compression) and retuned with early stopping; the loop goes on while the retuned loss L_c ≤ (1+ρ)·L. The answer
    is the last model within the bound after one more loss-preserving greedy search (Alg. 2 lines 12–13), unless
    that search's loss leaves the bound, then the retuned model itself. A round whose search finds nothing to
    collapse ends the loop. ``model`` is changed in place; ``retune_kwargs`` go to :func:`retune`. With ``distill``
    (the default: on the seed-regime series it ended smaller and lower than the seed's plain retuning,
    results/seed-regime) every retuning distills from the uncompressed model (a copy kept in memory), unless
    ``retune_kwargs`` names another ``teacher``; tasks whose loss already compares with the original (fidelity)
    take none. Returns the model and one row per retuned round plus a row for the returned model
    (``round == "final"``, with why the loop ended).

    ``on_round(row, model)`` is called after every round (it may add fields to the row); with ``time_budget_s`` no
    new round starts once that many seconds have passed.

    With ``output_dir`` (a transformers model) the loop is resumable round by round: every retuned round is saved
    there (``round-<r>/``, a loadable checkpoint, with the retuning's own checkpoints in it) and recorded in
    ``alg2.json``; called again with the same settings it continues from the last saved round (a round interrupted
    mid-retuning continues its retuning) to the same weights and rows as an uninterrupted run. Settings that differ
    from the saved ones raise ``ValueError``; ``max_rounds`` and ``time_budget_s`` may change between calls."""

    if rho < 0 or quench < 1 or max_rounds < 0:
        raise ValueError(f"rho must be ≥ 0, quench ≥ 1 and max_rounds ≥ 0, got rho={rho}, quench={quench}, "
                         f"max_rounds={max_rounds}.")
    base = evaluate_loss(model, evalset) if base_loss is None else base_loss
    bound = base * (1 + rho) if evalset.task != "fidelity" else rho
    if distill and "teacher" not in retune_kwargs and evalset.task != "fidelity":
        retune_kwargs["teacher"] = copy.deepcopy(model).eval().requires_grad_(False)

    def sizes(m: nn.Module) -> dict:
        return {"params": count_parameters(m), "non_embedding_params": non_embedding_parameters(m)}

    def search(m: nn.Module) -> tuple[nn.Module, dict[str, float], float]:
        searched = copy.deepcopy(m)
        try:
            report = greedy_search(searched, config, evalset, progress=progress)
        except HoldoutError:  # the search could not keep τ: nothing more to compress at this tolerance
            return m, {}, evaluate_loss(m, evalset)
        return searched, {layer.name: layer.epsilon for layer in report.layers}, evaluate_loss(searched, evalset)

    rounds = Alg2Rounds(output_dir, {"rho": rho, "quench": quench, "base_loss": base, "config": config.to_dict(),
                                     "retune": _jsonable(retune_kwargs)}) if output_dir is not None else None
    rows: list[dict] = rounds.rows if rounds is not None else []
    first = 0
    if rows:  # resuming: continue from the model that entered the first round not yet finished
        first = len(rows) if rows[-1]["within_bound"] else len(rows) - 1
        if first > 0:
            model = rounds.load(model, first - 1)
    ended = "bound"
    began = time.perf_counter()
    for r in range(first, max_rounds + 1):
        start = time.perf_counter()
        last_good = copy.deepcopy(model)  # M_o: every round starts from the last model within the bound
        searched, epsilons, searched_loss = search(model)
        search_seconds = time.perf_counter() - start
        out_of_time = time_budget_s is not None and time.perf_counter() - began > time_budget_s
        if r < len(rows):  # this round was retuned before the resume and broke the bound
            break
        if r == max_rounds or not epsilons or out_of_time:
            ended = "nothing left to compress" if not epsilons else "time budget" if out_of_time else "max_rounds"
            break
        over = {name: min(eps * quench, EPSILON_CEILING) for name, eps in epsilons.items()}
        # the over-compression sees the eval data too (refits and calibrated fiber sources such as span need it);
        # sites the search left alone get ε = 0, where only exact fibers merge
        fixed = {**dict.fromkeys(config.parts, 0.0), **over}
        before = non_embedding_parameters(model)
        compress_pretrained(model, FibrationConfig(**{**config.to_dict(), "epsilon": None, "epsilons": fixed,
                                                      "target_params": None}), evalset=evalset, progress=False)
        if non_embedding_parameters(model) == before:  # the ε's found only cuts that change no size
            ended = "nothing left to compress"
            break
        compressed_loss = evaluate_loss(model, evalset)
        checkpoints = {} if rounds is None else {"output_dir": rounds.folder(r), "resume": True}
        result = retune(model, train, evalset, progress=progress, **checkpoints, **retune_kwargs)
        row = {"round": r, "epsilons_searched": epsilons, "searched": {**sizes(searched), "loss": searched_loss},
               "epsilons": over, **sizes(model), "loss_compressed": compressed_loss,
               "loss_retuned": result.best_loss, "steps": result.steps, "epochs": result.epochs,
               "within_bound": result.best_loss <= bound, "search_seconds": search_seconds,
               "seconds": time.perf_counter() - start, "base_loss": base, "bound": bound}
        if on_round is not None:
            on_round(row, model)
        rows.append(row)
        if rounds is not None:
            rounds.save(model, r)
        if not row["within_bound"]:
            break
    # Alg. 2 lines 12–13: the last model within the bound, compressed once more at the searched ε's
    # (the last round began from M_o, so its search already is that compression)
    final, final_loss, closing = searched, searched_loss, True
    if final_loss > bound:
        final, final_loss, closing = last_good, evaluate_loss(last_good, evalset), False
    # the returned model is not retuned after the closing collapse: both loss fields hold its loss
    rows.append({"round": "final", "ended": ended, "closing_search": closing, "epsilons_searched": epsilons,
                 **sizes(final), "loss_compressed": final_loss, "loss_retuned": final_loss,
                 "within_bound": final_loss <= bound, "search_seconds": search_seconds, "base_loss": base,
                 "bound": bound})
    return final, rows


def _jsonable(kwargs: dict) -> dict:
    """The retuning settings that identify a run (modules such as a teacher by their class)."""
    return {k: v if isinstance(v, (int, float, str, bool, type(None), list, tuple)) else type(v).__name__
            for k, v in sorted(kwargs.items())}


class Alg2Rounds:
    """The saved rounds of a resumable Alg. 2 run: ``alg2.json`` (settings and one row per finished round) and
    ``round-<r>/`` (the retuned model of round r, a fibration checkpoint)."""

    def __init__(self, output_dir: str | Path, settings: dict) -> None:
        self.dir = Path(output_dir)
        self.record = self.dir / "alg2.json"
        self.settings = json.loads(json.dumps(settings))  # as it reads back from the file
        self.rows: list[dict] = []
        if self.record.exists():
            saved = json.loads(self.record.read_text())
            changed = sorted(k for k in self.settings if saved["settings"].get(k) != self.settings[k])
            if changed:
                raise ValueError(f"{self.dir} holds an Alg. 2 run with other settings ({', '.join(changed)}); "
                                 "pass the same settings to resume it, or another output_dir.")
            self.rows = saved["rows"]

    def folder(self, r: int) -> Path:
        return self.dir / f"round-{r}"

    def save(self, model: nn.Module, r: int) -> None:
        if not hasattr(model, "save_pretrained"):
            raise ValueError("A resumable Alg. 2 run (output_dir) needs a transformers model.")
        mark_compressed(model, {"alg2_round": r}, {"round": self.rows[-1]})
        model.save_pretrained(self.folder(r))
        tmp = self.record.with_suffix(".tmp")  # the record names a round only once its model is written
        tmp.write_text(json.dumps({"settings": self.settings, "rows": self.rows}, indent=1) + "\n")
        os.replace(tmp, self.record)

    def load(self, like: nn.Module, r: int) -> nn.Module:
        loaded = type(like).from_pretrained(self.folder(r)).to(next(like.parameters()).device)
        return loaded.train(like.training)
