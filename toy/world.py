"""Toy world: 64x64 pictures of one or two flat coloured shapes, small enough to train on a CPU.

Rendering, the prompt grammar ("a red circle above a blue square"), deliberately incomplete
training captions, an analytic evaluator (connected components -> colour, shape, centre) that
scores an image against a prompt, and a colour-agnostic shape segmenter with the interface of
segment.py (seg(images, nouns) -> (masks, found)). Shapes: B batch, K nouns, H, W image size.
Usage: scene = sample_scene(np.random.default_rng(0), "spatial"); img = render(scene)
       score(img, prompt(scene))["correct"]  # True
"""
import itertools
import os
import re
from typing import NamedTuple, Optional

import numpy as np
import torch
from tqdm import tqdm

from segment import INK, MIN_AREA, components, fit, label, shape_mask  # noqa: F401 (the world's geometry)

SIZE = 64
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 40), "blue": (30, 70, 220),
           "yellow": (235, 200, 20), "purple": (140, 40, 180), "cyan": (20, 190, 200)}
SHAPES = ("circle", "square", "triangle")
RELATIONS = ("to the left of", "to the right of", "above", "below")
PALETTE = np.array(list(COLOURS.values()), dtype=np.float64)  # (6, 3), in COLOURS order
MIN_SIDE, MAX_SIDE = 16, 28  # shape size in pixels (width = height)
GAP = 2          # bounding boxes of two shapes stay this far apart: separate 4-connected components
CLEAN_DIST, CLEAN_PURE, CLEAN_IOU = 40.0, 0.95, 0.85  # see detect()


class Obj(NamedTuple):
    colour: str
    shape: str
    cx: Optional[float] = None  # centre and size in pixels; None in a parsed prompt (a spec)
    cy: Optional[float] = None
    size: Optional[float] = None


class Scene(NamedTuple):
    objects: tuple  # one or two Obj
    relation: Optional[str] = None  # RELATIONS entry: objects[0] <relation> objects[1]


def render(scene: Scene) -> np.ndarray:
    """(64, 64, 3) uint8, white background, exact palette colours."""
    img = np.full((SIZE, SIZE, 3), 255, dtype=np.uint8)
    for o in scene.objects:
        img[shape_mask(o.shape, o.cx, o.cy, o.size)] = COLOURS[o.colour]
    return img


def holds(relation, a, b, margin=0.0) -> bool:
    """Relation between centres, on its own axis, which must dominate the other axis."""
    dx, dy = b.cx - a.cx, b.cy - a.cy  # from a to b
    d, other = {"to the left of": (dx, dy), "to the right of": (-dx, dy),
                "above": (dy, dx), "below": (-dy, dx)}[relation]
    return d > abs(other) + margin


def place(spec: Scene, rng: np.random.Generator) -> Scene:
    """Random sizes and positions for a spec's objects: inside the image, bounding boxes at least
    GAP apart, and a spatial relation held with a 4 px margin so it is unambiguous."""
    while True:  # rejection sampling; a few tries on average
        objs, boxes = [], []
        for o in spec.objects:
            s = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
            x0, y0 = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))  # integer corners
            objs.append(o._replace(cx=x0 + s / 2, cy=y0 + s / 2, size=float(s)))
            boxes.append((x0, y0, x0 + s, y0 + s))
        if len(boxes) == 2:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes
            apart = (ax1 + GAP <= bx0 or bx1 + GAP <= ax0 or ay1 + GAP <= by0 or by1 + GAP <= ay0)
            if not apart or (spec.relation and not holds(spec.relation, *objs, margin=4)):
                continue
        return Scene(tuple(objs), spec.relation)


def sample_spec(rng: np.random.Generator, kind: str) -> Scene:
    """Colours, shapes (and relation) for kind "one", "two" or "spatial"; two objects always
    differ in colour or shape, so a prompt never names the same object twice."""
    n = 1 if kind == "one" else 2
    while True:
        objs = tuple(Obj(str(rng.choice(list(COLOURS))), str(rng.choice(SHAPES))) for _ in range(n))
        if n == 1 or objs[0] != objs[1]:
            return Scene(objs, str(rng.choice(RELATIONS)) if kind == "spatial" else None)


def sample_scene(rng: np.random.Generator, kind: str) -> Scene:
    assert kind in ("one", "two", "spatial"), kind
    return place(sample_spec(rng, kind), rng)


def prompt(scene: Scene) -> str:
    """The complete description; also the captioner's training caption."""
    return f" {scene.relation or 'and'} ".join(f"a {o.colour} {o.shape}" for o in scene.objects)


def caption(scene: Scene, rng, drop_object_p: float, drop_colour_p: float) -> str:
    """The base model's incomplete training caption, like web alt-text: a two-object scene
    loses one object (and its relation) with drop_object_p, each colour word is dropped with
    drop_colour_p, e.g. "a circle and a blue square"."""
    objs, rel = list(scene.objects), scene.relation
    if len(objs) == 2 and rng.random() < drop_object_p:
        objs, rel = [objs[int(rng.integers(2))]], None
    words = [f"a {o.shape}" if rng.random() < drop_colour_p else f"a {o.colour} {o.shape}"
             for o in objs]
    return f" {rel or 'and'} ".join(words)


_OBJ = rf"a ({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})"
_PROMPT = re.compile(rf"{_OBJ}(?: (and|{'|'.join(RELATIONS)}) {_OBJ})?")


def parse_prompt(text: str) -> Scene:
    """The inverse of prompt(): a Scene whose objects have colour and shape only."""
    m = _PROMPT.fullmatch(text.strip())
    if not m:
        raise ValueError(f"not a toy-world prompt: {text!r}")
    c1, s1, rel, c2, s2 = m.groups()
    if rel is None:
        return Scene((Obj(c1, s1),))
    return Scene((Obj(c1, s1), Obj(c2, s2)), None if rel == "and" else rel)


class Found(NamedTuple):
    colour: str
    shape: str
    cx: float      # centre and size of the fitted template (exact on clean renders)
    cy: float
    size: float
    area: int
    clean: bool    # a palette shape as rendered: pure and fits (see detect)
    pure: bool = True   # one palette colour (else a blend: "mixed" in describe)
    fits: bool = True   # a template shape of a world size (else "blob" in describe)


def detect(img: np.ndarray) -> list[Found]:
    """Shapes in a (64, 64, 3) uint8 image. Colour: the palette entry nearest the component's
    median colour. Clean: >= 95% of its inner pixels (not on its border, which a soft edge
    blends with white) within 40 (RGB distance) of that entry, longest side within 2 px of
    16..28, and the best template IoU >= 0.85."""
    out = []
    for comp in components(img):
        inner = comp.copy()  # erode by one pixel (4-neighbours)
        inner[1:] &= comp[:-1]
        inner[:-1] &= comp[1:]
        inner[:, 1:] &= comp[:, :-1]
        inner[:, :-1] &= comp[:, 1:]
        pix = img[inner if inner.any() else comp].astype(np.float64)  # (n, 3)
        k = int(np.argmin(((PALETTE - np.median(pix, 0)) ** 2).sum(1)))
        pure = (np.sqrt(((pix - PALETTE[k]) ** 2).sum(1)) <= CLEAN_DIST).mean()
        shape, iou, (cx, cy, size) = fit(comp)
        ys, xs = np.nonzero(comp)
        side = max(np.ptp(xs), np.ptp(ys)) + 1  # longest bounding-box side
        pure = bool(pure >= CLEAN_PURE)
        fits = bool(MIN_SIDE - 2 <= side <= MAX_SIDE + 2 and iou >= CLEAN_IOU)
        out.append(Found(list(COLOURS)[k], shape, float(cx), float(cy), float(size),
                         int(comp.sum()), pure and fits, pure, fits))
    return out


def score(img: np.ndarray, text: str) -> dict:
    """Does a (64, 64, 3) uint8 image show a prompt? Each prompt object must be matched to a
    distinct detected shape of its colour and shape; a spatial relation must hold between the
    matched centres (its axis dominating); and there must be no extra shape: every component of
    at least MIN_AREA px counts, because the world holds only what the prompt names.
    clean: one or two shapes, all clean palette shapes (what the fidelity figure counts)."""
    spec, found = parse_prompt(text), detect(img)
    n = len(spec.objects)
    matches = [p for p in itertools.permutations(range(len(found)), n)
               if all(found[i][:2] == o[:2] for i, o in zip(p, spec.objects))]
    relation_ok = None
    if spec.relation:
        relation_ok = any(holds(spec.relation, found[a], found[b]) for a, b in matches)
    extra = len(found) > n
    bound = bool(matches) and relation_ok is not False  # binding: extra shapes ignored
    return dict(correct=bound and not extra, objects_ok=bool(matches), bound=bound,
                relation_ok=relation_ok, extra=extra,
                clean=1 <= len(found) <= 2 and all(f.clean for f in found), n=len(found))


# --- What a drifting generator draws, and what is truly there ---
# The captioner's language is richer than the prompts': it names what the evaluator reads, so a
# picture that is not a clean world scene is described as what it is (a blend is "mixed", a
# melted or merged shape a "blob", a third shape is named, speckles are "noise") and the prompt
# loses probability on it. Without these words a captioner has no true description to move its
# probability to, and an optimiser finds arbitrary highs of the prompt (docs/toy-world.md:
# reward hacking).
ODD_WORDS = ("mixed", "blob", "with", "noise")
ODD_KINDS = ("blend", "melt", "merge", "duplicate", "noise")
SPECKS = 20  # foreground pixels in specks (components under MIN_AREA) that make "with noise"
MAX_NAMED = 4  # shapes named in a description, largest first (prefix + 4 shapes < 32 tokens)


def describe(img: np.ndarray, rng: np.random.Generator | None = None) -> str:
    """The evaluator's reading of a (64, 64, 3) uint8 image as a caption: each component "a
    {colour | mixed} {shape | blob}", joined by "and" (in random order when rng is given), then
    "with noise" when specks cover SPECKS px. A clean one- or two-shape render reads as its
    "and"-prompt; a blank image as ""."""
    found = sorted(detect(img), key=lambda f: -f.area)[:MAX_NAMED]
    order = rng.permutation(len(found)) if rng is not None else range(len(found))
    words = [f"a {f.colour if f.pure else 'mixed'} {f.shape if f.fits else 'blob'}"
             for f in (found[i] for i in order)]
    fg = (255 - img.astype(np.int16)).max(-1) > INK
    specks = int(fg.sum()) - sum(int(c.sum()) for c in components(img))
    text = " and ".join(words)
    if specks >= SPECKS:
        text = f"{text} with noise" if text else "noise"
    return text


def _free_box(boxes, s, rng, tries=50):
    """A random s x s box GAP apart from every box in boxes, or None."""
    for _ in range(tries):
        x0, y0 = (int(v) for v in rng.integers(0, SIZE - s + 1, size=2))
        if all(x0 + s + GAP <= a or c + GAP <= x0 or y0 + s + GAP <= b or d + GAP <= y0
               for a, b, c, d in boxes):
            return x0, y0
    return None


def render_odd(scene: Scene, kind: str, rng: np.random.Generator) -> np.ndarray:
    """A scene drawn wrongly in one of ODD_KINDS, (64, 64, 3) uint8: what a drifting or weak
    generator makes of a prompt. blend: one shape's colour is a mix or a gradient of two palette
    colours; melt: one shape's mask is warped by a smooth random field; merge: a second shape
    overlaps the first (one component, often two colours); duplicate: an extra shape, a copy of
    one in the scene or a random one; noise: speckles and Gaussian noise over the render."""
    assert kind in ODD_KINDS, kind
    objs = list(scene.objects)
    i = int(rng.integers(len(objs)))
    img = np.full((SIZE, SIZE, 3), 255.0)
    if kind == "merge":  # move (or add) a second shape onto the first, centres 40-90% apart
        o = objs[i]
        other = objs[1 - i] if len(objs) == 2 else Obj(str(rng.choice(list(COLOURS))),
                                                       str(rng.choice(SHAPES)))
        s = float(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        d, a = (o.size + s) / 2 * rng.uniform(0.4, 0.9), rng.uniform(0, 2 * np.pi)
        cx = float(np.clip(o.cx + d * np.cos(a), s / 2, SIZE - s / 2))
        cy = float(np.clip(o.cy + d * np.sin(a), s / 2, SIZE - s / 2))
        objs = [o, other._replace(cx=cx, cy=cy, size=s)]
    if kind == "duplicate":
        boxes = [(o.cx - o.size / 2, o.cy - o.size / 2, o.cx + o.size / 2, o.cy + o.size / 2)
                 for o in objs]
        s = int(rng.integers(MIN_SIDE, MAX_SIDE + 1))
        at = _free_box(boxes, s, rng)
        if at is not None:
            src = objs[i] if rng.random() < 0.5 else Obj(str(rng.choice(list(COLOURS))),
                                                         str(rng.choice(SHAPES)))
            objs.append(src._replace(cx=at[0] + s / 2, cy=at[1] + s / 2, size=float(s)))
    for j, o in enumerate(objs):
        m = shape_mask(o.shape, o.cx, o.cy, o.size)
        colour = np.array(COLOURS[o.colour], dtype=np.float64)
        if kind == "melt" and j == i:  # nearest-pixel lookup through a smooth displacement
            amp = rng.uniform(3, 7)
            f = torch.nn.functional.interpolate(torch.from_numpy(rng.uniform(-1, 1, (1, 2, 3, 3))),
                                                size=(SIZE, SIZE), mode="bicubic")[0].numpy()
            py, px = np.mgrid[0:SIZE, 0:SIZE]
            ys = np.clip(np.round(py + amp * f[0]), 0, SIZE - 1).astype(int)
            xs = np.clip(np.round(px + amp * f[1]), 0, SIZE - 1).astype(int)
            m = m[ys, xs]
        if kind == "blend" and j == i:
            second = PALETTE[int(rng.integers(len(PALETTE)))]
            if rng.random() < 0.5:  # a uniform mix
                colour = colour + rng.uniform(0.3, 0.7) * (second - colour)
            else:  # a gradient across the shape, along a random direction
                py, px = np.mgrid[0:SIZE, 0:SIZE] + 0.5
                a = rng.uniform(0, 2 * np.pi)
                t = ((px - o.cx) * np.cos(a) + (py - o.cy) * np.sin(a)) / o.size + 0.5
                colour = colour + np.clip(t, 0, 1)[..., None] * (second - colour)
                img[m] = colour[m]
                continue
        img[m] = colour
    if kind == "noise":
        for _ in range(int(rng.integers(15, 60))):  # 1-3 px specks of palette colours
            s, (y, x) = int(rng.integers(1, 4)), rng.integers(0, SIZE - 3, size=2)
            img[y:y + s, x:x + s] = PALETTE[int(rng.integers(len(PALETTE)))]
        img = img + rng.normal(0, rng.uniform(0, 40), img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) float in [0, 1] -> (B, H, W, 3) uint8."""
    x = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_float(images: np.ndarray) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float32 in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _eval_prompts() -> dict[str, list[str]]:
    """Fixed evaluation prompts: one-object: all 18 colour x shape; two-object: 24 pairs and
    spatial: 6 per relation, all with two different colours and two different shapes (so a
    colour or a shape cannot be right by accident), drawn once with seed 0."""
    rng, names = np.random.default_rng(0), list(COLOURS)
    out = {"one": [f"a {c} {s}" for s in SHAPES for c in names], "two": [], "spatial": []}
    for cat, rel, n in [("two", None, 24)] + [("spatial", r, 6) for r in RELATIONS]:
        start = len(out[cat])
        while len(out[cat]) < start + n:
            (c1, c2), (s1, s2) = rng.permutation(names)[:2], rng.permutation(SHAPES)[:2]
            p = prompt(Scene((Obj(c1, s1), Obj(c2, s2)), rel))
            if p not in out[cat]:
                out[cat].append(p)
    return out


EVAL_PROMPTS = _eval_prompts()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
PROMPTS_FILE = os.path.join(ROOT, "prompts.txt")  # the training prompts: kept out of validation


def _val_prompts() -> dict[str, list[str]]:
    """The validation split that training settings are chosen on (docs/toy-world.md): 24
    two-object and 24 spatial prompts of the training style (two different colours and shapes),
    neither evaluation prompts nor in prompts.txt, drawn with seed 1. No one-object split: all 18
    one-object prompts are evaluation prompts."""
    rng, names = np.random.default_rng(1), list(COLOURS)
    with open(PROMPTS_FILE, encoding="utf-8") as f:
        taken = {ln.strip() for ln in f} | {p for ps in EVAL_PROMPTS.values() for p in ps}
    out = {"two": [], "spatial": []}
    for cat, rel, n in [("two", None, 24)] + [("spatial", r, 6) for r in RELATIONS]:
        start = len(out[cat])
        while len(out[cat]) < start + n:
            (c1, c2), (s1, s2) = rng.permutation(names)[:2], rng.permutation(SHAPES)[:2]
            p = prompt(Scene((Obj(c1, s1), Obj(c2, s2)), rel))
            if p not in out[cat] and p not in taken:
                out[cat].append(p)
    return out


VAL_PROMPTS = _val_prompts()


def evaluate(generate_fn, seeds, prompts: dict = EVAL_PROMPTS) -> dict[str, float]:
    """Accuracy per category (share of correct images over prompts x seeds), overall (the mean
    of the categories, each counting equally), fidelity (share of clean images) and missing
    (share of two-object and spatial images with fewer than two shapes). Strict accuracy mixes
    two things, so each category also gets them apart: {cat}_pairs, the share of images in which
    every asked-for (colour, shape) pair is drawn, extra shapes and the relation ignored;
    {cat}_binding, the same with the relation holding (binding: right colours on the right shapes
    in the right places, extra shapes ignored); and {cat}_extra, the share with a shape more than
    the prompt asks for.
    generate_fn(prompts, seed) -> images (B, 3, 64, 64) in [0, 1]; prompts: {category: list}."""
    out, cleans, missing = {}, [], []
    bar = tqdm(total=len(prompts) * len(seeds), desc="eval", leave=False)
    for cat, texts in prompts.items():
        hits, pairs, bound, extra = [], [], [], []
        for seed in seeds:
            bar.update()
            for img, p in zip(to_uint8(generate_fn(texts, seed)), texts):
                r = score(img, p)
                hits.append(r["correct"])
                pairs.append(r["objects_ok"])
                bound.append(r["bound"])
                extra.append(r["extra"])
                cleans.append(r["clean"])
                if cat != "one":
                    missing.append(r["n"] < 2)
        out[cat] = float(np.mean(hits))
        out[f"{cat}_pairs"], out[f"{cat}_extra"] = float(np.mean(pairs)), float(np.mean(extra))
        out[f"{cat}_binding"] = float(np.mean(bound))
    out["overall"] = float(np.mean([out[c] for c in prompts]))
    out["fidelity"] = float(np.mean(cleans))
    out["missing"] = float(np.mean(missing))
    return out
