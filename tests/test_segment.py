"""segment.py: prompt parsing, CLIP token alignment, Grounding-DINO + SAM masks (tiny, offline)."""
import itertools

import pytest
import torch
from oracle import tiny_grounded_sam

from segment import (align, boxes_to_masks, grounded_sam, load_segmenter, objects, parse,
                     relation, to_pil)
from weights import clip_tokenizer

CASES = {
    "a red cat and a blue dog": [(("red",), "cat"), (("blue",), "dog")],
    "a green bench on the left of a brown cow": [(("green",), "bench"), (("brown",), "cow")],
    "a metallic spoon and a fluffy towel": [(("metallic",), "spoon"), (("fluffy",), "towel")],
    "The round clock above the rectangular mirror.": [(("round",), "clock"),
                                                     (("rectangular",), "mirror")],
    "a big shiny red car": [(("big", "shiny", "red"), "car")],
    "a red, shiny car": [(("red", "shiny"), "car")],
    "a black and white cat next to a dog": [(("black", "white"), "cat"), ((), "dog")],
    "a girl with long hair": [((), "girl"), (("long",), "hair")],
    "a cat sitting on a wooden chair in the kitchen": [((), "cat"), (("wooden",), "chair")],
    "a person is holding a leather bag": [((), "person"), (("leather",), "bag")],
    "the car is red and the bike is blue": [(("red",), "car"), (("blue",), "bike")],
    "there is a tall building near a striped tent": [(("tall",), "building"),
                                                     (("striped",), "tent")],
    "a man's red hat": [((), "man"), (("red",), "hat")],
    "a red t-shirt in front of a teddy bear": [(("red",), "t-shirt"), (("teddy",), "bear")],
    "a red cat and a blue cat": [],  # repeated noun: the masks could not tell them apart
    "a dog under a clear sky": [((), "dog")],  # scene nouns are dropped
}


@pytest.mark.parametrize("prompt", CASES)
def test_parse(prompt):
    assert parse(prompt) == CASES[prompt]


def test_parse_toy_world_prompts():
    colours = "red green blue yellow purple cyan".split()
    shapes = "circle square triangle".split()
    relations = ["and a", "to the left of a", "to the right of a", "above a", "below a"]
    for c1, s1 in itertools.product(colours, shapes):
        assert parse(f"a {c1} {s1}") == [((c1,), s1)]
        for c2, s2, rel in itertools.product(colours, shapes, relations):
            want = [((c1,), s1), ((c2,), s2)] if s1 != s2 else []
            assert parse(f"a {c1} {s1} {rel} {c2} {s2}") == want, (c1, s1, rel, c2, s2)


def test_relation_direction():
    """Where the second object lies from the first (x, y; y down), T2I-CompBench's wording too."""
    assert relation("a red circle to the left of a blue square") == (1, 0)
    assert relation("a green bench on the left of a brown cow") == (1, 0)
    assert relation("A cat on the right of a dog") == (-1, 0)
    assert relation("a lamp on the top of a desk") == relation("a cup above a plate") == (0, 1)
    assert relation("a dog below a cat") == relation("a mat under a chair") == (0, -1)
    assert relation("a cat above a dog to the left of a bird") == (0, 1)  # the first one
    assert relation("a red cat and a blue dog") is relation("a leftover pizza") is None


def test_attributed_only_drops_bare_nouns():
    assert parse("a cat and a blue dog", attributed_only=True) == [(("blue",), "dog")]


def test_token_positions_cover_word_pieces():
    tok = clip_tokenizer()  # character-level: every word spans several pieces
    prompt = "a red cat and a blue dog"
    objs = objects(tok, prompt)
    assert [o.noun for o in objs] == ["cat", "dog"]
    pieces = tok.convert_ids_to_tokens(tok(prompt).input_ids)
    for o in objs:
        assert "".join(pieces[i].removesuffix("</w>") for i in o.tokens) == "".join(o.words)
    assert objs[0].tokens == (2, 3, 4, 5, 6, 7)  # 0 start, 1 "a", "r e d" 2-4, "c a t" 5-7
    words = clip_tokenizer(words=["red", "cat", "and", "blue", "dog"])  # one piece per word
    assert [o.tokens for o in objects(words, "A Red cat and a blue dog")] == [(2, 3), (6, 7)]
    # CLIP splits "t-shirt" into three words: the object takes all their pieces
    (o,) = objects(words, "a red t-shirt")
    assert o.tokens == (2, 3, 4, 5, 6, 7, 8, 9) and o.words == ("red", "t-shirt")
    # a repeated attribute takes its first unused occurrence, as the official alignment does
    objs = objects(words, "a red cat and a red dog")
    assert [o.tokens for o in objs] == [(2, 3), (6, 7)]


def test_over_long_prompt_and_max_objects():
    tok = clip_tokenizer(words=["red", "cat", "blue", "dog"])
    prompt = "a red cat " + "and a big one " * 20 + "and a blue dog"
    assert len(tok(prompt).input_ids) > 77  # untruncated: the dog lies past position 76
    assert [o.noun for o in objects(tok, prompt)] == ["cat"]
    assert align(tok, "a red cat", [(("green",), "cat")]) == []  # a word not in the prompt
    assert [o.noun for o in objects(tok, "a red cat and a blue dog", max_objects=1)] == ["cat"]
    assert objects(tok, "a red cat and a red cat") == []  # repeated noun dropped


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    return load_segmenter(*tiny_grounded_sam(str(tmp_path_factory.mktemp("seg"))))


def test_nothing_detected_gives_no_mask(models):
    seg = grounded_sam(*models, box_threshold=1.1)  # no sigmoid score exceeds 1
    masks, found = seg(torch.rand(2, 3, 48, 40), [["cat", "dog"], ["circle"]])
    assert masks.shape == (2, 2, 48, 40) and masks.dtype == torch.bool and not masks.any()
    assert found.shape == (2, 2) and found.dtype == torch.bool and not found.any()
    masks, found = seg(torch.rand(1, 3, 48, 48), [[]])  # a prompt without objects
    assert masks.shape == (1, 1, 48, 48) and not found.any()


class Rigged:
    """The tiny Grounding-DINO with its scores overwritten: query q is sure of the caption tokens
    in `hits[q]` with box `boxes[q]` (normalised cx, cy, w, h); every other score is low. The real
    processor then turns them into phrases and pixel boxes."""

    def __init__(self, dino, tokenizer, hits, boxes):
        self.dino, self.tok, self.hits, self.boxes = dino, tokenizer, hits, boxes
        self.device, self.dtype = dino.device, dino.dtype

    def __call__(self, **inputs):
        out = self.dino(**inputs)
        ids = inputs["input_ids"][0].tolist()
        out.logits.fill_(-10.0)
        for q, (words, box) in enumerate(zip(self.hits, self.boxes)):
            for w in words:  # a word missing from this caption scores nothing
                i = self.tok.convert_tokens_to_ids(w)
                out.logits[0, q, ids.index(i) if i in ids else 0] = 10.0 if i in ids else -10
            out.pred_boxes[0, q] = torch.tensor(box)
        return out


def test_boxes_become_masks_per_noun(models):
    torch.manual_seed(0)
    dino, dproc, sam, sproc = models
    # two "cat" boxes (OR-ed; special tokens and dots don't count as words), a "cat. dog" phrase
    # (no exact noun: ignored), nothing for "dog"
    hits = [["cat"], ["cat", ".", "[SEP]"], ["cat", ".", "dog"]]
    boxes = [[0.25, 0.25, 0.3, 0.3], [0.7, 0.6, 0.2, 0.4], [0.5, 0.5, 0.9, 0.9]]
    seg = grounded_sam(Rigged(dino, dproc.tokenizer, hits, boxes), dproc, sam, sproc)
    images = torch.rand(2, 3, 48, 40) * 1.4 - 0.2  # clamped inside
    masks, found = seg(images, [["dog", "cat"], ["circle"]])
    assert found.tolist() == [[False, True], [False, False]]
    assert not masks[0, 0].any() and not masks[1].any()
    # the "cat" mask is the union of SAM's masks for the two boxes, in pixels (x0, y0, x1, y1)
    xyxy = torch.tensor([[4.0, 4.8, 16, 19.2], [24, 19.2, 32, 38.4]])
    direct = boxes_to_masks(sam, sproc, to_pil(images[:1])[0], xyxy)
    assert direct.shape == (2, 48, 40) and direct.dtype == torch.bool
    assert torch.equal(masks[0, 1], direct[0] | direct[1])


def test_to_pil_truncates_clamped_pixels():
    images = torch.tensor([-0.5, 0.999, 1.5, 0.5]).view(1, 1, 2, 2).expand(1, 3, 2, 2)
    (image,) = to_pil(images)
    assert image.size == (2, 2) and image.getpixel((0, 0)) == (0, 0, 0)
    assert image.getpixel((1, 0)) == (254, 254, 254) and image.getpixel((0, 1)) == (255,) * 3
