"""One command for a lent GPU: our UNet against diffusers', and a real CoMat step against the plan.

1. UNet forward and forward+backward (LoRA 128 on both, input detached, batch 2, bf16 autocast):
   ours vs diffusers' UNet2DConditionModel on the same random weights, in this process: time and
   peak memory ratios, and the outputs' max abs difference in fp32 and in bf16.
2. train.py's own step (train.setup / losses / update) on random weights at the official
   architectures (UNet, VAE, text encoders, BLIP-large, discriminator; random segmenter masks, as
   plan.py does): measured peak (torch.cuda.max_memory_allocated) and seconds per step (median
   after a warm-up) next to plan.py's fake-tensor estimate of the same configuration, as a ratio;
   then the largest batch that runs (memory does not depend on T, so the search runs T = K).
Usage: python bench/gpu_check.py [--out gpu_check]        one GPU, under 8 minutes
       python bench/gpu_check.py --quick                  about a minute: fewer steps, no search
       python bench/gpu_check.py --device cpu --tiny      tiny presets on the CPU (tests run it)
Writes OUT.json and OUT.md (temp names, then renamed).
"""
import argparse
import contextlib
import io
import json
import multiprocessing
import os
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import replace

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import plan  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402
import unet as U  # noqa: E402

PROMPTS = os.path.join(os.path.dirname(__file__), "..", "prompts.txt")
GiB = 2**30


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


@contextlib.contextmanager
def rise_of(device):
    """Peak bytes allocated inside the block over what was allocated before it, in box[0]: the
    CUDA allocator's count, or on the CPU the planner's storage tracker (the same quantity,
    without allocator rounding)."""
    box = [0]
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield box
        box[0] = torch.cuda.max_memory_allocated() - base
    else:
        with plan.Tracker() as tracker:
            yield box
        box[0] = tracker.peak


def timed(fn, device, iters):
    """Median seconds of fn() over iters calls after one warm-up, and the calls' peak rise."""
    fn()
    times = []
    with rise_of(device) as rise:
        for _ in range(iters):
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), rise[0]


def estimate(argv, rules):
    """plan.py's fake-tensor estimate (quietly); runs in a worker process beside the GPU work."""
    with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return plan.plan(train.parse(argv), rules=rules)


def unet_pair(cfg, device):
    """Our UNet and diffusers', same random weights, each with a rank-128 LoRA (B = 0)."""
    from oracle import diffusers_unet
    from peft import LoraConfig
    torch.manual_seed(0)
    ours = U.UNet(cfg).to(device)
    theirs = diffusers_unet(cfg).to(device)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    U.add_lora(ours, 128)
    theirs.requires_grad_(False)
    theirs.add_adapter(LoraConfig(r=128, lora_alpha=128, init_lora_weights=True,
                                  target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return ours, theirs


def unet_check(name, cfg, side, device, iters):
    """Rows of part 1 for one config at latents side x side, batch 2."""
    ours, theirs = unet_pair(cfg, device)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, cfg.in_channels, side, side, generator=g).to(device)
    ctx = torch.randn(2, 77, cfg.ctx_dim, generator=g).to(device)
    t = torch.full((2,), 500, device=device)
    pooled = ids = None
    if cfg.adm_dim:
        pooled = torch.randn(2, cfg.adm_dim - 6 * cfg.time_id_dim, generator=g).to(device)
        ids = torch.tensor([[8.0 * side] * 2 + [0.0, 0.0] + [8.0 * side] * 2] * 2).to(device)
    added = {"text_embeds": pooled, "time_ids": ids} if cfg.adm_dim else None
    calls = {"ours": lambda: ours(x, t, ctx, pooled, ids),
             "diffusers": lambda: theirs(x, t, ctx, added_cond_kwargs=added).sample}
    dev = device.split(":")[0]
    diff = {}
    with torch.no_grad():
        for prec in ("fp32", "bf16"):
            with torch.autocast(dev, torch.bfloat16, enabled=prec == "bf16"):
                diff[prec] = (calls["ours"]().float() - calls["diffusers"]().float()).abs().max()
    rows = []
    for mode in ("forward", "fwd+bwd"):
        res = {}
        for impl, call in calls.items():
            def step():
                with torch.autocast(dev, torch.bfloat16):
                    if mode == "forward":
                        with torch.no_grad():
                            return call()
                    call().float().mean().backward()  # input detached: grads reach the LoRA
            res[impl] = timed(step, device, iters)
            for m in (ours, theirs):
                m.zero_grad(set_to_none=True)
        rows.append({"config": name, "latent": side, "mode": mode,
                     "ours_s": res["ours"][0], "diffusers_s": res["diffusers"][0],
                     "time_ratio": res["ours"][0] / res["diffusers"][0],
                     "ours_peak_gib": res["ours"][1] / GiB,
                     "diffusers_peak_gib": res["diffusers"][1] / GiB,
                     "peak_ratio": res["ours"][1] / max(res["diffusers"][1], 1),
                     "maxdiff_fp32": diff["fp32"].item(), "maxdiff_bf16": diff["bf16"].item()})
    return rows


class Inline:
    """ProcessPoolExecutor's submit, in this process (tiny plans take seconds)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def submit(self, fn, *args):
        done = Future()
        done.set_result(fn(*args))
        return done


def step_check(label, argv, device, iters, est, max_batch):
    """Part 2 for one configuration: a real step's peak and time against the plan's estimate."""
    cfg = train.parse(argv)
    dtype = torch.bfloat16 if cfg.precision in ("bf16", "auto") else torch.float32
    cuda = device.startswith("cuda")
    # CPU: the planner's tracker counts every storage from before the models are built, as
    # plan.py --real does (a count started later misses the frees of older storages)
    with (contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings(),
          contextlib.nullcontext() if cuda else plan.Tracker() as tracker):
        warnings.simplefilter("ignore")
        prompts = sample.read_prompts(cfg.prompts)
        with torch.device(device):  # random init on the GPU: minutes faster than on the CPU
            pipe = plan.pipeline(cfg.model, device, dtype)
            caps = [plan.captioner(c, device, dtype)
                    for c in train.captioner_paths(cfg.captioner) or [""]]
        run = train.setup(replace(cfg, out=tempfile.mkdtemp(prefix="gpu-check-")), pipe, caps,
                          plan.masks, prompts, device, dtype)
        reals = torch.randn(len(prompts), *run.lat_shape)
        state = {"step": 0}

        def one_step(r=run):
            idx = [j % len(prompts) for j in range(r.cfg.batch)]
            train.update(r, train.losses(r, idx, state["step"]), reals, idx)
            state["step"] += 1
            sync(device)
        one_step()  # warm-up: creates the optimiser state
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        else:
            tracker.peak = tracker.live
        times = []
        for _ in range(iters):
            t0 = time.perf_counter()
            one_step()
            times.append(time.perf_counter() - t0)
        sec = statistics.median(times)
        peak = torch.cuda.max_memory_allocated() if cuda else tracker.peak
    largest = None
    if max_batch > cfg.batch:  # memory is flat in T: search at T = K
        fast = run._replace(cfg=replace(cfg, total_steps=cfg.grad_steps),
                            ts=sample.timesteps(cfg.grad_steps))
        largest = cfg.batch
        for b in range(cfg.batch + 1, max_batch + 1):
            try:
                one_step(fast._replace(cfg=replace(fast.cfg, batch=b)))
                largest = b
            except torch.OutOfMemoryError:
                break
            finally:
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()
    row = {"setup": label, "measured_peak_gib": peak / GiB, "planned_peak_gib": est["peak"],
           "measured_over_planned": peak / GiB / est["peak"], "sec_per_step": sec,
           "tflop_per_step": est["flops"] / 1e12, "largest_batch": largest,
           "planned_batch_fit": est["batch_fit"]}
    del run, pipe, caps
    return row


def markdown(device_name, unet_rows, step_rows):
    lines = [f"GPU check on {device_name} (torch {torch.__version__})", "",
             "| UNet | latent | mode | ours s | diffusers s | ours/diffusers time | "
             "peak GiB ours / diffusers | max abs diff fp32 / bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for r in unet_rows:
        lines.append(f"| {r['config']} | {r['latent']} | {r['mode']} | {r['ours_s']:.4f} | "
                     f"{r['diffusers_s']:.4f} | {r['time_ratio']:.2f}x | "
                     f"{r['ours_peak_gib']:.2f} / {r['diffusers_peak_gib']:.2f} | "
                     f"{r['maxdiff_fp32']:.1e} / {r['maxdiff_bf16']:.1e} |")
    lines += ["", "| training step | measured peak GiB | planned GiB | measured/planned | "
              "s/step | largest batch that ran |", "|---|---|---|---|---|---|"]
    for r in step_rows:
        lines.append(f"| {r['setup']} | {r['measured_peak_gib']:.2f} | "
                     f"{r['planned_peak_gib']:.2f} | {r['measured_over_planned']:.3f} | "
                     f"{r['sec_per_step']:.2f} | {r['largest_batch'] or '-'} |")
    return "\n".join(lines) + "\n"


def write(path, text):
    with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="tiny presets (a CPU test)")
    ap.add_argument("--quick", action="store_true", help="about a minute on a GPU")
    ap.add_argument("--out", default="gpu_check", help="writes OUT.json and OUT.md")
    a = ap.parse_args(argv)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here (run it on a GPU, or --device cpu --tiny)")
    iters = 1 if a.quick or a.tiny else 3
    rules = "cuda" if a.device.startswith("cuda") else "cpu"  # the device's own autocast rules
    common = ["--rank", "128", "--grad_steps", "5", "--checkpointing", "--precision", "bf16"]
    if a.tiny:
        from oracle import tiny_blip
        captioner = tiny_blip(tempfile.mkdtemp(prefix="gpu-check-blip-"))
        unets = [("tiny-sdxl", U.TINY_SDXL, 8)]
        steps = [("tiny-sdxl 64 px, batch 1", ["--model", "tiny-sdxl", "--size", "64",
                                               "--batch", "1", *common, "--total_steps", "2",
                                               "--grad_steps", "1"], 2)]
    else:
        captioner = ""  # BLIP-large's architecture, random weights
        t = ["--total_steps", "10"] if a.quick else []
        unets = [("sd15", U.SD15, 64), ("sdxl", U.SDXL, 128)][:1 if a.quick else 2]
        steps = [("sdxl 512 px, batch 1", ["--model", "sdxl", "--size", "512", "--batch", "1",
                                           *t, *common], 1 if a.quick else 8),
                 ("sdxl 512 px, batch 1, --disc shared", ["--model", "sdxl", "--size", "512",
                  "--batch", "1", "--disc", "shared", *t, *common], 1),
                 ("sd15 512 px, official batch 4", ["--model", "sd15", "--size", "512",
                                                    "--batch", "4", *t, *common], 1)]
        steps = steps[:1] if a.quick else steps
    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else "CPU"
    steps = [(label, ["--prompts", PROMPTS, "--captioner", captioner, *args], b)
             for label, args, b in steps]
    # the plans (minutes of CPU each at full size) run in worker processes beside the GPU work
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(len(steps), mp_context=spawn) if not a.tiny else Inline() as pool:
        plans = [pool.submit(estimate, args, rules) for _, args, _ in steps]
        unet_rows = [r for n, cfg, side in unets
                     for r in unet_check(n, cfg, side, a.device, iters)]
        step_rows = []
        for (label, args, max_batch), est in zip(steps, plans):
            step_rows.append(step_check(label, args, a.device, iters, est.result(), max_batch))
            print(json.dumps(step_rows[-1]), flush=True)
    table = markdown(name, unet_rows, step_rows)
    write(a.out + ".json", json.dumps({"device": name, "torch": torch.__version__,
                                       "unet": unet_rows, "steps": step_rows}, indent=1))
    write(a.out + ".md", table)
    print(table)
    return unet_rows, step_rows


if __name__ == "__main__":
    main()
