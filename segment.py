"""Attribute concentration's inputs: objects parsed from the prompt, their CLIP token positions, and
one binary mask per object on the generated image (Grounding-DINO boxes -> SAM masks).

Source: CoMat official attr_concen_utils (docs/official-code.md 3.1-3.4). The official parser is
spaCy's en_core_web_trf; this one uses chunker.py's small rule-based chunker, so nothing is
downloaded and the result is deterministic. The official masks come from FastSAM; here
SAM is prompted with the boxes (the official code picks among
FastSAM's everything-masks by box IoU; box prompts usually give tighter masks). Segmentation runs
under no_grad on the detached image.
A segmenter is any function seg(images, nouns) -> (masks, found), so others can be passed in.
Shapes: B batch, K objects (padded), H, W image size.
Usage: objs = objects(tokenizer, "a red cat and a blue dog"); masks, found = seg(images, nouns)
"""
import re
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError
from transformers import (AutoProcessor, GroundingDinoForObjectDetection, SamModel,
                          SamProcessor)

from chunker import chunks
from weights import model_folder

# Relation nouns ("on the left of") and the official stop-list of scene / abstract nouns (3.2).
STOP = set("""left right top bottom front back side middle center centre edge corner
scene surface area atmosphere noise place kitchen dream interior exterior meal background bathroom
room scent street hillside mountain sky sea ocean lost language skill one night day morning space
environment conditions field shore restroom party grass snow meadow water shadow waves song cycle
sunlight mysteries wall salon range cry speech tone thing about activity air advertisement airport
also""".split())


class Obj(NamedTuple):
    noun: str                  # what the segmenter looks for
    words: tuple[str, ...]     # attribute words, then the noun
    tokens: tuple[int, ...]    # CLIP token positions of all of them (0 is the start token)


def parse(prompt: str, attributed_only=False) -> list[tuple[tuple[str, ...], str]]:
    """(attributes, noun) per object, a rule-based stand-in for the official spaCy rules (3.1).

    Official filters: nouns that repeat in the prompt are dropped (their masks could not be told
    apart), stop-list nouns are dropped. Bare nouns are kept unless attributed_only: the official
    code keeps only nouns with a modifier; keeping them gives "a cat and a dog" a loss too."""
    groups = [(c.words[:-1], c.words[-1]) for c in chunks(prompt)]
    # the official check also strips the noun's last letter; only a plural "s" here ("seat" != sea)
    out = [(a, n) for a, n in groups if n not in STOP and n.removesuffix("s") not in STOP]
    nouns = [n for _, n in out]
    return [(a, n) for a, n in out if nouns.count(n) == 1 and (a or not attributed_only)]


def word_pieces(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """CLIP word pieces grouped back into words: [(word, positions)], positions index the
    untruncated token sequence the UNet attends to (0 is <|startoftext|>)."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer(prompt).input_ids)
    words, cur, pos = [], "", []
    for i, p in enumerate(pieces[1:-1], start=1):  # skip start and end tokens
        cur, pos = cur + p.removesuffix("</w>"), pos + [i]
        if p.endswith("</w>"):  # CLIP's BPE marks the last piece of each word
            words.append((cur, pos))
            cur, pos = "", []
    return words


def find(words, w: str, used: set):
    """First run of unused CLIP words spelling `w` (CLIP splits "t-shirt" into three words)."""
    for j in range(len(words)):
        text, k = "", j
        while k < len(words) and k not in used and len(text) < len(w):
            text, k = text + words[k][0], k + 1
        if text == w:
            return range(j, k)
    return None


def align(tokenizer, prompt: str, groups) -> list[Obj]:
    """Objects from (attributes, noun) groups: each word takes its first unused occurrence, as the
    official alignment does (3.2) but case-insensitively. An object with a word past the token
    limit (truncated away) or not found is dropped."""
    words, used, out = word_pieces(tokenizer, prompt), set(), []
    limit = tokenizer.model_max_length - 1  # the last kept position holds the end token
    for attrs, noun in groups:
        hits = [find(words, w.lower(), used) for w in (*attrs, noun)]
        if None in hits:
            continue
        positions = [i for hit in hits for j in hit for i in words[j][1]]
        if max(positions) < limit:
            used.update(j for hit in hits for j in hit)
            out.append(Obj(noun, (*attrs, noun), tuple(positions)))
    return out


def objects(tokenizer, prompt: str, max_objects=None, attributed_only=False) -> list[Obj]:
    """The prompt's objects with their CLIP token positions, at most max_objects (first ones)."""
    return align(tokenizer, prompt, parse(prompt, attributed_only))[:max_objects]


# Where the second object of "A <relation> B" lies from the first, (x, y) with y down: for the
# relation term (train.py --w_rel, not in the paper). Longest phrases first ("on the top of"
# before "top of"); T2I-CompBench's spatial prompts use "on the left of" / "on the top of".
RELATIONS = [(re.compile(rf"\b(?:{p})\b"), d) for p, d in (
    ("(?:to|on) the left of|left of", (1, 0)), ("(?:to|on) the right of|right of", (-1, 0)),
    ("on (?:the )?top of|above|over", (0, 1)),
    ("on the bottom of|below|under|underneath|beneath", (0, -1)))]


def relation(prompt: str) -> tuple[int, int] | None:
    """The direction from the first to the second object of a prompt "A <relation> B" (the
    first relation phrase in it), or None: "a cat to the left of a dog" -> (1, 0)."""
    hits = [(m.start(), d) for rx, d in RELATIONS if (m := rx.search(prompt.lower()))]
    return min(hits)[1] if hits else None


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> PIL images of the clamped, detached picture (uint8 by truncation,
    as the official gsam_interface does)."""
    arr = (images.detach().float().clamp(0, 1) * 255).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def boxes_to_masks(sam, sam_processor, image, boxes):
    """SAM masks (n, H, W) bool for xyxy pixel boxes (n, 4) on one PIL image (one mask per box)."""
    inputs = sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    inputs = inputs.to(sam.device, sam.dtype)  # floats to the model dtype, ids/sizes stay ints
    out = sam(**inputs, multimask_output=False)  # pred_masks (1, n, 1, 256, 256) logits
    masks = sam_processor.image_processor.post_process_masks(
        out.pred_masks.float().cpu(), inputs["original_sizes"].cpu(),
        inputs["reshaped_input_sizes"].cpu())  # logits > 0 at the original size
    return masks[0][:, 0].bool()  # (n, H, W)


def detect(dino, dino_processor, image, names, box_threshold=0.3, text_threshold=0.25):
    """Grounding-DINO on one PIL image: [(k, score, xyxy pixel box (4,))], one per box whose phrase
    IS the lower-case noun names[k], best score first; "red car" for "car" is ignored
    (docs/official-code.md 3.4)."""
    # the caption format the HF processor builds from labels: "cat. dog."
    inputs = dino_processor(images=image, text=". ".join(names) + ".",
                            return_tensors="pt").to(dino.device, dino.dtype)
    det = dino_processor.post_process_grounded_object_detection(
        dino(**inputs), inputs["input_ids"], threshold=box_threshold,
        text_threshold=text_threshold, target_sizes=[image.size[::-1]])[0]
    # spaces (BERT decodes "t-shirt" as "t - shirt"), dots and special tokens like a trailing
    # "[SEP]" (HF decodes them into the phrase) are not words, so they are dropped
    keys = [n.replace(" ", "") for n in names]
    labels = [re.sub(r"\[[A-Z]+\]|[\s.]", "", lab) for lab in det["text_labels"]]
    hits = [(keys.index(lab), s.item(), box.float().cpu())
            for lab, s, box in zip(labels, det["scores"], det["boxes"]) if lab in keys]
    return sorted(hits, key=lambda h: -h[1])


def grounded_sam(dino, dino_processor, sam, sam_processor, box_threshold=0.3,
                 text_threshold=0.25):
    """A segmenter: seg(images (B, 3, H, W) in [0, 1], nouns per sample) -> (masks (B, K, H, W)
    bool, found (B, K) bool). Official thresholds; all boxes of one noun are OR-ed; an undetected
    noun gets found=False (and no loss)."""

    @torch.no_grad()
    def seg(images, nouns):
        B, _, H, W = images.shape
        assert len(nouns) == B, f"{len(nouns)} noun lists for {B} images"
        K = max([len(n) for n in nouns] + [1])
        masks = torch.zeros(B, K, H, W, dtype=torch.bool)
        found = torch.zeros(B, K, dtype=torch.bool)
        for b, (image, names) in enumerate(zip(to_pil(images), nouns)):
            names = [n.strip().lower() for n in names]
            hits = detect(dino, dino_processor, image, names, box_threshold, text_threshold)
            if not hits:
                continue
            box_masks = boxes_to_masks(sam, sam_processor, image, torch.stack([h[2] for h in hits]))
            for m, (k, _, _) in zip(box_masks, hits):
                masks[b, k], found[b, k] = masks[b, k] | m, True
        return masks.to(images.device), found.to(images.device)
    return seg


def load_segmenter(dino_path, sam_path, device="cpu"):
    """Grounding-DINO and SAM from folders or hub ids, frozen: grounded_sam's four arguments."""
    dino_path = model_folder(dino_path, ("GroundingDinoForObjectDetection",), "--dino")
    sam_path = model_folder(sam_path, ("SamModel",), "--sam")
    try:
        dino = GroundingDinoForObjectDetection.from_pretrained(dino_path, local_files_only=True)
        sam = SamModel.from_pretrained(sam_path, local_files_only=True)
        return (dino.to(device).eval().requires_grad_(False),
                AutoProcessor.from_pretrained(dino_path, local_files_only=True),
                sam.to(device).eval().requires_grad_(False),
                SamProcessor.from_pretrained(sam_path, local_files_only=True))
    except (OSError, ValueError, SafetensorError) as e:  # e.g. a half-downloaded shard
        raise ValueError(f"{dino_path} / {sam_path}: not a readable Grounding-DINO / SAM pair "
                         f"({str(e).splitlines()[0]})") from None


# --- a segmenter for flat shapes on white: connected components classified by geometry ---
# What the toy world draws (toy/world.py renders with shape_mask). Colour-agnostic on purpose:
# a mask says where a circle is, never which colour it has, so it cannot teach colour binding by
# itself. Each component is one shape: the template (circle, square, triangle) it fits best.
# a pixel is foreground when some channel is this far below white: about half way to every
# palette colour, so a soft edge (a generated image) is cut where a sharp render would be
INK = 110
MIN_AREA = 40    # smaller components are specks, ignored (a 16 px triangle has ~120 px)


def shape_mask(shape, cx, cy, size, h=64, w=64) -> np.ndarray:
    """(h, w) bool: pixels whose CENTRE lies in the shape, so there is no anti-aliasing."""
    py, px = np.mgrid[0:h, 0:w] + 0.5
    dx, dy, r = px - cx, py - cy, size / 2
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # upright isosceles triangle: apex at the top centre, base = height = size at the bottom
    t = (dy + r) / size  # 0 at the apex, 1 at the base
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)


def label(fg: np.ndarray) -> np.ndarray:
    """4-connected component labels of a bool (H, W) mask: 0 background, 1..n components.
    Min-label propagation with pointer jumping (a label is a pixel index + 1, so a pixel can
    adopt its label's label), in numpy: about a millisecond per 64x64 image."""
    h, w = fg.shape
    big = h * w + 1
    lab = np.where(fg, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        new = lab.copy()
        np.minimum(new[1:], lab[:-1], out=new[1:])  # from the pixel above, below, left, right
        np.minimum(new[:-1], lab[1:], out=new[:-1])
        np.minimum(new[:, 1:], lab[:, :-1], out=new[:, 1:])
        np.minimum(new[:, :-1], lab[:, 1:], out=new[:, :-1])
        new[~fg] = big  # background neither takes nor passes labels
        new[fg] = np.minimum(new[fg], new.ravel()[new[fg] - 1])  # pointer jump
        if np.array_equal(new, lab):
            break
        lab = new
    return np.where(fg, np.unique(lab, return_inverse=True)[1].reshape(h, w) + 1, 0)


def fit(comp: np.ndarray) -> tuple[str, float, tuple[float, float, float]]:
    """Shape of a component mask by geometry: the template (re-rendered from the bounding box)
    with the best IoU, that IoU and the template's (cx, cy, size). The square template fills
    the box, so its IoU is the fill ratio (square 1, circle ~pi/4, triangle ~1/2); a wrong
    aspect ratio lowers every IoU.
    Clean renders are reproduced exactly (IoU 1) because their corners are integers."""
    rows, cols = np.nonzero(comp.any(1))[0], np.nonzero(comp.any(0))[0]
    r0, r1, c0, c1 = rows[0], rows[-1], cols[0], cols[-1]
    w, h = c1 - c0 + 1, r1 - r0 + 1
    cx, cy, s = c0 + w / 2, r0 + h / 2, (w + h) / 2
    # a triangle's base row is its widest: size = width, base on the last row (the apex row
    # of an even-sized triangle holds no pixel centre, so the height can be one short)
    fits = {"circle": (cx, cy, s), "square": (cx, cy, s), "triangle": (cx, r1 + 1 - w / 2, w)}
    ious = {}
    for shape, (x, y, size) in fits.items():
        t = shape_mask(shape, x, y, size, *comp.shape)
        ious[shape] = (t & comp).sum() / (t | comp).sum()
    best = max(ious, key=ious.get)
    return best, float(ious[best]), fits[best]


def components(img: np.ndarray) -> list[np.ndarray]:
    """Bool masks of the foreground components of a (H, W, 3) uint8 image, specks dropped."""
    lab = label((255 - img.astype(np.int16)).max(-1) > INK)
    areas = np.bincount(lab.ravel())
    return [lab == k for k in range(1, len(areas)) if areas[k] >= MIN_AREA]


@torch.no_grad()
def shapes(images: torch.Tensor, nouns: list) -> tuple[torch.Tensor, torch.Tensor]:
    """A segmenter for flat shapes on white (the toy world's pictures): masks (B, K, H, W) bool and
    found (B, K) bool for images (B, 3, H, W) in [0, 1] and a list of shape names per image.
    A noun's mask is the union of the components whose geometry is that shape; found is False
    without any."""
    B, _, H, W = images.shape
    assert len(nouns) == B, f"{len(nouns)} noun lists for {B} images"
    K = max([len(n) for n in nouns] + [1])
    masks = torch.zeros(B, K, H, W, dtype=torch.bool)
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    for b, img in enumerate(pixels.permute(0, 2, 3, 1).cpu().numpy()):  # (H, W, 3) uint8
        comps = [(fit(c)[0], c) for c in components(img)] if nouns[b] else []
        for k, noun in enumerate(nouns[b]):
            for shape, c in comps:
                if shape == noun:
                    masks[b, k] |= torch.from_numpy(c)
    return masks.to(images.device), masks.flatten(2).any(2).to(images.device)
