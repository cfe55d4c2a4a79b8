"""What fits where: plan.py on the official setups (fake tensors: no weights, no memory).

Each row is one `python plan.py` run (train.py's own step, twice, on fake tensors at the real
architectures: UNet, discriminator, VAE, text encoders, BLIP-large, attention maps); `--check`
instead compares the estimate with the same run on random real weights (`plan.py --real`), where the
real run fits in CPU memory.
Usage: python bench/bench_plan.py [--models sd15,sdxl] [--grid 5:1,5:0,1:1] [--batch 1]
       python bench/bench_plan.py --check tiny,tiny-sdxl --size 64
"""
import argparse
import contextlib
import io
import json
import os
import sys
import warnings

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import plan  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(__file__), "..", "prompts.txt")


def run(model, K, ckpt, batch, size, mode, extra=()):
    argv = ["--model", model, *(["--real"] if mode == "real" else []), "--prompts", PROMPTS,
            "--size", str(size), "--grad_steps", str(K), "--total_steps", "50",
            "--batch", str(batch), "--checkpointing" if ckpt else "--no-checkpointing",
            "--rank", "128", *extra]
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
    a = ap.parse_args()
    extra = ["--captioner", a.captioner] if a.captioner else []
    if a.check:
        print("| model | size | K | ckpt | estimate GB | tracked real GB | error | RSS rise GB |")
        print("|---|---|---|---|---|---|---|---|")
        extra += ["--precision", "fp32"]  # CPU has no bf16 antialiased bicubic (captioner)
        for model in a.check.split(","):
            for case in a.grid.split(","):
                K, ck = map(int, case.split(":"))
                est, _ = run(model, K, ck, a.batch, a.size, "fake", extra)
                real, _ = run(model, K, ck, a.batch, a.size, "real", extra)
                err = est["peak"] / real["peak"] - 1
                print(f"| {model} | {a.size} | {K} | {ck} | {est['peak']:.3f} | {real['peak']:.3f}"
                      f" | {100 * err:+.1f}% | {real['rss_rise']:.2f} |", flush=True)
        return
    print("| setup | K | ckpt | batch | weights | grads+AdamW | activations | peak GB |"
          " TFLOP/step | batch in 24/40/80 GB | h / 2000 steps (A100, H100) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for model in a.models.split(","):
        for case in a.grid.split(","):
            K, ck = map(int, case.split(":"))
            r, text = run(model, K, ck, a.batch, a.size, "fake", extra)
            hours = [r["flops"] * 2000 / (tf * 1e12 * plan.UTILISATION) / 3600
                     for name, _, tf in plan.GPUS if name in ("A100 80GB", "H100 SXM")]
            fit = "/".join(str(r["batch_fit"][gb]) for gb in (24, 40, 80))
            print(f"| {model} {a.size}px | {K} | {ck} | {a.batch} | {r['weights']:.1f} | "
                  f"{r['optimiser']:.1f} | {r['activations']:.1f} | {r['peak']:.1f} | "
                  f"{r['flops'] / 1e12:.0f} | {fit} | {hours[0]:.1f}, {hours[1]:.1f} |", flush=True)
            print(json.dumps({"model": model, "K": K, "ckpt": ck, **r}), file=sys.stderr)


if __name__ == "__main__":
    main()
