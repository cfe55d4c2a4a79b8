"""CoMat fine-tuning (Jiang et al., NeurIPS 2024, arXiv 2404.03653) of SD1.5 / SDXL: one flat loop.

Each step samples images from text prompts with gradient on K of the T denoising steps, then adds
concept matching (a frozen BLIP's log-likelihood of the prompt), attribute concentration (token and
pixel cross-attention losses against Grounded-SAM masks) and fidelity preservation (a GAN whose
discriminator starts from the pretrained UNet). Defaults are the official scripts' (spec/comat.md).
Usage: python train.py --prompts prompts.txt --model sd15 --captioner blip --dino gdino --sam sam
       torchrun --nproc_per_node 8 train.py ...   (prompts split across ranks, gradients averaged)
"""
import argparse
import copy
import json
import os
import random
import tempfile
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, fields, replace

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

import comat
import plan
import sample
import toyworld
import viz
from captioner import caption_logprob, load_captioner, random_crop
from segment import align, grounded_sam, load_segmenter, objects
from unet import LoRALinear, add_lora, fold_lora, lora_state_dict
from weights import TOY, load, load_checkpoint, save_checkpoint, save_weights


@dataclass(frozen=True)
class TrainConfig:
    prompts: str = "prompts.txt"  # one prompt a line, or .jsonl lines {"prompt": ...}
    model: str = "toy"            # toy | tiny | tiny-sdxl | diffusers folder | original file
    captioner: str = ""           # BLIP folder (official: Salesforce/blip-image-captioning-large)
    dino: str = ""                # Grounding-DINO folder; empty = no attribute concentration
    sam: str = ""                 # SAM folder (box prompts; official used FastSAM)
    out: str = "runs/comat"       # checkpoints, log.jsonl, pictures
    steps: int = 2000             # optimizer steps (official 2000)
    batch: int = 4                # prompts per process per step (official SD1.5 4, SDXL 6)
    size: int = 512               # image side in pixels (official 512 for both models)
    lr: float = 5e-5              # generator AdamW lr, constant (official SD1.5 5e-5, SDXL 2e-5)
    lr_d: float = 2e-5            # discriminator lr, AdamW betas (0, 0.999) (SDXL 5e-5)
    clip: float = 0.1             # generator grad-norm clip: unusually tight, and it matters
    clip_d: float = 1.0           # discriminator grad-norm clip
    rank: int = 128               # LoRA rank on to_q/k/v/out of every attention; 0 = full fine-tune
    sampler: str = "ddpm"         # the official code trains with DDPM ancestral steps; or ddim
    total_steps: int = 50         # T denoising steps per sample
    grad_steps: int = 5           # K steps whose UNet call builds a graph
    grad_mode: str = "comat"      # comat (K evenly spaced, random offset) | last | single
    detach: bool | None = None    # detach the UNet input at those steps; None = official per model
    attn_steps: int = 2           # attention-loss steps drawn with replacement from the K
    attn_layers: str = "mid,up"   # blocks whose cross-attention feeds the losses (or add down)
    cfg: float = 7.5              # guidance scale during training, negative prompt ""
    w_cap: float = 1.0            # concept matching
    w_tok: float = 1e-3           # token-level attention loss
    w_pix: float = 5e-5           # pixel-level attention loss
    w_adv: float = 1.0            # adversarial term (official SDXL 0.5)
    smoothing: float = 0.1        # BLIP label smoothing (what official transformers 4.31 applied)
    real: str = "cache"           # discriminator's reals: cache = base-model latents made once, fly
    precision: str = "auto"       # bf16 (autocast, bf16 base weights, fp32 LoRA) | fp32 | auto
    checkpointing: bool = True    # gradient checkpointing of UNet blocks
    seed: int = 42
    every: int = 200              # sample grid, heat-maps, loss curve and checkpoint every N steps
    max_nan: int = 5              # consecutive non-finite losses before stopping with a checkpoint
    resume: bool = False          # continue from out/latest
    export: bool = False          # also write out/unet.safetensors with the LoRA folded in
    plan: str = ""                # fake: print memory, FLOPs, GPU time of a step, exit (plan.py)


SDXL_DEFAULTS = dict(lr=2e-5, lr_d=5e-5, w_adv=0.5, batch=6)  # scripts/sdxl.sh
# the toy world (toyworld.py): its own captioner, a run sized for 2 CPU cores; lr, attention and
# adversarial weights chosen on the validation prompts (toyworld.VAL_PROMPTS: lr 3e-4 over 1e-4
# and 1e-3; w_tok, w_pix 10x the official over 1x at training seeds 42-44, 30x, 100x; w_adv 0.03
# over 1, 0.3 and 0.1, where 0.01 barely reaches the clipped step; README: toy world)
TOY_DEFAULTS = dict(captioner=os.path.join(TOY, "captioner"), size=64, steps=300, batch=8, lr=3e-4,
                    lr_d=1e-3, w_tok=1e-2, w_pix=5e-4, w_adv=0.03, rank=8, sampler="ddim",
                    total_steps=20, grad_steps=5, checkpointing=False, every=100)


def parse(argv):
    """CLI flags from the dataclass fields; returns the config and the names given explicitly."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        bool_like = f.type is bool or f.type == (bool | None)
        kind = {"action": argparse.BooleanOptionalAction} if bool_like else {"type": f.type}
        ap.add_argument("--" + f.name, default=None, help=f"default {f.default!r}", **kind)
    given = {k: v for k, v in vars(ap.parse_args(argv)).items() if v is not None}
    return TrainConfig(**given), set(given)


def average_grads(params, world):
    """Data parallelism by hand: all-reduce and average every gradient (DDP does it in buckets)."""
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


def main(argv=None):
    cfg, given = parse(argv)
    if not cfg.plan:
        return train(cfg, given)
    # --plan fake | real: two steps of train() on random weights built from configs, on fake
    # tensors (no memory: any size plans on a laptop) or real ones (the check of the estimate)
    with plan.fake_mode() if cfg.plan == "fake" else nullcontext():
        with plan.Tracker() as tracker, plan.flops() as counter:
            return train(cfg, given, (tracker, counter, plan.rss()))


def train(cfg, given, probe=None):
    """The run; with probe = (plan.Tracker, FlopCounterMode, RSS at start) (--plan) it stops after
    two steps and returns plan.report's numbers."""
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    cuda = torch.cuda.is_available() and cfg.plan != "fake"  # fake tensors live on the CPU
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (cuda or cfg.plan == "fake"))
    dtype = torch.bfloat16 if bf16 else torch.float32

    # --- data and frozen models ---
    prompts = sample.read_prompts(cfg.prompts)
    pipe = plan.pipeline(cfg.model, device, dtype) if cfg.plan else load(cfg.model, device, dtype)
    toy = cfg.model == "toy"
    if pipe.sdxl or toy:  # the official SDXL script's values or the toy's, unless given
        preset = TOY_DEFAULTS if toy else SDXL_DEFAULTS
        cfg = replace(cfg, **{k: v for k, v in preset.items() if k not in given})
    plan_T, plan_steps = cfg.total_steps, cfg.steps
    if cfg.plan:  # two steps; T = K denoising steps has the graph and memory of T = 50 (README)
        cfg = replace(cfg, steps=2, total_steps=cfg.grad_steps, every=10**9,
                      out=tempfile.mkdtemp(prefix="plan-"))
    detach = pipe.sdxl if cfg.detach is None else cfg.detach  # official: SD1.5 keeps, SDXL detaches
    f = pipe.vae.cfg.factor
    if cfg.size % f or cfg.size < 4 * f:
        raise SystemExit(f"error: --size must be a multiple of {f} and at least {4 * f}")
    if not cfg.captioner and not cfg.plan:
        raise SystemExit("error: --captioner BLIP_FOLDER is required (concept matching)")
    if cfg.plan:  # BLIP-large unless a folder is given; random masks, every object found
        cap, seg = plan.captioner(cfg.captioner, device, dtype), plan.masks
    else:
        cap = load_captioner(cfg.captioner, device, dtype)
        seg = (grounded_sam(*load_segmenter(cfg.dino, cfg.sam, device)) if cfg.dino and cfg.sam
               else None)
    seg = toyworld.segment_shapes if toy and not seg else seg  # the toy's shape masks
    seg = seg if cfg.w_tok or cfg.w_pix else None  # weights 0: skip maps and masks altogether
    if seg is None and rank == 0:
        warnings.warn("attribute concentration is off (no --dino/--sam, or w_tok = w_pix = 0)")
    clip_tok = pipe.tokenizers[0]  # token positions index its sequence (T = model_max_length)
    objs = [objects(clip_tok, p) for p in prompts]
    if cfg.prompts.endswith(".jsonl"):  # precomputed objects: {"objects": [[attr..., noun], ...]}
        rows = [json.loads(ln) for ln in open(cfg.prompts, encoding="utf-8") if ln.strip()]
        objs = [align(clip_tok, r["prompt"], [(tuple(g[:-1]), g[-1]) for g in r["objects"]])
                if "objects" in r else o for r, o in zip(rows, objs)]
    if rank == 0 and not any(objs):
        warnings.warn("no prompt has a parseable object: attention losses will be 0")

    # --- trainable weights: LoRA (official) or the whole UNet; discriminator from the base UNet ---
    unet = pipe.unet.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank, as data parallelism needs
    D = comat.Discriminator(copy.deepcopy(unet))
    add_lora(D.unet, cfg.rank or 128)
    D.head.float()
    if cfg.rank:
        add_lora(unet, cfg.rank)
    else:  # full fine-tuning keeps fp32 master weights; autocast still computes in bf16
        unet.float().requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    d_params = [p for p in D.parameters() if p.requires_grad]
    unet.gradient_checkpointing = D.unet.gradient_checkpointing = cfg.checkpointing
    opt = torch.optim.AdamW(params, cfg.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opt_d = torch.optim.AdamW(d_params, cfg.lr_d, betas=(0.0, 0.999), weight_decay=1e-2, eps=1e-8)
    # official layers: mid and up blocks, never down; kept apart because the pixel loss averages
    # maps per (block, resolution) group: SD1.5 mid_8 up_16 up_32 up_64, SDXL mid_16 up_16 up_32
    blocks = [comat.loss_modules(unet, (w,)) for w in cfg.attn_layers.split(",")]
    loss_mods = [m for mods in blocks for m in mods]
    ts, abar = sample.timesteps(cfg.total_steps), sample.alphas_cumprod()
    lat_shape = (pipe.unet.cfg.in_channels, cfg.size // f, cfg.size // f)
    autocast = torch.autocast(device.split(":")[0], torch.bfloat16, enabled=bf16)

    def cond(batch_prompts):
        """Frozen text conditioning with the official training negative, the encoding of ""."""
        with torch.no_grad():
            c, u, p, up = sample.conditioning(pipe, batch_prompts, negative="")
        ids = sample.time_ids(cfg.size, cfg.size, len(c)).to(c) if pipe.sdxl else None
        return c, u, p, up, ids

    def generate(batch_prompts, x, g, grads=(), store_at=(), maps=None):
        """x_T (B, C, h, w) -> final latent; DDPM noise from g; graph only at `grads`."""
        c, u, p, up, ids = cond(batch_prompts)
        guided = sample.cfg_fn(unet, c, u, cfg.cfg, p, up, ids)

        def eps(x, t):  # keep cross-attention probs (with graph) only at the chosen steps
            for m in loss_mods:
                m.store = t in store_at
            e = guided(x, t)
            if t in store_at:  # one list per (step, block kind): the official sums over steps
                maps.extend(comat.attention_maps(mods) for mods in blocks)
            return e
        z = sample.denoise(eps, x.to(device), ts, abar, cfg.sampler, grads, detach, g)
        for m in loss_mods:
            m.store = False
        return z

    def base_latents(batch_prompts, x, g):
        """On-the-fly reals (--real fly): the base model, LoRA switched off, same prompts."""
        lora = [m for m in unet.modules() if isinstance(m, LoRALinear)]
        if not lora:
            raise SystemExit("error: --real fly needs LoRA training (--rank > 0)")
        scales = [m.scale for m in lora]
        for m in lora:
            m.scale = 0.0
        with torch.no_grad():
            z = generate(batch_prompts, x, g)
        for m, s in zip(lora, scales):
            m.scale = s
        return z

    null = cond([""])  # D's conditioning, the empty prompt: encoded once, expanded per call

    def disc(z):
        """D on clean latents at the last sampling timestep, conditioned on the empty prompt."""
        u, up, ids = (v if v is None else v.expand(len(z), *v.shape[1:])
                      for v in (null[1], null[3], null[4]))
        return D(z, ts[-1], u, up, ids)

    def batch_of(step):
        """This rank's prompt indices at `step`: a seeded permutation per epoch, so resuming or
        changing the number of processes sees the same global batches."""
        if cfg.plan:  # fake tensors hold no values to draw an order from
            return [j % len(prompts) for j in range(cfg.batch)]
        idx, first = [], (step * world + rank) * cfg.batch
        for j in range(first, first + cfg.batch):  # j: position in the endless shuffled stream
            g = torch.Generator().manual_seed(cfg.seed + j // len(prompts))  # one order per epoch
            idx.append(torch.randperm(len(prompts), generator=g)[j % len(prompts)].item())
        return idx

    # --- the discriminator's "real" latents: the frozen base model on the same prompts ---
    os.makedirs(cfg.out, exist_ok=True)
    real_path = os.path.join(cfg.out, "real_latents.safetensors")
    cache = cfg.real == "cache" and cfg.w_adv and not cfg.plan  # no GAN, no reals; a plan draws
    if cache and not os.path.exists(real_path):
        if rank == 0:  # the LoRA is still zero here, so the model IS the base model
            with torch.no_grad(), autocast:
                real = []
                for i in tqdm(range(0, len(prompts), 8), desc="real latents"):
                    g, chunk = torch.Generator().manual_seed(cfg.seed + i), prompts[i:i + 8]
                    x = torch.randn(len(chunk), *lat_shape, generator=g)
                    real.append(generate(chunk, x, g))
                real = torch.cat(real)
            save_weights({"latents": real.float().cpu()}, real_path)
        if world > 1:
            dist.barrier()
    real = load_file(real_path)["latents"] if cache else None
    real = torch.randn(len(prompts), *lat_shape) if cfg.plan and cfg.real == "cache" else real

    # --- resume ---
    start, log_rows, nan_run = 0, [], 0
    if cfg.resume and os.path.exists(os.path.join(cfg.out, "latest")):
        start = load_checkpoint(cfg.out, unet, D, opt, opt_d, not cfg.rank)
        log_path = os.path.join(cfg.out, "log.jsonl")
        log_rows = [r for r in map(json.loads, open(log_path)) if r["step"] <= start]
    log = open(os.path.join(cfg.out, "log.jsonl") if rank == 0 else os.devnull, "w")
    for r in log_rows:
        log.write(json.dumps(r) + "\n")

    # --- the loop ---
    before = grid(cfg, pipe, prompts) if rank == 0 and not cfg.plan else None  # last PNG's row
    if probe:  # the plan's peak and FLOPs are the steps', not the set-up's
        probe[0].peak, _ = probe[0].live, probe[1].flop_counts.clear()
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank > 0):
        t0 = time.time()
        idx = batch_of(step)
        batch_prompts, batch_objs = [prompts[i] for i in idx], [objs[i] for i in idx]
        rng = random.Random(cfg.seed * 1_000_003 + step)  # same draws on every rank
        grads = comat.pick_grad_steps(cfg.grad_mode, cfg.total_steps, cfg.grad_steps, rng)
        store_at = {ts[i] for i in rng.choices(grads, k=cfg.attn_steps)} if seg else set()
        # x_T is drawn for the global batch and sliced, so N processes draw what one process
        # with the combined batch draws; DDPM's per-step noise comes from a per-rank generator.
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
        x_T = torch.randn(cfg.batch * world, *lat_shape, generator=g)
        x_T = x_T[rank * cfg.batch:(rank + 1) * cfg.batch]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + step + 104729 * rank)

        # 1-2. sample with gradient on the chosen steps, decode
        maps = []
        with autocast:
            z = generate(batch_prompts, x_T, g, grads, store_at, maps)
            img = sample.decode(pipe, z)  # (B, 3, H, W), about [0, 1], graph kept, not clamped
            # 3. concept matching on a jittered crop
            cap_l = comat.caption_loss(caption_logprob(cap, img, batch_prompts,
                                                       smoothing=cfg.smoothing,
                                                       crop=random_crop(cfg.size, rng)))
            # 4. fidelity: the generator's adversarial term, D frozen for this step
            for p in d_params:
                p.requires_grad_(False)
            adv = comat.g_loss(disc(z)) if cfg.w_adv else torch.zeros(len(idx), device=device)
        # 5. attribute concentration: masks on the detached image, fp32 losses on the stored maps
        tok = pix = torch.zeros(len(idx), device=device)
        if seg and any(batch_objs):
            masks, found = seg(img.detach().float().clamp(0, 1),
                               [[o.noun for o in ob] for ob in batch_objs])
            tokens = comat.object_tokens(batch_objs, T=clip_tok.model_max_length).to(device)
            for group in maps:
                t_l, p_l = comat.attention_loss([m.float() for m in group], tokens, masks, found,
                                                cond_half=cfg.cfg > 1)
                tok, pix = tok + t_l, pix + p_l
        loss = (cfg.w_cap * cap_l.float() + cfg.w_tok * tok + cfg.w_pix * pix
                + cfg.w_adv * adv.float()).mean()

        # 6. generator step (skipped, with a warning, when the loss is not finite)
        finite = torch.isfinite(loss.detach()).float()
        if world > 1:  # every rank skips together, or the all-reduces below would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not cfg.plan and not bool(finite):  # (fake tensors hold no values)
            nan_run += 1
            warnings.warn(f"step {step}: non-finite loss, step skipped ({nan_run} in a row)")
            if nan_run >= cfg.max_nan:
                if rank == 0:
                    save_checkpoint(cfg.out, step, unet, D, opt, opt_d, not cfg.rank)
                raise SystemExit(f"error: {nan_run} non-finite losses in a row; checkpoint saved")
            continue
        nan_run = 0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        average_grads(params, world)
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()

        # 7. discriminator step on [fake; real], fakes detached (no GAN at all when w_adv = 0)
        for p in d_params:
            p.requires_grad_(True)
        d_l = torch.zeros(())
        if cfg.w_adv:
            reals = real[idx] if real is not None else base_latents(batch_prompts, x_T, g)
            with autocast:  # fakes detached: this step trains D only
                logits = disc(torch.cat([z.detach(), reals.to(z)]))
                d_l = comat.d_loss(logits[len(z):], logits[:len(z)]).mean()
            opt_d.zero_grad(set_to_none=True)
            d_l.backward()
            average_grads(d_params, world)
            torch.nn.utils.clip_grad_norm_(d_params, cfg.clip_d)
            opt_d.step()

        if cfg.plan:
            continue
        # 8. log, pictures, checkpoint (rank 0 only)
        row = {"step": step + 1, "loss": loss.item(), "cap": cap_l.mean().item(),
               "tok": tok.mean().item(), "pix": pix.mean().item(), "adv": adv.mean().item(),
               "d": d_l.item(), "grad_norm": gnorm.item(), "sec": round(time.time() - t0, 3)}
        log_rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if rank == 0 and ((step + 1) % cfg.every == 0 or step + 1 == cfg.steps):
            pictures(cfg, pipe, prompts, log_rows, maps, img, batch_objs[0], step + 1)
            save_checkpoint(cfg.out, step + 1, unet, D, opt, opt_d, not cfg.rank)
    if cfg.plan:
        models = {"unet": pipe.unet, "discriminator": D, "vae": pipe.vae,
                  "text": torch.nn.ModuleList(pipe.encoders), "captioner": cap.model}
        extra = (plan_T - cfg.total_steps) * plan.unet_flops(unet, cfg, cfg.batch, lat_shape[-1])
        return plan.report(cfg, *probe, models, (opt, opt_d), plan_steps, extra)
    if world > 1:  # data parallelism must leave identical weights on every rank: check it
        total = torch.stack([p.detach().double().sum() for p in params]).sum()
        span = torch.stack([total, -total])  # after a MAX reduce: (max, -min) over the ranks
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        assert span[0] == -span[1], "ranks ended with different weights"
    if rank == 0:
        final = os.path.join(cfg.out, "lora.safetensors" if cfg.rank else "unet.safetensors")
        save_weights(lora_state_dict(unet) if cfg.rank else unet.state_dict(), final)
        viz.save_images(torch.cat([before, grid(cfg, pipe, prompts)]),
                        os.path.join(cfg.out, "before_after.png"), len(before))
        if cfg.export and cfg.rank:  # a plain fine-tuned UNet (diffusers keys) for any loader
            fold_lora(unet)
            save_weights(unet.state_dict(), os.path.join(cfg.out, "unet.safetensors"))
        print(f"wrote {final} (sample with: python sample.py PROMPT --model {cfg.model} "
              f"--{'lora' if cfg.rank else 'unet'} {final})")
    if world > 1:
        dist.destroy_process_group()


def grid(cfg, pipe, prompts):
    """The first 8 prompts, seed 0, DDIM: the same noise at every call, so rows compare."""
    return sample.generate(pipe, prompts[:8], cfg.total_steps, cfg.cfg, cfg.size, "ddim",
                           seed=0, progress=False)


def pictures(cfg, pipe, prompts, rows, maps, img, objs, step):
    """Sample grid (fixed prompts and seeds), the last step's heat-maps, the loss curve."""
    images = grid(cfg, pipe, prompts)
    viz.save_images(images, os.path.join(cfg.out, f"samples-{step:06d}.png"), len(images))
    viz.loss_curve(rows, os.path.join(cfg.out, "loss.png"))
    maps = [m for group in maps for m in group]
    if maps and objs:
        tokens = comat.object_tokens([objs], T=maps[0].shape[-1])[0]
        viz.heatmaps(img[0], maps, tokens, [o.noun for o in objs],
                     os.path.join(cfg.out, f"attn-{step:06d}.png"))


if __name__ == "__main__":
    main()
