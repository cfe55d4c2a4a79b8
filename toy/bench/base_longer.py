"""Would a stronger toy base model draw both objects of a held-out pair more often? Continues the
shipped UNet and text encoder (toy/) for N more steps of the base stage's own training
(build.train_more, the build's "more" stage: same incomplete captions, batch, loss and lr
schedule, a fresh AdamW, a new pool of scenes encoded by the shipped VAE at its own scale), writes
the result as a model folder (toy/ with unet/ and text_encoder/ replaced), and prints
toy_failures' breakdown of the shipped and the continued model on the evaluation prompts.
Usage: python -m toy.bench.base_longer [--steps 3000] [--out runs/toy-longer] [--seeds 2]
"""
import argparse
import copy
import os
import shutil

import toy
import weights
from toy import build as tb
from toy.bench import failures as toy_failures

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000,
                    help="more UNet steps (the build: 9750, then 6000 more)")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "toy-longer"))
    ap.add_argument("--seeds", type=int, default=2, help="sampling seeds of the breakdown")
    ap.add_argument("--seed", type=int, default=1, help="training seed (the build's more stage: 1)")
    a = ap.parse_args()
    unet, enc = tb.train_more(toy.MODEL, a.steps, a.seed)
    tmp = a.out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(toy.MODEL, tmp)
    for part in ("unet", "text_encoder"):
        shutil.rmtree(os.path.join(tmp, part))
    tb.save_part(os.path.join(tmp, "unet"), tb.unet_json(tb.UNET_CFG, 16), unet)
    copy.deepcopy(enc).half().save_pretrained(os.path.join(tmp, "text_encoder"))
    shutil.rmtree(a.out, ignore_errors=True)
    os.replace(tmp, a.out)
    lines = []
    for name, folder in (("shipped base", toy.MODEL), (f"+ {a.steps} steps", a.out)):
        table = toy_failures.breakdown(weights.load(folder), range(a.seeds))
        lines += [f"| {name} | {cat} | " + " | ".join(f"{100 * row[c]:.1f}"
                                                     for c in toy_failures.COLUMNS) + " |"
                  for cat, row in table.items()]
    print("| model | category | " + " | ".join(toy_failures.COLUMNS) + " |")
    print("|---|---|" + "---|" * len(toy_failures.COLUMNS))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
