"""captioner.py: BLIP caption log-likelihood vs transformers' own loss, gradients to the pixels."""
import random

import pytest
import torch

from captioner import caption_logprob, load_captioner, preprocess, random_crop
from oracle import tiny_blip

PROMPTS = ["a red cat", "a blue dog on the left of a green circle"]


@pytest.fixture(scope="module")
def cap(tmp_path_factory):
    torch.manual_seed(0)
    return load_captioner(tiny_blip(str(tmp_path_factory.mktemp("blip"))), dtype=torch.float64)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_logprob_equals_transformers_loss(cap, smoothing):
    torch.manual_seed(0)
    images = torch.rand(2, 3, 40, 40, dtype=torch.float64)
    ours = caption_logprob(cap, images, PROMPTS, smoothing=smoothing)
    cap.model.text_decoder.label_smoothing = smoothing  # what config.label_smoothing sets
    for i, p in enumerate(PROMPTS):  # the standard way: labels with the prefix masked, batch of 1
        enc = cap.tokenizer([f"a photography of {p}"], return_tensors="pt")
        labels = enc.input_ids.clone()
        labels[:, :4] = -100  # [CLS] a photography of
        pixels = preprocess(images[i:i + 1], cap.model.config.vision_config.image_size)
        out = cap.model(pixel_values=pixels, input_ids=enc.input_ids,
                        attention_mask=enc.attention_mask, labels=labels)
        torch.testing.assert_close(ours[i], -out.loss)


def test_padding_and_case_do_not_change_a_sample(cap):
    images = torch.rand(2, 3, 32, 32, dtype=torch.float64)
    both = caption_logprob(cap, images, ["A Red Cat", PROMPTS[1]])
    alone = caption_logprob(cap, images[:1], ["a red cat"])
    torch.testing.assert_close(both[0], alone[0])


def test_gradient_reaches_pixels(cap):
    images = torch.rand(2, 3, 48, 48, dtype=torch.float64, requires_grad=True)
    crop = random_crop(48, random.Random(0))
    caption_logprob(cap, images, PROMPTS, smoothing=0.1, crop=crop).sum().backward()
    assert torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    assert all(p.grad is None for p in cap.model.parameters())  # frozen, but in the graph


def test_preprocess_and_crop():
    assert random_crop(512, random.Random(0))[2] == 510  # official: 512 // 224 = 2 px jitter
    x = torch.full((1, 3, 20, 20), 0.5, dtype=torch.float64)
    y = preprocess(x, 8, crop=(1, 2, 16))
    assert y.shape == (1, 3, 8, 8)
    expect = (0.5 - torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64)) / \
        torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64)
    torch.testing.assert_close(y[0, :, 3, 3], expect)


def test_bf16_runs(tmp_path):
    cap = load_captioner(tiny_blip(str(tmp_path)), dtype=torch.bfloat16)
    out = caption_logprob(cap, torch.rand(2, 3, 32, 32), PROMPTS)
    assert out.shape == (2,) and torch.isfinite(out).all()
