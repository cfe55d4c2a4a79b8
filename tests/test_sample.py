"""sample.py: schedule and steps vs diffusers' schedulers, prompt encoding and whole generations vs
diffusers' pipelines (float64, tiny random models), gradient control of `denoise`, and the CLI."""
import random

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from oracle import diffusers_unet, diffusers_vae
from safetensors.torch import save_file

import comat
import sample
import weights
from unet import merge_lora

SCHED = dict(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
             beta_end=0.012, prediction_type="epsilon", set_alpha_to_one=False, steps_offset=1,
             timestep_spacing="leading", clip_sample=False)


def test_schedule_values():
    abar = sample.alphas_cumprod()
    for t, v in [(0, 0.99915), (1, 0.998296), (500, 0.276332), (981, 0.0057755), (999, 0.0046601)]:
        assert abs(abar[t].item() - v) < 1e-6
    ref = DDIMScheduler.from_config(SCHED)
    assert torch.equal(abar, ref.alphas_cumprod)
    for n in (50, 30, 20, 7):
        ref.set_timesteps(n)
        assert sample.timesteps(n) == ref.timesteps.tolist()
    assert sample.timesteps(50)[:2] == [981, 961] and sample.timesteps(50)[-1] == 1


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_steps_match_diffusers(sampler):
    torch.manual_seed(0)
    ref = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(SCHED)
    ref.set_timesteps(10)
    abar, ts = sample.alphas_cumprod(), sample.timesteps(10)
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    ours = theirs = x
    g, g_ref = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ts:  # both draw one noise tensor per step from identically seeded generators
        eps = torch.randn_like(x)
        noise = torch.randn(x.shape, generator=g, dtype=x.dtype) if sampler == "ddpm" else None
        ours = sample.step(ours, eps, t, t - 100, abar, sampler, noise)
        kw = {"generator": g_ref} if sampler == "ddpm" else {}
        theirs = ref.step(eps, t, theirs, **kw).prev_sample
        torch.testing.assert_close(ours, theirs)


def _pair(sdxl):
    """Our tiny pipeline and diffusers' pipeline built from the same components (float64)."""
    pipe = weights.tiny_pipeline(sdxl=sdxl)
    for m in (pipe.unet, pipe.vae, *pipe.encoders):
        m.double()
    unet, vae = diffusers_unet(pipe.unet.cfg).double(), diffusers_vae(pipe.vae.cfg).double()
    unet.load_state_dict(pipe.unet.state_dict())
    vae.load_state_dict(pipe.vae.state_dict())
    if sdxl:
        ref = StableDiffusionXLPipeline(vae, *pipe.encoders, *pipe.tokenizers, unet,
                                        DDIMScheduler.from_config(SCHED), add_watermarker=False)
    else:
        ref = StableDiffusionPipeline(vae, pipe.encoders[0], pipe.tokenizers[0], unet,
                                      DDIMScheduler.from_config(SCHED), None, None,
                                      requires_safety_checker=False)
    return pipe, ref


@pytest.mark.parametrize("sdxl", [False, True])
def test_prompt_encoding_matches_diffusers(sdxl):
    pipe, ref = _pair(sdxl)
    prompts = ["a red cat", "two blue dogs on a green sofa"]
    ctx, uncond, pooled, upooled = sample.conditioning(pipe, prompts)
    out = ref.encode_prompt(prompts, device="cpu", num_images_per_prompt=1,
                            do_classifier_free_guidance=True)
    torch.testing.assert_close(ctx, out[0])
    torch.testing.assert_close(uncond, out[1])
    if sdxl:
        torch.testing.assert_close(pooled, out[2])
        torch.testing.assert_close(upooled, out[3])
        assert not uncond.any() and not upooled.any()  # SDXL's zero negative


@pytest.mark.parametrize("sdxl,sampler", [(False, "ddim"), (True, "ddim"), (False, "ddpm"),
                                          (True, "ddpm")])
def test_generation_matches_diffusers_pipeline(sdxl, sampler):
    torch.manual_seed(0)
    pipe, ref = _pair(sdxl)
    if sampler == "ddpm":
        ref.scheduler = DDPMScheduler.from_config(SCHED)
    prompts, size = ["a red cat", "a blue dog"], 16
    latents = torch.randn(2, 4, 8, 8, dtype=torch.float64)  # TINY_VAE downsamples by 2
    ours = sample.generate(pipe, prompts, steps=3, scale=7.5, size=size, sampler=sampler, seed=3,
                           latents=latents, progress=False)
    g = torch.Generator().manual_seed(3)
    theirs = ref(prompts, height=size, width=size, num_inference_steps=3, guidance_scale=7.5,
                 latents=latents, output_type="pt", generator=g).images
    torch.testing.assert_close(ours, theirs.float())


def test_cfg_scale_one_is_conditional_only():
    torch.manual_seed(0)
    pipe = weights.tiny_pipeline()
    ctx, uncond, _, _ = sample.conditioning(pipe, ["a cat"])
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(sample.cfg_fn(pipe.unet, ctx, uncond, 1.0)(x, 500),
                                   pipe.unet(x, 500, ctx))


def _grads(grad_steps, detach, n=6):
    """Run denoise with a per-step scale s_i on the eps model; return the grads of every s_i,
    the input latent's grad, and which calls ran with grad enabled."""
    torch.manual_seed(0)
    net = torch.nn.Conv2d(4, 4, 3, padding=1).double()
    s = torch.nn.Parameter(torch.ones(n, dtype=torch.float64))
    ts, calls = sample.timesteps(n), []

    def eps_fn(x, t):
        i = ts.index(t)
        calls.append(torch.is_grad_enabled())
        return net(x) * s[i]
    x = torch.randn(1, 4, 6, 6, dtype=torch.float64, requires_grad=True)
    out = sample.denoise(eps_fn, x, ts, sample.alphas_cumprod(), "ddim", grad_steps, detach)
    out.square().mean().backward()
    return s.grad, x.grad, calls


@pytest.mark.parametrize("mode", ["comat", "last", "single"])
@pytest.mark.parametrize("detach", [True, False])
def test_only_chosen_steps_get_gradients(mode, detach):
    steps = comat.pick_grad_steps(mode, 6, 2, random.Random(0))
    g, _, calls = _grads(steps, detach)
    assert calls == [i in steps for i in range(6)]  # no graph outside the chosen steps
    assert [i for i in range(6) if g[i] != 0] == sorted(steps)


def test_detach_controls_the_input_jacobian_path():
    # With detached UNet inputs, step 1's gradient is the same whether or not step 3 is a gradient
    # step (it only reaches step 1 along the scheduler's latent path); without detaching it is not.
    g13, _, _ = _grads((1, 3), detach=True)
    g1, _, _ = _grads((1,), detach=True)
    assert torch.equal(g13[1], g1[1])
    g13_open, _, _ = _grads((1, 3), detach=False)
    assert not torch.allclose(g13_open[1], g1[1])
    # Truncation: steps before the first gradient step are constants, so x_T gets no gradient,
    assert _grads((1, 3), detach=False)[1] is None
    # unless step 0 is a gradient step: then along the latent path, plus the UNet input path.
    assert not torch.allclose(_grads((0,), detach=True)[1], _grads((0,), detach=False)[1])


def test_comat_grad_steps_are_evenly_spaced():
    rng, starts = random.Random(0), set()
    for _ in range(300):
        st = comat.pick_grad_steps("comat", 50, 5, rng)
        assert [b - a for a, b in zip(st, st[1:])] == [10] * 4
        starts.add(st[0])
    assert starts == set(range(10))
    assert comat.pick_grad_steps("last", 50, 5, rng) == (45, 46, 47, 48, 49)


def test_merge_lora(tmp_path):
    torch.manual_seed(0)
    pipe = weights.tiny_pipeline()
    name = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    lin = dict(pipe.unet.named_modules())[name]
    down, up = torch.randn(3, lin.in_features), torch.randn(lin.out_features, 3)
    expect = lin.weight.detach() + 0.5 * up @ down
    save_file({f"unet.{name}.lora_A.weight": down, f"unet.{name}.lora_B.weight": up,
               f"unet.{name}.alpha": torch.tensor(1.5)}, tmp_path / "l.safetensors")
    merge_lora(pipe.unet, weights.load_state(str(tmp_path / "l.safetensors")))
    torch.testing.assert_close(lin.weight.detach(), expect)
    with pytest.raises(ValueError, match="no LoRA keys"):
        merge_lora(pipe.unet, {"x": down})


def test_cli_writes_png_and_rejects_bad_input(tmp_path, capsys):
    out = tmp_path / "grid.png"
    sample.main(["a red cat", "a blue dog", "--model", "tiny", "--steps", "2", "--n", "2",
                 "--out", str(out)])
    from PIL import Image
    assert Image.open(out).size == (2 * 64, 2 * 64)
    assert str(out) in capsys.readouterr().out
    for bad in (["--prompts", str(tmp_path / "missing.txt")], ["x", "--size", "63"],
                ["x", "--size", "100000"], [], ["x", "--model", str(tmp_path / "nope")]):
        with pytest.raises(SystemExit) as e:
            sample.main(bad + ["--out", str(tmp_path / "b.png")])
        assert str(e.value).startswith("error:")
    (tmp_path / "blank.txt").write_text("\n  \n")
    with pytest.raises(SystemExit, match="no prompt"):
        sample.main(["--prompts", str(tmp_path / "blank.txt"), "--model", "tiny"])


def test_long_prompt_is_truncated_with_a_warning():
    pipe = weights.tiny_pipeline()
    with pytest.warns(UserWarning, match="truncated"):
        ctx, _ = sample.encode_prompt(pipe, ["a very long prompt " * 20])
    assert ctx.shape == (1, 77, 32)
