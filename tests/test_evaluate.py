"""evaluate.py: tiny random BLIP-VQA / CLIP / Grounding-DINO / DPT-Hybrid saved to tmp_path (no
downloads), the generate-then-score round trip for all eight categories, layout and CLI errors
(the rules themselves: test_compbench.py). Prompts marked "val" are lines of T2I-CompBench's
examples/dataset/*_val.txt (Karine-Huang/T2I-CompBench, MIT licence, Copyright (c) 2023 HKU),
used here as test fixtures."""
import json
import os

import pytest
import torch
from oracle import tiny_grounded_sam
from PIL import Image

import compbench as cb
import evaluate as ev
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


def tiny_dpt(folder):
    """Tiny random DPT-Hybrid (BiT stages + ViT), Intel/dpt-hybrid-midas's architecture; its
    32 px config side is not the 480 it runs at, as 384 is not for the real one."""
    from transformers import DPTConfig, DPTForDepthEstimation
    bit = dict(hidden_sizes=[8, 16, 32], depths=[1, 1, 1], embedding_size=8, num_groups=2,
               out_features=["stage1", "stage2", "stage3"], layer_type="bottleneck",
               global_padding="same", embedding_dynamic_padding=True)
    cfg = DPTConfig(is_hybrid=True, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, image_size=32, patch_size=16, backbone_config=bit,
                    backbone_out_indices=[0, 1, 0, 1], neck_hidden_sizes=[8, 16, 16, 16],
                    reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=16,
                    backbone_featmap_shape=[1, 32, 2, 2])
    torch.manual_seed(0)
    DPTForDepthEstimation(cfg).save_pretrained(folder)
    return folder


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


def test_read_samples_errors(tmp_path):
    os.makedirs(tmp_path / "samples")
    for name in ("a cat_000000.png", "a dog_000002.png"):
        Image.new("RGB", (8, 8)).save(tmp_path / "samples" / name)
    with pytest.raises(ValueError, match="must run 0..N-1"):
        cb.read_samples(str(tmp_path))
    Image.new("RGB", (8, 8)).save(tmp_path / "samples" / "cat.png")
    with pytest.raises(ValueError, match="is not named"):
        cb.read_samples(str(tmp_path))


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


def test_3d_spatial_and_numeracy(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    os.makedirs(data)
    files = {"3d_spatial_val.txt": "a dog in front of a desk\na chair hidden by a mouse",  # val
             "numeracy_val.txt": "two boys\none pear and three knives",  # val
             "new_objects.txt": "boy - boys\npear - pears\nknife - knives"}
    for name, text in files.items():
        (data / name).write_text(text)
    torch.manual_seed(0)
    dino, _ = tiny_grounded_sam(str(tmp_path / "gs"), words=("dog", "desk", "person", "pear"))
    dpt = tiny_dpt(str(tmp_path / "dpt"))
    flags = ["--data", str(data), "--dino", dino, "--parser", "rules"]
    ev.main([str(out), "--categories", "3d_spatial,numeracy", "--model", "tiny", "--n", "2",
             "--steps", "1", "--size", "32", "--dpt", dpt, *flags])
    printed = capsys.readouterr().out
    assert "3d_spatial: spatial_3d" in printed and "numeracy: numeracy" in printed
    for sub in ("3d_spatial/labels/annotation_obj_detection_3d", "numeracy/annotation_num"):
        res = json.load(open(out / sub / "vqa_result.json"))
        assert [r["question_id"] for r in res] == [0, 1, 2, 3]
        assert all(0 <= r["answer"] <= 1 for r in res)
    depth_dir = out / "3d_spatial" / "labels" / "depth" / "3d_spatial" / "samples"
    png = Image.open(depth_dir / "a dog in front of a desk_000001.png")
    assert png.mode == "L" and png.size == (32, 32)  # 8 bits, at the image's size
    # hand-made boxes (479-px frame), best first, through score(): numbers known by hand
    hits = [("person", 0.9, (0, 0, 99, 99)), ("person", 0.8, (1, 1, 99, 99)),  # a duplicate
            ("person", 0.7, (200, 200, 299, 299)), ("pear", 0.6, (0, 0, 50, 50)),
            ("dog", 0.8, (0, 0, 100, 100)), ("desk", 0.4, (20, 0, 120, 100))]  # IoU 2/3

    def detect(image, nouns):
        return [h for h in hits if h[0] in nouns]
    from transformers import DPTForDepthEstimation
    scorers = ev.Scorers(None, None, detect, ev.dpt_depth(DPTForDepthEstimation.from_pretrained(
        dpt).eval()))
    means = ev.score(str(out / "numeracy"), "numeracy", scorers, objects=[
        ("boy", "boys"), ("pear", "pears"), ("knife", "knives")])
    assert means == {"numeracy": (1 + 1 + 0.5 + 0.5) / 4}  # two people; a pear but no knives
    ev.score(str(out / "3d_spatial"), "3d_spatial", scorers)
    res = json.load(open(out / "3d_spatial/labels/annotation_obj_detection_3d/vqa_result.json"))
    for k in (0, 1):  # dog (nearer or not, by this image's depth file) in front of the desk
        d = cb.depth_map(Image.open(depth_dir / f"a dog in front of a desk_00000{k}.png"))
        near = cb.box_depth(d, hits[4][2]) > cb.box_depth(d, hits[5][2])
        assert res[k]["answer"] == pytest.approx(0.3 + 0.5 * near)
    assert [r["answer"] for r in res[2:]] == [0.0, 0.0]  # no chair or mouse among the hits
    ev.main([str(out), "--categories", "numeracy", *flags])  # no --dpt needed to score it
    with pytest.raises(SystemExit, match="--dpt .a model folder or hub id. is needed for 3d_"):
        ev.main([str(out), "--categories", "3d_spatial", *flags])
    with pytest.raises(SystemExit, match="--data is needed"):
        ev.main([str(out), "--categories", "numeracy", "--dino", dino])


def test_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match="--blip .a model folder or hub id. is needed for color"):
        ev.main([str(tmp_path), "--categories", "color"])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(SystemExit, match="empty/config.json: missing .not a transformers model "
                       "folder, for --blip") as e:
        ev.main([str(tmp_path), "--categories", "color", "--blip", str(tmp_path / "empty")])
    assert "\n" not in str(e.value)
    with pytest.raises(SystemExit, match="--data is needed"):
        ev.main([str(tmp_path), "--categories", "complex"])
