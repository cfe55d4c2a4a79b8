"""The toy-world ablation (the paper's Table 4 on the toy world): the base model,
CoMat with concept matching only, + attribute concentration, + fidelity preservation (= train.py's
toy defaults), each trained row once per training seed with `python train.py --prompts prompts.txt`
and scored by `python -m toy.eval` (4 sampling seeds). Runs are cached in --out (one folder per
row and training seed; delete one to redo it); the table gives each trained row's mean over its
training seeds and their range, and is written to OUT/table.md.
The same script chooses settings on the validation split: `--split val --train --lr 3e-4` scores
on world.VAL_PROMPTS (never the evaluation prompts) with the extra train.py flags.
Usage: python -m toy.bench.ablation [--rows base,cap,attn,full] [--train-seeds 42,43]
                                    [--split eval|val] [--out runs/ablation] [--train FLAGS...]
"""
import argparse
import json
import os

import numpy as np

import train
from toy import eval as toy_eval

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROWS = {  # name: (table label, train.py flags switching terms off; None = no training)
    "base": ("base model", None),
    "cap": ("+ concept matching", ["--w_tok", "0", "--w_pix", "0", "--w_adv", "0"]),
    "attn": ("+ attribute concentration", ["--w_adv", "0"]),
    "full": ("+ fidelity preservation (full)", []),
}
COLUMNS = ("one", "two", "spatial", "overall", "fidelity", "missing",
           "two_pairs", "spatial_pairs", "two_binding", "spatial_binding", "two_extra",
           "spatial_extra")


def run_row(name, seed, a) -> dict:
    """Train (unless cached) and score one row at one training seed; returns the scores."""
    flags = ROWS[name][1]
    run = os.path.join(a.out, name if flags is None else f"{name}-s{seed}")
    scores = os.path.join(run, f"{a.split}.json")
    lora = None if flags is None else os.path.join(run, "lora.safetensors")
    if lora and not os.path.exists(lora):
        train.main(["--prompts", os.path.join(ROOT, "prompts.txt"), "--out", run,
                    "--seed", str(seed), *a.train, *flags])  # the row's switches win
    if not os.path.exists(scores):
        toy_eval.main(["--seeds", str(a.seeds), "--split", a.split, "--out", scores]
                      + (["--lora", lora] if lora else []))
    out = json.load(open(scores))
    if "spatial_binding" not in out:  # scored before the binding columns: score again
        os.remove(scores)
        return run_row(name, seed, a)
    return out


def cell(values) -> str:
    """Mean over training seeds in %, with the range when there are several."""
    v = 100 * np.array(values)
    return f"{v.mean():.1f}" + (f" ({v.min():.1f}-{v.max():.1f})" if len(v) > 1 else "")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--train-seeds", default="42,43", help="train.py --seed per trained row")
    ap.add_argument("--seeds", type=int, default=4, help="sampling seeds of the evaluation")
    ap.add_argument("--split", choices=["eval", "val"], default="eval")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
    ap.add_argument("--train", nargs=argparse.REMAINDER, default=[],
                    help="extra train.py flags for every trained row (last on the line)")
    a = ap.parse_args()
    cols = [c for c in COLUMNS if a.split == "eval" or c != "one"]  # val has no one-object split
    lines = ["| model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name in a.rows.split(","):
        seeds = [0] if ROWS[name][1] is None else [int(s) for s in a.train_seeds.split(",")]
        runs = [run_row(name, s, a) for s in seeds]
        lines.append(f"| {ROWS[name][0]} | "
                     + " | ".join(cell([r[c] for r in runs]) for c in cols) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "table.md" if a.split == "eval" else "table-val.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
