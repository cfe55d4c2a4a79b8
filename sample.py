"""Sampling for SD1.5 / SDXL: noise schedule, one differentiable `denoise` loop (DDIM eta=0 or DDPM
ancestral) shared by training and sampling, guidance as a closure, prompt encoding, and the CLI.

Schedule and steps follow diffusers' DDIM/DDPMScheduler with the SD config (scaled-linear betas,
"leading" spacing, steps_offset 1, no clipping), as in the scheduler configs
that ship with SD1.5 and SDXL (docs/official-code.md 7).
Shapes: B batch, C latent channels, H, W latent size, T text tokens (77), D context width.
Usage: python sample.py "a red cat" --model path/to/sdxl --steps 30 --seed 0
"""
import argparse
import json
import os
import sys
import tempfile
import warnings

import torch
from tqdm import tqdm

import viz
from unet import merge_lora
from weights import load, load_state, load_strict, unknown_words

# --- noise schedule and the two update rules ---


def alphas_cumprod(n_train=1000, beta_start=0.00085, beta_end=0.012):
    """abar_t for SD's "scaled_linear" betas, in fp32 exactly as diffusers computes them."""
    betas = torch.linspace(beta_start**0.5, beta_end**0.5, n_train, dtype=torch.float32) ** 2
    return torch.cumprod(1.0 - betas, dim=0)  # (n_train,)


def timesteps(n, n_train=1000, offset=1):
    """'Leading' spacing: n=50 gives [981, 961, ..., 21, 1]."""
    return [i * (n_train // n) + offset for i in reversed(range(n))]


def step(x, eps, t, t_prev, abar, sampler, noise=None):
    """One reverse step x_t -> x_prev: DDIM (eta 0) or DDPM ancestral ("fixed_small" variance).

    Written in diffusers' operation order so float64 runs agree to the last bits. The last step has
    t_prev < 0: DDIM then uses abar[0] (set_alpha_to_one=False), DDPM uses 1, so DDPM's final
    sample is exactly the x0 prediction (plus ~1e-10 noise).
    """
    a_t = abar[t]
    a_p = abar[t_prev] if t_prev >= 0 else (abar[0] if sampler == "ddim" else torch.ones_like(a_t))
    x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t**0.5  # epsilon prediction -> x0 prediction
    if sampler == "ddim":
        return a_p**0.5 * x0 + (1 - a_p) ** 0.5 * eps
    alpha, beta = a_t / a_p, 1 - a_t / a_p  # this step's own alpha and beta
    mean = (a_p**0.5 * beta) / (1 - a_t) * x0 + alpha**0.5 * (1 - a_p) / (1 - a_t) * x
    var = torch.clamp((1 - a_p) / (1 - a_t) * beta, min=1e-20)
    return mean + var**0.5 * noise


def denoise(eps_fn, x, ts, abar, sampler="ddim", grad_steps=(), detach=True, generator=None,
            progress=False):
    """Run the reverse chain from x = x_T (B, C, H, W) over timesteps ts; return the final latent.

    Gradient truncation: steps before min(grad_steps) run entirely without a graph. From there on
    the scheduler update stays in the graph, so a loss on the result reaches every chosen step
    along the linear latent path; the UNet (eps_fn) builds a graph only at the steps in grad_steps.
    detach=True detaches the UNet input at those steps (official SDXL path); with detach=False the
    gradient also flows through the UNet's input Jacobian into earlier steps (official SD1.5).
    eps_fn(x, t) -> eps is any callable, e.g. the CFG closure below.
    """
    n_train, first = len(abar), min(grad_steps, default=len(ts))
    for i, t in enumerate(tqdm(ts, disable=not progress, desc="denoise")):
        t_prev = t - n_train // len(ts)
        noise = None
        if sampler == "ddpm":  # one draw per step, in diffusers' order, so seeded runs match it
            noise = torch.randn(x.shape, generator=generator, dtype=x.dtype, device=x.device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and i >= first):
            with torch.set_grad_enabled(torch.is_grad_enabled() and i in grad_steps):
                eps = eps_fn(x.detach() if detach or i not in grad_steps else x, t)
            x = step(x, eps, t, t_prev, abar.to(x.device), sampler, noise)
    return x


def cfg_fn(unet, ctx, uncond, scale, pooled=None, upooled=None, ids=None):
    """Classifier-free guidance as a closure: eps = eps_u + scale * (eps_c - eps_u).

    One UNet call on the batch [uncond; cond] (diffusers' order). scale <= 1 runs the conditional
    branch alone, as diffusers does.
    """
    if scale <= 1:
        return lambda x, t: unet(x, t, ctx, pooled, ids)
    c = torch.cat([uncond, ctx])  # (2B, T, D)
    p = None if pooled is None else torch.cat([upooled, pooled])
    i2 = None if ids is None else torch.cat([ids, ids])

    def eps(x, t):
        e_u, e_c = unet(torch.cat([x, x]), t, c, p, i2).chunk(2)
        return e_u + scale * (e_c - e_u)
    return eps


# --- text conditioning ---


def tokenize(tok, prompts):
    """Pad/truncate to the tokenizer's length (77), warning about what truncation drops."""
    for p in prompts:
        if len(tok(p).input_ids) > tok.model_max_length:
            warnings.warn(f"prompt over {tok.model_max_length} tokens, truncated: {p[:60]!r}...")
    return tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").input_ids


def encode_prompt(pipe, prompts):
    """Text context (B, T, D) and, for SDXL, the pooled embedding (B, 1280).

    SD1.5: CLIP-L's last hidden state (after the final LayerNorm). SDXL: both encoders' penultimate
    hidden states concatenated (L then G) and encoder 2's projected pooled output.
    """
    dev = next(pipe.encoders[0].parameters()).device
    if not pipe.sdxl:
        return pipe.encoders[0](tokenize(pipe.tokenizers[0], prompts).to(dev))[0], None
    hidden, pooled = [], None
    for tok, enc in zip(pipe.tokenizers, pipe.encoders):
        out = enc(tokenize(tok, prompts).to(dev), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])  # input of the last layer, not final-normed
        pooled = out[0]  # for CLIPTextModelWithProjection: text_embeds
    return torch.cat(hidden, dim=-1), pooled


def conditioning(pipe, prompts, negative=None):
    """(ctx, uncond, pooled, upooled) for CFG. negative=None uses each model's default: SDXL all
    zeros (force_zeros_for_empty_prompt), SD1.5 the encoding of ""."""
    ctx, pooled = encode_prompt(pipe, prompts)
    if pipe.sdxl and negative is None:
        return ctx, torch.zeros_like(ctx), pooled, torch.zeros_like(pooled)
    uncond, upooled = encode_prompt(pipe, [negative or ""] * len(prompts))
    return ctx, uncond, pooled, upooled


def time_ids(h, w, batch):
    """SDXL micro-conditioning (B, 6): original size, crop top-left, target size; height first."""
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(batch, 1)


def decode(pipe, z):
    """Latents (B, C, H, W) -> image (B, 3, 8H, 8W) in about [0, 1], not clamped (training keeps
    the graph). The VAE runs in its own dtype: SDXL's is kept in fp32, it overflows fp16."""
    dtype = next(pipe.vae.parameters()).dtype
    return pipe.vae.decode(z.to(dtype) / pipe.vae.cfg.scale) / 2 + 0.5


# --- CLI ---


def read_prompts(path):
    """Prompts from a UTF-8 text file (one a line) or JSONL ({"prompt": "..."}); blank lines
    skipped. Any other content exits in one line naming the file (and the line)."""
    if not os.path.isfile(path):
        sys.exit(f"error: prompts file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            lines = [(i, ln.strip()) for i, ln in enumerate(f, 1) if ln.strip()]
    except UnicodeDecodeError as e:
        sys.exit(f"error: prompts file is not UTF-8 text: {path} (byte {e.start}: "
                 f"{e.object[e.start:e.start + 1]!r})")
    if not lines:
        sys.exit(f"error: prompts file has no prompts: {path}")
    if not path.endswith(".jsonl"):
        return [ln for _, ln in lines]
    prompts = []
    for i, ln in lines:
        try:
            row = json.loads(ln)
        except json.JSONDecodeError as e:
            sys.exit(f"error: {path} line {i}: not JSON ({e.msg})")
        prompt = row.get("prompt") if isinstance(row, dict) else None
        if not (isinstance(prompt, str) and prompt.strip()):
            sys.exit(f"error: {path} line {i}: needs {{\"prompt\": \"some text\"}}, got {ln[:60]}")
        prompts.append(prompt)
    return prompts


def check_out(path):
    """Exit in one line, before any work, when `path` cannot be written: its nearest existing
    folder must be a folder we can write a file in (nothing is created here)."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    try:
        if not os.path.isdir(folder):
            raise NotADirectoryError(f"{folder} is a file")
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        sys.exit(f"error: cannot write {path} ({e.strerror or e})")


def generate(pipe, prompts, steps=30, scale=7.5, size=512, sampler="ddim", seed=0, negative=None,
             latents=None, progress=True):
    """Prompts -> images (B, 3, size, size) in [0, 1]; the whole loop under no_grad."""
    f = pipe.vae.cfg.factor
    dev, dtype = pipe.unet.conv_in.weight.device, pipe.unet.conv_in.weight.dtype
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        ctx, uncond, pooled, upooled = conditioning(pipe, prompts, negative)
        ids = time_ids(size, size, len(prompts)).to(dev, dtype) if pipe.sdxl else None
        if latents is None:
            shape = (len(prompts), pipe.unet.cfg.in_channels, size // f, size // f)
            latents = torch.randn(shape, generator=g, device=dev, dtype=dtype)
        pooled, upooled = (None, None) if pooled is None else (pooled.to(dtype), upooled.to(dtype))
        eps = cfg_fn(pipe.unet, ctx.to(dtype), uncond.to(dtype), scale, pooled, upooled, ids)
        z = denoise(eps, latents, timesteps(steps), alphas_cumprod(), sampler, generator=g,
                    progress=progress)
        return decode(pipe, z).clamp(0, 1).float()


def load_or_exit(model, unet=None, lora=None, device="cpu", dtype=torch.float32, text_from=None):
    """weights.load, fine-tuned UNet weights or a LoRA merged in; bad files exit in one line."""
    try:
        pipe = load(model, device, dtype, text_from)
        if unet:
            sd = {k: v.to(device, dtype) for k, v in load_state(unet).items()}
            load_strict(pipe.unet, sd, f"UNet weights {unet}")
        if lora:
            merge_lora(pipe.unet, load_state(lora))
    except (FileNotFoundError, ValueError) as e:
        sys.exit(f"error: {e}")
    return pipe


def warn_unknown(model, prompts):
    """The toy model draws only its own world: say so, in one line, for any other word."""
    line = unknown_words(model, prompts)
    if line:
        print(line, file=sys.stderr)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Sample images from SD1.5 / SDXL or a fine-tune.")
    ap.add_argument("prompt", nargs="*", help="one or more prompts")
    ap.add_argument("--prompts", help="text file, one prompt per line")
    ap.add_argument("--model", default="toy/model",
                    help="diffusers folder | single file | hub id (org/name) | tiny | tiny-sdxl "
                         "(random weights); "
                         "default: the toy-world model shipped in this repository")
    ap.add_argument("--text-from", help="diffusers folder (or hub id) with the text encoders, "
                    "for a single file without them (default: the file's own)")
    ap.add_argument("--unet", help="fine-tuned UNet weights (.safetensors, our/diffusers keys)")
    ap.add_argument("--lora", help="LoRA weights (.safetensors, diffusers/peft keys) to merge")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=7.5, help="guidance scale; <= 1 disables CFG")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n", type=int, default=1, help="images per prompt")
    ap.add_argument("--size", type=int,
                    help="image side in pixels (default: the model's, SDXL 1024, SD1.5 512)")
    ap.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default="out/sample.png")
    a = ap.parse_args(argv)

    prompts = list(a.prompt) + (read_prompts(a.prompts) if a.prompts else [])
    if not prompts:
        sys.exit("error: no prompt given (pass prompts as arguments or --prompts FILE)")
    if a.steps < 1 or a.steps > 1000 or a.n < 1:
        sys.exit("error: --steps must be in 1..1000 and --n >= 1")
    check_out(a.out)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    pipe = load_or_exit(a.model, a.unet, a.lora, a.device, dtype, a.text_from)
    warn_unknown(a.model, prompts)
    f = pipe.vae.cfg.factor
    size = a.size or pipe.size
    if size % f or not f * 4 <= size <= 4096:
        sys.exit(f"error: --size must be a multiple of {f} between {4 * f} and 4096, got {size}")
    if a.model.startswith("tiny"):
        print("note: the tiny preset has random weights; its pictures are noise")

    images = []
    for i in range(a.n):  # a different seed per image row keeps each image independent of --n
        images.append(generate(pipe, prompts, a.steps, a.cfg, size, a.sampler, a.seed + i))
    images = torch.stack(images, 1).flatten(0, 1)  # (prompts * n, 3, size, size)
    viz.save_images(images, a.out, cols=a.n if len(prompts) > 1 else min(a.n, 4))
    print(f"wrote {a.out} ({len(images)} image{'s' if len(images) > 1 else ''}, {size}x{size})")


if __name__ == "__main__":
    main()
