"""Peak memory and time of one CoMat generator step against T (denoising steps) and K (grad steps).

The step is train.py's expensive part: sample with gradient on K of T steps (CFG batch, LoRA),
decode with gradient through the VAE, backward. A stand-in scalar loss on the image replaces the
captioner (whose cost does not depend on T or K). Each case runs in a fresh subprocess; memory is
the rise of the peak over the setup's peak (max RSS on CPU; max allocated on CUDA).
Usage: python bench/bench_train.py [--config tiny|sd15|sdxl] [--latent 16] [--device cpu]
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import comat  # noqa: E402
import sample  # noqa: E402
import unet as U  # noqa: E402
import vae as V  # noqa: E402

CONFIGS = {"tiny": (U.TINY_SD15, V.TINY_VAE), "sd15": (U.SD15, V.SD15_VAE),
           "sdxl": (U.SDXL, V.SDXL_VAE)}


def peak(device):
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(name, T, K, ckpt, latent, device, rank):
    ucfg, vcfg = CONFIGS[name]
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    unet, vae = U.UNet(ucfg).to(device, dtype), V.VAE(vcfg).to(device, dtype)
    vae.requires_grad_(False)
    U.add_lora(unet, rank)
    unet.gradient_checkpointing = ckpt
    B = 1
    ctx = torch.randn(B, 77, ucfg.ctx_dim, device=device, dtype=dtype)
    extra = ()
    if ucfg.adm_dim:
        pooled = torch.randn(B, ucfg.adm_dim - 6 * ucfg.time_id_dim, device=device, dtype=dtype)
        ids = sample.time_ids(8 * latent, 8 * latent, B).to(device, dtype)
        extra = (pooled, torch.zeros_like(pooled), ids)
    eps = sample.cfg_fn(unet, ctx, torch.zeros_like(ctx), 7.5, *extra)
    pipe = type("P", (), {"vae": vae})  # decode() only reads pipe.vae
    grads = comat.pick_grad_steps("comat", T, K, random.Random(0))
    x = torch.randn(B, ucfg.in_channels, latent, latent, device=device, dtype=dtype)
    abar, ts = sample.alphas_cumprod(), sample.timesteps(T)
    base = peak(device)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autocast(device, torch.bfloat16, enabled=device == "cuda"):
        z = sample.denoise(eps, x, ts, abar, "ddpm", grads, detach=False)
        loss = sample.decode(pipe, z).float().square().mean()
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    rise = peak(device) if device == "cuda" else peak(device) - base
    print(json.dumps({"sec": sec, "gb": rise / 2**30}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--latent", type=int, default=16, help="latent side (image = 8x for SD)")
    ap.add_argument("--rank", type=int, default=4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--grid", default="10:1,10:5,50:1,50:5,50:10")
    ap.add_argument("--child", nargs=3)
    a = ap.parse_args()
    if a.child:
        T, K, ckpt = a.child
        return child(a.config, int(T), int(K), ckpt == "1", a.latent, a.device, a.rank)
    print(f"config={a.config} latent={a.latent} device={a.device} LoRA rank={a.rank}")
    print(f"{'T':>4} {'K':>4} {'ckpt':>5} {'sec':>8} {'peak rise GB':>13}")
    for case in a.grid.split(","):
        T, K = case.split(":")
        for ckpt in ("0", "1"):
            cmd = [sys.executable, __file__, "--child", T, K, ckpt, "--config", a.config,
                   "--latent", str(a.latent), "--device", a.device, "--rank", str(a.rank)]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{T:>4} {K:>4} {ckpt:>5} {r['sec']:8.2f} {r['gb']:13.3f}", flush=True)


if __name__ == "__main__":
    main()
