"""What fits where: plan.py on the official setups (fake tensors: no weights, no memory).

Each row is one `python plan.py` run (train.py's own step, twice, on fake tensors at the real
architectures: UNet, discriminator, VAE, text encoders, BLIP-large, attention maps); `--check`
instead compares the estimate with the same run on random real weights (`plan.py --real`), where the
real run fits in CPU memory.
`--decode` plans the SDXL VAE decode's forward and backward alone (the step's largest activation
block at 512 px) under both autocast rule sets, with and without checkpointing its blocks.
Usage: python bench/bench_plan.py [--models sd15,sdxl] [--grid 5:1,5:0,1:1] [--batch 1]
          [--rules cuda] [--extra "--disc shared"]
       python bench/bench_plan.py --check tiny,tiny-sdxl --size 64
       python bench/bench_plan.py --decode
"""
import argparse
import contextlib
import io
import json
import os
import sys
import warnings

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import plan  # noqa: E402
import vae as V  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(__file__), "..", "prompts.txt")


def decode_peak(rules, ckpt, side=64):
    """GiB of the SDXL VAE decode's forward + backward at latents side x side, batch 1, bf16
    autocast, on fake tensors, over its weights."""
    with plan.fake_mode(), plan.CudaRules() if rules == "cuda" else contextlib.nullcontext():
        with torch.device("meta"):
            vae = V.VAE(V.SDXL_VAE)
        vae = plan.materialise(vae, "cpu", torch.bfloat16)
        vae.decoder.gradient_checkpointing = ckpt
        z = torch.randn(1, 4, side, side, requires_grad=True)
        with plan.Tracker() as tracker:
            with torch.autocast("cpu", torch.bfloat16):
                img = vae.decode(z)
            img.float().square().mean().backward()
    return tracker.peak / plan.GiB


def run(model, K, ckpt, batch, size, mode, extra=(), rules=None):
    argv = ["--model", model, *(["--real"] if mode == "real" else []), "--prompts", PROMPTS,
            "--size", str(size), "--grad_steps", str(K), "--total_steps", "50",
            "--batch", str(batch), "--checkpointing" if ckpt else "--no-checkpointing",
            "--rank", "128", *extra, *(["--rules", rules] if rules else [])]
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()) as out:
        warnings.simplefilter("ignore")
        r = plan.main(argv)
    return r, out.getvalue()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="sd15,sdxl")
    ap.add_argument("--grid", default="5:1,5:0,1:1", help="K:checkpointing pairs")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--check", default="", help="models to measure for real as well")
    ap.add_argument("--captioner", default="", help="BLIP folder (default: BLIP-large's config)")
    ap.add_argument("--rules", choices=("cuda", "cpu"), help="autocast rules (plan.py's default)")
    ap.add_argument("--extra", default="", help="more train.py flags, e.g. '--disc shared'")
    ap.add_argument("--decode", action="store_true", help="the SDXL VAE decode alone")
    a = ap.parse_args()
    if a.decode:
        print("| rules | decoder checkpointing | decode fwd+bwd peak GiB (SDXL VAE, 512 px) |")
        print("|---|---|---|")
        for rules in ("cpu", "cuda"):
            for ckpt in (False, True):
                print(f"| {rules} | {'on' if ckpt else 'off'} | {decode_peak(rules, ckpt):.2f} |")
        return
    extra = (["--captioner", a.captioner] if a.captioner else []) + a.extra.split()
    if a.check:
        print("| model | size | K | ckpt | estimate GB | tracked real GB | error | RSS rise GB |")
        print("|---|---|---|---|---|---|---|---|")
        extra += ["--precision", "fp32", "--rules", "cpu"]  # as the checks were made
        for model in a.check.split(","):
            for case in a.grid.split(","):
                K, ck = map(int, case.split(":"))
                est, _ = run(model, K, ck, a.batch, a.size, "fake", extra)
                real, _ = run(model, K, ck, a.batch, a.size, "real", extra)
                err = est["peak"] / real["peak"] - 1
                print(f"| {model} | {a.size} | {K} | {ck} | {est['peak']:.3f} | {real['peak']:.3f}"
                      f" | {100 * err:+.1f}% | {real['rss_rise']:.2f} |", flush=True)
        return
    print("| setup | K | ckpt | batch | weights | grads+AdamW | activations | peak GiB |"
          " TFLOP/step | batch in 24/40/80 GB | h / 2000 steps (A100, H100) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for case in a.grid.split(","):
            K, ck = map(int, case.split(":"))
            r, text = run(model, K, ck, a.batch, a.size, "fake", extra, a.rules)
            hours = [r["flops"] * 2000 / (tf * 1e12 * plan.UTILISATION) / 3600
                     for name, _, tf in plan.GPUS if name in ("A100 80GB", "H100 SXM")]
            fit = "/".join(str(r["batch_fit"][name]) for name in ("RTX 4090", "A100 40GB",
                                                                   "A100 80GB"))
            print(f"| {model} {a.size}px {r['rules'].upper()} {a.extra} | {K} | {ck} | {a.batch} | "
                  f"{r['weights']:.1f} | "
                  f"{r['optimiser']:.1f} | {r['activations']:.1f} | {r['peak']:.1f} | "
                  f"{r['flops'] / 1e12:.0f} | {fit} | {hours[0]:.1f}, {hours[1]:.1f} |", flush=True)
            print(json.dumps({"model": model, "K": K, "ckpt": ck, **r}), file=sys.stderr)


if __name__ == "__main__":
    main()
