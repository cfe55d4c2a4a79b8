"""CoMat fine-tuning (Jiang et al., NeurIPS 2024, arXiv 2404.03653) of SD1.5 / SDXL: one flat loop.

Each step samples images from text prompts with gradient on K of the T denoising steps, then adds
concept matching (a frozen BLIP's log-likelihood of the prompt), attribute concentration (token and
pixel cross-attention losses against object masks) and fidelity preservation (a GAN whose
discriminator starts from the pretrained UNet). Defaults are the official scripts'
(docs/official-code.md 5).
Read in this order: TrainConfig and the presets, setup (models, optimisers), losses (phases 1-5 of
a step), update (phases 6-7), train (the loop: data, the two halves of a step, logs, checkpoints).
Usage: python train.py --prompts prompts.txt --model sd15 --captioner blip --dino gdino --sam sam
       torchrun --nproc_per_node 8 train.py ...   (prompts split across ranks, gradients averaged)
       python plan.py --model sdxl ...            (memory and time of a step, before any download)
"""
import argparse
import inspect
import json
import os
import pickle
import random
import re
import shutil
import time
import warnings
from dataclasses import dataclass, fields
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
from safetensors.torch import load_file
from tqdm import tqdm

import comat
import sample
import viz
from captioner import Captioner, caption_logprob, load_captioner, random_crop
from segment import align, grounded_sam, load_segmenter, objects, relation, shapes
from unet import LoRALinear, add_lora, fold_lora, lora_state_dict
from weights import Pipeline, folder_preset, kind, save_weights


@dataclass(frozen=True)
class TrainConfig:
    prompts: str = "prompts.txt"  # one prompt a line, or .jsonl lines {"prompt": ...}
    model: str = "toy/model"      # diffusers folder | original file | hub id | tiny | tiny-sdxl
    captioner: str = ""           # BLIP folder (official: Salesforce/blip-image-captioning-large)
    #                               or A,B (not in the paper): concept matching reads their mean
    dino: str = ""                # Grounding-DINO folder, with --sam: the official segmenter
    sam: str = ""                 # SAM folder (box prompts; official used FastSAM)
    segmenter: str = "grounded-sam"  # grounded-sam (--dino, --sam; else none) | shapes (flat)
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
    w_obj: float = 0.0            # per-object concept matching (not in the paper; 0 = off)
    w_rel: float = 0.0            # relation term on the attention (not in the paper; 0 = off)
    relation_masks: bool = False  # exchange A's and B's masks where drawn reversed (not in paper)
    smoothing: float = 0.1        # BLIP label smoothing (what official transformers 4.31 applied)
    disc: str = "copy"            # D's UNet: copy (own, official) | shared (base + 2nd LoRA set)
    real: str = "cache"           # discriminator's reals: cache = base-model latents made once, fly
    precision: str = "auto"       # bf16 (autocast, bf16 base weights, fp32 LoRA) | fp32 | auto
    checkpointing: bool = True    # gradient checkpointing of UNet and VAE-decoder blocks
    seed: int = 42                # LoRA init, batch order, noise: the whole run follows from it
    every: int = 200              # sample grid, heat-maps, loss curve and checkpoint every N steps
    max_nan: int = 5              # consecutive non-finite losses before stopping with a checkpoint
    resume: bool = False          # continue from out/latest
    export: bool = False          # also write out/unet.safetensors with the LoRA folded in


# The official scripts' values per model family, over TrainConfig's (which are SD1.5's). A model
# folder may carry its own preset in comat.json, applied last: the toy model's (toy/model) names
# its captioner, the flat-shape segmenter and a run sized for 2 CPU cores, chosen on the toy's
# validation prompts (docs/toy-world.md).
PRESETS = {"sd15": {}, "sdxl": dict(lr=2e-5, lr_d=5e-5, w_adv=0.5, batch=6)}  # scripts/sdxl.sh


def preset(model: str) -> dict:
    """The values a run on `model` uses where no flag is given: its family's, then its folder's."""
    try:
        return {**PRESETS[kind(model)], **folder_preset(model)}
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: --model: {e}") from None


def parse(argv=None) -> TrainConfig:
    """CLI flags from the dataclass fields, each with its comment as help and the value the run
    will use for the chosen --model (TrainConfig's default, or the model's preset)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--model", default=TrainConfig.model)
    defaults = {f.name: f.default for f in fields(TrainConfig)}
    defaults |= preset(pre.parse_known_args(argv)[0].model)
    comments = dict(re.findall(r"^    (\w+): .*?# (.*)$", inspect.getsource(TrainConfig), re.M))
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in fields(TrainConfig):
        bool_like = f.type is bool or f.type == (bool | None)
        kind_ = {"action": argparse.BooleanOptionalAction} if bool_like else {"type": f.type}
        ap.add_argument("--" + f.name, default=defaults[f.name], **kind_,
                        help=f"{comments.get(f.name, '')} (default: {defaults[f.name]!r})")
    cfg = TrainConfig(**vars(ap.parse_args(argv)))
    if cfg.batch < 1:
        raise SystemExit(f"error: --batch must be at least 1, got {cfg.batch}")
    return cfg


# --- set-up: everything a step uses, made once ---
class Run(NamedTuple):
    cfg: TrainConfig
    pipe: Pipeline
    caps: list[Captioner]  # concept matching reads their mean, --w_obj the first
    seg: Callable | None  # seg(images, nouns) -> (masks, found); None = attribute concentration off
    prompts: list
    objs: list            # per prompt: segment.Obj per object (noun, words, token positions)
    D: comat.Discriminator
    opt: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    params: list          # the generator's trainable parameters (LoRA, or the whole UNet)
    d_params: list
    blocks: list          # per --attn_layers entry: the cross-attentions whose maps are kept
    ts: list              # the T sampling timesteps
    abar: torch.Tensor
    lat_shape: tuple      # (C, h, w) of one latent
    detach: bool
    null: tuple           # conditioning of "": the discriminator's, encoded once
    device: str
    dtype: torch.dtype
    rank: int
    world: int


def check_size(cfg, vae_cfg) -> int:
    """The VAE's downsampling factor, once --size is known to fit it."""
    f = vae_cfg.factor
    if cfg.size % f or cfg.size < 4 * f:
        raise SystemExit(f"error: --size must be a multiple of {f} and at least {4 * f}")
    return f


def setup(cfg, pipe, caps, seg, prompts, device, dtype, rank=0, world=1) -> Run:
    """LoRA (official) or the whole UNet trainable, the discriminator from a copy of the base UNet
    (--disc shared: on the base itself, with a second LoRA set), both optimisers, the prompts'
    objects and the attention layers. The caller chooses the models (train: from files; plan.py:
    random, on fake tensors)."""
    f = check_size(cfg, pipe.vae.cfg)
    attend = bool(seg and (cfg.w_tok or cfg.w_pix))
    seg = seg if attend or cfg.w_obj else None  # weights 0: skip maps and masks altogether
    if not attend and rank == 0:
        warnings.warn("attribute concentration is off (no segmenter, or w_tok = w_pix = 0)"
                      + ("; --relation_masks acts on nothing" if cfg.relation_masks else ""))
    clip_tok = pipe.tokenizers[0]  # token positions index its sequence (T = model_max_length)
    objs = [objects(clip_tok, p) for p in prompts]
    if cfg.prompts.endswith(".jsonl"):  # precomputed objects: {"objects": [[attr..., noun], ...]}
        rows = [json.loads(ln) for ln in open(cfg.prompts, encoding="utf-8") if ln.strip()]
        objs = [align(clip_tok, r["prompt"], [(tuple(g[:-1]), g[-1]) for g in r["objects"]])
                if "objects" in r else o for r, o in zip(rows, objs)]
    if rank == 0 and not any(objs):
        warnings.warn("no prompt has a parseable object: attention losses will be 0")

    unet = pipe.unet.requires_grad_(False)
    torch.manual_seed(cfg.seed)  # same LoRA init on every rank, as data parallelism needs
    if cfg.disc not in ("copy", "shared"):
        raise SystemExit(f"error: --disc is copy or shared, not {cfg.disc}")
    if cfg.disc == "shared" and not cfg.rank:
        raise SystemExit("error: --disc shared needs LoRA training (--rank > 0): a full "
                         "fine-tune changes the base the discriminator would share")
    if cfg.disc == "shared":  # one frozen base in memory; same random draws as the copy's
        D = comat.SharedDiscriminator(unet, cfg.rank)
    else:
        D = comat.Discriminator(copy_unet(unet))
        add_lora(D.unet, cfg.rank or 128)
        D.unet.gradient_checkpointing = cfg.checkpointing
        D.head.float()
    if cfg.rank:
        add_lora(unet, cfg.rank)
    else:  # full fine-tuning keeps fp32 master weights; autocast still computes in bf16
        unet.float().requires_grad_(True)
    params = [p for p in unet.parameters() if p.requires_grad]
    d_params = [p for p in D.parameters() if p.requires_grad]
    unet.gradient_checkpointing = pipe.vae.decoder.gradient_checkpointing = cfg.checkpointing
    opt = torch.optim.AdamW(params, cfg.lr, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    opt_d = torch.optim.AdamW(d_params, cfg.lr_d, betas=(0.0, 0.999), weight_decay=1e-2, eps=1e-8)
    # official layers: mid and up blocks, never down; kept apart because the pixel loss averages
    # maps per (block, resolution) group: SD1.5 mid_8 up_16 up_32 up_64, SDXL mid_16 up_16 up_32
    blocks = [comat.loss_modules(unet, (w,)) for w in cfg.attn_layers.split(",")]
    detach = pipe.sdxl if cfg.detach is None else cfg.detach  # official: SD1.5 keeps, SDXL detaches
    run = Run(cfg, pipe, caps, seg, prompts, objs, D, opt, opt_d, params, d_params, blocks,
              sample.timesteps(cfg.total_steps), sample.alphas_cumprod(),
              (pipe.unet.cfg.in_channels, cfg.size // f, cfg.size // f), detach, (), device, dtype,
              rank, world)
    return run._replace(null=cond(run, [""]))


def copy_unet(unet):
    """A second UNet with its own copy of the weights: built on the meta device, then given
    clones (copy.deepcopy reads fake tensors' data pointers in plan.py, a deprecated access)."""
    with torch.device("meta"):
        twin = type(unet)(unet.cfg)
    twin.load_state_dict({k: v.clone() for k, v in unet.state_dict().items()}, assign=True)
    return twin.requires_grad_(False)


def autocast(run):
    return torch.autocast(run.device.split(":")[0], torch.bfloat16,
                          enabled=run.dtype == torch.bfloat16)


def cond(run, prompts):
    """Frozen text conditioning with the official training negative, the encoding of ""."""
    with torch.no_grad():
        c, u, p, up = sample.conditioning(run.pipe, prompts, negative="")
    ids = sample.time_ids(run.cfg.size, run.cfg.size, len(c)).to(c) if run.pipe.sdxl else None
    return c, u, p, up, ids


def generate(run, prompts, x, g, grads=(), store_at=(), maps=None):
    """x_T (B, C, h, w) -> final latent; DDPM noise from g; graph only at the steps `grads`; the
    cross-attention maps of the timesteps `store_at` appended to `maps`, one list per block."""
    c, u, p, up, ids = cond(run, prompts)
    guided = sample.cfg_fn(run.pipe.unet, c, u, run.cfg.cfg, p, up, ids)
    mods = [m for block in run.blocks for m in block]

    def eps(x, t):  # keep cross-attention probs (with graph) only at the chosen steps
        for m in mods:
            m.store = t in store_at
        e = guided(x, t)
        if t in store_at:  # one list per (step, block kind): the official sums over steps
            maps.extend(comat.attention_maps(block) for block in run.blocks)
        return e
    z = sample.denoise(eps, x.to(run.device), run.ts, run.abar, run.cfg.sampler, grads,
                       run.detach, g)
    for m in mods:
        m.store = False
    return z


def base_latents(run, prompts, x, g):
    """On-the-fly reals (--real fly): the base model, LoRA switched off, same prompts."""
    lora = [m for m in run.pipe.unet.modules() if isinstance(m, LoRALinear)]
    if not lora:
        raise SystemExit("error: --real fly needs LoRA training (--rank > 0)")
    scales = [m.scale for m in lora]
    for m in lora:
        m.scale = 0.0
    with torch.no_grad():
        z = generate(run, prompts, x, g)
    for m, s in zip(lora, scales):
        m.scale = s
    return z


def disc(run, z):
    """D on clean latents at the last sampling timestep, conditioned on the empty prompt."""
    u, up, ids = (v if v is None else v.expand(len(z), *v.shape[1:])
                  for v in (run.null[1], run.null[3], run.null[4]))
    return run.D(z, run.ts[-1], u, up, ids)


# --- one training step: losses (phases 1-5), then update (phases 6-7) ---
class Losses(NamedTuple):
    loss: torch.Tensor    # () the weighted sum the generator minimises
    cap: torch.Tensor     # (B,) per-sample terms, unweighted
    tok: torch.Tensor
    pix: torch.Tensor
    adv: torch.Tensor
    obj: torch.Tensor     # (B,) per-object concept matching (zeros when w_obj = 0)
    rel: torch.Tensor     # (B,) relation term (zeros when w_rel = 0)
    z: torch.Tensor       # (B, C, h, w) generated latents, with graph
    img: torch.Tensor     # (B, 3, H, W) decoded images, with graph
    maps: list            # per (stored step, block): attention maps, for the heat-maps
    prompts: list
    objs: list
    x_T: torch.Tensor     # the start noise and DDPM generator, for --real fly's base latents
    g: torch.Generator


def losses(run, idx, step) -> Losses:
    """Phases 1-5 of step `step` on the prompts `idx`: sample with gradient on K steps, decode,
    concept matching, the generator's adversarial term, attribute concentration, and the two terms
    not in the paper when weighted (--w_obj per-object concept matching, --w_rel relations)."""
    cfg, world, rank = run.cfg, run.world, run.rank
    prompts, objs = [run.prompts[i] for i in idx], [run.objs[i] for i in idx]
    rng = random.Random(cfg.seed * 1_000_003 + step)  # same draws on every rank
    grads = comat.pick_grad_steps(cfg.grad_mode, cfg.total_steps, cfg.grad_steps, rng)
    attend = run.seg and (cfg.w_tok or cfg.w_pix)  # the maps feed attribute concentration
    store = attend or cfg.w_rel  # and the relation term
    store_at = {run.ts[i] for i in rng.choices(grads, k=cfg.attn_steps)} if store else set()
    # x_T is drawn for the global batch and sliced, so N processes draw what one process with
    # the combined batch draws; DDPM's per-step noise comes from a per-rank generator.
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    x_T = torch.randn(cfg.batch * world, *run.lat_shape, generator=g)
    x_T = x_T[rank * cfg.batch:(rank + 1) * cfg.batch]
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step + 104729 * rank)

    # 1-2. sample with gradient on the chosen steps, decode
    maps = []
    with autocast(run):
        z = generate(run, prompts, x_T, g, grads, store_at, maps)
        img = sample.decode(run.pipe, z)  # (B, 3, H, W), about [0, 1], graph kept, not clamped
        # 3. concept matching on a jittered crop
        cap = comat.caption_loss(read(run.caps, img, prompts, smoothing=cfg.smoothing,
                                      crop=random_crop(cfg.size, rng)))
        # 4. fidelity: the generator's adversarial term, D frozen for this step
        for p in run.d_params:
            p.requires_grad_(False)
        adv = comat.g_loss(disc(run, z)) if cfg.w_adv else torch.zeros(len(idx), device=run.device)
    # 5. attribute concentration: masks on the detached image, fp32 losses on the stored maps
    tok = pix = obj = rel = torch.zeros(len(idx), device=run.device)
    T = run.pipe.tokenizers[0].model_max_length  # tokens: only for the terms on the maps
    tokens = comat.object_tokens(objs, T=T).to(run.device) if maps else None
    # (B, 2) each prompt's relation, for the two terms that read it
    direction = directions(prompts, objs, run.device) if cfg.w_rel or cfg.relation_masks else None
    if run.seg and any(objs):
        masks, found = run.seg(img.detach().float().clamp(0, 1), [[o.noun for o in ob]
                                                                  for ob in objs])
        if cfg.w_obj:  # 5b. each object alone (or the rest), read as its own phrase
            with autocast(run):
                obj = object_loss(run.caps[0], img, objs, masks, found, cfg.smoothing)
        if cfg.relation_masks:  # 5a'. "A left of B" drawn reversed: each to the other's place
            masks = comat.exchange_reversed(masks, found, direction)
        for group in maps if attend else ():
            t_l, p_l = comat.attention_loss([m.float() for m in group], tokens, masks, found,
                                            cond_half=cfg.cfg > 1)
            tok, pix = tok + t_l, pix + p_l
    if cfg.w_rel:  # 5c. "A left of B": B's attention centre to the right of A's
        for group in maps:
            rel = rel + comat.relation_loss([m.float() for m in group], tokens, direction,
                                            cond_half=cfg.cfg > 1)
    loss = (cfg.w_cap * cap.float() + cfg.w_tok * tok + cfg.w_pix * pix
            + cfg.w_adv * adv.float() + cfg.w_obj * obj.float() + cfg.w_rel * rel).mean()
    return Losses(loss, cap, tok, pix, adv, obj, rel, z, img, maps, prompts, objs, x_T, g)


def captioner_paths(spec: str) -> list[str]:
    """--captioner's folders: "A,B" -> ["A", "B"]; empty entries dropped ("A," reads as "A")."""
    return [c.strip() for c in spec.split(",") if c.strip()]


def read(caps, img, prompts, smoothing=0.0, crop=None) -> torch.Tensor:
    """Concept matching's log-likelihood, (B,): one captioner's, or the mean of several (not in
    the paper). A captioner can be bought by what it misreads; in the mean, a misreading only one
    captioner has pays a share, while what the others read keeps its price, so captioners built to
    read different things (the toy world's: binding, relations) can be combined (docs/toy-world.md,
    "Two captioners")."""
    return torch.stack([caption_logprob(c, img, prompts, smoothing=smoothing, crop=crop)
                        for c in caps]).mean(0)


def directions(prompts, objs, device) -> torch.Tensor:
    """(B, 2): each two-object prompt's relation direction (segment.relation), else (0, 0)."""
    return torch.tensor([(relation(p) or (0, 0)) if len(o) == 2 else (0, 0)
                         for p, o in zip(prompts, objs)], device=device, dtype=torch.float)


def object_loss(cap, img, objs, masks, found, smoothing=0.0):
    """Per-object concept matching (not in the paper; --w_obj): each asked-for object alone
    (comat.isolate_objects: its found pixels, or the rest of the picture when it is not found)
    scored by the captioner as its own phrase ("a red circle"). The whole-image caption mixes the
    objects' colours in one likelihood, which faint tints can buy (docs/toy-world.md, "Binding in
    the reachable space"); alone, an object is read as what it is. (B,), 0 without objects."""
    valid = torch.zeros(found.shape, dtype=torch.bool, device=found.device)
    for b, ob in enumerate(objs):
        valid[b, :len(ob)] = True
    pics, idx = comat.isolate_objects(img, masks, found, valid)
    if not len(idx):
        return torch.zeros(len(objs), device=img.device)
    texts = ["a " + " ".join(objs[b][k].words) for b, k in idx.tolist()]
    lp = caption_logprob(cap, pics, texts, smoothing=smoothing)
    return comat.object_loss(lp, idx[:, 0], len(objs))


def update(run, out: Losses, real, idx):
    """Phases 6-7: the generator's step on out.loss, then the discriminator's on [fake; real]
    (fakes detached; none when w_adv = 0). real: cached latents, or None to make them (fly).
    Returns the generator's pre-clip gradient norm and the discriminator's loss."""
    cfg = run.cfg
    # 6. generator step
    run.opt.zero_grad(set_to_none=True)
    out.loss.backward()
    average_grads(run.params, run.world)
    gnorm = torch.nn.utils.clip_grad_norm_(run.params, cfg.clip)
    run.opt.step()

    # 7. discriminator step
    for p in run.d_params:
        p.requires_grad_(True)
    d_l = torch.zeros(())
    if cfg.w_adv:
        reals = real[idx] if real is not None else base_latents(run, out.prompts, out.x_T, out.g)
        with autocast(run):  # fakes detached: this step trains D only
            logits = disc(run, torch.cat([out.z.detach(), reals.to(out.z)]))
            d_l = comat.d_loss(logits[len(out.z):], logits[:len(out.z)]).mean()
        run.opt_d.zero_grad(set_to_none=True)
        d_l.backward()
        average_grads(run.d_params, run.world)
        torch.nn.utils.clip_grad_norm_(run.d_params, cfg.clip_d)
        run.opt_d.step()
    return gnorm, d_l


def average_grads(params, world):
    """Data parallelism by hand: all-reduce and average every gradient (DDP does it in buckets)."""
    if world > 1:
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad /= world


# --- the run ---
def batch_of(cfg, step, rank, world, n):
    """This rank's prompt indices at `step`: a seeded permutation per epoch, so resuming or
    changing the number of processes sees the same global batches."""
    idx, first = [], (step * world + rank) * cfg.batch
    for j in range(first, first + cfg.batch):  # j: position in the endless shuffled stream
        g = torch.Generator().manual_seed(cfg.seed + j // n)  # one order per epoch
        idx.append(torch.randperm(n, generator=g)[j % n].item())
    return idx


def real_latents(run):
    """The discriminator's "real" latents: the frozen base model on the same prompts, made once
    (--real cache) into out/real_latents.safetensors; None for --real fly or without a GAN."""
    cfg, path = run.cfg, os.path.join(run.cfg.out, "real_latents.safetensors")
    if not (cfg.real == "cache" and cfg.w_adv):
        return None
    if not os.path.exists(path):
        if run.rank == 0:  # the LoRA is still zero here, so the model IS the base model
            with torch.no_grad(), autocast(run):
                real = []
                for i in tqdm(range(0, len(run.prompts), 8), desc="real latents"):
                    g, chunk = torch.Generator().manual_seed(cfg.seed + i), run.prompts[i:i + 8]
                    x = torch.randn(len(chunk), *run.lat_shape, generator=g)
                    real.append(generate(run, chunk, x, g))
                real = torch.cat(real)
            save_weights({"latents": real.float().cpu()}, path)
        if run.world > 1:
            dist.barrier()
    return load_file(path)["latents"]


def segmenter(cfg, device):
    """Grounded-SAM from --dino and --sam, the flat-shape segmenter, or None."""
    if cfg.dino and cfg.sam:
        return grounded_sam(*load_segmenter(cfg.dino, cfg.sam, device))
    if cfg.segmenter not in ("grounded-sam", "shapes"):
        raise SystemExit(f"error: --segmenter is grounded-sam or shapes, not {cfg.segmenter}")
    return shapes if cfg.segmenter == "shapes" else None


def train(cfg: TrainConfig):
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))  # torchrun
    cuda = torch.cuda.is_available()
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
    device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if cuda else "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32

    # --- data, frozen models, trainable weights ---
    prompts = sample.read_prompts(cfg.prompts)
    sample.check_out(os.path.join(cfg.out, "log.jsonl"))
    pipe = sample.load_or_exit(cfg.model, device=device, dtype=dtype)
    if rank == 0:
        sample.warn_unknown(cfg.model, prompts)
    check_size(cfg, pipe.vae.cfg)  # before BLIP and the segmenter are loaded
    paths = captioner_paths(cfg.captioner)
    if not paths:
        raise SystemExit("error: --captioner BLIP_FOLDER is required (concept matching)")
    try:
        caps = [load_captioner(c, device, dtype) for c in paths]
        seg = segmenter(cfg, device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"error: {e}") from None
    run = setup(cfg, pipe, caps, seg, prompts, device, dtype, rank, world)
    os.makedirs(cfg.out, exist_ok=True)
    real = real_latents(run)

    # --- resume ---
    start, log_rows, nan_run = 0, [], 0
    if cfg.resume and os.path.exists(os.path.join(cfg.out, "latest")):
        start = load_checkpoint(cfg.out, pipe.unet, run.D, run.opt, run.opt_d, not cfg.rank)
        log_path = os.path.join(cfg.out, "log.jsonl")
        log_rows = [r for r in map(json.loads, open(log_path)) if r["step"] <= start]
    log = open(os.path.join(cfg.out, "log.jsonl") if rank == 0 else os.devnull, "w")
    for r in log_rows:
        log.write(json.dumps(r) + "\n")

    # --- the loop ---
    before = grid(cfg, pipe, prompts) if rank == 0 else None  # before_after.png's first row
    for step in tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=rank > 0):
        t0 = time.time()
        idx = batch_of(cfg, step, rank, world, len(prompts))
        # 1-5. sample, decode, the three losses
        out = losses(run, idx, step)
        # a non-finite loss skips the step, with a warning; too many in a row stop the run
        finite = torch.isfinite(out.loss.detach()).float()
        if world > 1:  # every rank skips together, or the all-reduces below would hang
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        if not bool(finite):
            nan_run += 1
            warnings.warn(f"step {step}: non-finite loss, step skipped ({nan_run} in a row)")
            if nan_run >= cfg.max_nan:
                if rank == 0:
                    save_checkpoint(cfg.out, step, pipe.unet, run.D, run.opt, run.opt_d,
                                    not cfg.rank)
                raise SystemExit(f"error: {nan_run} non-finite losses in a row; checkpoint saved")
            continue
        nan_run = 0
        # 6-7. generator step, discriminator step
        gnorm, d_l = update(run, out, real, idx)

        # 8. log, pictures, checkpoint (rank 0 only)
        row = {"step": step + 1, "loss": out.loss.item(), "cap": out.cap.mean().item(),
               "tok": out.tok.mean().item(), "pix": out.pix.mean().item(),
               "adv": out.adv.mean().item(), "obj": out.obj.mean().item(),
               "rel": out.rel.mean().item(), "d": d_l.item(), "grad_norm": gnorm.item(),
               "sec": round(time.time() - t0, 3)}
        log_rows.append(row)
        log.write(json.dumps(row) + "\n")
        log.flush()
        if rank == 0 and ((step + 1) % cfg.every == 0 or step + 1 == cfg.steps):
            pictures(cfg, pipe, prompts, log_rows, out, step + 1)
            save_checkpoint(cfg.out, step + 1, pipe.unet, run.D, run.opt, run.opt_d, not cfg.rank)

    if world > 1:  # data parallelism must leave identical weights on every rank: check it
        total = torch.stack([p.detach().double().sum() for p in run.params]).sum()
        span = torch.stack([total, -total])  # after a MAX reduce: (max, -min) over the ranks
        dist.all_reduce(span, op=dist.ReduceOp.MAX)
        assert span[0] == -span[1], "ranks ended with different weights"
    if rank == 0:
        unet = pipe.unet
        final = os.path.join(cfg.out, "lora.safetensors" if cfg.rank else "unet.safetensors")
        save_weights(lora_state_dict(unet) if cfg.rank else unet.state_dict(), final)
        viz.labelled_grid([("base", before), (f"fine-tuned, step {cfg.steps}",
                                              grid(cfg, pipe, prompts))], prompts,
                          os.path.join(cfg.out, "before_after.png"))
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


def pictures(cfg, pipe, prompts, rows, out: Losses, step):
    """Sample grid (fixed prompts and seeds), the last step's heat-maps, the loss curve."""
    viz.labelled_grid([(f"step {step}", grid(cfg, pipe, prompts))], prompts,
                      os.path.join(cfg.out, f"samples-{step:06d}.png"))
    terms = ("loss", "cap", "tok", "pix", "adv", *(("obj",) if cfg.w_obj else ()),
             *(("rel",) if cfg.w_rel else ()), "d")
    viz.loss_curve(rows, os.path.join(cfg.out, "loss.png"), terms)
    maps, objs = [m for group in out.maps for m in group], out.objs[0]
    if maps and objs:
        tokens = comat.object_tokens([objs], T=maps[0].shape[-1])[0]
        viz.heatmaps(out.img[0], maps, tokens, [o.noun for o in objs],
                     os.path.join(cfg.out, f"attn-{step:06d}.png"))


# --- checkpoints: LoRA or UNet, discriminator, optimisers, RNG ---
def save_checkpoint(out, step, unet, D, opt, opt_d, full):
    """Write out/ckpt-STEP atomically (temp folder, rename), then point out/latest at it."""
    final, tmp = os.path.join(out, f"ckpt-{step}"), os.path.join(out, f"ckpt-{step}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_weights(unet.state_dict() if full else lora_state_dict(unet),
                 os.path.join(tmp, "unet.safetensors" if full else "lora.safetensors"))
    save_weights(D.state_dict(), os.path.join(tmp, "disc.safetensors"))
    torch.save({"step": step, "opt": opt.state_dict(), "opt_d": opt_d.state_dict(),
                "torch_rng": torch.get_rng_state()}, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(out, "latest.tmp"), "w") as fh:
        fh.write(os.path.basename(final))
    os.replace(os.path.join(out, "latest.tmp"), os.path.join(out, "latest"))
    return final


def load_checkpoint(out, unet, D, opt, opt_d, full) -> int:
    """Load out/latest (save_checkpoint's) into the models and optimisers, and torch's RNG;
    returns its step. A checkpoint of another model, or one holding a pickled object, is an
    error: state.pt is read with weights_only (tensors, numbers, dicts and lists only), since a
    pickled object in a shared checkpoint could run code when loaded."""
    ck = os.path.join(out, open(os.path.join(out, "latest")).read().strip())
    w = load_file(os.path.join(ck, "unet.safetensors" if full else "lora.safetensors"))
    bad = unet.load_state_dict({k.removeprefix("unet."): v for k, v in w.items()},
                               strict=False).unexpected_keys
    assert not bad, f"checkpoint {ck} does not fit this model: {bad[:3]}"
    D.load_state_dict(load_file(os.path.join(ck, "disc.safetensors")))
    try:
        st = torch.load(os.path.join(ck, "state.pt"), weights_only=True)
    except pickle.UnpicklingError as e:
        what = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if not what:  # no object named: the file is damaged, not malicious
            raise SystemExit(f"error: {ck}/state.pt is damaged (not a readable checkpoint); "
                             f"resume from another ckpt-* by writing its name into "
                             f"{out}/latest") from None
        raise SystemExit(f"error: {ck}/state.pt holds a pickled object ({what[1]}); "
                         f"refused, since unpickling it could run code") from None
    except (RuntimeError, EOFError, OSError) as e:  # e.g. truncated: torch's zip reader fails
        raise SystemExit(f"error: {ck}/state.pt is damaged ({str(e).splitlines()[0][:120]}); "
                         f"resume from another ckpt-* by writing its name into "
                         f"{out}/latest") from None
    for o, key in ((opt, "opt"), (opt_d, "opt_d")):
        o.load_state_dict(st[key])
    torch.set_rng_state(st["torch_rng"])
    return st["step"]


def main(argv=None):
    train(parse(argv))


if __name__ == "__main__":
    main()
