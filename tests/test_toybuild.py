"""build.py: a build at a few steps writes a folder the loaders read, bit-identical per seed."""
import json
import os
from functools import partial

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import captioner
import sample
import toy
import weights
from toy import build as tb
from toy import world as tw
from unet import UNet
from vae import VAE

FEW = dict(vae=1, unet=2, more=2, captioner=1, vqa=1, relations=1, bind=1)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tb.build(str(tmp_path_factory.mktemp("toy") / "toy"), seed=0, steps=FEW, pool=64)


def test_build_loads_and_samples(built):
    assert sorted(os.listdir(os.path.dirname(built))) == ["toy"]  # no temp folder left behind
    preset = [open(os.path.join(d, "comat.json")).read() for d in (built, toy.MODEL)]
    assert preset[0] == preset[1]  # the shipped preset is the one the build writes
    pipe = weights.load_pipeline(built)
    assert pipe.unet.cfg == tb.UNET_CFG and not pipe.sdxl
    assert pipe.vae.cfg.channels == tb.VAE_CFG.channels and pipe.vae.cfg.scale > 0
    images = sample.generate(pipe, ["a red circle to the left of a blue square", "a green square"],
                             steps=2, scale=3.0, size=64, progress=False)
    assert images.shape == (2, 3, 64, 64) and torch.isfinite(images).all()
    cap = captioner.load_captioner(os.path.join(built, "captioner"))
    logp = captioner.caption_logprob(cap, images, ["a red circle to the left of a blue square",
                                                   "a green square"])
    assert logp.shape == (2,) and torch.isfinite(logp).all()
    # every grammar word is one token in both tokenizers (segment.py aligns masks by token)
    text = "a purple triangle to the right of a yellow triangle"  # the longest prompt
    assert len(pipe.tokenizers[0](text).input_ids) == 12 <= tb.MAX_TOKENS
    assert cap.tokenizer.tokenize(f"a photography of {text}") == f"a photography of {text}".split()


def test_same_seed_same_weights(built, tmp_path):
    again = tb.build(str(tmp_path / "toy"), seed=0, steps=FEW, pool=64)
    parts = ("unet", "vae", "text_encoder", "captioner", "vqa", "captioner_bind", "captioner_rel")
    files = [os.path.join(d, f) for d in parts
             for f in os.listdir(os.path.join(built, d)) if f.endswith(".safetensors")]
    assert len(files) == 7
    for f in files:
        a, b = load_file(os.path.join(built, f)), load_file(os.path.join(again, f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_rebuilding_one_stage_keeps_the_others(built, tmp_path):
    out = str(tmp_path / "toy")
    with pytest.raises(SystemExit, match="missing"):  # nothing to keep the base model from
        tb.build(out, seed=1, steps=FEW, only=("captioner",))
    assert not os.path.exists(out) and not os.listdir(tmp_path)  # no temp folder left behind
    import shutil
    shutil.copytree(built, out)
    tb.build(out, seed=1, steps=FEW, only=("captioner",))
    for d in ("unet", "vae", "text_encoder", "captioner", "vqa"):
        f = [x for x in os.listdir(os.path.join(out, d)) if x.endswith(".safetensors")][0]
        a, b = load_file(os.path.join(built, d, f)), load_file(os.path.join(out, d, f))
        same = all(torch.equal(a[k], b[k]) for k in a)
        assert same == (d != "captioner"), d  # only the captioner was retrained (seed 1)
    tb.build(out, seed=1, steps=FEW, only=("bind", "rel"))  # bind: from the captioner kept
    a, b, c = (load_file(os.path.join(out, d, "model.safetensors"))
               for d in ("captioner", "captioner_bind", "captioner_rel"))
    assert a.keys() == b.keys() == c.keys() and any(not torch.equal(a[k], b[k]) for k in a)
    pos = "vision_model.embeddings.position_embedding"  # (1, 1 + 64, 96)
    assert a[pos].float().abs().max() < 0.01  # BLIP's start (~0), one step on
    assert (c[pos][0, 1:].float().norm(dim=1) - tb.POS_NORM).abs().max() < 0.5  # the grid's
    tb.build(out, seed=1, steps=FEW, only=("more",))  # the UNet and text encoder trained on
    for d in ("unet", "vae", "text_encoder"):
        f = [x for x in os.listdir(os.path.join(out, d)) if x.endswith(".safetensors")][0]
        a, b = load_file(os.path.join(built, d, f)), load_file(os.path.join(out, d, f))
        assert all(torch.equal(a[k], b[k]) for k in a) == (d == "vae"), d


def test_confusions_are_one_edit_away():
    rng = np.random.default_rng(0)
    for text in ["a red circle", "a red circle and a blue square",
                 "a green triangle to the left of a green square"]:
        for _ in range(20):
            wrong = tb.confuse(text, rng)
            a, b = text.split(), wrong.split()
            diff = [i for i in range(len(a)) if a[i] != b[i]]
            assert len(a) == len(b) and 1 <= len(diff) <= 2, wrong
            if len(diff) == 2:  # a colour swap
                assert a[diff[0]] == b[diff[1]] and a[diff[1]] == b[diff[0]]
                assert a[diff[0]] in tw.COLOURS
            assert tw.parse_prompt(wrong)  # still in the grammar
    # two circles: swapping their colours says the same thing, so it is never the confusion
    for _ in range(20):
        wrong = tb.confuse("a red circle and a blue circle", rng)
        assert sorted(wrong.split(" and ")) != ["a blue circle", "a red circle"], wrong


def test_colour_swaps_only_where_they_change_the_binding():
    assert tb.swap_colours("a red circle and a blue square") == "a blue circle and a red square"
    assert (tb.swap_colours("a red circle to the left of a blue square")
            == "a blue circle to the left of a red square")
    for text in ["a red circle", "a red circle and a blue circle",
                 "a red circle and a red square", "a mixed blob and a red square"]:
        assert tb.swap_colours(text) is None, text  # same meaning, or no two colours


def test_reshapes_change_the_first_shape_to_the_next():
    assert tb.reshape("a red circle") == "a red " + tw.SHAPES[(tw.SHAPES.index("circle") + 1)
                                                             % len(tw.SHAPES)]
    last = tw.SHAPES[-1]
    assert tb.reshape(f"a blue {last} above a red {last}") == \
        f"a blue {tw.SHAPES[0]} above a red {last}"  # the first object only, wrapping round
    assert tb.reshape("a mixed blob") is None  # no shape of the grammar to change


def test_base_samples_are_the_models_drawings_of_training_prompts(built):
    images, prompts = tb.base_samples(built, 4, seed=0)
    assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
    assert all(tw.parse_prompt(p) and p not in tb.HELD_OUT for p in prompts)
    again, _ = tb.base_samples(built, 4, seed=0)
    assert np.array_equal(images, again)


def test_miscounts_name_one_object_too_few_or_too_many():
    rng = np.random.default_rng(0)
    for text, n in [("a red circle", 1), ("a red circle and a blue square", 2),
                    ("a green triangle to the left of a green square", 2),
                    ("a mixed blob and a red square and a red circle with noise", 3), ("", 0)]:
        for _ in range(10):
            wrong = tb.miscount(text, rng)
            named = wrong.removesuffix(" with noise").split(" and ") if wrong else []
            assert len(named) == (n + 1 if n < 2 else 1), wrong
            assert wrong.endswith("with noise") == text.endswith("with noise")
            kept = set(text.removesuffix(" with noise").replace(" to the left of ", " and ")
                       .split(" and "))
            assert set(named[:n]) <= kept or len(named) == 1 and named[0] in kept, wrong


def test_ascent_stays_in_budget_and_raises_the_target():
    cap = captioner.load_captioner(toy.CAPTIONER)
    rng = np.random.default_rng(0)
    one = [tw.sample_scene(rng, "one") for i in range(3)]
    x = tw.to_float(np.stack([tw.render(s) for s in one]))
    # a wrong colour: room to rise (a wrong shape may not have it: the shipped captioner prefers
    # another shape to the true one on 11 of 64 clean one-object renders, as the previous did)
    cols = list(tw.COLOURS)
    after = {c: cols[(i + 1) % len(cols)] for i, c in enumerate(cols)}  # the next palette colour
    recoloured = [s.objects[0]._replace(colour=after[s.objects[0].colour]) for s in one]
    target = [tw.prompt(s._replace(objects=(o,))) for s, o in zip(one, recoloured)]
    adv = tb.ascend(cap, x, target, eps=0.05, steps=5)
    rms = (adv - x).pow(2).mean((1, 2, 3)).sqrt()
    assert (rms <= 0.05 + 1e-6).all() and adv.min() >= 0 and adv.max() <= 1
    before = captioner.caption_logprob(cap, x, target)
    after = captioner.caption_logprob(cap, adv, target)
    assert (after > before).all()
    assert all(p.grad is None for p in cap.model.parameters())  # the weights are untouched


def test_latent_ascent_stays_in_budget_and_raises_the_target():
    """build.ascend_latent: the probe's and the captioner's attack where CoMat's gradient goes
    (the VAE latent, through the decoder), within eps x each latent's RMS."""
    cap, pipe = captioner.load_captioner(toy.CAPTIONER), weights.load(toy.MODEL)
    vae = pipe.vae
    rng = np.random.default_rng(0)
    two = [s for s in (tw.sample_scene(rng, "two") for _ in range(20))
           if tb.swap_colours(tw.prompt(s))][:3]
    with torch.no_grad():
        z = vae.encode(tb.images(two))[0] * vae.cfg.scale
    target = [tb.swap_colours(tw.prompt(s)) for s in two]
    reward = partial(captioner.caption_logprob, cap)
    z2, img = tb.ascend_latent(reward, pipe, z, target, eps=0.3, steps=3)
    budget = 0.3 * z.pow(2).mean((1, 2, 3)).sqrt()
    assert ((z2 - z).pow(2).mean((1, 2, 3)).sqrt() <= budget + 1e-5).all()
    assert img.shape == (3, 3, 64, 64) and 0 <= img.min() and img.max() <= 1
    _, clean = tb.ascend_latent(reward, pipe, z, target, eps=0.0, steps=0)
    before, after = (captioner.caption_logprob(cap, x, target) for x in (clean, img))
    assert (after > before).all()
    assert all(p.grad is None for p in [*cap.model.parameters(), *vae.parameters()])


def test_captioner_trains_on_latent_ascents_when_asked(monkeypatch, tmp_path):
    """The reachable-space lever (a pipe given; the bind stage's reshapes): one step from the
    shipped captioner runs the latent ascents and the relation hinge, and moves the weights; the
    VAE gets no gradient."""
    monkeypatch.setattr(tb, "LAT_N", 4)
    monkeypatch.setattr(tb, "BATCH", {**tb.BATCH, "captioner": 12})
    pipe = weights.load(toy.MODEL)
    init = captioner.load_captioner(toy.CAPTIONER)
    before = {k: v.float().clone() for k, v in init.model.state_dict().items()}
    model = tb.train_captioner(init.tokenizer, 1, 0, None, pipe, init=init.model, lr=1e-3,
                               mistake=tb.reshape)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in after.values())
    assert all(p.grad is None for p in pipe.vae.parameters())


def test_relation_flips_and_what_the_evaluator_reads():
    assert (tb.flip_relation("a red circle to the left of a blue square")
            == "a red circle to the right of a blue square")
    assert tb.flip_relation("a red circle below a blue square with noise") == \
        "a red circle above a blue square with noise"
    for text in ["a red circle and a blue square", "a red circle above a red circle"]:
        assert tb.flip_relation(text) is None, text  # no relation, or the same either way
    rng = np.random.default_rng(0)
    for _ in range(5):
        scene = tw.sample_scene(rng, "spatial")
        img, text = tw.render(scene), tw.prompt(scene)
        assert tb.reads_as(img, text) and not tb.reads_as(img, text + " with noise")
        for wrong in (tb.flip_relation(text), tb.swap_colours(text)):
            assert wrong is None or not tb.reads_as(img, wrong), wrong
        a, b = text.split(f" {scene.relation} ")
        assert tb.reads_as(img, f"{b} and {a}")  # objects in any order, no relation asked


def test_captioner_batches_are_captioned_with_what_is_there():
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    scene = tw.Scene((tw.Obj("cyan", "circle", 32, 32, 20),))
    pool = (np.stack([tw.render(scene)] * 4), ["a cyan circle"] * 4)  # stands in for samples
    x, caps = tb.captioner_batch(rng, g, 64, pool)
    assert sum(c.removesuffix(" with noise") == "a cyan circle" for c in caps) >= 8  # 1 by chance
    assert x.shape == (64, 3, 64, 64) and 0 <= x.min() and x.max() <= 1
    words = {w for c in caps for w in c.split()}
    assert words <= set(tb.WORDS) | set(tw.ODD_WORDS)
    assert {"mixed", "blob"} <= words  # off-grammar pictures are in every batch of this size
    def reading(t):  # shapes in any order, noise or not
        return sorted(t.removesuffix(" with noise").split(" and ")), t.endswith("noise")
    for img, c in zip(tw.to_uint8(x), caps):
        if not any(r in c for r in tw.RELATIONS):  # a spatial prompt is the scene's own
            assert reading(c) == reading(tw.describe(img)), c


def test_captioner_positions_say_where_each_patch_is(tmp_path):
    tok = tb.blip_tokenizer(str(tmp_path))
    torch.manual_seed(0)
    plain, placed = tb.blip(tok).vision_model.embeddings, tb.blip(tok, 20.0).vision_model.embeddings
    assert plain.position_embedding.abs().max() < 1e-6  # BLIP's own start: no position at all
    pos = placed.position_embedding[0, 1:].detach()  # (64, 96), patches row-major
    n, half = tw.SIZE // tb.BLIP_PATCH, pos.shape[1] // 2
    assert torch.allclose(pos.norm(dim=1), torch.full((n * n,), 20.0))
    grid = pos.view(n, n, -1)  # (row, column, channel)
    assert torch.allclose(grid[0, :, :half], grid[5, :, :half])  # x half: the column only
    assert torch.allclose(grid[:, 0, half:], grid[:, 5, half:])  # y half: the row only
    assert torch.cdist(pos, pos).add(torch.eye(n * n) * 99).min() > 1.0  # every patch distinct


def test_configs_round_trip_through_the_loader():
    assert weights.unet_config_from_diffusers(tb.unet_json(tb.UNET_CFG, 16)) == tb.UNET_CFG
    assert weights.vae_config_from_diffusers(tb.vae_json(tb.VAE_CFG, 64)) == tb.VAE_CFG


def test_fp16_weights_fit_the_repo_budget(tmp_path):
    tok = tb.word_tokenizer()
    with torch.device("meta"):
        models = [UNet(tb.UNET_CFG), VAE(tb.VAE_CFG), tb.text_encoder(tok),
                  tb.blip(tb.blip_tokenizer(str(tmp_path))),
                  tb.vqa_model(tb.vqa_tokenizer(str(tmp_path)))]
    n = sum(p.numel() for m in models for p in m.parameters())
    assert 2 * n < 25e6  # fp16 bytes


def test_training_scenes_hold_out_the_evaluation_combinations():
    rng = np.random.default_rng(0)
    prompts = {tw.prompt(tb.train_scene(rng)) for _ in range(3000)}
    assert not prompts & tb.HELD_OUT and len(tb.HELD_OUT) == 48
    assert set(tw.EVAL_PROMPTS["one"]) <= prompts  # one-object prompts are all trained on


def test_plan_splits_the_budget():
    steps = tb.plan(60)
    cost = sum(steps[k] * tb.SEC_PER_STEP[k] * tb.RUNS.get(k, 1) for k in steps)
    assert 0.9 * 3600 < cost <= 0.95 * 3600 and min(steps.values()) > 100


def test_vqa_questions_are_answered_by_the_evaluator():
    rng, g = np.random.default_rng(0), torch.Generator().manual_seed(0)
    x, qs, owner, y = tb.vqa_batch(rng, g, 64)
    assert torch.equal(x, tw.to_float(tw.to_uint8(x)))  # what a saved PNG holds
    assert 0.45 < y.mean() < 0.55 and len(qs) == len(owner) == len(y)
    swapped = 0
    for q, b, ans in zip(qs, owner, y.tolist()):
        found = {(f.colour, f.shape) for f in tw.detect(tw.to_uint8(x[b:b + 1])[0])}
        _, c, s = q.removesuffix("?").split()
        assert ((c, s) in found) == (ans == 1), q
        swapped += ans == 0 and any(c == a[0] for a in found) and any(s == a[1] for a in found)
    assert swapped > 10  # the binding is asked about, not only presence
    assert tb.absent(set(), rng) and tb.absent({("red", "circle")}, rng) != ("red", "circle")


def test_evaluate_scores_toy_samples_with_the_built_vqa(built, tmp_path, capsys):
    import evaluate as ev
    ev.main([str(tmp_path / "ev"), "--model", built, "--size", "64", "--steps", "2", "--n", "1",
             "--data", toy.DATA, "--categories", "color", "--blip", os.path.join(built, "vqa"),
             "--blip-size", "64", "--batch", "24"])
    res = json.load(open(tmp_path / "ev" / "color" / "annotation_blip" / "vqa_result.json"))
    assert len(res) == len(tw.EVAL_PROMPTS["two"]) and all(0 < float(r["answer"]) < 1 for r in res)
    assert "| color |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="shape_val.txt"):  # the toy has colour prompts only
        ev.main([str(tmp_path / "ev"), "--model", built, "--data", toy.DATA,
                 "--categories", "shape", "--blip", os.path.join(built, "vqa")])
