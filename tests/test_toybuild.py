"""toybuild.py: a build at a few steps writes a folder the loaders read, bit-identical per seed."""
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import captioner
import sample
import toybuild as tb
import toyworld as tw
import weights
from unet import UNet
from vae import VAE

FEW = dict(vae=1, unet=2, captioner=2)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return tb.build(str(tmp_path_factory.mktemp("toy") / "toy"), seed=0, steps=FEW, pool=64)


def test_build_loads_and_samples(built):
    assert sorted(os.listdir(os.path.dirname(built))) == ["toy"]  # no temp folder left behind
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
    files = [os.path.join(d, f) for d in ("unet", "vae", "text_encoder", "captioner")
             for f in os.listdir(os.path.join(built, d)) if f.endswith(".safetensors")]
    assert len(files) == 4
    for f in files:
        a, b = load_file(os.path.join(built, f)), load_file(os.path.join(again, f))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_configs_round_trip_through_the_loader():
    assert weights.unet_config_from_diffusers(tb.unet_json(tb.UNET_CFG, 16)) == tb.UNET_CFG
    assert weights.vae_config_from_diffusers(tb.vae_json(tb.VAE_CFG, 64)) == tb.VAE_CFG


def test_fp16_weights_fit_the_repo_budget(tmp_path):
    tok = tb.word_tokenizer()
    with torch.device("meta"):
        models = [UNet(tb.UNET_CFG), VAE(tb.VAE_CFG), tb.text_encoder(tok),
                  tb.blip(tb.blip_tokenizer(str(tmp_path)))]
    n = sum(p.numel() for m in models for p in m.parameters())
    assert 2 * n < 25e6  # fp16 bytes


def test_training_scenes_hold_out_the_evaluation_combinations():
    rng = np.random.default_rng(0)
    prompts = {tw.prompt(tb.train_scene(rng)) for _ in range(3000)}
    assert not prompts & tb.HELD_OUT and len(tb.HELD_OUT) == 48
    assert set(tw.EVAL_PROMPTS["one"]) <= prompts  # one-object prompts are all trained on


def test_plan_splits_the_budget():
    steps = tb.plan(60)
    cost = sum(steps[k] * tb.SEC_PER_STEP[k] for k in steps)
    assert 0.9 * 3600 < cost <= 0.95 * 3600 and min(steps.values()) > 100
