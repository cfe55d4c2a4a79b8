"""Score a toy-world model or fine-tune: accuracy per category on the fixed evaluation prompts
(or on the validation prompts that training settings are chosen on), counted by the analytic
evaluator (toy/world.py), the fidelity and the missing-object share; --out also writes a PNG of
sampling seed 0.
Usage: python -m toy.eval [--lora runs/comat/lora.safetensors | --unet F] [--model M] [--seeds N]
                          [--split eval|val] [--out F.json]
"""
import argparse
import json
import os

import torch

import sample
import toy
import viz
from toy import world


def main(argv=None):
    ap = argparse.ArgumentParser(description="Toy world: evaluate a model.")
    ap.add_argument("--out", help="JSON file for the scores")
    ap.add_argument("--model", default=toy.MODEL, help="any model sample.py loads")
    ap.add_argument("--lora", help="LoRA weights to merge")
    ap.add_argument("--unet", help="fine-tuned UNet weights")
    ap.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt")
    ap.add_argument("--split", choices=["eval", "val"], default="eval",
                    help="eval: the fixed evaluation prompts; val: the validation prompts")
    ap.add_argument("--steps", type=int, default=30, help="DDIM steps")
    ap.add_argument("--cfg", type=float, default=7.5, help="guidance scale")
    a = ap.parse_args(argv)
    pipe = sample.load_or_exit(a.model, a.unet, a.lora)
    first = []

    def generate(prompts, seed):
        images = sample.generate(pipe, prompts, a.steps, a.cfg, world.SIZE, "ddim", seed,
                                 progress=False)
        if seed == 0:
            first.append(images)
        return images
    prompts = world.EVAL_PROMPTS if a.split == "eval" else world.VAL_PROMPTS
    scores = world.evaluate(generate, range(a.seeds), prompts)
    print(json.dumps({k: round(v, 4) for k, v in scores.items()}))
    if a.out:
        os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
        with open(a.out + ".tmp", "w") as f:
            json.dump({"model": a.model, "lora": a.lora, "unet": a.unet, "seeds": a.seeds,
                       "split": a.split,
                       "steps": a.steps, "cfg": a.cfg, **scores}, f, indent=1)
        os.replace(a.out + ".tmp", a.out)
        viz.save_images(torch.cat(first), os.path.splitext(a.out)[0] + ".png", cols=6)


if __name__ == "__main__":
    main()
