"""Why are the toy world's images wrong? The analytic evaluator's reading of each image broken down,
for the base model and fine-tuned LoRAs, on the evaluation prompts (the same prompts, seeds and
sampler as `python -m toy.eval`). Per category, as shares of its images, in %:
  correct      what the accuracy counts (every prompt object, no extra shape, the relation);
  objects ok   every prompt object found with its colour and shape (extra shapes allowed);
  extra        more shapes than the prompt names (any of them may be right);
  n = 1, 2, 3+ how many shapes the evaluator finds;
  colours      every prompt colour is on some shape (whatever its shape);
  pairs 0/1/2  how many of the prompt's (colour, shape) pairs are found;
  clean        one or two shapes, all clean palette shapes (what fidelity counts);
  reversed     spatial: every prompt object found, the relation failing and the reversed one
               holding (what train.py --relation_masks acts on); the rest of the failing
               relations have the objects side by side on the other axis.
Usage: python -m toy.bench.failures [--lora A.safetensors,B.safetensors] [--seeds 4] [--out F.md]
"""
import argparse
import os

import numpy as np

import sample
import toy
from toy import world as tw
from toy.build import flip_relation

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

COLUMNS = ("correct", "objects ok", "extra", "n = 1", "n = 2", "n = 3+", "colours",
           "pairs 0", "pairs 1", "pairs 2", "clean", "reversed")


def reading(img: np.ndarray, text: str) -> dict:
    """The evaluator's reading of one (64, 64, 3) uint8 image against its prompt, as 0/1 flags."""
    r, found, flipped = tw.score(img, text), tw.detect(img), flip_relation(text)
    objs = tw.parse_prompt(text).objects
    pairs = sum(any(f[:2] == o[:2] for f in found) for o in objs)
    return {"correct": r["correct"], "objects ok": r["objects_ok"], "extra": r["extra"],
            "n = 1": r["n"] == 1, "n = 2": r["n"] == 2, "n = 3+": r["n"] >= 3,
            "colours": all(any(f.colour == o.colour for f in found) for o in objs),
            "pairs 0": pairs == 0, "pairs 1": pairs == 1, "pairs 2": pairs == 2,
            "clean": r["clean"], "reversed": r["relation_ok"] is False and bool(
                flipped and tw.score(img, flipped)["relation_ok"])}


def breakdown(pipe, seeds) -> dict[str, dict[str, float]]:
    """{category: {column: share}} over EVAL_PROMPTS x seeds, DDIM 30 steps, CFG 7.5."""
    out = {}
    for cat, texts in tw.EVAL_PROMPTS.items():
        rows = []
        for seed in seeds:
            images = sample.generate(pipe, texts, 30, 7.5, tw.SIZE, "ddim", seed, progress=False)
            rows += [reading(img, p) for img, p in zip(tw.to_uint8(images), texts)]
        out[cat] = {c: float(np.mean([r[c] for r in rows])) for c in COLUMNS}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora", default="", help="comma-separated LoRA files (the base is always in)")
    ap.add_argument("--seeds", type=int, default=4, help="sampling seeds 0..N-1")
    ap.add_argument("--out", help="also write the table to this Markdown file")
    a = ap.parse_args()
    models = [("base model", None)] + [(f, f) for f in a.lora.split(",") if f]
    lines = ["| model | category | " + " | ".join(COLUMNS) + " |",
             "|---|---|" + "---|" * len(COLUMNS)]
    for name, lora in models:
        table = breakdown(sample.load_or_exit(toy.MODEL, lora=lora), range(a.seeds))
        for cat, row in table.items():
            lines.append(f"| {name} | {cat} | " + " | ".join(f"{100 * row[c]:.1f}" for c in COLUMNS)
                         + " |")
        print("\n".join(lines[-len(table):]), flush=True)
    print("\n".join(lines))
    if a.out:
        with open(a.out + ".tmp", "w") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(a.out + ".tmp", a.out)


if __name__ == "__main__":
    main()
