"""The toy-world ablation in the README (the paper's Table 4 on the toy world): the base model,
CoMat with concept matching only, + attribute concentration, + fidelity preservation (= train.py's
toy defaults), each trained with `python train.py --prompts prompts.txt` and scored by
`python toyworld.py eval` on the fixed evaluation prompts. Rows are cached in --out (delete a row's
folder to redo it); a markdown table is printed and written to OUT/table.md.
Usage: python bench/toy_ablation.py [--rows base,cap,attn,full] [--seeds 4] [--out runs/ablation]
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import toyworld  # noqa: E402
import train  # noqa: E402

ROWS = {  # name: (README label, train.py flags switching terms off; None = no training)
    "base": ("base model", None),
    "cap": ("+ concept matching", ["--w_tok", "0", "--w_pix", "0", "--w_adv", "0"]),
    "attn": ("+ attribute concentration", ["--w_adv", "0"]),
    "full": ("+ fidelity preservation (full)", []),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "ablation"))
    ap.add_argument("--train", nargs=argparse.REMAINDER, default=[],
                    help="extra train.py flags for every trained row (last on the line)")
    a = ap.parse_args()
    lines = ["| model | one-object | two-object | spatial | overall | fidelity | missing 2nd |",
             "|---|---|---|---|---|---|---|"]
    for name in a.rows.split(","):
        label, flags = ROWS[name]
        run, scores = os.path.join(a.out, name), os.path.join(a.out, name, "eval.json")
        lora = None if flags is None else os.path.join(run, "lora.safetensors")
        if lora and not os.path.exists(lora):
            train.main(["--prompts", os.path.join(ROOT, "prompts.txt"), "--out", run,
                        *flags, *a.train])
        if not os.path.exists(scores):
            toyworld.main(["eval", "--seeds", str(a.seeds), "--out", scores]
                          + (["--lora", lora] if lora else []))
        s = json.load(open(scores))
        lines.append(f"| {label} | " + " | ".join(f"{100 * s[k]:.1f}" for k in (
            "one", "two", "spatial", "overall", "fidelity", "missing")) + " |")
    table = "\n".join(lines)
    print(table)
    with open(os.path.join(a.out, "table.md"), "w") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
