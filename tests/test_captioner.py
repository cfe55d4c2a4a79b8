"""captioner.py: BLIP caption log-likelihood vs transformers' own loss, gradients to the pixels."""
import random

import numpy as np
import pytest
import torch
from oracle import tiny_blip
from PIL import Image
from transformers import BlipConfig, BlipForConditionalGeneration

from captioner import MEAN, STD, caption_logprob, load_captioner, preprocess, random_crop

PROMPTS = ["a red cat", "a blue dog on the left of a green circle"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    torch.manual_seed(0)
    return tiny_blip(str(tmp_path_factory.mktemp("blip")))


@pytest.fixture(scope="module")
def cap(folder):
    return load_captioner(folder, dtype=torch.float64)


def official_labels(enc):
    """caption_blip.py: PAD -> -100 and the first 4 positions ([CLS] a photography of) -> -100."""
    labels = enc.input_ids.masked_fill(enc.input_ids == 0, -100)
    labels[:, :4] = -100
    return labels


def test_tokenizer_layout(cap):
    ids = cap.tokenizer("a photography of red cat").input_ids
    assert ids[0] == cap.tokenizer.cls_token_id and ids[-1] == cap.tokenizer.sep_token_id
    assert len(cap.tokenizer("a photography of").input_ids) - 1 == 4  # as in the official code


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_logprob_equals_transformers_loss(cap, folder, smoothing):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    ours = caption_logprob(cap, images, PROMPTS, smoothing=smoothing)
    # the reference reads its smoothing from the config, as transformers >= 4.32 does
    cfg = BlipConfig.from_pretrained(folder)
    cfg.text_config.label_smoothing = smoothing
    ref = BlipForConditionalGeneration.from_pretrained(folder, config=cfg, dtype=torch.float64)
    pixels = preprocess(images, cap.model.config.vision_config.image_size)
    for i, p in enumerate(PROMPTS):  # the standard way, batches of 1
        enc = cap.tokenizer([f"a photography of {p}"], return_tensors="pt")
        out = ref(pixel_values=pixels[i:i + 1], input_ids=enc.input_ids,
                  attention_mask=enc.attention_mask, labels=official_labels(enc))
        torch.testing.assert_close(ours[i], -out.loss)
    # the official batch of 2 (padded) is one token mean: ours weighted by scored-token counts
    enc = cap.tokenizer([f"a photography of {p}" for p in PROMPTS], padding="longest",
                        return_tensors="pt")
    out = ref(pixel_values=pixels, input_ids=enc.input_ids, attention_mask=enc.attention_mask,
              labels=official_labels(enc))
    n = enc.attention_mask.sum(1) - 4  # prompt tokens + [SEP]
    torch.testing.assert_close((ours * n).sum() / n.sum(), -out.loss)


def test_padding_and_case_do_not_change_a_sample(cap):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    both = caption_logprob(cap, images, ["A Red Cat", PROMPTS[1]])
    alone = caption_logprob(cap, images[:1], ["a red cat"])
    torch.testing.assert_close(both[0], alone[0])


def test_gradient_reaches_pixels(cap):
    torch.manual_seed(0)
    assert not cap.model.training and not any(p.requires_grad for p in cap.model.parameters())
    images = torch.rand(2, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    crop = random_crop(48, random.Random(0))
    caption_logprob(cap, images, PROMPTS, smoothing=0.1, crop=crop).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in cap.model.parameters())  # frozen, but in the graph


def test_random_crop():
    rng = random.Random(0)
    crops = [random_crop(512, rng) for _ in range(200)]
    assert {c[2] for c in crops} == {510}  # official: 512 // 224 = 2 px jitter
    assert {c[0] for c in crops} == {c[1] for c in crops} == {0, 1, 2}


def test_preprocess_matches_reference():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 40, 40, dtype=torch.float64) * 1.2 - 0.1  # not clamped: out of range too
    mean, std = torch.tensor(MEAN, dtype=torch.float64), torch.tensor(STD, dtype=torch.float64)
    # a same-size bicubic is the identity, so crop + normalise is exact in float64
    y = preprocess(x, 36, crop=(1, 3, 36))
    torch.testing.assert_close(y, (x[:, :, 1:37, 3:39] - mean[:, None, None]) / std[:, None, None])
    # the antialiased bicubic down-size equals PIL's (float32 "F" images; what BLIP trained on)
    y = preprocess(x, 12) * std[:, None, None] + mean[:, None, None]
    ref = [np.asarray(Image.fromarray(x[b, c].float().numpy()).resize((12, 12), Image.BICUBIC))
           for b in range(2) for c in range(3)]
    torch.testing.assert_close(y.float(), torch.from_numpy(np.stack(ref)).view(2, 3, 12, 12))


def test_bf16_runs(folder):
    cap = load_captioner(folder, dtype=torch.bfloat16)
    out = caption_logprob(cap, torch.rand(2, 3, 32, 32), PROMPTS)
    assert out.shape == (2,) and torch.isfinite(out).all()


def test_gradient_reaches_the_unet_through_the_sampler(tmp_path):
    import sample
    import weights
    from unet import add_lora
    torch.manual_seed(0)
    cap = load_captioner(tiny_blip(str(tmp_path)))
    pipe = weights.tiny_pipeline()
    add_lora(pipe.unet, 4)
    for n, p in pipe.unet.named_parameters():  # B = 0 would stop the gradient reaching A
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.01)
    ctx, uncond, _, _ = sample.conditioning(pipe, PROMPTS, negative="")
    eps = sample.cfg_fn(pipe.unet, ctx, uncond, 7.5)
    ts = sample.timesteps(4)
    z = sample.denoise(eps, torch.randn(2, 4, 16, 16), ts, sample.alphas_cumprod(), "ddpm",
                       grad_steps=(1, 3), detach=False)
    caption_logprob(cap, sample.decode(pipe, z), PROMPTS).sum().backward()
    grads = [p.grad for n, p in pipe.unet.named_parameters() if "lora_A" in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(g.abs().sum() for g in grads) > 0
