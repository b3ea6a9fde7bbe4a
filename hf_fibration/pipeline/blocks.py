"""The blocks of a model grouped in stacks (encoder, decoder, ...), which block a site lives in, and the replay of
blocks whose outputs are final (the searches run only what comes after the site they decide)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from torch import nn

from hf_fibration.models.architectures import architecture_for
from hf_fibration.models.sites import Site
from hf_fibration.models.surgery import model_type_of


@dataclass
class BlockReplay:
    """Replays the recorded outputs of the final blocks of each stack (encoder, decoder, ...)."""

    stacks: list[list[nn.Module]]
    batch: int = 0
    frozen: dict[int, int] = field(default_factory=dict)  # stack → number of leading blocks replayed
    outputs: dict[tuple[int, int], object] = field(default_factory=dict)  # (stack, batch) → last frozen output
    recording: tuple[int, int] | None = None  # (stack, block) whose outputs the next pass records
    recorded: set[int] = field(default_factory=set)  # the batches recorded since ``record``
    _wrapped: list[nn.Module] = field(default_factory=list)

    def install(self) -> None:
        for s, blocks in enumerate(self.stacks):
            for b, block in enumerate(blocks):
                self._wrapped.append(block)
                block.forward = self._wrap(s, b, block.forward)

    def remove(self) -> None:
        self.detach()
        self.outputs.clear()

    def detach(self) -> None:
        """Give the blocks back their own forward, keeping what was recorded."""
        for block in self._wrapped:
            block.__dict__.pop("forward", None)
        self._wrapped = []

    def _wrap(self, s: int, b: int, forward: Callable) -> Callable:
        def replay_or_run(*args, **kwargs):
            if b < self.frozen.get(s, 0) and (s, self.batch) in self.outputs:  # a batch not recorded runs
                return self.outputs[(s, self.batch)]
            out = forward(*args, **kwargs)
            if self.recording == (s, b):
                self.outputs[(s, self.batch)] = out
                self.recorded.add(self.batch)
            return out

        return replay_or_run

    def record(self, s: int, b: int) -> None:
        """Record block b of stack s on the passes until ``freeze``."""
        self.recording, self.recorded = (s, b), set()

    def freeze(self) -> None:
        """Blocks up to the recorded one replay from now on, on the batches the passes since ``record`` ran."""
        s, b = self.recording
        for key in [key for key in self.outputs if key[0] == s and key[1] not in self.recorded]:
            del self.outputs[key]  # an older block's output: those batches run again
        self.frozen[s], self.recording = b + 1, None

    def freeze_through(self, s: int, b: int, record_pass: Callable[[], None]) -> None:
        """Make blocks 0..b of stack s replayed: one pass records block b's outputs."""
        if self.frozen.get(s, 0) > b:
            return
        self.record(s, b)
        record_pass()
        self.freeze()


def stacks_of(model: nn.Module) -> tuple[list[list[nn.Module]], dict[str, tuple[int, int]]]:
    """Blocks grouped by their parent list, and each block name's (stack, index)."""
    arch = architecture_for(model_type_of(model))
    stacks: dict[str, list[tuple[str, nn.Module]]] = {}
    for name, block in arch.blocks(model):
        stacks.setdefault(name.rpartition(".")[0], []).append((name, block))
    position = {name: (s, b) for s, blocks in enumerate(stacks.values()) for b, (name, _) in enumerate(blocks)}
    return [[m for _, m in blocks] for blocks in stacks.values()], position


def block_of(site: Site, position: dict[str, tuple[int, int]]) -> tuple[int, int] | None:
    for name, pos in position.items():
        if site.name.startswith(name + "."):
            return pos
    return None


def first_output(out: object) -> object:
    """A block's hidden states: the first item of the tuple some families return, or the output itself."""
    return out[0] if isinstance(out, (tuple, list)) else out


class CalibrationPasses:
    """The forward passes that capture the calibration of sites collapsed one after another in block order: each
    pass replays the blocks before the one before its site's block and records that one (final by then: its sites
    are collapsed), so every block runs about twice in a whole collapse rather than once per later site — linear in
    depth. The blocks are wrapped only during those passes; sites out of block order (or an embedding after a
    block) get plain passes."""

    def __init__(self, model: nn.Module, sites: list[Site], run_batch: Callable[[int], object]) -> None:
        stacks, position = stacks_of(model)
        self.run_batch, self.position = run_batch, position
        self.replay = BlockReplay(stacks)
        order = [(-1, -1) if site.kind == "embedding" else block_of(site, position) for site in sites]
        in_blocks = [pos for pos in order if pos is not None]
        self.enabled = in_blocks == sorted(in_blocks)

    def run(self, i: int) -> object:
        self.replay.batch = i
        return self.run_batch(i)

    @contextmanager
    def capturing(self, site: Site) -> Iterator[Callable[[int], object]]:
        """``run(i)`` for the passes that capture ``site``'s calibration (they record the block before its block)."""
        pos = block_of(site, self.position) if self.enabled else None
        if pos is None:
            yield self.run_batch
            return
        self.replay.install()
        try:
            if pos[1] > self.replay.frozen.get(pos[0], 0):  # else the block before is replayed already
                self.replay.record(pos[0], pos[1] - 1)
            yield self.run
            if self.replay.recording is not None:
                self.replay.freeze()
        finally:
            self.replay.recording = None
            self.replay.detach()
