"""What attribute concentration sees in the toy world. Its losses compare each object's
cross-attention with the object's mask, resized to the map (official: antialiased bilinear, then
any coverage counts, comat.resize_masks). The toy UNet's mid/up maps are 4x4, 8x8 and 16x16 at
its 64-px images, so the masks are coarse; this prints, per map side:
  mask area    % of the map inside an object's resized mask (uniform attention scores exactly this);
  attention    % of the object tokens' attention (head mean) that falls inside the mask;
  token loss   mean (1 - attention)^2 per map and object, what comat.token_loss averages.
Maps are taken at the training run's gradient steps (20 DDIM steps, K = 5, CFG 7.5) on the first
--n prompts of prompts.txt, objects the toy segmenter finds only. It also prints the mask area the
same shapes have, clean, on the toy's maps and on SD1.5's (512-px image; mid 8, up 16, 32, 64).
Usage: python -m toy.bench.attention [--lora A.safetensors,B.safetensors] [--n 32]
"""
import argparse
import os
import random

import numpy as np
import torch

import comat
import sample
import segment
import toy
from segment import objects
from toy import world as tw

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def clean_areas(n=400) -> dict[str, float]:
    """Mask area in % of clean toy shapes per map: the toy's (64-px image) and SD1.5's (the same
    shapes drawn at 512 px)."""
    rng, out = np.random.default_rng(0), {}
    for _ in range(n // 2):
        for o in tw.sample_scene(rng, "two").objects:
            m = torch.from_numpy(tw.shape_mask(o.shape, o.cx, o.cy, o.size))[None, None]
            big = torch.nn.functional.interpolate(m.float(), size=(512, 512)) > 0.5
            out.setdefault("image", []).append(100 * m.float().mean().item())
            for name, mask, sides in (("toy", m, (4, 8, 16)), ("SD1.5", big, (8, 16, 32, 64))):
                for h in sides:
                    area = comat.resize_masks(mask, (h, h)).mean().item()
                    out.setdefault(f"{name} {h}x{h}", []).append(100 * area)
    return {k: float(np.mean(v)) for k, v in out.items()}


@torch.no_grad()
def measure(pipe, prompts, batch=8) -> dict[int, dict[str, float]]:
    """Per map side: mean mask area, attention inside, token loss (all in the units above)."""
    unet, tok = pipe.unet, pipe.tokenizers[0]
    mods = comat.loss_modules(unet, ("mid", "up"))
    ts, abar = sample.timesteps(20), sample.alphas_cumprod()
    grads = comat.pick_grad_steps("comat", 20, 5, random.Random(0))
    store_at = {ts[i] for i in grads}
    rows: dict[int, dict[str, list]] = {}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        objs = [objects(tok, p) for p in chunk]
        c, u, p, up = sample.conditioning(pipe, chunk, negative="")
        guided = sample.cfg_fn(unet, c, u, 7.5, p, up, None)
        maps = []

        def eps(x, t):
            for m in mods:
                m.store = t in store_at
            e = guided(x, t)
            if t in store_at:
                maps.extend(A[len(chunk):] for A in comat.attention_maps(mods))  # cond half
            return e
        g = torch.Generator().manual_seed(i)
        side = tw.SIZE // pipe.vae.cfg.factor  # 16: the toy VAE downsamples by 4
        x = torch.randn(len(chunk), unet.cfg.in_channels, side, side, generator=g)
        img = sample.decode(pipe, sample.denoise(eps, x, ts, abar, "ddim")).clamp(0, 1)
        for m in mods:
            m.store = False
        masks, found = segment.shapes(img, [[o.noun for o in ob] for ob in objs])
        tokens = comat.object_tokens(objs, T=tok.model_max_length)  # (B, K, T)
        keep = found & (tokens.sum(-1) > 0)  # (B, K)
        for A in maps:  # (B, heads, HW, T)
            h = int(A.shape[2] ** 0.5)
            m = comat.resize_masks(masks, (h, h))  # (B, K, HW)
            a = comat.inside_fraction(A, m)  # (B, K, T), what comat.token_loss squares
            a = (a * tokens).sum(-1) / tokens.sum(-1).clamp(min=1)  # (B, K) token mean
            r = rows.setdefault(h, {"area": [], "attention": [], "token loss": []})
            r["area"] += (100 * m.mean(-1)[keep]).tolist()
            r["attention"] += (100 * a[keep]).tolist()
            r["token loss"] += ((1 - a[keep]) ** 2).tolist()
    return {h: {k: float(np.mean(v)) for k, v in r.items()} for h, r in sorted(rows.items())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lora", default="", help="comma-separated LoRA files (default: base only)")
    ap.add_argument("--n", type=int, default=32, help="prompts of prompts.txt")
    a = ap.parse_args()
    prompts = sample.read_prompts(os.path.join(ROOT, "prompts.txt"))[:a.n]
    areas = clean_areas()
    print("clean shapes, mask area %: " + ", ".join(f"{k} {v:.1f}" for k, v in areas.items()))
    print("| model | map | mask area % | attention inside % | token loss |\n|---|---|---|---|---|")
    for lora in [""] + [f for f in a.lora.split(",") if f]:
        pipe = sample.load_or_exit(toy.MODEL, lora=lora or None)
        name = os.path.dirname(os.path.relpath(lora, os.path.join(ROOT, "runs"))) if lora else ""
        for h, r in measure(pipe, prompts).items():
            print(f"| {name or 'base'} | {h}x{h} | "
                  f"{r['area']:.1f} | {r['attention']:.1f} | {r['token loss']:.3f} |")


if __name__ == "__main__":
    main()
