"""Concept matching's frozen captioner: BLIP's log-likelihood of the prompt given a generated image.

Source: CoMat official concept_mat_utils/caption_blip.py (docs/official-code.md section 2), on
transformers' BlipForConditionalGeneration (official: Salesforce/blip-image-captioning-large).
Preprocessing is done in torch, not with the HF image processor (PIL/numpy would cut the graph),
so the gradient of the likelihood reaches the pixels, the VAE decoder and the UNet.
Shapes: B batch, H, W image size, L text tokens, V vocabulary.
Usage: cap = load_captioner(path); logp = caption_logprob(cap, images, prompts)  # (B,)
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from transformers import AutoTokenizer, BlipForConditionalGeneration, PreTrainedTokenizerBase

from weights import model_folder

# BLIP was trained with CLIP's normalisation constants (official code uses the same numbers).
MEAN = (0.48145466, 0.4578275, 0.40821073)
STD = (0.26862954, 0.26130258, 0.27577711)


class Captioner(NamedTuple):
    model: BlipForConditionalGeneration
    tokenizer: PreTrainedTokenizerBase


def load_captioner(path, device="cpu", dtype=torch.float32) -> Captioner:
    """A BLIP captioning folder or hub id (model + tokenizer), frozen. It stays in the graph: no
    no_grad here."""
    path = model_folder(path, ("BlipForConditionalGeneration",), "--captioner (BLIP captioning)")
    try:
        model = BlipForConditionalGeneration.from_pretrained(path, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as e:  # e.g. a half-downloaded shard
        raise ValueError(f"{path}: not a readable BLIP captioner ({str(e).splitlines()[0]})"
                         ) from None
    return Captioner(model.to(device, dtype).requires_grad_(False).eval(), tok)


def random_crop(h, rng):
    """The official crop jitter: off = h // 224 pixels, a square of side h - off at a random
    offset in [0, off] on each axis (512 px: a 510 px crop). Returns (top, left, side)."""
    off = h // 224
    return rng.randint(0, off), rng.randint(0, off), h - off


def preprocess(images, size=384, crop=None):
    """Images (B, 3, H, W) in about [0, 1] -> BLIP pixel values (B, 3, size, size), differentiable.

    Not clamped, as in the official code: the captioner's gradient also acts on out-of-range values.
    The resize is torchvision's Resize(bicubic, antialias=True) on tensors, i.e. this interpolate.
    """
    if crop is not None:
        top, left, side = crop
        images = images[:, :, top:top + side, left:left + side]
    # fp32 for the resize, back to the input dtype after: CPU has no bf16 antialiased bicubic
    # ("compute_index_ranges_weights" not implemented for 'BFloat16'), and a bf16 resize would
    # round the weights of a 510 -> 384 px filter anyway
    wide = torch.promote_types(images.dtype, torch.float32)
    x = F.interpolate(images.to(wide), size=(size, size), mode="bicubic", antialias=True,
                      align_corners=False).to(images.dtype)
    mean = torch.tensor(MEAN, device=x.device, dtype=x.dtype)[:, None, None]
    std = torch.tensor(STD, device=x.device, dtype=x.dtype)[:, None, None]
    return (x - mean) / std


def caption_logprob(cap, images, prompts, prefix="a photography of", smoothing=0.0, crop=None):
    """Per-sample token-mean log-likelihood (B,) of `prefix + prompt` given the images.

    The prefix tokens ([CLS] a photography of) and padding are not scored; the prompt tokens and the
    final [SEP] are. [CLS] stays the decoder's first input, as BLIP's forward() does (generate()
    would swap in [DEC]). With smoothing > 0 each token's term is torch's label-smoothed cross
    entropy, (1 - s) * NLL + s * mean over the vocabulary of -log p: the official value is 0.1,
    which transformers 4.31 hard-coded. The official reduction is one token mean over the whole
    batch; here it is per sample, so losses stay per-sample functions (equal for equal lengths).
    """
    assert images.ndim == 4 and images.shape[0] == len(prompts), "images (B, 3, H, W), B prompts"
    model, tok = cap
    texts = [f"{prefix} {p.lower()}" for p in prompts]
    limit = model.config.text_config.max_position_embeddings  # over-long prompts are cut here
    enc = tok(texts, padding="longest", truncation=True, max_length=limit, return_tensors="pt")
    enc = enc.to(images.device)
    n_prefix = len(tok(prefix).input_ids) - 1  # [CLS] + prefix words, without the final [SEP]
    size = model.config.vision_config.image_size
    # images may come from an fp32 VAE while BLIP runs in half precision (official: fp16)
    pixels = preprocess(images, size, crop).to(model.dtype)
    img = model.vision_model(pixel_values=pixels).last_hidden_state  # (B, patches + 1, D)
    # return_logits gives the logits shifted by one, as the HF loss uses them: (B, L-1, V)
    logits = model.text_decoder(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                                encoder_hidden_states=img, return_logits=True)
    # log-softmax over 30k words in at least fp32: bf16 would round every log-probability
    logp = logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)
    target = enc.input_ids[:, 1:]  # next-token targets, (B, L-1)
    scored = enc.attention_mask[:, 1:].bool()  # padding is never a target (official: PAD -> -100)
    scored[:, : n_prefix - 1] = False  # targets inside the prefix are given, not predicted
    token = logp.gather(-1, target[..., None])[..., 0]  # (B, L-1)
    if smoothing:
        token = (1 - smoothing) * token + smoothing * logp.mean(-1)
    return (token * scored).sum(1) / scored.sum(1)
