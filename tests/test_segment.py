"""segment.py: prompt parsing, CLIP token alignment, Grounding-DINO + SAM masks (tiny, offline)."""
import pytest
import torch

from oracle import tiny_grounded_sam
from segment import align, boxes_to_masks, grounded_sam, load_segmenter, objects, parse, to_pil
from weights import clip_tokenizer

CASES = {
    "a red cat and a blue dog": [(("red",), "cat"), (("blue",), "dog")],
    "a green bench on the left of a brown cow": [(("green",), "bench"), (("brown",), "cow")],
    "a metallic spoon and a fluffy towel": [(("metallic",), "spoon"), (("fluffy",), "towel")],
    "The round clock above the rectangular mirror.": [(("round",), "clock"),
                                                     (("rectangular",), "mirror")],
    "a big shiny red car": [(("big", "shiny", "red"), "car")],
    "a red circle to the right of a blue square": [(("red",), "circle"), (("blue",), "square")],
    "a yellow triangle below a cyan circle": [(("yellow",), "triangle"), (("cyan",), "circle")],
    "a cat sitting on a wooden chair in the kitchen": [((), "cat"), (("wooden",), "chair")],
    "a red cat and a blue cat": [],  # repeated noun: the masks could not tell them apart
    "a dog under a clear sky": [((), "dog")],  # scene nouns are dropped
}


@pytest.mark.parametrize("prompt", CASES)
def test_parse(prompt):
    assert parse(prompt) == CASES[prompt]


def test_attributed_only_drops_bare_nouns():
    assert parse("a cat and a blue dog", attributed_only=True) == [(("blue",), "dog")]


def test_token_positions_cover_word_pieces():
    tok = clip_tokenizer()  # character-level: every word spans several pieces
    objs = objects(tok, "a red cat and a blue dog")
    assert [o.noun for o in objs] == ["cat", "dog"]
    pieces = tok.convert_ids_to_tokens(tok("a red cat and a blue dog").input_ids)
    for o in objs:
        assert "".join(pieces[i].removesuffix("</w>") for i in o.tokens) == "".join(o.words)
    words = clip_tokenizer(words=["red", "cat", "and", "blue", "dog"])  # one piece per word
    assert [o.tokens for o in objects(words, "A Red cat and a blue dog")] == [(2, 3), (6, 7)]


def test_over_long_prompt_drops_truncated_objects():
    tok = clip_tokenizer(words=["red", "cat", "blue", "dog"])
    prompt = "a red cat " + "and a big one " * 20 + "and a blue dog"
    assert [o.noun for o in objects(tok, prompt)] == ["cat"]  # the dog lies past token 76
    assert align(tok, "a red cat", [(("green",), "cat")]) == []  # a word not in the prompt


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.manual_seed(0)
    return load_segmenter(*tiny_grounded_sam(str(tmp_path_factory.mktemp("seg"))))


def test_nothing_detected_gives_no_mask(models):
    seg = grounded_sam(*models, box_threshold=1.1)  # no score exceeds 1
    masks, found = seg(torch.rand(2, 3, 48, 48), [["cat", "dog"], ["circle"]])
    assert masks.shape == (2, 2, 48, 48) and masks.dtype == torch.bool and not masks.any()
    assert found.shape == (2, 2) and not found.any()
    masks, found = seg(torch.rand(1, 3, 48, 48), [[]])  # a prompt without objects
    assert masks.shape == (1, 1, 48, 48) and not found.any()


def test_boxes_become_masks_per_noun(models):
    dino, dproc, sam, sproc = models

    class Detections:  # the real processor, but with fixed detections: "cat" twice, "bird" once
        def __call__(self, **kw):
            return dproc(**kw)

        def post_process_grounded_object_detection(self, *a, **kw):
            boxes = torch.tensor([[2.0, 2, 20, 20], [30, 30, 46, 46], [5, 5, 9, 9]])
            return [{"boxes": boxes, "text_labels": ["cat", "cat ", "bird"]}]
    seg = grounded_sam(dino, Detections(), sam, sproc)
    masks, found = seg(torch.rand(1, 3, 48, 48), [["dog", "cat"]])
    assert found.tolist() == [[False, True]] and not masks[0, 0].any()
    image = to_pil(torch.rand(1, 3, 48, 48))[0]
    direct = boxes_to_masks(sam, sproc, image, torch.tensor([[2.0, 2, 20, 20], [30, 30, 46, 46]]))
    assert direct.shape == (2, 48, 48) and direct.dtype == torch.bool
    seg_img = to_pil(torch.rand(1, 3, 48, 48))
    assert seg_img[0].size == (48, 48)
