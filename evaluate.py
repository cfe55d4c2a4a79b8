"""T2I-CompBench(++) as the benchmark scores it (Karine-Huang/T2I-CompBench 1b70949, MIT;
docs/compbench.md): BLIP-VQA for colour, shape, texture; a detector and a position
rule for spatial; CLIP for non-spatial; their 3-in-1 mix for complex; detector + DPT depth for
3d_spatial; detector counts for numeracy. This file runs the models (from local folders), the
layout, generation and the CLI; the rules themselves are compbench.py's pure functions.
Deviations: Grounding-DINO, not UniDet (detector scores are not comparable with published
numbers); spaCy's en_core_web_sm only when installed, else chunker.py's rule-based chunker.
Layout (compbench.read_samples): OUT/{category}/samples/{prompt}_{NNNNNN}.png (index
prompt * 10 + k, seed 42 + k).
Usage: python evaluate.py runs/base --data T2I-CompBench/examples/dataset
    --model path/to/stable-diffusion-v1-5 --blip blip-vqa-capfilt-large
    --clip clip-vit-base-patch32 --dino grounding-dino-tiny --dpt dpt-hybrid-midas
"""
import argparse
import os
import sys
from typing import Callable, NamedTuple

import torch
from PIL import Image
from safetensors import SafetensorError
from tqdm import tqdm
from transformers import (AutoProcessor, AutoTokenizer, BlipForQuestionAnswering, CLIPModel,
                          DPTForDepthEstimation, GroundingDinoForObjectDetection)

import captioner
import compbench as cb
import segment
import viz
from weights import model_folder
from sample import check_out, generate, load_or_exit, warn_unknown

CATEGORIES = ("color", "shape", "texture", "spatial", "non_spatial", "complex", "3d_spatial",
              "numeracy")
NEEDS = {"blip": ("color", "shape", "texture", "complex"), "clip": ("non_spatial", "complex"),
         "dino": ("spatial", "complex", "3d_spatial", "numeracy"),
         "dpt": ("3d_spatial",)}  # which scorer each category runs
ARCH = {"blip": ("BlipForQuestionAnswering",), "clip": ("CLIPModel",),
        "dino": ("GroundingDinoForObjectDetection",), "dpt": ("DPTForDepthEstimation",)}
MAIN = {"spatial": "spatial", "non_spatial": "clip", "complex": "3_in_1",
        "3d_spatial": "spatial_3d", "numeracy": "numeracy"}  # the table's metric; else blip
# BLIP and CLIP were both trained with CLIP's normalisation constants (captioner.py's), (3, 1, 1)
MEAN, STD = (torch.tensor(v)[:, None, None] for v in (captioner.MEAN, captioner.STD))


# --- BLIP-VQA (BLIPvqa_eval: colour, shape, texture, complex's attribute part) ---
def pixels(image, size: int, crop: bool, resample=Image.BICUBIC, mean=MEAN, std=STD):
    """PIL -> normalised (3, size, size): squashed (BLIP, DPT) or short side + crop (CLIP)."""
    w, h = image.size
    new = (size, size)
    if crop:  # torchvision Resize(int): the long side is int(size * long / short)
        new = (size, int(size * h / w)) if w <= h else (int(size * w / h), size)
    image = image.convert("RGB").resize(new, resample)
    left, top = int(round((new[0] - size) / 2)), int(round((new[1] - size) / 2))
    image = image.crop((left, top, left + size, top + size))
    x = torch.tensor(bytearray(image.tobytes()), dtype=torch.uint8).view(size, size, 3)
    return (x.permute(2, 0, 1).float() / 255 - mean) / std


def yes_logit(model, tok, x, qs, owner):
    """logit(yes) - logit(no) at the first answer step (vqa_prob): images x (B, 3, S, S),
    questions qs about images owner (Q,) -> (Q,)."""
    dec = model.config.text_config.bos_token_id  # [DEC] (30522) starts the answer
    # BLIP appends [DEC] and then [ENC] (30523) to BERT's vocabulary; questions start with [ENC]
    assert model.config.text_config.vocab_size == dec + 2, "[DEC], [ENC] must be the last ids"
    yes, no = tok.convert_tokens_to_ids(["yes", "no"])
    img = model.vision_model(x, interpolate_pos_encoding=True).last_hidden_state  # (B, 1+P, D)
    ids = [tok(cb.pre_question(q), truncation=True, max_length=35).input_ids for q in qs]
    out = torch.zeros(len(qs), device=x.device)
    # one question length at a time, unpadded: transformers' BLIP text cross-attention drops
    # encoder_attention_mask (5.x), so padded question states would leak into the answer
    for n in sorted({len(i) for i in ids}):
        sel = [j for j, i in enumerate(ids) if len(i) == n]
        q = torch.tensor([[dec + 1] + ids[j][1:] for j in sel], device=x.device)  # (b, n)
        h = model.text_encoder(q, encoder_hidden_states=img[[owner[j] for j in sel]])[0]
        start = torch.full((len(sel), 1), dec, device=x.device)
        z = model.text_decoder(start, encoder_hidden_states=h).logits[:, 0]  # (b, V)
        out[sel] = z[:, yes].float() - z[:, no].float()
    return out


def yes_prob(model, tok, x, qs, owner):
    """P(yes) / (P(yes) + P(no)): the benchmark's answer (not generation, not ranking)."""
    return torch.sigmoid(yes_logit(model, tok, x, qs, owner))


def blip_vqa(model, tok, size=480):
    """A scorer: vqa(images, questions, owner) -> [P(yes)] per question about images[owner]."""

    @torch.no_grad()
    def vqa(images, qs, owner):
        x = torch.stack([pixels(im, size, crop=False) for im in images])
        return yes_prob(model, tok, x.to(model.device, model.dtype), qs, owner).tolist()
    return vqa


# --- CLIP (CLIPScore_eval: non-spatial, complex's action part) ---
def clip_cosine(model, tok):
    """A scorer: cosine(images, texts) -> raw cosine per pair (not 2.5 * max(0, .), not x100)."""
    dev = model.device

    @torch.no_grad()
    def cosine(images, texts):
        x = torch.stack([pixels(im, 224, crop=True) for im in images]).to(dev, model.dtype)
        t = tok(texts, padding=True, truncation=True, max_length=77, return_tensors="pt").to(dev)
        a = model.get_image_features(pixel_values=x).pooler_output  # (B, E)
        b = model.get_text_features(**t).pooler_output  # (B, E)
        return torch.cosine_similarity(a.float(), b.float(), dim=-1).tolist()
    return cosine


# --- detection (UniDet_eval: spatial, complex, 3d_spatial, numeracy) and depth ---
def grounding_dino(model, processor, box_threshold=0.35, text_threshold=0.25):
    """A scorer: detect(image, nouns) -> hits [(noun, confidence, xyxy box)], every box whose
    phrase is one of the nouns (None skipped, each asked once), best first, in UniDet's frame
    (cb.unidet_frame, 512 px -> 479), where the benchmark measures boxes and reads depth."""

    @torch.no_grad()
    def detect(image, nouns):
        nouns = [n for n in dict.fromkeys(nouns) if n]
        if not nouns:
            return []
        (w, h), (fw, fh) = image.size, cb.unidet_frame(*image.size)
        hits = segment.detect(model, processor, image.convert("RGB"), nouns, box_threshold,
                              text_threshold)
        # clipped to the frame, as detectron2 clips UniDet's boxes (detector_postprocess)
        scale, lim = torch.tensor([fw / w, fh / h] * 2), torch.tensor([fw, fh] * 2).float()
        return [(nouns[k], conf, torch.minimum((box * scale).clamp(min=0), lim).tolist())
                for k, conf, box in hits]
    return detect


def dpt_depth(model, size=480):
    """A scorer: depth(images, paths) -> [(h, w) depth in [0, 1], larger = nearer] in UniDet's
    frame, through the benchmark's 8-bit depth PNGs, written to paths and read back."""
    # HF checks a hybrid DPT's input side against config.image_size (384); the benchmark runs
    # it at 480, its position embeddings resized bilinearly, which HF's forward then does too
    if model.config.is_hybrid:
        model.dpt.embeddings.image_size = (size, size)

    @torch.no_grad()
    def depth(images, paths):
        # model_bank_3d: Resize([480, 480]) (bilinear squash), ToTensor, Normalize(0.5, 0.5)
        x = torch.stack([pixels(im, size, False, Image.BILINEAR, 0.5, 0.5) for im in images])
        pred = model(pixel_values=x.to(model.device, model.dtype)).predicted_depth  # (B, S, S)
        for im, d, path in zip(images, pred.float().cpu(), paths):
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cb.depth_png(d, im.size).save(path)
        return [cb.depth_map(Image.open(path)) for path in paths]
    return depth


# --- scoring a folder, generating one ---
def open_image(path):
    """A sample, fully read now: a truncated or non-image .png is one line naming it."""
    try:
        image = Image.open(path)
        image.load()
    except OSError as e:  # PIL's UnidentifiedImageError is one too
        raise ValueError(f"{path}: not a readable image ({e})") from None
    return image


class Scorers(NamedTuple):
    vqa: Callable | None     # blip_vqa(...), for color, shape, texture, complex
    cosine: Callable | None  # clip_cosine(...), for non_spatial, complex
    detect: Callable | None  # grounding_dino(...), for spatial, complex, 3d_spatial, numeracy
    depth: Callable | None   # dpt_depth(...), for 3d_spatial


def score(folder, category, scorers: Scorers, nlp=None, types=((), ()), objects=(),
          batch=8) -> dict:
    """Score folder/samples, write the vqa_result.json files; metric -> mean. types: the
    (spatial, action) prompt keys of complex_val_{spatial,action}.txt; objects: numeracy's
    (singular, plural) lines of new_objects.txt."""
    samples = cb.read_samples(folder)
    parsed = {p: cb.analyse(p, nlp) for p in {p for p, _ in samples}}
    res, complex_mode = {}, category == "complex"
    for i in tqdm(range(0, len(samples), batch), desc=category):
        part = samples[i:i + batch]
        images = [open_image(path) for _, path in part]
        if category in NEEDS["blip"]:
            qs = [(j, q) for j, (p, _) in enumerate(part) for q in cb.questions(parsed[p].chunks)
                  if q]
            probs = iter(scorers.vqa(images, [q for _, q in qs], [j for j, _ in qs]))
            for p, _ in part:  # each answer stored with 4 decimals, then the product
                res.setdefault("blip", []).append(cb.product(
                    [f"{next(probs):.4f}" if q else None for q in cb.questions(parsed[p].chunks)]))
        if category in NEEDS["clip"]:
            texts = [cb.clip_text(parsed[p]) if complex_mode else p for p, _ in part]
            res.setdefault("clip", []).extend(scorers.cosine(images, texts))
        if category in ("spatial", "complex"):
            for (p, _), im in zip(part, images):
                o1, o2 = cb.spatial_objects(parsed[p], complex_mode)
                best = {}
                for name, conf, box in scorers.detect(im, [o1, o2]):
                    best.setdefault(name, (conf, box))  # hits come best first
                rel = next((r for r in cb.RELATIONS if r in p), None)
                res.setdefault("spatial", []).append(cb.spatial_score(rel, best.get(o1),
                                                                      best.get(o2)))
        if category == "3d_spatial":
            depths = scorers.depth(images, [cb.depth_file(folder, path) for _, path in part])
            for (p, _), im, d in zip(part, images, depths):
                o1, o2 = cb.spatial_objects(parsed[p], False)
                rel = next((r for r in cb.RELATIONS_3D if r in p), None)
                res.setdefault("spatial_3d", []).append(
                    cb.spatial_3d_score(rel, o1, o2, scorers.detect(im, [o1, o2]), d))
        if category == "numeracy":
            for (p, _), im in zip(part, images):
                objs = cb.counted_objects([t for t, _ in parsed[p].tokens], objects)
                hits = cb.dedup(scorers.detect(im, [cb.ALIAS.get(o, o) for o, _ in objs]))
                res.setdefault("numeracy", []).append(
                    cb.numeracy_score(objs, [lab for lab, _, _ in hits]))
    if complex_mode:
        res["3_in_1"] = [cb.three_in_one(p, b, s, c, *types) for (p, _), b, s, c in
                         zip(samples, res["blip"], res["spatial"], res["clip"])]
    return {m: cb.write_result(folder, cb.OUT[m], answers) for m, answers in res.items()}


def generate_samples(pipe, prompts, folder, n=10, seed=42, steps=30, scale=7.5, size=512,
                     batch=8):
    """Image k of prompt i: samples/{prompt}_{i*n+k:06d}.png from seed + k; existing files kept."""
    bad = [p for p in prompts if "_" in p or "/" in p]  # scorers read the prompt up to the '_'
    assert not bad, f"prompt with '_' or '/': {bad[0]!r}"
    os.makedirs(os.path.join(folder, "samples"), exist_ok=True)
    f, dev = pipe.vae.cfg.factor, pipe.unet.conv_in.weight.device
    for k in range(n):
        todo = [(p, os.path.join(folder, "samples", f"{p}_{i * n + k:06d}.png"))
                for i, p in enumerate(prompts)]
        todo = [(p, path) for p, path in todo if not os.path.exists(path)]
        g = torch.Generator().manual_seed(seed + k)  # one start latent per seed, any batching
        x = torch.randn((1, pipe.unet.cfg.in_channels, size // f, size // f), generator=g)
        for j in tqdm(range(0, len(todo), batch), desc=f"seed {seed + k}", disable=not todo):
            part = todo[j:j + batch]
            z = x.repeat(len(part), 1, 1, 1).to(dev, pipe.unet.conv_in.weight.dtype)
            images = generate(pipe, [p for p, _ in part], steps, scale, size, latents=z,
                              progress=False)
            for img, (_, path) in zip(images, part):
                viz.save_images(img[None], path, cols=1)


# --- CLI ---
def val_prompts(data, category):
    """The benchmark's {category}_val.txt in the --data folder (toy/data holds the toy's)."""
    path = os.path.join(data, f"{category}_val.txt")
    prompts = cb.read_lines(path)
    if not prompts:  # checked before any folder is made
        raise ValueError(f"{path}: no prompts (empty, or blank lines only)")
    return prompts


def load_scorers(a, categories) -> Scorers:
    """The scorers the categories need, in fp32 as the benchmark, from folders or hub ids; each
    folder's config.json must name its flag's architecture (a BLIP captioning checkpoint given as
    --blip would score with a freshly initialised text encoder)."""
    need = {name: sorted(set(cats) & set(categories)) for name, cats in NEEDS.items()}
    paths = {}
    for name, cats in need.items():
        if cats and not getattr(a, name):
            raise FileNotFoundError(f"--{name} (a model folder or hub id) is needed for "
                                    f"{', '.join(cats)}")
        if cats:
            paths[name] = model_folder(getattr(a, name), ARCH[name], f"--{name}")

    def load(cls, path):
        try:
            m = cls.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, SafetensorError) as e:  # wrong layout, half a shard
            raise ValueError(f"{path}: not a {cls.__name__} folder ({str(e).splitlines()[0]})")
        return m.to(a.device, torch.float32).eval() if isinstance(m, torch.nn.Module) else m
    return Scorers(
        blip_vqa(load(BlipForQuestionAnswering, paths["blip"]), load(AutoTokenizer, paths["blip"]),
                 a.blip_size) if need["blip"] else None,
        clip_cosine(load(CLIPModel, paths["clip"]), load(AutoTokenizer, paths["clip"]))
        if need["clip"] else None,
        grounding_dino(load(GroundingDinoForObjectDetection, paths["dino"]),
                       load(AutoProcessor, paths["dino"]), a.box_threshold, a.text_threshold)
        if need["dino"] else None,
        dpt_depth(load(DPTForDepthEstimation, paths["dpt"])) if need["dpt"] else None)


def main(argv=None):
    ap = argparse.ArgumentParser(description="T2I-CompBench scores (generate first if --model).")
    ap.add_argument("out", help="root: one benchmark folder per category, OUT/{category}/samples")
    ap.add_argument("--categories", default=",".join(CATEGORIES))
    ap.add_argument("--data", help="the benchmark's examples/dataset folder (the toy's: toy/data)")
    ap.add_argument("--model", help="generate first: diffusers folder | single file | hub id | "
                    "tiny")
    ap.add_argument("--text-from", help="diffusers folder (or hub id) with the text encoders, "
                    "for a single file without them (default: the file's own)")
    ap.add_argument("--unet", help="fine-tuned UNet weights (.safetensors)")
    ap.add_argument("--lora", help="LoRA weights (.safetensors) to merge")
    ap.add_argument("--n", type=int, default=10, help="images per prompt (seeds 42..)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--cfg", type=float, default=7.5)
    ap.add_argument("--size", type=int, help="default: the model's (toy 64, SD1.5 512, SDXL 1024)")
    ap.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32")
    ap.add_argument("--blip", help="BLIP-VQA folder (Salesforce/blip-vqa-capfilt-large)")
    ap.add_argument("--blip-size", type=int, default=480, help="BLIP input side (benchmark: 480)")
    ap.add_argument("--clip", help="CLIP folder (openai/clip-vit-base-patch32)")
    ap.add_argument("--dino", help="Grounding-DINO folder (IDEA-Research/grounding-dino-tiny)")
    ap.add_argument("--dpt", help="DPT depth folder (Intel/dpt-hybrid-midas), for 3d_spatial")
    ap.add_argument("--box-threshold", type=float, default=0.35)
    ap.add_argument("--text-threshold", type=float, default=0.25)
    ap.add_argument("--parser", choices=["auto", "rules", "spacy"], default="auto")
    ap.add_argument("--spacy-model", help="spaCy English model package to load (default: "
                    "en_core_web_sm; naming one makes a missing model an error)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    cats = a.categories.split(",")
    try:
        if a.model:  # before minutes of generation
            check_out(os.path.join(a.out, cats[0], "samples", "x.png"))
        assert set(cats) <= set(CATEGORIES), f"--categories: choose from {', '.join(CATEGORIES)}"
        assert a.data or not (a.model or {"complex", "numeracy"} & set(cats)), "--data is " \
            "needed to generate, to route complex prompts and for numeracy's new_objects.txt"
        val = {c: val_prompts(a.data, c) for c in cats} if a.model else {}
        types = cb.complex_types(a.data) if "complex" in cats else ((), ())
        objects = cb.numeracy_objects(a.data) if "numeracy" in cats else ()
        scorers, nlp = load_scorers(a, cats), cb.load_parser(a.parser, a.spacy_model)
        if a.model:
            dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
            pipe = load_or_exit(a.model, a.unet, a.lora, a.device, dtype, a.text_from)
            warn_unknown(a.model, [p for c in cats for p in val[c]])
            for c in cats:
                generate_samples(pipe, val[c], os.path.join(a.out, c), a.n, 42, a.steps, a.cfg,
                                 a.size or pipe.size, a.batch)
        spacy = f"spaCy {a.spacy_model or 'en_core_web_sm'}"
        print(f"noun chunks and POS tags: {spacy if nlp else 'rule-based'}")
        rows = []
        for c in cats:
            means = score(os.path.join(a.out, c), c, scorers, nlp, types, objects, a.batch)
            rows.append(means[MAIN.get(c, "blip")])
            print(f"{c}: " + ", ".join(f"{m} {v:.4f} ({os.path.join(a.out, c, cb.OUT[m])})"
                                      for m, v in means.items()))
    except (AssertionError, FileNotFoundError, ValueError, ImportError) as e:
        sys.exit(f"error: {e}")
    print("| " + " | ".join(cats) + " |\n|" + "---|" * len(cats) + "\n| "
          + " | ".join(f"{v:.4f}" for v in rows) + " |")


if __name__ == "__main__":
    main()
