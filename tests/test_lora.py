"""LoRA on the UNet attention projections (unet.LoRALinear, add_lora, lora_state_dict, fold_lora).

The oracle is diffusers' own LoRA loader (`load_lora_weights`, which needs `peft`): our saved file
must load into a diffusers pipeline built from the same tiny components and give the same UNet
output in float64. Tiny random models; B is randomised so that the LoRA branch is not a no-op.
"""
import pytest
import torch
import torch.nn as nn
from oracle import diffusers_unet, diffusers_vae
from safetensors.torch import save_file

import weights
from unet import TINY_SD15, LoRALinear, UNet, add_lora, fold_lora, lora_state_dict, merge_lora


def _inputs(cfg, sdxl=False, dtype=torch.float64):
    """(x, t, ctx, pooled, time_ids) for a batch of 2 on an 8x8 latent."""
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    ctx = torch.randn(2, 5, cfg.ctx_dim, dtype=dtype)
    if not sdxl:
        return x, 500, ctx, None, None
    return x, 500, ctx, torch.randn(2, 32, dtype=dtype), torch.rand(2, 6, dtype=dtype) * 64


def _randomise_b(unet):
    """Non-zero B (zero init would make every comparison trivially pass)."""
    for name, p in unet.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(p, std=0.1)


def test_zero_init_is_identity_and_only_lora_trains():
    torch.manual_seed(0)
    unet = UNet(TINY_SD15)
    x, t, ctx, _, _ = _inputs(TINY_SD15, dtype=torch.float32)
    before = unet(x, t, ctx).detach()
    names = add_lora(unet, rank=8)
    # 4 projections of every attention: TINY_SD15 has 11 transformer blocks x (attn1, attn2).
    assert len(names) == 4 * 22
    assert names[0].endswith("attn1.to_q") and names[3].endswith("attn1.to_out.0")
    assert all(isinstance(unet.get_submodule(n), LoRALinear) for n in names)
    torch.testing.assert_close(unet(x, t, ctx), before, rtol=0, atol=0)
    # Official init: A ~ N(0, std 1/r), B = 0, LoRA in fp32.
    A = torch.cat([unet.get_submodule(n).lora_A.weight.flatten() for n in names])
    assert abs(A.std().item() * 8 - 1) < 0.05 and A.dtype == torch.float32
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == {f"{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    unet(x, t, ctx).square().mean().backward()
    for n, p in unet.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n
    assert all(unet.get_submodule(n).lora_B.weight.grad.abs().sum() > 0 for n in names)


@pytest.mark.parametrize("sdxl", [False, True])
def test_saved_lora_loads_into_diffusers_pipeline(sdxl, tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    torch.manual_seed(0)
    pipe = weights.tiny_pipeline(sdxl=sdxl)
    base = pipe.unet.state_dict()
    add_lora(pipe.unet, rank=4)
    _randomise_b(pipe.unet)
    pipe.unet.double()
    save_file(lora_state_dict(pipe.unet), tmp_path / "lora.safetensors")
    unet, vae = diffusers_unet(pipe.unet.cfg).double(), diffusers_vae(pipe.vae.cfg).double()
    unet.load_state_dict(base)
    sched = DDIMScheduler(clip_sample=False, steps_offset=1)  # unused: only the UNet is compared
    if sdxl:
        ref = StableDiffusionXLPipeline(vae, *pipe.encoders, *pipe.tokenizers, unet, sched,
                                        add_watermarker=False)
    else:
        ref = StableDiffusionPipeline(vae, pipe.encoders[0], pipe.tokenizers[0], unet, sched,
                                      None, None, requires_safety_checker=False)
    x, t, ctx, pooled, ids = _inputs(pipe.unet.cfg, sdxl)
    extra = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": ids}} if sdxl else {}
    with torch.no_grad():
        plain = ref.unet(x, t, ctx, **extra).sample
        ref.load_lora_weights(str(tmp_path), weight_name="lora.safetensors")
        ours, theirs = pipe.unet(x, t, ctx, pooled, ids), ref.unet(x, t, ctx, **extra).sample
    assert (ours - plain).abs().max() > 1e-3  # the LoRA does change the output
    torch.testing.assert_close(ours, theirs)


def test_fold_and_merge_match_lora_unet():
    torch.manual_seed(0)
    unet = UNet(TINY_SD15).double()
    plain = UNet(TINY_SD15).double()
    plain.load_state_dict(unet.state_dict())
    keys = list(unet.state_dict())
    add_lora(unet, rank=4, alpha=8)  # scale 2: lora_state_dict folds it into B
    _randomise_b(unet)
    unet.double()
    x, t, ctx, _, _ = _inputs(TINY_SD15)
    with torch.no_grad():
        ours = unet(x, t, ctx)
        merge_lora(plain, lora_state_dict(unet))  # the sampler's --lora path
        torch.testing.assert_close(plain(x, t, ctx), ours)
        fold_lora(unet)
        torch.testing.assert_close(unet(x, t, ctx), ours)
    assert list(unet.state_dict()) == keys
    assert not any(isinstance(m, LoRALinear) for m in unet.modules())


def test_add_lora_after_meta_device_load():
    torch.manual_seed(0)
    ref = UNet(TINY_SD15)
    with torch.device("meta"):
        unet = UNet(TINY_SD15)
    unet.load_state_dict(ref.state_dict(), strict=True, assign=True)
    add_lora(unet, rank=4)
    assert not any(p.is_meta for p in unet.parameters())
    x, t, ctx, _, _ = _inputs(TINY_SD15, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, ctx), ref(x, t, ctx))


def test_bf16_base_with_fp32_lora():
    torch.manual_seed(0)
    ref = UNet(TINY_SD15)
    add_lora(ref, rank=4)
    _randomise_b(ref)
    unet = UNet(TINY_SD15).to(torch.bfloat16)
    add_lora(unet, rank=4)  # LoRA created in fp32 beside the bf16 base
    unet.load_state_dict(ref.state_dict())  # copies cast per tensor: base bf16, LoRA fp32
    lora = [p for p in unet.parameters() if p.requires_grad]
    assert {p.dtype for p in lora} == {torch.float32}
    x, t, ctx, _, _ = _inputs(TINY_SD15, dtype=torch.float32)
    with torch.no_grad():
        want = ref(x, t, ctx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = unet(x, t, ctx)
    out.float().square().mean().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in lora)
    torch.testing.assert_close(out.float(), want, rtol=0.1, atol=0.1)
    with torch.no_grad():  # without autocast: the branch runs in fp32, returns bf16
        plain = unet(x.bfloat16(), t, ctx.bfloat16())
    assert plain.dtype == torch.bfloat16
    torch.testing.assert_close(plain.float(), want, rtol=0.1, atol=0.1)
