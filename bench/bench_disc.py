"""--disc shared against --disc copy on the CPU: seconds per step and peak memory, side by side.

Each run is `plan.py --real` (train.py's own step, twice, on random real weights, bf16 under the
CPU's autocast rules): the tracked peak and the second step's time, with the planner's counters
on in both. Runs alternate copy, shared, copy, shared, ... in one process, so the ratios compare
like with like on a shared machine; absolute times are not comparable across runs.
Usage: python bench/bench_disc.py [--models tiny,sd15] [--size 128] [--repeats 2]
"""
import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import plan  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(__file__), "..", "prompts.txt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny,sd15")
    ap.add_argument("--size", type=int, default=128, help="px for sd15 (tiny plans at 64)")
    ap.add_argument("--repeats", type=int, default=2)
    a = ap.parse_args()
    from oracle import tiny_blip
    blip = tiny_blip(tempfile.mkdtemp(prefix="bench-disc-"))
    print("| model | size | copy s/step | shared s/step | time shared/copy | copy peak GiB | "
          "shared peak GiB | peak shared/copy |")
    print("|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        tiny = model.startswith("tiny")
        size = 64 if tiny else a.size
        res = {"copy": [], "shared": []}
        for _ in range(a.repeats):
            for disc in res:
                argv = ["--real", "--rules", "cpu", "--model", model, "--prompts", PROMPTS,
                        "--size", str(size), "--batch", "1", "--grad_steps", "1",
                        "--total_steps", "1", "--rank", "128", "--precision", "bf16",
                        "--disc", disc, *(["--captioner", blip] if tiny else [])]
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    res[disc].append(plan.main(argv))
        t = {d: statistics.median(r["step_s"] for r in rs) for d, rs in res.items()}
        p = {d: rs[0]["peak"] for d, rs in res.items()}
        print(f"| {model} | {size} | {t['copy']:.2f} | {t['shared']:.2f} | "
              f"{t['shared'] / t['copy']:.2f} | {p['copy']:.3f} | {p['shared']:.3f} | "
              f"{p['shared'] / p['copy']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
