"""Time and peak memory of our UNet against diffusers' UNet2DConditionModel: same config, weights.

Each measurement runs in its own subprocess so the peak memory (max RSS on CPU, max allocated on
CUDA) belongs to one model and one mode. Forward runs under no_grad; forward+backward backprops
through all parameters. "ours-bf16" is our UNet (fp32 weights) under bf16 autocast.
Usage: python bench/bench_unet.py [--configs tiny,sd15] [--size 32] [--iters 3] [--device cpu]
       python bench/bench_unet.py --configs sdxl --size 128 --device cuda     (on a GPU machine)
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
import unet as U  # noqa: E402

CONFIGS = {"tiny": U.TINY_SDXL, "sd15": U.SD15, "sdxl": U.SDXL}


def build(impl, cfg, device):
    # diffusers is imported for both, so its imports count equally in the peak RSS
    from diffusers import UNet2DConditionModel  # noqa: F401
    from oracle import diffusers_unet
    with torch.device("meta"):
        return U.UNet(cfg) if impl.startswith("ours") else diffusers_unet(cfg)


def inputs(cfg, size, device, batch=2):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cfg.in_channels, size, size, generator=g).to(device)
    ctx = torch.randn(batch, 77, cfg.ctx_dim, generator=g).to(device)
    extra = {}
    if cfg.adm_dim:
        pooled = torch.randn(batch, cfg.adm_dim - 6 * cfg.time_id_dim, generator=g).to(device)
        ids = torch.tensor([[8.0 * size] * 2 + [0.0, 0.0] + [8.0 * size] * 2] * batch).to(device)
        extra = {"pooled": pooled, "ids": ids}
    return x, ctx, extra


def measure(impl, name, mode, size, iters, device, weights):
    """Runs in the child: load weights, time `iters` calls after one warm-up, report peak memory."""
    from safetensors.torch import load_file
    cfg = CONFIGS[name]
    model = build(impl, cfg, device)
    model.load_state_dict(load_file(weights, device=device), strict=True, assign=True)
    x, ctx, extra = inputs(cfg, size, device)
    t = torch.full((x.shape[0],), 500, device=device)

    def call():
        if impl.startswith("ours"):
            return model(x, t, ctx, extra.get("pooled"), extra.get("ids"))
        cond = ({"text_embeds": extra["pooled"], "time_ids": extra["ids"]} if extra else None)
        return model(x, t, ctx, added_cond_kwargs=cond).sample

    def run():
        with torch.autocast(device, torch.bfloat16, enabled=impl == "ours-bf16"):
            if mode == "fwd":
                with torch.no_grad():
                    call()
            else:
                call().float().mean().backward()
                model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
    run()  # warm-up
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps({"time": statistics.median(times), "peak_gb": peak / 2**30}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--configs", default="tiny,sd15")
    ap.add_argument("--size", type=int, default=32, help="latent side (sd15/sdxl); tiny uses 32")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--child", nargs=4)
    ap.add_argument("--weights")
    a = ap.parse_args()
    if a.child:
        impl, name, mode, size = a.child
        return measure(impl, name, mode, int(size), a.iters, a.device, a.weights)

    from safetensors.torch import save_file
    print(f"device={a.device} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(f"{'config':6} {'mode':8} {'impl':10} {'time s':>8} {'peak GB':>8} {'vs diffusers':>12}")
    for name in a.configs.split(","):
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            weights = os.path.join(d, "w.safetensors")
            save_file({k: v.contiguous() for k, v in U.UNet(CONFIGS[name]).state_dict().items()},
                      weights)
            size = 32 if name == "tiny" else a.size
            for mode in ("fwd", "fwd+bwd"):
                res = {}
                for impl in ("diffusers", "ours", "ours-bf16"):
                    cmd = [sys.executable, __file__, "--child", impl, name, mode, str(size),
                           "--iters", str(a.iters), "--device", a.device, "--weights", weights]
                    out = subprocess.run(cmd, capture_output=True, text=True)
                    if out.returncode:
                        print(out.stderr[-2000:])
                        raise SystemExit(f"{impl} {name} {mode} failed")
                    res[impl] = json.loads(out.stdout.strip().splitlines()[-1])
                    ratio = res[impl]["time"] / res["diffusers"]["time"]
                    print(f"{name:6} {mode:8} {impl:10} {res[impl]['time']:8.3f} "
                          f"{res[impl]['peak_gb']:8.2f} {ratio:11.2f}x", flush=True)


if __name__ == "__main__":
    main()
