"""Toy-world base model, built from scratch on a CPU: VAE, CLIP text encoder + UNet, BLIP captioner.

The trainings behind `python -m toy.build` (kept out of toy/world.py, which holds the
world itself: this is the "pretraining" that makes a toy Stable Diffusion plus a toy captioner).
Output: a diffusers-layout folder (unet/ vae/ text_encoder/ tokenizer/ captioner/ vqa/
captioner_bind/ captioner_rel/, fp16, and comat.json: train.py's preset for it) that
weights.load_pipeline and captioner.load_captioner read.
Deterministic under a seed and a thread count: step counts come from the budget through fixed
per-step costs, never from the clock; the thread count changes the floats' summation order (shipped
toy/: base, more, bind and rel built at 2 threads, captioner and vqa at OMP_NUM_THREADS=1).
Shapes: B batch, 64x64 images, 16x16x4 latents, T = 16 text tokens.
Usage: build("toy/model", seed=0, budget_minutes=60)
"""
import copy
import dataclasses
import json
import math
import os
import re
import shutil
from functools import partial

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm
from transformers import (
    BertTokenizer,
    BlipConfig,
    BlipForConditionalGeneration,
    BlipForQuestionAnswering,
    CLIPTextConfig,
    CLIPTextModel,
)

import evaluate
from captioner import Captioner, caption_logprob
from sample import alphas_cumprod, decode, generate
from toy import world as tw
from unet import UNet, UNetConfig
from vae import VAE, VAEConfig
from weights import clip_tokenizer, load_pipeline, save_weights

# every word of every prompt and caption of the grammar; each is ONE token in both tokenizers
WORDS = sorted({"a", "and", *tw.COLOURS, *tw.SHAPES, *" ".join(tw.RELATIONS).split()})
MAX_TOKENS = 16  # longest prompt: 10 words + start + end = 12
# 64px -> 16x16x4 latents (f = 4: two downsamplings); GroupNorm groups divide every width
VAE_CFG = VAEConfig(channels=(32, 64, 64), n_res=1, groups=8, latent=4, scale=1.0)
# cross-attention at every level, so CoMat's losses have down, mid and up maps (16, 8, 4 px)
UNET_CFG = UNetConfig(channels=(32, 64, 64), depth=(1, 1, 1), heads=(2, 4, 4), mid_depth=1,
                      n_res=1, groups=8, ctx_dim=64, linear_proj=True)
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
            max_position_embeddings=MAX_TOKENS)
BLIP_WIDTH, BLIP_LAYERS, BLIP_PATCH = 96, 3, 8  # vision and text towers alike; 64px images
# Incomplete base captions (the alt-text condition the paper blames): half of the two-object
# images are captioned with one object, each colour word is dropped with p 0.3; 10% of the
# captions are empty so classifier-free guidance has an unconditional model.
DROP_OBJECT_P, DROP_COLOUR_P, EMPTY_P = 0.5, 0.3, 0.1
KL_WEIGHT = 1e-5  # VAE: MSE + this * KL (per element); just enough to keep latents bounded
# batch sizes; the shipped build's step counts; seconds per step on 2 CPU cores (torch 2.13;
# measured VAE 0.4-0.67 (rounded up), UNet 0.19-0.30, captioner 0.29 with its adversarial steps; VQA
# 0.3 on one thread of a shared machine; relations 0.07; bind 1.4-2.0 with its latent ascents):
# about 170 minutes in all. The UNet's 9750 steps are the first build's 6750 plus the 3000 that
# toy/bench/base_longer.py showed to matter (docs/toy-world.md);
# "more" is a second round of its training (train_more), 6000 steps that toy/bench/base_longer.py
# showed to nearly triple how often both objects of a held-out pair are drawn (docs/toy-world.md).
BATCH = {"vae": 16, "unet": 32, "captioner": 32, "vqa": 32}
STEPS = {"vae": 1200, "unet": 9750, "more": 6000, "captioner": 2880, "vqa": 3420, "bind": 600,
         "relations": 3000}
SEC_PER_STEP = {"vae": 0.9, "unet": 0.25, "more": 0.25, "captioner": 0.3, "vqa": 0.3, "bind": 2.0,
                "relations": 0.08}
# the stages in build order and the model folders each one writes; base: VAE, text encoder, UNet
# (one pool of latents); more: UNet and text encoder trained on (train_more); bind: a copy of the
# captioner fine-tuned where the generator reaches (LAT_*), the reward of the binding runs; rel: a
# captioner that knows where things are (POS_NORM, train_relations), then trained as the captioner
# and the bind stage are, the reward of the spatial runs
PARTS = {"base": ("unet", "vae", "text_encoder", "tokenizer"), "more": ("unet", "text_encoder"),
         "captioner": ("captioner",), "vqa": ("vqa",), "bind": ("captioner_bind",),
         "rel": ("captioner_rel",)}
STAGES = tuple(PARTS)
# how often each recipe runs in a whole build: the rel stage repeats the captioner's and the bind's
RUNS = {"captioner": 2, "bind": 2}
# train.py's preset for this model, written into the folder as comat.json (flags override it): its
# captioner, the flat-shape segmenter, a run sized for 2 CPU cores; lr, attention and adversarial
# weights chosen on the validation prompts (docs/toy-world.md: lr 3e-4 over 1e-4 and 1e-3; w_tok,
# w_pix 10x the official over 1x, 30x, 100x; w_adv 0.03 over 1, 0.3, 0.1 and 0.01)
TRAIN_PRESET = {"_comment": "train.py's preset for this model (flags override it), written by "
                "toy/build.py: its captioner, the flat-shape segmenter, a run sized for 2 CPU "
                "cores; chosen on the toy's validation prompts (docs/toy-world.md)",
                "captioner": "captioner", "segmenter": "shapes", "size": 64, "steps": 300,
                "batch": 8, "lr": 3e-4, "lr_d": 1e-3, "w_tok": 1e-2, "w_pix": 5e-4, "w_adv": 0.03,
                "rank": 8, "sampler": "ddim", "total_steps": 20, "grad_steps": 5,
                "checkpointing": False, "every": 100,
                # every word the model knows and what it draws: the product warns about others
                "vocabulary": {"words": WORDS, "draws": f"shapes {', '.join(tw.SHAPES)}; "
                               f"colours {', '.join(tw.COLOURS)}; relations "
                               f"{', '.join(tw.RELATIONS)}, and"}}
LATENT_POOL = 16384  # scenes encoded once for the UNet (captions are drawn anew at every use)
HELD_OUT = set(tw.EVAL_PROMPTS["two"] + tw.EVAL_PROMPTS["spatial"])
# captioner: share of pictures drawn wrongly; share of each batch first pushed towards a wrong
# caption by PGD (RMS budget, steps); the hinge margin of true over confused captions (nats/token)
ODD_P, PGD_P, PGD_EPS, PGD_STEPS, MARGIN = 0.5, 0.5, 0.06, 3, 1.0
# captioner: share of each batch taken from the base model's own samples (a pool drawn once on
# training prompts with the sampler CoMat trains with: DDIM 20 steps, CFG 7.5), pool size
GEN_P, GEN_POOL, GEN_STEPS = 0.25, 2048, 20
# captioner: the colour-swap hinge's margin (nats per token). A swap changes two tokens in ten,
# so 1 nat per token asks for certainty; at 1 the captioner binds as well but is a weak reward
# (two-object +4.9 against +18.1 at 0.2; docs/toy-world.md)
SWAP_MARGIN = 0.2
# captioner, reading where CoMat's gradient reaches (issue: the reward paid for faint tints that mix
# two objects' colours, and for shapes that were not drawn): with a pipe, LAT_N images of each
# batch are encoded by the toy VAE, pushed by ascend_latent towards a wrong caption
# (train_captioner's `mistake`: the colour swap or the next shape; for a spatial caption half the
# time its relation flipped) within LAT_EPS x the latent's RMS (drawn per batch up to it) in
# LAT_STEPS steps, decoded, and trained on what the evaluator reads there; where it still reads the
# true scene, the true caption must beat the target by SWAP_MARGIN. Clean spatial pictures: the
# true relation beats the flipped one by REL_MARGIN. Not in the captioner stage (built with colour
# swaps at (8, 0.5, 2) it bound no better there); the bind stage fine-tunes the built captioner
# with reshapes at these settings for STEPS["bind"] steps at BIND_LR (docs/toy-world.md, "Binding
# in the reachable space").
LAT_N, LAT_EPS, LAT_STEPS, REL_MARGIN, BIND_LR = 16, 0.6, 5, 0.2, 1e-4
# the rel stage's captioner: patch positions of this norm to start with (blip), and the captions
# of STEPS["relations"] batches of spatial scenes first (train_relations). With neither, no
# captioner here ever read a relation (true vs flipped caption 50%); with the positions alone, on
# spatial captions only, 70% after 1500 steps; within the full recipe, still 50.5%
# (docs/toy-world.md, "A captioner that reads relations").
POS_NORM = 20.0


def train_scene(rng: np.random.Generator, kind: str | None = None) -> tw.Scene:
    """A training scene of `kind`, or of the three kinds in equal shares; two-object scenes whose
    complete prompt is an evaluation prompt are never seen (by the base model or the captioner), so
    the evaluation measures held-out combinations. One-object prompts cannot be held out: all 18
    are evaluated."""
    while True:
        scene = tw.sample_scene(rng, kind or ("one", "two", "spatial")[int(rng.integers(3))])
        if tw.prompt(scene) not in HELD_OUT:
            return scene


def images(scenes) -> torch.Tensor:
    """Rendered scenes as (B, 3, 64, 64) float in [-1, 1] (the VAE's range)."""
    return tw.to_float(np.stack([tw.render(s) for s in scenes])) * 2 - 1


def lr_at(i: int, n: int, base: float) -> float:
    """Linear warm-up over the first 5% (at most 200 steps), then cosine down to 10%."""
    warm = max(1, min(200, n // 20))
    if i < warm:
        return base * (i + 1) / warm
    return base * (0.1 + 0.45 * (1 + math.cos(math.pi * (i - warm) / max(1, n - warm))))


def optimise(params, steps: int, lr: float, loss_fn, desc: str) -> None:
    """The shared loop: AdamW, the schedule above, gradient norm clipped at 1."""
    params = list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc=desc, leave=False)
    for i in bar:
        for g in opt.param_groups:
            g["lr"] = lr_at(i, steps, lr)
        loss = loss_fn(i)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")


def train_vae(steps: int, seed: int) -> VAE:
    """MSE of the reconstruction from a SAMPLED latent (so the decoder tolerates the UNet's
    imprecise latents) + KL_WEIGHT * KL to N(0, 1), on freshly rendered scenes."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 0])
    vae = VAE(VAE_CFG)

    def loss(i):
        x = images([train_scene(rng) for _ in range(BATCH["vae"])])
        mean, logvar = vae.encode(x)
        z = mean + torch.randn_like(mean) * (logvar / 2).exp()
        kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean()
        return F.mse_loss(vae.decode(z), x) + KL_WEIGHT * kl
    optimise(vae.parameters(), steps, 1e-3, loss, "vae")
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_pool(vae: VAE, n: int, seed: int) -> tuple[list, torch.Tensor, float]:
    """n training scenes and their latent MEANS (the posterior sample's noise would only blur the
    UNet's target), scaled by 1/std of all latent values as SD's scaling_factor does."""
    rng = np.random.default_rng([seed, 1])
    scenes = [train_scene(rng) for _ in range(n)]
    z = torch.cat([vae.encode(images(scenes[i:i + 256]))[0] for i in range(0, n, 256)])
    scale = float(1 / z.std())
    return scenes, z * scale, scale  # (n, 4, 16, 16)


def word_tokenizer():
    """The CLIP tokenizer with each grammar word ONE token. Longest words first: BPE applies the
    lowest-ranked merge present, and a short word's merges ("r i" of "right") listed before a
    longer word's chain ("t r", "tr i" of "triangle") would split the longer word."""
    tok = clip_tokenizer(words=sorted(WORDS, key=lambda w: (-len(w), w)), max_len=MAX_TOKENS)
    assert all(len(tok.tokenize(w)) == 1 for w in WORDS), "a grammar word spans several tokens"
    return tok


def text_encoder(tok) -> CLIPTextModel:
    return CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                                       eos_token_id=tok.eos_token_id,
                                       pad_token_id=tok.pad_token_id, **TEXT))


def diffusion_loss(unet, z0: torch.Tensor, context: torch.Tensor, abar: torch.Tensor):
    """eps-prediction MSE at uniformly drawn timesteps (torch's generator): z0 (B, 4, 16, 16)."""
    t = torch.randint(0, len(abar), (len(z0),))
    eps = torch.randn_like(z0)
    a = abar[t][:, None, None, None]
    zt = a.sqrt() * z0 + (1 - a).sqrt() * eps  # forward diffusion q(z_t | z_0)
    return F.mse_loss(unet(zt, t, context), eps)


def train_unet(scenes, latents, steps: int, seed: int, start=None
               ) -> tuple[UNet, object, CLIPTextModel]:
    """eps-prediction with SD's noise schedule, text encoder trained jointly, on (latent,
    INCOMPLETE caption) pairs; EMPTY_P empty captions for classifier-free guidance.
    start: (unet, text encoder) to continue instead of new ones (toy/bench/base_longer.py)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 2])
    tok = word_tokenizer()
    unet, enc = start if start is not None else (UNet(UNET_CFG), text_encoder(tok))
    abar = alphas_cumprod()

    def loss(i):
        idx = rng.integers(len(scenes), size=BATCH["unet"])
        caps = ["" if rng.random() < EMPTY_P else
                tw.caption(scenes[j], rng, DROP_OBJECT_P, DROP_COLOUR_P) for j in idx]
        ids = tok(caps, padding="max_length", max_length=MAX_TOKENS, return_tensors="pt")
        return diffusion_loss(unet, latents[torch.from_numpy(idx)], enc(ids.input_ids)[0], abar)
    optimise([*unet.parameters(), *enc.parameters()], steps, 5e-4, loss, "unet + text")
    return unet.eval(), tok, enc.eval()


def train_more(folder: str, steps: int, seed: int) -> tuple[UNet, CLIPTextModel]:
    """The base model saved in `folder` (fp16, as shipped) trained on with train_unet: a fresh
    AdamW and lr schedule, and a new pool of scenes (seed) encoded by its VAE at its scale."""
    pipe = load_pipeline(folder)
    n = min(LATENT_POOL, 4 * steps * BATCH["unet"])
    scenes, latents, scale = encode_pool(pipe.vae, n, seed)
    latents = latents / scale * pipe.vae.cfg.scale
    start = (pipe.unet.train().requires_grad_(True), pipe.encoders[0].train().requires_grad_(True))
    unet, _, enc = train_unet(scenes, latents, steps, seed, start=start)
    return unet, enc


def word_vocab(folder: str, vocab: list) -> BertTokenizer:
    """A BERT word tokenizer with exactly these tokens, written to folder/vocab.txt."""
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    return BertTokenizer(os.path.join(folder, "vocab.txt"))


def blip_tokenizer(folder: str) -> BertTokenizer:
    """A BERT word tokenizer for the captioner: BLIP's specials, its prefix and the grammar."""
    return word_vocab(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                               *sorted(set(WORDS) | {"photography", "of"} | set(tw.ODD_WORDS))])


def blip_config(tok, bos: int) -> BlipConfig:
    """BLIP's architecture at width BLIP_WIDTH, 64px images, 8px patches; `bos` starts the text
    decoder ([CLS] for the captioner, [DEC] for the VQA)."""
    w, n = BLIP_WIDTH, BLIP_LAYERS
    return BlipConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=w, intermediate_size=2 * w,
                         num_hidden_layers=n, num_attention_heads=2, max_position_embeddings=32,
                         encoder_hidden_size=w, pad_token_id=tok.pad_token_id,
                         bos_token_id=bos, sep_token_id=tok.sep_token_id),
        vision_config=dict(hidden_size=w, intermediate_size=2 * w, num_hidden_layers=n,
                           num_attention_heads=2, image_size=tw.SIZE, patch_size=BLIP_PATCH),
        projection_dim=w)


def grid_positions(n: int, dim: int, norm: float) -> torch.Tensor:
    """(n * n, dim) 2D sine-cosine codes of an n x n patch grid, row-major like BLIP's patches:
    x in the first half of the channels, y in the second (ViT's fixed layout), `norm` per patch."""
    freq = torch.exp(-math.log(100.0) * torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    ys, xs = torch.meshgrid(torch.arange(n).float(), torch.arange(n).float(), indexing="ij")

    def code(v):  # (n * n,) -> (n * n, dim / 2)
        angle = v.flatten()[:, None] * freq
        return torch.cat([angle.sin(), angle.cos()], 1)
    pos = torch.cat([code(xs), code(ys)], 1)
    return pos / pos.norm(dim=1, keepdim=True) * norm


def blip(tok, pos_norm: float = 0.0) -> BlipForConditionalGeneration:
    """The tiny captioner. BLIP's vision config starts its learned position embedding at std 1e-10
    (the real BLIP starts from a pretrained ViT): beside 8px patch embeddings of norm ~17 it stays
    invisible, and a captioner built so never learns where anything is (true vs flipped relation:
    50%). pos_norm > 0 starts it at grid_positions of that norm per patch instead."""
    model = BlipForConditionalGeneration(blip_config(tok, tok.cls_token_id))
    if pos_norm:
        emb = model.vision_model.embeddings
        n = tw.SIZE // BLIP_PATCH
        with torch.no_grad():  # index 0 is the class token
            emb.position_embedding[0, 1:] = grid_positions(n, emb.embed_dim, pos_norm)
    return model


def corrupt(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Mild augmentation of images (B, 3, H, W) in [0, 1], each with p 0.5 per image: a smooth
    colour field (amplitude up to 0.15), a 3x3 blur, Gaussian noise (sd up to 0.08). Captions
    are read off the result (world.describe), so a corruption strong enough to change what
    the evaluator reads changes the caption too."""
    B = len(x)

    def some(p, scale):  # (B, 1, 1, 1): 0 for the images left alone, else a random strength
        hit = torch.rand(B, 1, 1, 1, generator=g) < p
        return hit * torch.rand(B, 1, 1, 1, generator=g) * scale
    field = F.interpolate(torch.rand(B, 3, 4, 4, generator=g) * 2 - 1, size=x.shape[-2:],
                          mode="bicubic", align_corners=False)
    x = x + some(0.5, 0.15) * field
    blur = (torch.rand(B, 1, 1, 1, generator=g) < 0.5).float()
    x = blur * F.avg_pool2d(x, 3, 1, 1, count_include_pad=False) + (1 - blur) * x
    return (x + some(0.5, 0.08) * torch.randn(x.shape, generator=g)).clamp(0, 1)


def confuse(text: str, rng: np.random.Generator) -> str:
    """A wrong caption one edit away: the colours of two different shapes swapped (p 0.5 when a
    caption names them), else one colour or shape word replaced by another. (Swapping the
    colours of two same-shape objects would say the same thing: the captioner built before
    ee2215c was trained with that flaw, which pushed one word order over the other.)"""
    w = text.split()
    cols = [i for i, x in enumerate(w) if x in tw.COLOURS]
    shapes = [i for i, x in enumerate(w) if x in tw.SHAPES]
    if (len(cols) >= 2 and w[cols[0]] != w[cols[1]] and w[cols[0] + 1] != w[cols[1] + 1]
            and rng.random() < 0.5):
        w[cols[0]], w[cols[1]] = w[cols[1]], w[cols[0]]
    elif cols or shapes:
        i = int(rng.choice(cols + shapes))
        pool = list(tw.COLOURS) if w[i] in tw.COLOURS else list(tw.SHAPES)
        w[i] = str(rng.choice([x for x in pool if x != w[i]]))
    return " ".join(w)


def reshape(text: str) -> str | None:
    """The caption with its first object drawn as the next shape (circle -> square -> ...): the
    commonest binding failure left, a wrong shape. None without a shape."""
    w = text.split()
    i = next((i for i, x in enumerate(w) if x in tw.SHAPES), None)
    if i is None:
        return None
    w[i] = tw.SHAPES[(tw.SHAPES.index(w[i]) + 1) % len(tw.SHAPES)]
    return " ".join(w)


def swap_colours(text: str) -> str | None:
    """The caption with the colours of its first two objects swapped: wrong binding, right
    words. None when they share a colour or a shape (two circles swapped say the same thing)."""
    w = text.split()
    cols = [i for i, x in enumerate(w) if x in tw.COLOURS]
    if len(cols) < 2 or w[cols[0]] == w[cols[1]] or w[cols[0] + 1] == w[cols[1] + 1]:
        return None
    w[cols[0]], w[cols[1]] = w[cols[1]], w[cols[0]]
    return " ".join(w)


FLIP = {"to the left of": "to the right of", "to the right of": "to the left of",
        "above": "below", "below": "above"}


def relation(text: str) -> str | None:
    """The relation phrase of a caption ("above", "to the left of"), or None."""
    return next((r for r in FLIP if f" {r} " in text), None)


def reads_as(img: np.ndarray, caption: str) -> bool:
    """Does the evaluator read (64, 64, 3) uint8 `img` as `caption` (a captioner caption: objects
    joined by "and" or one relation, maybe "with noise"): the same objects, noise, relation?"""
    text = caption.removesuffix(" with noise")
    rel = relation(text)
    objs = sorted(text.split(f" {rel} " if rel else " and "))
    read = tw.describe(img)
    if sorted(read.removesuffix(" with noise").split(" and ")) != objs:
        return False
    if read.endswith("noise") != caption.endswith("noise"):
        return False
    return rel is None or tw.score(img, text)["relation_ok"] is True


def flip_relation(text: str) -> str | None:
    """A spatial caption with its relation reversed (left <-> right, above <-> below): the same
    objects in the other places. None without a relation or when the objects are the same."""
    rel = relation(text)
    if rel is None:
        return None
    a, b = text.split(f" {rel} ")
    return None if a == b else f"{a} {FLIP[rel]} {b}"


def miscount(text: str, rng: np.random.Generator) -> str:
    """A wrong caption naming one object too few or too many: one object kept of several, or a
    palette object added. The base model's commonest errors are an extra shape and a missing one,
    and both change only where a caption ends (one token of ten), so the token-mean likelihood
    hardly sees them unless the captioner is taught that a caption ending early is wrong."""
    # the objects named: 'a red circle', 'a mixed blob'
    objs = re.findall(r"a \S+ \S+", text.removesuffix(" with noise"))
    noise = " with noise" if text.endswith("noise") else ""
    if len(objs) >= 2:
        return str(rng.choice(objs)) + noise
    extra = f"a {rng.choice(list(tw.COLOURS))} {rng.choice(tw.SHAPES)}"
    return " and ".join([*objs, extra]) + noise


def ascend(cap: Captioner, x: torch.Tensor, prompts: list, eps: float, steps: int,
           ) -> torch.Tensor:
    """Projected gradient ascent of caption_logprob(prompts) on the pixels of x (B, 3, H, W) in
    [0, 1]: normalised steps of 2.5 eps / steps, each image's perturbation kept within RMS eps
    and the image within [0, 1]. The captioner's weights get no gradient."""
    delta = torch.zeros_like(x)
    for _ in range(steps):
        delta.requires_grad_(True)
        lp = caption_logprob(cap, x + delta, prompts).sum()
        grad, = torch.autograd.grad(lp, delta)
        rms = grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        delta = (x + delta.detach() + 2.5 * eps / steps * grad / rms).clamp(0, 1) - x
        norm = delta.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
        delta = delta * (eps / norm.clamp_min(eps))  # onto the RMS ball
    return (x + delta).clamp(0, 1).detach()


def ascend_latent(reward, pipe, z: torch.Tensor, prompts: list, eps: float,
                  steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient ascent of reward(images, prompts) (B,), e.g. a captioner's
    caption_logprob, on the decoded image of latents z (B, 4, 16, 16), scaled as the UNet's,
    through `pipe`'s VAE decoder: the space CoMat's gradient reaches, where a change must pass
    through the decoder. Each latent's perturbation is kept within RMS eps x its own RMS;
    normalised steps of 2.5 eps / steps of it. Returns the latents and their decoded images
    (B, 3, 64, 64) in [0, 1]. No weight gets a gradient."""
    size = z.pow(2).mean((1, 2, 3), keepdim=True).sqrt() * eps  # (B, 1, 1, 1) budget
    image = lambda z: decode(pipe, z).clamp(0, 1)  # noqa: E731
    delta = torch.zeros_like(z)
    for _ in range(steps):
        delta.requires_grad_(True)
        lp = reward(image(z + delta), prompts).sum()
        grad, = torch.autograd.grad(lp, delta)
        rms = grad.pow(2).mean((1, 2, 3), keepdim=True).sqrt().clamp_min(1e-12)
        delta = delta.detach() + 2.5 / steps * size * grad / rms
        norm = delta.pow(2).mean((1, 2, 3), keepdim=True).sqrt()
        delta = delta * (size / torch.maximum(norm, size))  # onto the RMS ball
    with torch.no_grad():
        return z + delta, image(z + delta)


def base_samples(folder: str, n: int, seed: int) -> tuple[np.ndarray, list]:
    """n samples (n, 64, 64, 3) uint8 of the base model saved in `folder`, on training prompts
    (train_scene), drawn as CoMat's training draws them (DDIM GEN_STEPS, CFG 7.5), and their
    prompts. What a captioner never saw it scores arbitrarily, and CoMat's reward is read on
    exactly these images."""
    pipe = load_pipeline(folder)
    rng = np.random.default_rng([seed, 5])
    prompts = [tw.prompt(train_scene(rng)) for _ in range(n)]
    out = [generate(pipe, prompts[i:i + 64], GEN_STEPS, 7.5, tw.SIZE, "ddim", seed + i,
                    progress=False) for i in tqdm(range(0, n, 64), desc="base samples")]
    return tw.to_uint8(torch.cat(out)), prompts


def captioner_batch(rng: np.random.Generator, g: torch.Generator, n: int, pool=None):
    """n training images (n, 3, 64, 64) in [0, 1] and their true captions: GEN_P of them the
    base model's samples (pool = base_samples(...), if given), ODD_P of the rest drawn wrongly
    (world.render_odd), all mildly corrupted, each captioned with what the evaluator reads in
    it (world.describe); a picture that reads as its scene gets the scene's prompt, so
    spatial scenes keep their relation word."""
    scenes = [train_scene(rng) for _ in range(n)]
    odd = rng.random(n) < ODD_P
    pics = [tw.render_odd(s, str(rng.choice(tw.ODD_KINDS)), rng) if o else tw.render(s)
            for s, o in zip(scenes, odd)]
    if pool is not None:
        for i in np.flatnonzero(rng.random(n) < GEN_P):
            j = int(rng.integers(len(pool[0])))
            pics[i], scenes[i] = pool[0][j], tw.parse_prompt(pool[1][j])
    x = corrupt(tw.to_float(np.stack(pics)), g)
    caps = []
    for s, img in zip(scenes, tw.to_uint8(x)):
        text = tw.describe(img, rng)
        same = sorted(text.split(" and ")) == sorted(f"a {o.colour} {o.shape}" for o in s.objects)
        caps.append(tw.prompt(s) if same else text)
    return x, caps


def train_relations(model: BlipForConditionalGeneration, tok, steps: int,
                    seed: int) -> BlipForConditionalGeneration:
    """The captioner's likelihood of spatial training scenes' prompts alone (batches of
    BATCH["captioner"], corrupted renders). To say "to the left of" after "a red circle" it must
    attend to the named object and read its place against the other's, which no other word of the
    grammar asks for: among all the captions that circuit never starts (the relation stays at
    chance), on relations alone it does."""
    torch.manual_seed(seed)
    rng, g = np.random.default_rng([seed, 5]), torch.Generator().manual_seed(seed)
    model = model.float().train().requires_grad_(True)
    cap = Captioner(model, tok)
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4)
    for _ in tqdm(range(steps), desc="relations", mininterval=10):
        scenes = [train_scene(rng, "spatial") for _ in range(BATCH["captioner"])]
        x = corrupt(tw.to_float(np.stack([tw.render(s) for s in scenes])), g)
        loss = -caption_logprob(cap, x, [tw.prompt(s) for s in scenes]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def train_captioner(tok, steps: int, seed: int, pool=None, pipe=None,
                    init: BlipForConditionalGeneration | None = None, lr: float = 5e-4,
                    mistake=swap_colours) -> BlipForConditionalGeneration:
    """Maximises captioner.caption_logprob (the very score CoMat uses, same prefix) of the TRUE
    caption of each picture (captioner_batch), and makes the gradient of that score semantic:
    - adversarial training: PGD_P of each batch is first pushed by `ascend` towards a confused
      caption within RMS PGD_EPS, then trained on its true caption (re-read by the evaluator),
      the standard way to get perceptually aligned input gradients;
    - binding and counting: on the unperturbed images the true caption must beat, by MARGIN
      nats per token (hinges), its confusion (colours swapped or one word changed) and its
      miscount (an object dropped or added), and by SWAP_MARGIN, where it names two objects of
      different colours and shapes, its colour swap (without this third hinge binding was read
      on 73-77% of 64 scenes, with it 95%: docs/toy-world.md), or whatever `mistake` makes of it
      (swap_colours or reshape: a caption -> a wrong caption, or None);
    - the generator's own pictures: `pool` (base_samples) supplies GEN_P of each batch;
    - reading where the generator reaches (with `pipe`, the base model whose VAE the ascents go
      through): latent ascents towards `mistake` or the flipped relation, read by the evaluator,
      and their hinges.
    init: a captioner to fine-tune (fp32) instead of a new one (toy/bench/reward.py's levers)."""
    torch.manual_seed(seed)
    rng, g = np.random.default_rng([seed, 3]), torch.Generator().manual_seed(seed)
    model = blip(tok) if init is None else init.float().train().requires_grad_(True)
    cap = Captioner(model, tok)
    k = int(PGD_P * BATCH["captioner"])

    def loss(i):
        x, caps = captioner_batch(rng, g, BATCH["captioner"], pool)
        wrong = [confuse(c, rng) for c in caps]
        model.eval()  # no dropout in the ascent (BLIP's default config has none anyway)
        adv = ascend(cap, x[:k], wrong[:k], PGD_EPS * float(rng.uniform(0.5, 1.5)), PGD_STEPS)
        model.train()
        adv_caps = [c if tw.describe(b) == tw.describe(a) else tw.describe(b, rng)
                    for a, b, c in zip(tw.to_uint8(x[:k]), tw.to_uint8(adv), caps[:k])]
        right = caption_logprob(cap, torch.cat([x, adv]), caps + adv_caps)  # (B + k,)
        true, clean = right[k:len(x)], x[k:]  # the unperturbed images, (n,), (n, 3, 64, 64)
        swaps = {j: mistake(c) for j, c in enumerate(caps[k:]) if mistake(c)}
        j = torch.tensor(list(swaps), dtype=torch.long)  # the images whose caption has a swap
        worse = caption_logprob(cap, torch.cat([clean, clean, clean[j]]),
                                wrong[k:] + [miscount(c, rng) for c in caps[k:]]
                                + list(swaps.values()))  # (2n + len(j),)
        n = len(true)
        margin = torch.full_like(worse, MARGIN)
        margin[2 * n:] = SWAP_MARGIN
        hinge = F.relu(margin - (torch.cat([true, true, true[j]]) - worse))
        total = (-right.mean() + hinge[:n].mean() + hinge[n:2 * n].mean()
                 + hinge[2 * n:].sum() / max(len(j), 1))
        if pipe is not None:
            total = total + reachable_binding(clean, caps[k:], swaps, rng)
        return total

    def reachable_binding(clean, caps, swaps, rng):
        """The latent ascents' caption loss and hinges, and the relation hinge (a scalar).
        swaps: {index in caps: its `mistake`} where it has one."""
        flips = {i: flip_relation(c) for i, c in enumerate(caps) if flip_relation(c)}
        pick = [i for i in range(len(caps)) if i in swaps or i in flips][:LAT_N]
        if not pick:
            return torch.zeros(())
        target = [flips[i] if i in flips and (i not in swaps or rng.random() < 0.5)
                  else swaps[i] for i in pick]
        with torch.no_grad():
            z = pipe.vae.encode(clean[pick] * 2 - 1)[0] * pipe.vae.cfg.scale  # (m, 4, 16, 16)
        model.eval()
        _, adv = ascend_latent(partial(caption_logprob, cap), pipe, z, target,
                               LAT_EPS * float(rng.uniform(0.1, 1.0)), LAT_STEPS)
        model.train()
        same = [reads_as(a, caps[i]) for a, i in zip(tw.to_uint8(adv), pick)]
        adv_caps = [caps[i] if ok else tw.describe(a, rng)
                    for ok, i, a in zip(same, pick, tw.to_uint8(adv))]
        keep = torch.tensor(same)
        f = torch.tensor(list(flips), dtype=torch.long)
        lp = caption_logprob(cap, torch.cat([adv, adv[keep], clean[f], clean[f]]),
                             adv_caps + [t for t, ok in zip(target, same) if ok]
                             + [caps[i] for i in flips] + list(flips.values()))
        m, h = len(pick), int(keep.sum())
        hinge = F.relu(SWAP_MARGIN - (lp[:m][keep] - lp[m:m + h]))
        rel = F.relu(REL_MARGIN - (lp[m + h:m + h + len(f)] - lp[m + h + len(f):]))
        return (-lp[:m].mean() + hinge.sum() / max(h, 1) + rel.sum() / max(len(f), 1))
    optimise(model.parameters(), steps, lr, loss, "captioner")
    return model.eval()


# --- the toy BLIP-VQA: T2I-CompBench's colour scorer (evaluate.py) for the toy world ---
SWAP_P, NEAR_P = 0.5, 0.8  # "no" questions: share of swapped bindings (where possible), of
# near misses (one word of a found object changed); the rest any absent colour and shape


def vqa_tokenizer(folder: str) -> BertTokenizer:
    """A BERT word tokenizer for the VQA: the grammar, "?", "yes", "no", and BLIP's [DEC], [ENC]
    as the LAST two ids, where BLIP appends them to BERT's vocabulary (evaluate.yes_logit)."""
    return word_vocab(folder, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", "yes", "no",
                               *WORDS, "[DEC]", "[ENC]"])


def vqa_model(tok) -> BlipForQuestionAnswering:
    """The captioner's tiny BLIP (blip_config) as BlipForQuestionAnswering; [DEC] starts the
    answer."""
    return BlipForQuestionAnswering(blip_config(tok, tok.convert_tokens_to_ids("[DEC]")))


def absent(found: set, rng: np.random.Generator) -> tuple[str, str]:
    """A (colour, shape) not in found: with SWAP_P the binding of two found objects swapped
    (a red circle and a blue square -> "a blue circle?"), else with NEAR_P one word of a found
    object changed, else any."""
    every = {(c, s) for c in tw.COLOURS for s in tw.SHAPES}
    swaps = {(a[0], b[1]) for a in found for b in found} - found
    near = {(c, s) for c0, s0 in found for c, s in every if c == c0 or s == s0} - found
    for pool, p in ((swaps, SWAP_P), (near, NEAR_P), (every - found, 1.0)):
        if pool and rng.random() < p:
            return sorted(pool)[int(rng.integers(len(pool)))]
    raise AssertionError("an image holding every colour and shape")


def vqa_batch(rng: np.random.Generator, g: torch.Generator, n: int):
    """n pictures (n, 3, 64, 64) in [0, 1] as the captioner's (captioner_batch: ODD_P drawn
    wrongly, all mildly corrupted), rounded to uint8 as a saved PNG; questions as evaluate.py
    asks them ("a red circle?"), their pictures' indices, answers 1 (yes) / 0 (no): yes when the
    analytic evaluator (world.detect) finds that colour and shape. One yes and one no per
    picture (a blank picture: one no)."""
    x, _ = captioner_batch(rng, g, n)
    x = tw.to_float(tw.to_uint8(x))
    qs, owner, ys = [], [], []
    for b, img in enumerate(tw.to_uint8(x)):
        found = {(f.colour, f.shape) for f in tw.detect(img)}
        pairs = [(sorted(found)[int(rng.integers(len(found)))], 1.0)] if found else []
        for (c, s), y in pairs + [(absent(found, rng), 0.0)]:
            qs.append(f"a {c} {s}?")
            owner.append(b)
            ys.append(y)
    return x, qs, owner, torch.tensor(ys)


def from_captioner(model: BlipForQuestionAnswering, cap, cap_tok, tok) -> None:
    """Start the VQA from the captioner, as BLIP's VQA starts from its pre-trained model (whose
    text encoder and decoder share all but self-attention): the vision tower, and both text
    towers from the captioner's decoder, word embeddings matched by word ("?", "yes", "no",
    [DEC], [ENC] and the yes/no head's bias start random)."""
    model.vision_model.load_state_dict(cap.vision_model.state_dict())
    sd, key = cap.text_decoder.bert.state_dict(), "embeddings.word_embeddings.weight"
    emb, old = model.text_encoder.state_dict()[key].clone(), cap_tok.get_vocab()
    for word, i in tok.get_vocab().items():
        if word in old:
            emb[i] = sd[key][old[word]]
    sd[key] = emb
    model.text_encoder.load_state_dict(sd)
    model.text_decoder.bert.load_state_dict(sd)  # its output layer is tied to these embeddings
    model.text_decoder.cls.predictions.transform.load_state_dict(
        cap.text_decoder.cls.predictions.transform.state_dict())


def train_vqa(tok, cap, cap_tok, steps: int, seed: int) -> BlipForQuestionAnswering:
    """Cross-entropy of the answer that evaluate.py reads: yes vs no at the decoder's first step
    (evaluate.yes_logit, the same code path), on vqa_batch's pictures and questions, starting
    from the captioner cap (from_captioner): from scratch, 1500 steps learnt presence but hardly
    binding (held-out accuracy 52%)."""
    torch.manual_seed(seed)
    rng, g = np.random.default_rng([seed, 4]), torch.Generator().manual_seed(seed)
    model = vqa_model(tok)
    from_captioner(model, cap, cap_tok, tok)

    def loss(i):
        x, qs, owner, y = vqa_batch(rng, g, BATCH["vqa"])
        z = evaluate.yes_logit(model, tok, (x - evaluate.MEAN) / evaluate.STD, qs, owner)
        return F.binary_cross_entropy_with_logits(z, y)
    optimise(model.parameters(), steps, 5e-4, loss, "vqa")
    return model.eval()


def unet_json(cfg: UNetConfig, sample_size: int) -> dict:
    """diffusers UNet2DConditionModel config.json fields (the inverse of
    weights.unet_config_from_diffusers for SD1.5-style UNets)."""
    return {"_class_name": "UNet2DConditionModel", "sample_size": sample_size,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D"
                                 for d in cfg.depth],
            "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D"
                               for d in cfg.depth[::-1]],
            "block_out_channels": list(cfg.channels), "layers_per_block": cfg.n_res,
            # diffusers' mid block takes the last level's depth
            "transformer_layers_per_block": [d or 1 for d in cfg.depth[:-1]] + [cfg.mid_depth],
            "attention_head_dim": list(cfg.heads),  # diffusers' name for the head COUNT
            "norm_num_groups": cfg.groups, "cross_attention_dim": cfg.ctx_dim,
            "use_linear_projection": cfg.linear_proj}


def vae_json(cfg: VAEConfig, sample_size: int) -> dict:
    """diffusers AutoencoderKL config.json fields (read by weights.vae_config_from_diffusers)."""
    n = len(cfg.channels)
    return {"_class_name": "AutoencoderKL", "sample_size": sample_size,
            "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
            "down_block_types": ["DownEncoderBlock2D"] * n,
            "up_block_types": ["UpDecoderBlock2D"] * n, "block_out_channels": list(cfg.channels),
            "layers_per_block": cfg.n_res, "latent_channels": cfg.latent,
            "norm_num_groups": cfg.groups, "scaling_factor": cfg.scale,
            "force_upcast": cfg.upcast}


def save_part(folder: str, config: dict, module: torch.nn.Module) -> None:
    """config.json + diffusion_pytorch_model.fp16.safetensors (the loader's fp16 variant)."""
    os.makedirs(folder)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = {k: v.half() for k, v in module.state_dict().items()}
    save_weights(sd, os.path.join(folder, "diffusion_pytorch_model.fp16.safetensors"))


def plan(budget_minutes: float | None) -> dict[str, int]:
    """Step counts for a budget: the shipped build's counts (None) scaled so that training takes
    95% of the budget (the rest: encoding the latent pool, saving)."""
    if budget_minutes is None:
        return dict(STEPS)
    scale = 0.95 * budget_minutes * 60 / sum(STEPS[k] * SEC_PER_STEP[k] * RUNS.get(k, 1)
                                             for k in STEPS)
    return {k: max(1, int(STEPS[k] * scale)) for k in STEPS}


def build(out: str = "toy/model", seed: int = 0, budget_minutes: float | None = None,
          steps: dict | None = None, pool: int = LATENT_POOL, only: tuple = STAGES) -> str:
    """Train the models of the stages in `only` and write the folder `out` atomically (built in
    a temp folder, then renamed over any previous one); a stage left out is copied from the
    existing `out`. `steps` overrides plan(budget_minutes) per model."""
    steps = {**plan(budget_minutes), **(steps or {})}
    assert set(only) <= set(STAGES), f"stages are {STAGES}"
    print(f"toy build: stages {list(only)}, steps {steps} (seed {seed})")
    made = {p for stage in only for p in PARTS[stage]}
    if "more" in only and "base" not in only:  # it trains on the UNet and text encoder kept
        made -= set(PARTS["more"])
    kept = sorted({p for parts in PARTS.values() for p in parts} - made)
    for p in kept:
        if not os.path.isdir(os.path.join(out, p)):
            raise SystemExit(f"error: {out}/{p} missing: build its stage too (--only)")
    tmp = f"{out}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    for p in kept:
        shutil.copytree(os.path.join(out, p), os.path.join(tmp, p))
    if "base" in only:
        vae = train_vae(steps["vae"], seed)
        scenes, latents, scale = encode_pool(vae, min(pool, 4 * steps["unet"] * BATCH["unet"]),
                                             seed)
        vae.cfg = dataclasses.replace(vae.cfg, scale=scale)  # read by sample.decode
        unet, tok, enc = train_unet(scenes, latents, steps["unet"], seed)
        save_part(os.path.join(tmp, "unet"), unet_json(UNET_CFG, 16), unet)
        save_part(os.path.join(tmp, "vae"), vae_json(vae.cfg, tw.SIZE), vae)
        copy.deepcopy(enc).half().save_pretrained(os.path.join(tmp, "text_encoder"))
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    if "more" in only:  # from the fp16 files just written (or kept), as they are shipped
        unet, enc = train_more(tmp, steps["more"], seed + 1)
        for part in ("unet", "text_encoder"):
            shutil.rmtree(os.path.join(tmp, part))
        save_part(os.path.join(tmp, "unet"), unet_json(UNET_CFG, 16), unet)
        copy.deepcopy(enc).half().save_pretrained(os.path.join(tmp, "text_encoder"))
    if "captioner" in only:
        cap_dir = os.path.join(tmp, "captioner")
        os.makedirs(cap_dir)
        btok = blip_tokenizer(cap_dir)
        n = min(GEN_POOL, BATCH["captioner"] * steps["captioner"])  # the UNet built or kept
        model = train_captioner(btok, steps["captioner"], seed, base_samples(tmp, n, seed))
        model.half().save_pretrained(cap_dir)
        btok.save_pretrained(cap_dir)
    if "vqa" in only:  # after the captioner: it starts from the captioner's vision tower
        vqa_dir = os.path.join(tmp, "vqa")
        os.makedirs(vqa_dir)
        vtok = vqa_tokenizer(vqa_dir)
        cap = BlipForConditionalGeneration.from_pretrained(os.path.join(tmp, "captioner"))
        cap_tok = BertTokenizer.from_pretrained(os.path.join(tmp, "captioner"))
        model = train_vqa(vtok, cap.float(), cap_tok, steps["vqa"], seed)
        model.half().save_pretrained(vqa_dir)
        vtok.save_pretrained(vqa_dir)
    if "bind" in only:  # the captioner fine-tuned on reshapes where the generator reaches
        bind_dir = os.path.join(tmp, "captioner_bind")
        cap = BlipForConditionalGeneration.from_pretrained(os.path.join(tmp, "captioner"))
        cap_tok = BertTokenizer.from_pretrained(os.path.join(tmp, "captioner"))
        base = load_pipeline(tmp)  # fp32, frozen: the ascents' decoder
        model = train_captioner(cap_tok, steps["bind"], seed, None, base, init=cap, lr=BIND_LR,
                                mistake=reshape)
        model.half().save_pretrained(bind_dir)
        cap_tok.save_pretrained(bind_dir)
    if "rel" in only:  # a captioner that reads relations, built as the two above from the start
        rel_dir = os.path.join(tmp, "captioner_rel")
        os.makedirs(rel_dir)
        rtok = blip_tokenizer(rel_dir)
        cap = train_relations(blip(rtok, POS_NORM), rtok, steps["relations"], seed)
        n = min(GEN_POOL, BATCH["captioner"] * steps["captioner"])
        cap = train_captioner(rtok, steps["captioner"], seed, base_samples(tmp, n, seed), init=cap)
        base = load_pipeline(tmp)
        model = train_captioner(rtok, steps["bind"], seed, None, base, init=cap, lr=BIND_LR,
                                mistake=reshape)
        model.half().save_pretrained(rel_dir)
        rtok.save_pretrained(rel_dir)
    with open(os.path.join(tmp, "comat.json"), "w") as f:
        json.dump(TRAIN_PRESET, f, indent=1)
        f.write("\n")
    old = f"{out}.old{os.getpid()}"
    if os.path.exists(out):
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def main(argv=None):
    """`python -m toy.build [--minutes M] [--out DIR] [--seed S] [--only base,captioner]`."""
    import argparse
    ap = argparse.ArgumentParser(description="Build the toy world's base model and captioner.")
    ap.add_argument("--minutes", type=float, default=None,
                    help="budget on 2 CPU cores (default: the shipped build's steps, ~135 min)")
    ap.add_argument("--out", default="toy/model", help="folder (default toy/model)")
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--only", default=",".join(STAGES),
                    help="stages to (re)build; the others are kept from --out")
    a = ap.parse_args(argv)
    print(f"wrote {build(a.out, a.seed, a.minutes, only=tuple(a.only.split(',')))}")


if __name__ == "__main__":
    main()
