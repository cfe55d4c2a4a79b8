"""Attribute concentration's inputs: objects parsed from the prompt, their CLIP token positions, and
one binary mask per object on the generated image (Grounding-DINO boxes -> SAM masks).

Source: CoMat official attr_concen_utils (spec comat-official.md 3.1-3.4). The official parser is
spaCy's en_core_web_trf; this one is a small rule-based chunker for T2I-CompBench-style prompts, so
nothing is downloaded. The official masks come from FastSAM; here SAM is prompted with the boxes.
A segmenter is any function seg(images, nouns) -> (masks, found), so others can be passed in.
Shapes: B batch, K objects (padded), H, W image size.
Usage: objs = objects(tokenizer, "a red cat and a blue dog"); masks, found = seg(images, nouns)
"""
import re
from typing import NamedTuple

import torch
from PIL import Image
from transformers import (AutoProcessor, GroundingDinoForObjectDetection, SamModel,
                          SamProcessor)

# Words that end a noun chunk: determiners, conjunctions, prepositions, auxiliaries.
BREAK = set("""a an the one two three four five some several many this that these those its his her
their my our your and or but with without while as is are was were be being has have had which who
on in at of to from by for into onto over under above below behind beside besides near next between
among around across against along atop beneath underneath inside outside through toward towards
up down off than then""".split())
# Relation nouns ("on the left of") and the official stop-list of scene / abstract nouns.
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
    """(attributes, noun) per object: chunks between BREAK words, the noun last (English heads).

    Verbs in -ing/-ed also end a chunk ("a cat sitting on a mat"). Official filters: nouns that
    repeat in the prompt are dropped (the masks could not tell them apart), stop-list nouns are
    dropped. Bare nouns are kept unless attributed_only (the official code keeps only nouns with a
    modifier; keeping them gives "a cat and a dog" an attention loss too)."""
    words = re.findall(r"[a-z]+(?:-[a-z]+)*|[^\sa-z]", prompt.lower())
    chunks, cur = [], []
    for w in words + ["."]:
        if w in BREAK or not w[0].isalpha() or (len(w) > 4 and w.endswith(("ing", "ed"))):
            chunks += [cur] if cur else []
            cur = []
        else:
            cur.append(w)
    out = [(tuple(c[:-1]), c[-1]) for c in chunks
           if c[-1] not in STOP and c[-1].removesuffix("s") not in STOP]
    nouns = [n for _, n in out]
    return [(a, n) for a, n in out if nouns.count(n) == 1 and (a or not attributed_only)]


def word_pieces(tokenizer, prompt: str) -> list[tuple[str, list[int]]]:
    """CLIP word pieces grouped back into words: [(word, positions)], positions index the 77-long
    sequence the UNet attends to (0 is <|startoftext|>)."""
    ids = tokenizer(prompt).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    words, cur, pos = [], "", []
    for i, p in enumerate(pieces[1:-1], start=1):  # skip start and end tokens
        cur, pos = cur + p.removesuffix("</w>"), pos + [i]
        if p.endswith("</w>"):
            words.append((cur, pos))
            cur, pos = "", []
    return words


def align(tokenizer, prompt: str, groups) -> list[Obj]:
    """Objects from (attributes, noun) groups: each word takes its first unused occurrence.
    An object with a word past the token limit (truncated away) or not found is dropped."""
    words, used, out = word_pieces(tokenizer, prompt), set(), []
    limit = tokenizer.model_max_length - 1  # the last position holds the end token
    for attrs, noun in groups:
        positions = []
        for w in (*attrs, noun):
            hit = next((j for j, (text, _) in enumerate(words) if text == w and j not in used), None)
            if hit is None:
                break
            used.add(hit)
            positions += words[hit][1]
        else:
            if max(positions) < limit:
                out.append(Obj(noun, (*attrs, noun), tuple(positions)))
    return out


def objects(tokenizer, prompt: str, attributed_only=False) -> list[Obj]:
    return align(tokenizer, prompt, parse(prompt, attributed_only))


def to_pil(images):
    """(B, 3, H, W) in [0, 1] -> PIL images: the segmenters see the clamped, detached picture."""
    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in arr]


def boxes_to_masks(sam, sam_processor, image, boxes):
    """SAM masks (n, H, W) bool for xyxy pixel boxes (n, 4) on one PIL image."""
    inputs = sam_processor(images=image, input_boxes=[boxes.tolist()], return_tensors="pt")
    inputs = inputs.to(sam.device)
    out = sam(**inputs, multimask_output=False)
    masks = sam_processor.image_processor.post_process_masks(
        out.pred_masks.cpu(), inputs["original_sizes"].cpu(), inputs["reshaped_input_sizes"].cpu())
    return masks[0][:, 0].bool()  # (n, H, W)


def grounded_sam(dino, dino_processor, sam, sam_processor, box_threshold=0.3,
                 text_threshold=0.25):
    """A segmenter: seg(images (B, 3, H, W) in [0, 1], nouns per sample) -> (masks (B, K, H, W)
    bool, found (B, K) bool). Official thresholds; a box counts only if its phrase IS the noun;
    all boxes of one noun are OR-ed; an undetected noun gets found=False (and no loss)."""

    @torch.no_grad()
    def seg(images, nouns):
        B, _, H, W = images.shape
        K = max([len(n) for n in nouns] + [1])
        masks = torch.zeros(B, K, H, W, dtype=torch.bool)
        found = torch.zeros(B, K, dtype=torch.bool)
        for b, (image, names) in enumerate(zip(to_pil(images), nouns)):
            if not names:
                continue
            inputs = dino_processor(images=image, text=" . ".join(names) + " .",
                                    return_tensors="pt").to(dino.device)
            det = dino_processor.post_process_grounded_object_detection(
                dino(**inputs), inputs.input_ids, threshold=box_threshold,
                text_threshold=text_threshold, target_sizes=[(H, W)])[0]
            labels = [str(lab).strip() for lab in det["text_labels"]]
            keep = [i for i, lab in enumerate(labels) if lab in names]
            if not keep:
                continue
            box_masks = boxes_to_masks(sam, sam_processor, image, det["boxes"][keep].cpu())
            for m, i in zip(box_masks, keep):
                k = names.index(labels[i])
                masks[b, k] |= m
                found[b, k] = True
        return masks.to(images.device), found.to(images.device)
    return seg


def load_segmenter(dino_path, sam_path, device="cpu"):
    """Grounding-DINO and SAM from local folders, frozen: the four arguments of grounded_sam."""
    dino = GroundingDinoForObjectDetection.from_pretrained(dino_path, local_files_only=True)
    sam = SamModel.from_pretrained(sam_path, local_files_only=True)
    return (dino.to(device).eval(), AutoProcessor.from_pretrained(dino_path, local_files_only=True),
            sam.to(device).eval(), SamProcessor.from_pretrained(sam_path, local_files_only=True))
