"""What bounds peak memory changes no value: the in-place and chunked forms equal the one-shot formulas bit for bit."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_model

from hf_fibration.config import FibrationConfig
from hf_fibration.core.compensate import RidgeStats, mlp_hidden, reconstruction_error
from hf_fibration.core.fibers import EPSILON_MAX, cosine_distance_condensed
from hf_fibration.integrations.memory import return_big_frees
from hf_fibration.models.sites import build_sites
from hf_fibration.repair.calibration import capture_calibration


def _one_shot_distances(rows: torch.Tensor) -> np.ndarray:
    norms = rows.norm(dim=1, keepdim=True)
    unit = (rows / norms.clamp_min(1e-30)).to(torch.float32)
    dist = (1.0 - unit @ unit.T).clamp_(0.0, EPSILON_MAX).numpy().astype(np.float64)
    i, j = np.triu_indices(rows.shape[0], k=1)
    return dist[i, j]


@pytest.mark.parametrize("shape, transposed", [((300, 70), False), ((40, 5000), True), ((3, 4), False),
                                               ((1, 4), False)])
def test_chunked_cosine_distances_equal_the_one_shot_ones(shape, transposed):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(*(shape[::-1] if transposed else shape), generator=g, dtype=torch.float64)
    rows = rows.T if transposed else rows  # an embedding's rows are a transposed view
    rows[0] = 0.0  # a zero row stays at distance 1
    assert np.array_equal(cosine_distance_condensed(rows), _one_shot_distances(rows))


def test_in_place_refit_arithmetic_equals_the_out_of_place_formulas():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 6, generator=g, dtype=torch.float64)
    (w1, b1), (w2, b2) = [(torch.randn(9, 6, generator=g, dtype=torch.float64),
                           torch.randn(9, generator=g, dtype=torch.float64)) for _ in range(2)]
    act = torch.nn.functional.silu
    assert torch.equal(mlp_hidden(x, [(w1, b1)], act), act(x @ w1.T + b1))
    assert torch.equal(mlp_hidden(x, [(w1, None), (w2, None)], act), act(x @ w1.T + 0) * (x @ w2.T + 0))
    h, y = mlp_hidden(x, [(w1, b1)], act), torch.randn(200, 4, generator=g, dtype=torch.float64)
    w, b = torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64)
    assert reconstruction_error(h, w, b, y) == float((((h @ w.T) + b - y) ** 2).mean())
    cell = torch.arange(200) % 4
    stats = RidgeStats(h, y, cell, 4)
    gram, cross, h_mean, y_mean = stats._centered((0, 1, 3))
    n = sum(stats.n[c] for c in (0, 1, 3))
    assert torch.equal(gram, sum(stats.hh[c] for c in (0, 1, 3)) - n * torch.outer(h_mean, h_mean))
    assert torch.equal(cross, sum(stats.hy[c] for c in (0, 1, 3)) - n * torch.outer(h_mean, y_mean))


def test_the_capture_never_holds_more_than_the_asked_tokens(monkeypatch):
    import hf_fibration.repair.calibration as calibration

    model = tiny_model("llama")
    site = next(s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp")
    ids = torch.randint(3, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    held = []

    class WatchedTorch:  # torch as calibration.py sees it, with its concatenations counted
        def __getattr__(self, name):
            return getattr(torch, name)

        @staticmethod
        def cat(tensors, *args, **kwargs):
            held.append(sum(t.shape[0] for t in tensors))
            return torch.cat(tensors, *args, **kwargs)

    monkeypatch.setattr(calibration, "torch", WatchedTorch())
    cal = capture_calibration(model, site, lambda i: model(input_ids=ids), 5, 70)
    assert len(cal) == 70 and held[0] == 70  # 48 + 22 rows captured, not 48 + 48
    assert cal.sequence.tolist() == [i // 12 for i in range(70)]


def test_return_big_frees_leaves_a_chosen_threshold(monkeypatch):
    assert isinstance(return_big_frees(), bool)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert return_big_frees() is False


def test_trim_heap_gives_back_the_free_pages_inside_the_heap():
    import subprocess
    import sys

    script = """
import ctypes
from hf_fibration.integrations.memory import return_big_frees, trim_heap
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS")) // 1024
return_big_frees()  # 1 MB buffers come from the heap, below the fixed threshold
blocks = []
for _ in range(400):
    blocks.append(libc.malloc(1 << 20))
    ctypes.memset(blocks[-1], 1, 1 << 20)
before = rss()
for block in blocks[0::2]:  # holes between live blocks: no free chunk reaches the heap's top
    libc.free(block)
freed = rss()
trim_heap()
print(before, freed, rss())
"""
    if not sys.platform.startswith("linux"):
        pytest.skip("glibc's heap: Linux only")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    before, freed, trimmed = map(int, out)
    assert freed > before - 50  # freeing alone keeps the pages
    assert trimmed < freed - 150  # the trim hands back most of the 200 MB of holes
