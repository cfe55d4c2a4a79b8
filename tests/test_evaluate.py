"""evaluate.py: the T2I-CompBench rules on hand-made inputs, tiny random BLIP-VQA / CLIP /
Grounding-DINO saved to tmp_path (no downloads), and the generate-then-score round trip.
Prompts marked "val" are lines of T2I-CompBench's examples/dataset/*_val.txt (Karine-Huang/
T2I-CompBench, MIT licence, Copyright (c) 2023 HKU), used here as test fixtures."""
import json
import os

import pytest
import torch
from PIL import Image

import evaluate as ev
from oracle import tiny_grounded_sam
from weights import clip_tokenizer

WORDS = "a an the green blue bench bowl girl frog top of yes no".split()


def tiny_vqa(folder):
    """Tiny random BlipForQuestionAnswering + BERT word tokenizer; [DEC], [ENC] last, as in BLIP."""
    from transformers import BertTokenizer, BlipConfig, BlipForQuestionAnswering
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "?", *WORDS, "[DEC]", "[ENC]"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "vocab.txt"), "w") as f:
        f.write("\n".join(vocab) + "\n")
    cfg = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
                         encoder_hidden_size=32, pad_token_id=0, bos_token_id=len(vocab) - 2,
                         sep_token_id=3),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8))
    torch.manual_seed(0)
    BlipForQuestionAnswering(cfg).save_pretrained(folder)
    BertTokenizer(os.path.join(folder, "vocab.txt")).save_pretrained(folder)
    return folder


def tiny_clip(folder):
    from transformers import CLIPConfig, CLIPModel
    tok, small = clip_tokenizer(), dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), eos_token_id=tok.eos_token_id, **small),
                     vision_config=dict(image_size=224, patch_size=32, **small), projection_dim=16)
    CLIPModel(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


# val: color_val.txt lines 1-2, spatial_val.txt line 2, complex_val.txt
QUESTIONS = {
    "a green bench and a blue bowl": ["a green bench?", "a blue bowl?"],
    "a blue bench and a green bowl": ["a blue bench?", "a green bowl?"],
    "a girl on the top of a frog": ["a girl?", "the top?", "a frog?"],
    "The fluffy cat is on the left of the soft pillow.": ["The fluffy cat?", "the soft pillow?"],
    "a black and white cat next to a dog": ["a black and white cat?", "a dog?"],
}


@pytest.mark.parametrize("prompt", QUESTIONS)
def test_questions_on_benchmark_prompts(prompt):
    want = QUESTIONS[prompt]
    assert ev.questions(ev.analyse(prompt).chunks) == want + [""] * (8 - len(want))
    assert ev.questions(["top", "the left", "a cat"], n=2) == ["a cat?", ""]  # benchmark's filter
    assert ev.pre_question('The "Big" cat: here!?') == "the big cat here?"


def test_yes_prob_against_logits(tmp_path):
    from transformers import AutoTokenizer, BlipForQuestionAnswering
    path = tiny_vqa(str(tmp_path / "blip"))
    model, tok = BlipForQuestionAnswering.from_pretrained(path), AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)  # not the config's 32 px: position embeddings interpolated
    qs, owner = ["a green bench?", "the top of a frog?", "a bowl?"], [0, 1, 1]  # two lengths
    with torch.no_grad():
        got = ev.yes_prob(model, tok, x, qs, owner)
        v = tok.get_vocab()
        for q, b, g in zip(qs, owner, got):  # one by one, ids by hand, softmax over all logits
            ids = torch.tensor([[v["[ENC]"], *tok.convert_tokens_to_ids(tok.tokenize(q)), 3]])
            img = model.vision_model(x[b:b + 1], interpolate_pos_encoding=True)[0]
            h = model.text_encoder(ids, encoder_hidden_states=img)[0]
            p = model.text_decoder(torch.tensor([[v["[DEC]"]]]), encoder_hidden_states=h
                                   ).logits[0, 0].softmax(-1)
            torch.testing.assert_close(g, p[v["yes"]] / (p[v["yes"]] + p[v["no"]]))
    assert len(ev.blip_vqa(model, tok, 40)([Image.new("RGB", (64, 48))] * 2, qs, owner)) == 3


def test_product_with_empty_slots():
    assert ev.product(["0.5000", None, "0.4000"] + [None] * 5) == "0.2000"
    assert ev.product(["0.5000", "0.3333"]) == "0.1666"  # 0.16665 is 0.1666499.. in float32
    assert ev.product([None] * 8) == "1.0000"
    assert ev.product(["0.9999"] * 8) == "0.9992"


B = (100, 100, 150, 150)  # obj1's box; obj2's boxes below are placed around it


@pytest.mark.parametrize("rel, b2, want", [
    ("next to", (400, 100, 450, 150), 1.0),      # |dy| = 0 < 150
    ("near", (400, 400, 450, 450), 0.5),         # 150 / max(300, 300)
    ("on side of", (200, 200, 250, 250), 1.0),
    ("on the left of", (300, 110, 350, 160), 1.0),   # obj2 to the right, no overlap
    ("on the left of", (110, 100, 160, 150), 0.1 / (2000 / 3000)),  # IoU 2/3 >= 0.1
    ("on the left of", (0, 100, 50, 150), 0.0),      # wrong side
    ("on the left of", (110, 300, 160, 350), 0.0),   # mostly vertical
    ("on the right of", (0, 100, 50, 150), 1.0),
    ("on the right of", (300, 100, 350, 150), 0.0),
    ("on the top of", (100, 300, 150, 350), 1.0),    # obj1 above: obj2's centre lower
    ("on the top of", (100, 0, 150, 50), 0.0),
    ("on the bottom of", (100, 0, 150, 50), 1.0),
    ("on the bottom of", (100, 300, 150, 350), 0.0),
    ("on top of", (100, 300, 150, 350), 0.0),        # the benchmark scores "on top of" 0
    (None, (300, 100, 350, 150), 0.0),
])
def test_position_rule(rel, b2, want):
    assert ev.position(rel, B, b2) == pytest.approx(want)


def test_spatial_score_weights_and_cutoff():
    right, wrong = (0.8, (300, 100, 350, 150)), (0.6, (0, 100, 50, 150))
    assert ev.spatial_score("on the left of", (0.6, B), right) == pytest.approx(0.85)
    assert ev.spatial_score("on the left of", (0.9, B), wrong) == 0.0  # 0.375 < 0.5
    assert ev.spatial_score("on the left of", (1.0, B), (1.0, wrong[1])) == 0.5
    assert ev.spatial_score("next to", (0.9, B), None) == 0.0  # one object: 0.225 -> 0
    assert ev.spatial_score("next to", None, None) == 0.0


def test_spatial_objects_and_relation():
    p = ev.analyse("a girl on the top of a frog")  # val: spatial_val.txt line 2
    assert ev.spatial_objects(p, False) == ("girl", "frog")
    p = ev.analyse("The blue water bottle was on top of the red backpack.")  # val: complex_val
    assert ev.spatial_objects(p, True) == ("bottle", "backpack")
    assert ev.clip_text(p) == "The water bottle was on top of the backpack ."
    p = ev.analyse("a cat next to a dog near a tree")  # two prepositions: 4 objects -> none
    assert ev.spatial_objects(p, True) == (None, None)
    assert ev.spatial_objects(ev.analyse("near it"), False) == (None, None)  # no noun
    # PROPN fallback after a preposition, as spaCy would tag it
    tokens = [("cat", "NOUN"), ("near", "ADP"), ("Big", "PROPN"), ("Ben", "PROPN"), (".", "X")]
    assert ev.spatial_objects(ev.Parsed(tokens, []), True) == ("cat", "Ben")


def test_three_in_one_routing():
    sp, ac = {"the cat was on top of the chair"}, {"the man is riding a horse"}
    def mix(p):
        return ev.three_in_one(p, "0.4000", 0.8, 0.3, sp, ac)
    assert mix("The cat was on top of the chair.") == pytest.approx(0.6)  # (BLIP + det) / 2
    assert mix("The man is riding a horse. Fast.") == pytest.approx(0.35)  # (BLIP + CLIP) / 2
    assert mix("The man rides near a tree.") == pytest.approx(0.5)  # all three / 3


def test_read_samples_errors(tmp_path):
    os.makedirs(tmp_path / "samples")
    for name in ("a cat_000000.png", "a dog_000002.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "samples" / name)
    with pytest.raises(ValueError, match="must run 0..N-1"):
        ev.read_samples(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "cat.png")
    with pytest.raises(ValueError, match="is not named"):
        ev.read_samples(str(tmp_path))


def test_generate_then_score(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    os.makedirs(data)
    files = {"color_val.txt": "a green bench and a blue bowl\r\na blue bench and a green bowl",
             "spatial_val.txt": "a girl on the top of a frog",
             "non_spatial_val.txt": "a girl is holding a bowl",
             "complex_val.txt": "The green bench is near the frog.\r\nThe girl holds a blue bowl.",
             "complex_val_spatial.txt": "The green bench is near the frog.",
             "complex_val_action.txt": "The girl holds a blue bowl."}
    for name, text in files.items():
        (data / name).write_text(text)
    blip, clip = tiny_vqa(str(tmp_path / "blip")), tiny_clip(str(tmp_path / "clip"))
    dino, _ = tiny_grounded_sam(str(tmp_path / "gs"), words=("girl", "frog", "bench"))
    flags = ["--data", str(data), "--blip", blip, "--blip-size", "32", "--clip", clip,
             "--dino", dino, "--parser", "rules"]
    ev.main([str(out), "--categories", "color,spatial,non_spatial,complex", "--model", "tiny",
             "--n", "2", "--steps", "1", "--size", "32", *flags])
    names = sorted(os.listdir(out / "color" / "samples"))
    assert names == [f"a blue bench and a green bowl_00000{i}.png" for i in (2, 3)] + \
        [f"a green bench and a blue bowl_00000{i}.png" for i in (0, 1)]
    assert "complex: blip" in capsys.readouterr().out
    assert [r["question_id"] for r in json.load(open(
        out / "complex" / "annotation_3_in_1" / "vqa_result.json"))] == [0, 1, 2, 3]
    res = json.load(open(out / "color" / "annotation_blip" / "vqa_result.json"))
    assert all(isinstance(r["answer"], str) and 0 < float(r["answer"]) < 1 for r in res)
    before = os.path.getmtime(out / "color" / "samples" / names[0])
    ev.main([str(out), "--categories", "color", *flags])  # score only; samples untouched
    assert os.path.getmtime(out / "color" / "samples" / names[0]) == before


def test_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--blip must be a local model folder for color"):
        ev.main([str(tmp_path), "--categories", "color"])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="not a BlipForQuestionAnswering folder") as e:
        ev.main([str(tmp_path), "--categories", "color", "--blip", str(tmp_path / "empty")])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--data is needed"):
        ev.main([str(tmp_path), "--categories", "complex"])
