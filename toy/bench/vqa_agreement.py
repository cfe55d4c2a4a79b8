"""Does T2I-CompBench's colour score (evaluate.py on the toy BLIP-VQA, toy/model/vqa) agree with
the toy world's analytic evaluator? Two measurements, both printed as Markdown tables
(docs/compbench.md):
1. the VQA's yes/no accuracy against world.detect on held-out pictures (scenes of the
   evaluation prompts, which no training scene shows; clean, drawn wrongly and corrupted as in
   training), for "yes", swapped-binding "no" and other "no" questions;
2. per image, on the base toy model's and a fine-tuned LoRA's images of the toy colour prompts
   (`evaluate.py --data toy`, 24 prompts x 10 seeds): the mean BLIP-VQA score, the analytic
   evaluator's objects_ok (both prompt objects found, colour and shape: what the two questions
   ask) and correct (also no extra shape), and Spearman's rank correlation between them.
Usage: python -m toy.bench.vqa_agreement --lora runs/val/lr3e-4/lora.safetensors [--out DIR]
"""
import argparse
import json
import os
import re

import numpy as np
import torch
from PIL import Image

import compbench as cb
import evaluate as ev
import toy
from toy import build as tb
from toy import world as tw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def ranks(a) -> np.ndarray:
    """Ranks 0..n-1 of a, ties sharing their mean rank (what Spearman's rho needs)."""
    a = np.asarray(a, dtype=np.float64)
    r = np.empty(len(a))
    r[a.argsort(kind="stable")] = np.arange(len(a))
    _, tie = np.unique(a, return_inverse=True)
    return (np.bincount(tie, r) / np.bincount(tie))[tie]


def spearman(a, b) -> float:
    """Spearman's rho: Pearson's correlation of the ranks."""
    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def heldout_accuracy(vqa, n: int, seed: int) -> dict[str, float]:
    """Accuracy of vqa's answer (P(yes) > 0.5) against world.detect on n held-out pictures,
    per question kind: every found object ("yes"), its swapped binding ("no, swapped"), and
    one absent object drawn as in training (build.absent, "no, other")."""
    rng, g = np.random.default_rng([seed, 9]), torch.Generator().manual_seed(seed)
    specs = [tw.parse_prompt(p) for p in rng.choice(sorted(tb.HELD_OUT), n)]
    scenes = [tw.place(s, rng) for s in specs]
    pics = [tw.render_odd(s, str(rng.choice(tw.ODD_KINDS)), rng) if rng.random() < tb.ODD_P
            else tw.render(s) for s in scenes]
    imgs = tw.to_uint8(tb.corrupt(tw.to_float(np.stack(pics)), g))
    hits = {"yes": [], "no, swapped": [], "no, other": []}
    for i in range(0, n, 64):
        qs, owner, kinds = [], [], []
        for b, img in enumerate(imgs[i:i + 64]):
            found = {(f.colour, f.shape) for f in tw.detect(img)}
            swaps = sorted({(a[0], c[1]) for a in found for c in found} - found)
            asks = [(o, "yes") for o in sorted(found)] + [(o, "no, swapped") for o in swaps]
            for (c, s), kind in asks + [(tb.absent(found, rng), "no, other")]:
                qs.append(f"a {c} {s}?")
                owner.append(b)
                kinds.append(kind)
        p = vqa([Image.fromarray(im) for im in imgs[i:i + 64]], qs, owner)
        for pk, kind in zip(p, kinds):
            hits[kind].append((pk > 0.5) == (kind == "yes"))
    out = {k: float(np.mean(v)) for k, v in hits.items()}
    out["all"] = float(np.mean([h for v in hits.values() for h in v]))
    return out


def agreement(folder: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image of folder/color: the BLIP-VQA score evaluate.py wrote, and the analytic
    evaluator's objects_ok and correct on the same PNG."""
    blip = json.load(open(os.path.join(folder, "color", cb.OUT["blip"], "vqa_result.json")))
    rows = [tw.score(np.array(Image.open(path).convert("RGB")), p)
            for p, path in cb.read_samples(os.path.join(folder, "color"))]
    return (np.array([float(r["answer"]) for r in blip]),
            np.array([r["objects_ok"] for r in rows], dtype=float),
            np.array([r["correct"] for r in rows], dtype=float))


def main(argv=None):
    ap = argparse.ArgumentParser(description="Toy BLIP-VQA vs the toy world's analytic evaluator.")
    ap.add_argument("--lora", required=True, help="a fine-tuned toy LoRA (.safetensors)")
    ap.add_argument("--out", default="runs/toy-vqa", help="evaluate.py output root per model")
    ap.add_argument("--blip", default=toy.VQA, help="the toy BLIP-VQA")
    ap.add_argument("--heldout", type=int, default=2000, help="held-out pictures (accuracy)")
    ap.add_argument("--n", type=int, default=10, help="images per prompt (seeds 42..)")
    a = ap.parse_args(argv)
    model = ev.BlipForQuestionAnswering.from_pretrained(a.blip, local_files_only=True).float()
    tok = ev.AutoTokenizer.from_pretrained(a.blip, local_files_only=True)
    acc = heldout_accuracy(ev.blip_vqa(model.eval(), tok, tw.SIZE), a.heldout, 0)
    print(f"\nheld-out yes/no accuracy ({a.heldout} pictures), %:\n| " + " | ".join(acc)
          + " |\n|" + "---|" * len(acc) + "\n| "
          + " | ".join(f"{100 * v:.1f}" for v in acc.values()) + " |")
    cols, pooled = [], []
    # one folder per LoRA path, so images of another LoRA are never rescored as this one's
    lora_dir = "lora-" + re.sub(r"[^A-Za-z0-9.-]+", "-", os.path.abspath(a.lora)).strip("-")
    for name, lora in (("toy", None), (lora_dir, a.lora)):
        folder = os.path.join(a.out, name)
        flags = ["--model", toy.MODEL, "--data", toy.DATA, "--categories", "color",
                 "--blip", a.blip, "--blip-size", str(tw.SIZE), "--n", str(a.n), "--batch", "24"]
        flags += ["--lora", lora] if lora else []
        print(f"python evaluate.py {folder} {' '.join(flags)}")
        ev.main([folder, *flags])
        cols.append((name if lora is None else f"toy + LoRA ({lora})", *agreement(folder)))
        pooled.append(cols[-1][1:])
    both = [np.concatenate(x) for x in zip(*pooled)]
    print("\n| model | images | BLIP-VQA colour | analytic objects_ok | analytic correct | "
          "Spearman (BLIP, objects_ok) | Spearman (BLIP, correct) |\n|---|---|---|---|---|---|---|")
    for name, blip, ok, correct in cols + [("both, pooled", *both)]:
        print(f"| {name} | {len(blip)} | {blip.mean():.4f} | {ok.mean():.4f} | "
              f"{correct.mean():.4f} | {spearman(blip, ok):.3f} | {spearman(blip, correct):.3f} |")


if __name__ == "__main__":
    main()
