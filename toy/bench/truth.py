"""What can the truth teach the toy base model? Fine-tunes it on rendered training scenes with their
COMPLETE captions (what CoMat's reward can only point at), with the base stage's own diffusion loss,
then scores it with `python -m toy.eval`: a ceiling for any reward trained with the same weights.
Trains a LoRA (the toy preset's rank 8 and lr 3e-4) or the whole UNet (--full, lr 1e-4), and with
--text the whole text encoder beside it (lr 3e-4); 10% empty captions, as the base stage; AdamW,
gradient norm clipped at 1. Writes OUT/lora.safetensors (or unet.safetensors), OUT/model (the
model folder, with the trained text encoder under --text) and OUT/{split}.json (docs/toy-world.md,
"What this base can learn about relations").
Usage: python -m toy.bench.truth [--steps 2000] [--batch 32] [--kind all|one|two|spatial]
                                 [--text] [--full] [--split val|eval] [--out runs/truth]
"""
import argparse
import copy
import os
import shutil

import numpy as np
import torch
from tqdm import tqdm

import sample
import toy
from toy import build as tb
from toy import eval as toy_eval
from toy import world as tw
from unet import add_lora, lora_state_dict
from weights import save_weights

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def train(pipe, steps: int, batch: int, kind: str | None, seed: int, text: bool, full: bool):
    """Fine-tune pipe's UNet (LoRA rank 8, or whole) and, with `text`, its text encoder, in place,
    on `steps` batches of rendered training scenes of `kind` (None: the three kinds alike). Scenes
    and captions follow from `seed`; the LoRA's init and the noise from torch's generator, which
    main() seeds before loading the model."""
    rng = np.random.default_rng(seed)
    unet, vae, enc, tok = pipe.unet, pipe.vae, pipe.encoders[0], pipe.tokenizers[0]
    vae.requires_grad_(False)
    enc.requires_grad_(text)
    if full:
        unet.requires_grad_(True)
    else:
        add_lora(unet, 8)
    groups = [{"params": [p for p in unet.parameters() if p.requires_grad],
               "lr": 1e-4 if full else 3e-4}]
    if text:
        groups.append({"params": list(enc.parameters()), "lr": 3e-4})
    params = [p for g in groups for p in g["params"]]
    opt = torch.optim.AdamW(groups, weight_decay=1e-2)
    abar = sample.alphas_cumprod()
    for _ in tqdm(range(steps), desc="truth", mininterval=10):
        scenes = [tb.train_scene(rng, kind) for _ in range(batch)]
        with torch.no_grad():
            z0 = vae.encode(tb.images(scenes))[0] * vae.cfg.scale  # (B, 4, 16, 16)
        caps = ["" if rng.random() < tb.EMPTY_P else tw.prompt(s) for s in scenes]
        ids = tok(caps, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.set_grad_enabled(text):
            c = enc(ids)[0]  # (B, 16, 64)
        loss = tb.diffusion_loss(unet, z0, c, abar)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()


def save(pipe, out: str, text: bool, full: bool) -> tuple[str, str]:
    """The trained weights and a model folder, made anew (the shipped parts linked, the text
    encoder written when trained); returns (weights file, model folder)."""
    os.makedirs(out, exist_ok=True)
    model, tmp = os.path.join(out, "model"), os.path.join(out, "model.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # links only: the shipped parts are never touched
    os.makedirs(tmp)
    for part in os.listdir(toy.MODEL):
        if not (text and part == "text_encoder"):
            os.symlink(os.path.abspath(os.path.join(toy.MODEL, part)), os.path.join(tmp, part))
    if text:  # fp16, as shipped
        copy.deepcopy(pipe.encoders[0]).eval().half().save_pretrained(
            os.path.join(tmp, "text_encoder"))
    shutil.rmtree(model, ignore_errors=True)
    os.replace(tmp, model)
    path = os.path.join(out, "unet.safetensors" if full else "lora.safetensors")
    save_weights(pipe.unet.state_dict() if full else lora_state_dict(pipe.unet), path)
    return path, model


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--kind", choices=["all", "one", "two", "spatial"], default="all")
    ap.add_argument("--text", action="store_true", help="train the text encoder too")
    ap.add_argument("--full", action="store_true", help="the whole UNet instead of a LoRA")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--split", choices=["eval", "val"], default="val")
    ap.add_argument("--out", default=os.path.join(ROOT, "runs", "truth"))
    a = ap.parse_args()
    torch.manual_seed(a.seed)
    pipe = sample.load(toy.MODEL)
    train(pipe, a.steps, a.batch, None if a.kind == "all" else a.kind, a.seed, a.text, a.full)
    path, model = save(pipe, a.out, a.text, a.full)
    toy_eval.main(["--model", model, "--unet" if a.full else "--lora", path, "--split", a.split,
                   "--out", os.path.join(a.out, f"{a.split}.json")])


if __name__ == "__main__":
    main()
