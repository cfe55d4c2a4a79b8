"""T2I-CompBench's scoring rules as its scripts compute them (Karine-Huang/T2I-CompBench 1b70949,
MIT; docs/compbench.md): prompt analysis, the BLIP-VQA questions and product,
the 2D and 3D spatial rules, numeracy, the 3-in-1 mix, as pure functions of strings, numbers,
boxes and depth maps, each tested on hand-made inputs; and the benchmark's files (image layout,
vqa_result.json outputs, prompt files, spaCy). evaluate.py runs the models, generation, the CLI.
Boxes are xyxy floats in UniDet's frame (the image resized to short side 479, long side <= 480),
where the benchmark's detector sees the image; hits are (label, confidence, box), best first.
"""
import json
import os
import re
import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image

import chunker


# --- prompt analysis: spaCy's en_core_web_sm when given, else chunker.py's ---
class Parsed(NamedTuple):
    tokens: list[tuple[str, str]]  # (text, coarse POS): NOUN, ADJ, PROPN (spaCy only), or other
    chunks: list[str]              # noun chunks' text, case kept ("a green bench")


def analyse(prompt: str, nlp=None) -> Parsed:
    """Tokens, noun chunks; the rules tag a chunk's last word NOUN and chunker.ADJ's words ADJ."""
    if nlp is not None:
        doc = nlp(prompt)
        return Parsed([(t.text, t.pos_) for t in doc], [c.text for c in doc.noun_chunks])
    chunks = chunker.chunks(prompt)
    heads = {c.end for c in chunks}
    tokens = [(prompt[m.start():m.end()], "NOUN" if m.end() in heads else
               "ADJ" if m.group() in chunker.ADJ else "X")
              for m in chunker.TOKEN.finditer(prompt.lower())]
    return Parsed(tokens, [prompt[c.start:c.end] for c in chunks])


# --- BLIP-VQA (BLIPvqa_eval) and CLIP's complex-mode text (CLIPScore_eval) ---
DROP = ("top", "the side", "the left", "the right")  # chunks the benchmark never asks about


def questions(chunks: list[str], n=8) -> list[str]:
    """One question "{chunk}?" per noun chunk, np_num = 8 slots, "" for the empty ones."""
    qs = [f"{c}?" for c in chunks if c not in DROP][:n]
    return qs + [""] * (n - len(qs))


def pre_question(q: str, max_words=50) -> str:
    """BLIP's data/utils.py pre_question: lower case, drop .!"()*#:;~ (keep '?'), 50 words."""
    return " ".join(re.sub(r'[.!"()*#:;~]', "", q.lower()).rstrip(" ").split(" ")[:max_words])


def product(answers: list) -> str:
    """An image's score: float32 product of its 4-decimal answers (None, an empty slot: 1)."""
    r = torch.tensor(1.0)
    for a in answers:
        r = r * (1.0 if a is None else float(a))
    return f"{r.item():.4f}"


def clip_text(parsed: Parsed) -> str:
    """Complex mode's CLIP text: the prompt without its ADJ tokens, re-joined with spaces."""
    return " ".join(t for t, pos in parsed.tokens if pos != "ADJ")


# --- UniDet's frame and boxes ---
def unidet_frame(w: int, h: int) -> tuple[int, int]:
    """(w, h) after torchvision's Resize(size=479, max_size=480), UniDet's input transform."""
    short, long = min(w, h), max(w, h)
    new_short, new_long = 479, int(479 * long / short)
    if new_long > 480:
        new_short, new_long = int(480 * new_short / new_long), 480
    return (new_short, new_long) if w <= h else (new_long, new_short)


def box_iou(b1, b2) -> float:
    """IoU of xyxy boxes as determine_position computes it (0 for an empty union)."""
    inter = (max(0, min(b1[2], b2[2]) - max(b1[0], b2[0]))
             * max(0, min(b1[3], b2[3]) - max(b1[1], b2[1])))
    union = (b1[2] - b1[0]) * (b1[3] - b1[1]) + (b2[2] - b2[0]) * (b2[3] - b2[1]) - inter
    return inter / union if union > 0 else 0.0


# --- 2D spatial (UniDet_eval/2D_spatial_eval.py) ---
RELATIONS = ("on side of", "next to", "near", "on the left of", "on the right of",
             "on the bottom of", "on the top of", "on top of")  # first substring found wins
PREPOSITIONS = ("on top of", "on bottom of", "on the left", "on the right", "next to",
                "on side of", "near")  # complex mode: objects around these
PERSON = ("girl", "boy", "man", "woman")  # UniDet's label for them is "person"


def spatial_objects(parsed: Parsed, complex_mode: bool):
    """(obj1, obj2): first and last NOUN; complex mode: the NOUN/PROPN nearest before each
    preposition and the first NOUN after (PROPN fallback), (None, None) unless exactly two.
    girl/boy/man/woman become person, as the 2D and 3D scripts rename them."""
    tok = parsed.tokens
    if not complex_mode:
        nouns = [t for t, pos in tok if pos == "NOUN"]
        objs = [nouns[0], nouns[-1]] if nouns else []
    else:
        objs, words = [], [t for t, _ in tok]
        for i in range(len(tok)):
            k = next((k for k in (3, 2, 1) if " ".join(words[i:i + k]) in PREPOSITIONS), 0)
            if not k:
                continue
            objs += [t for t, pos in reversed(tok[:i]) if pos in ("NOUN", "PROPN")][:1]
            after = [t for t, pos in tok[i + k:] if pos == "NOUN"][:1]
            if not after:  # a PROPN not followed by another PROPN
                after = [tok[j][0] for j in range(i + k, len(tok) - 1)
                         if tok[j][1] == "PROPN" and tok[j + 1][1] != "PROPN"][:1]
            objs += after
    return tuple("person" if o in PERSON else o for o in objs) if len(objs) == 2 else (None, None)


def position(rel, b1, b2, iou_threshold=0.1, distance=150.0) -> float:
    """determine_position: how well xyxy boxes b1, b2 satisfy "obj1 {rel} obj2" (y grows down)."""
    dx = (b2[0] + b2[2]) / 2 - (b1[0] + b1[2]) / 2  # centre of obj2 minus centre of obj1
    dy = (b2[1] + b2[3]) / 2 - (b1[1] + b1[3]) / 2
    iou = box_iou(b1, b2)
    if rel in ("next to", "on side of", "near"):
        return 1.0 if min(abs(dx), abs(dy)) < distance else distance / max(abs(dx), abs(dy))
    # "on top of" is in RELATIONS but not here: the benchmark scores it 0
    ok = {"on the left of": dx > 0 and abs(dx) > abs(dy), "on the right of": dx < 0 and
          abs(dx) > abs(dy), "on the top of": dy > 0 and abs(dy) > abs(dx),
          "on the bottom of": dy < 0 and abs(dy) > abs(dx)}.get(rel, False)
    return 0.0 if not ok else 1.0 if iou < iou_threshold else iou_threshold / iou


def spatial_score(rel, found1, found2) -> float:
    """0.25 conf1 + 0.25 conf2 + 0.5 position, or 0.25 conf of the one found (conf, box); any
    score < 0.5 is 0."""
    if found1 and found2:
        s = 0.25 * found1[0] + 0.25 * found2[0] + position(rel, found1[1], found2[1]) / 2
    else:
        s = 0.25 * (found1 or found2 or (0.0,))[0]
    return 0.0 if s < 0.5 else s


# --- 3D spatial (UniDet_eval/3D_spatial_eval.py; depth: DPT-Hybrid MiDaS) ---
RELATIONS_3D = ("in front of", "behind", "hidden")  # first substring found wins ("hidden by")


def depth_png(pred, size) -> Image.Image:
    """The benchmark's depth file from DPT's output pred (h, w) (inverse depth: larger = nearer):
    min-max normalised, bilinear (align_corners) to the image's size (w, h), x 255, 8 bits by
    PIL's float -> L conversion, which truncates (254.9 -> 254)."""
    pred = pred.float()
    lo, hi = pred.min(), pred.max()
    d = (pred - lo) / (hi - lo) if hi > lo else torch.zeros_like(pred)  # NaN there: PIL writes 0
    d = F.interpolate(d[None, None], size=(size[1], size[0]), mode="bilinear", align_corners=True)
    return Image.fromarray((255 * d[0, 0]).numpy()).convert("L")


def depth_map(png: Image.Image) -> torch.Tensor:
    """A depth file as the benchmark reads it back: Resize(479, max_size=480) (bilinear), / 255:
    (h, w) in [0, 1] in UniDet's frame, where the boxes are."""
    w, h = unidet_frame(*png.size)
    png = png.convert("L").resize((w, h), Image.BILINEAR)
    return torch.tensor(bytearray(png.tobytes()), dtype=torch.uint8).view(h, w).float() / 255


def box_depth(depth, box) -> float:
    """A box's mean depth as the benchmark reads it: depth[x_min:x_max, y_min:y_max] of the
    (h, w) map, rows by x and columns by y (the box's transposed region), int() truncated
    coordinates; NaN for an empty region (then every comparison is False)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return depth[x0:x1, y0:y1].mean().item()


def depth_position(rel, b1, b2, depth, iou_threshold=0.5) -> float:
    """determine_position's 3D branch: obj1 must be nearer than obj2 ("in front of") or farther
    ("behind", "hidden"), by mean box depth (larger = nearer); then 1 if IoU > 0.5, IoU / 0.5 if
    0 < IoU < 0.5, else 0 (boxes that do not overlap score 0; benchmark issue #23)."""
    d = box_depth(depth, b1) - box_depth(depth, b2)
    if not {"in front of": d > 0, "behind": d < 0, "hidden": d < 0}.get(rel, False):
        return 0.0
    iou = box_iou(b1, b2)
    return 1.0 if iou > iou_threshold else iou / iou_threshold if 0 < iou < iou_threshold else 0.0


def pick_boxes(labels: list[str], obj1, obj2):
    """The hits (indices) 3D_spatial_eval.py takes for obj1, obj2: labels containing the object
    (substring). When both occur, it walks until both have been seen, each index overwritten
    by later matches on the way; otherwise the first match of the one that occurs."""
    i1 = i2 = None
    for i, lab in enumerate(labels):
        i1, i2 = (i if obj1 and obj1 in lab else i1), (i if obj2 and obj2 in lab else i2)
        if i1 is not None and i2 is not None:
            return i1, i2
    return (next((i for i, lab in enumerate(labels) if obj1 and obj1 in lab), None),
            next((i for i, lab in enumerate(labels) if obj2 and obj2 in lab), None))


def spatial_3d_score(rel, obj1, obj2, hits, depth) -> float:
    """0.25 conf1 + 0.25 conf2 + 0.5 depth_position, or 0.25 conf of the one found; unlike 2D,
    no 0.5 cut-off."""
    i1, i2 = pick_boxes([lab for lab, _, _ in hits], obj1, obj2)
    if i1 is not None and i2 is not None:
        p = depth_position(rel, hits[i1][2], hits[i2][2], depth)
        return 0.25 * hits[i1][1] + 0.25 * hits[i2][1] + p / 2
    one = i1 if i1 is not None else i2
    return 0.0 if one is None else 0.25 * hits[one][1]


# --- numeracy (UniDet_eval/numeracy_eval.py) ---
NUMBERS = ("a", "an", "one", "two", "three", "four", "five", "six", "seven", "eight")
VALUE = {w: n for n, w in enumerate(NUMBERS[2:], 1)}  # word2number's; it rejects "a", "an"
ALIAS = {"boy": "person", "girl": "person", "man": "person", "woman": "person", "ship": "boat",
         "telivision": "tv", "goldfish": "fish", "painting": "picture"}  # "telivision" (sic)


def counted_objects(words: list[str], pairs) -> list[tuple[str, int | None]]:
    """(object, count) per number word among the prompt's tokens, as numeracy_eval.py reads
    them; pairs: new_objects.txt's (singular, plural) lines. The object is the next two tokens
    when they are an entry, else the next token: a plural gives its singular and the number's
    value ("two fish": fish is both), a singular after a/an/one gives 1, and so does a two-token
    singular after any number. Where the benchmark fails, this skips: a number word last (its
    IndexError), a singular after two..eight (its ValueError); "a"/"an" + plural gives count None
    (word2number raises there, and the benchmark's counts shift by one)."""
    sing, plur = [s for s, _ in pairs], [p for _, p in pairs]
    out = []
    for i, w in enumerate(words[:-1]):
        if w not in NUMBERS:
            continue
        two, one = " ".join(words[i + 1:i + 3]), words[i + 1]
        if i < len(words) - 2 and (two in sing or two in plur):
            plural = two in plur and w not in NUMBERS[:3]
            out.append((sing[plur.index(two)], VALUE.get(w)) if plural else (two, 1))
        elif one in sing and w in NUMBERS[:3]:
            out.append((one, 1))
        elif one in plur:
            out.append((sing[plur.index(one)], VALUE.get(w)))
    return out


def same_box(b1, b2) -> bool:
    """numeracy_eval.py's calculate_iou: pixel-inclusive (+1) boxes with IoU > 0.9, or whose
    intersection covers more than 0.9 of either."""
    inter = (max(0, min(b1[2], b2[2]) - max(b1[0], b2[0]) + 1)
             * max(0, min(b1[3], b2[3]) - max(b1[1], b2[1]) + 1))
    a1 = (b1[2] - b1[0] + 1) * (b1[3] - b1[1] + 1)
    a2 = (b2[2] - b2[0] + 1) * (b2[3] - b2[1] + 1)
    return inter / (a1 + a2 - inter) > 0.9 or inter / a1 > 0.9 or inter / a2 > 0.9


def dedup(hits):
    """The hits numeracy counts: best first, a hit is dropped when an already kept one with the
    same label is the same_box."""
    kept = []
    for lab, conf, box in hits:
        if not any(lab == k and same_box(box, kb) for k, _, kb in kept):
            kept.append((lab, conf, box))
    return kept


def numeracy_score(objects, labels: list[str]) -> float:
    """With w = 1 / #objects: 0.5 w per object (aliased) among the kept labels, 0.5 w more when
    it is there exactly its count times. An object that is no label first renames every label
    containing it (substring) to it, which the objects after it see too, as in the benchmark;
    no objects scores 0 (the benchmark divides by zero)."""
    if not objects:
        return 0.0
    labels, w, score = list(labels), 1.0 / len(objects), 0.0
    for name, count in objects:
        name = ALIAS.get(name, name)
        if name not in labels:
            labels = [name if name in lab else lab for lab in labels]
        if name in labels:
            score += 0.5 * w
            if labels.count(name) == count:
                score += 0.5 * w
    return score


# --- complex: the 3-in-1 mix (3_in_1_eval/3_in_1.py) ---
def three_in_one(prompt, blip, spatial, clip, spatial_keys, action_keys) -> float:
    """By type (lower-cased text before the first '.'): spatial (BLIP + det) / 2, action
    (BLIP + CLIP) / 2, the rest the mean of all three."""
    key = prompt.split(".")[0].lower()
    if key in spatial_keys:
        return (spatial + float(blip)) * 0.5
    if key in action_keys:
        return (clip + float(blip)) * 0.5
    return (float(blip) + spatial + clip) / 3


# --- the benchmark's files: image layout, outputs, prompt files, parser ---
# Where each metric's vqa_result.json goes, as the benchmark's scripts write it.
OUT = {"blip": "annotation_blip", "spatial": "labels/annotation_obj_detection_2d",
       "clip": "annotation_clip", "3_in_1": "annotation_3_in_1",
       "spatial_3d": "labels/annotation_obj_detection_3d", "numeracy": "annotation_num"}


def read_samples(folder: str) -> list[tuple[str, str]]:
    """(prompt, path) per image of folder/samples in index order; the index must be 0..N-1 (#17)."""
    d = os.path.join(folder, "samples")
    if not os.path.isdir(d):
        raise FileNotFoundError(f"no samples/ folder in {folder}")
    found = {}
    for f in sorted(os.listdir(d)):
        if not f.lower().endswith(".png"):  # .DS_Store, Thumbs.db, a note: not a sample
            warnings.warn(f"{d}/{f}: not a .png sample, skipped")
            continue
        m = re.fullmatch(r"([^_]+)_.*?(\d+)\.png", f)
        if not m:
            raise ValueError(f"{d}/{f} is not named {{prompt}}_{{NNNNNN}}.png")
        found[int(m[2])] = (m[1], os.path.join(d, f))
    if not found:
        raise ValueError(f"{d}: no {{prompt}}_{{NNNNNN}}.png images")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"{d}: image indices must run 0..N-1, found {len(found)} images")
    return [found[i] for i in range(len(found))]


def write_result(folder: str, sub: str, answers: list) -> float:
    """The benchmark's vqa_result.json ({"question_id", "answer"} per image); returns the mean."""
    os.makedirs(os.path.join(folder, sub), exist_ok=True)
    path = os.path.join(folder, sub, "vqa_result.json")
    with open(path + ".tmp", "w") as f:
        json.dump([{"question_id": i, "answer": a} for i, a in enumerate(answers)], f)
    os.replace(path + ".tmp", path)
    return sum(float(a) for a in answers) / len(answers)


def load_parser(kind: str, name: str | None = None):
    """spaCy's English model `name` (default en_core_web_sm, the benchmark's parser) or None for
    the rule-based chunker. "auto" falls back to the chunker unless a model was named."""
    if kind != "rules":
        try:
            import spacy
            return spacy.load(name or "en_core_web_sm")
        except (ImportError, OSError):
            if kind == "spacy" or name:
                name = name or "en_core_web_sm"
                raise ImportError(f"spaCy's model {name} is not installed (or spacy is not): "
                                  f"install it, or name another with --spacy-model NAME")
    return None


def depth_file(folder, image_path):
    """Where 3D_spatial_eval.py keeps an image's depth: labels/depth/{folder name}/samples/."""
    name = os.path.basename(os.path.normpath(folder))
    return os.path.join(folder, "labels", "depth", name, "samples", os.path.basename(image_path))


def read_lines(path):
    """A benchmark prompt file (CRLF, no final newline): its stripped non-empty lines."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"prompt file not found: {path}")
    try:
        with open(path, encoding="utf-8") as f:
            return [ln.strip() for ln in f if ln.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text (byte {e.start})") from None


def complex_types(data: str) -> list[set]:
    """The (spatial, action) prompt keys of complex_val_{spatial,action}.txt for three_in_one:
    each line's text before the first '.', lower-cased."""
    return [{ln.split(".")[0].lower() for ln in read_lines(os.path.join(
        data, f"complex_val_{t}.txt"))} for t in ("spatial", "action")]


def numeracy_objects(data: str) -> list[tuple[str, ...]]:
    """new_objects.txt's "singular - plural" lines, split as numeracy_eval.py splits them."""
    return [tuple(w.strip().lower() for w in ln.split(" - "))
            for ln in read_lines(os.path.join(data, "new_objects.txt"))]
