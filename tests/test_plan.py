"""plan.py: the fake-tensor estimate of one step's peak memory against the same two steps
on real (random) tensors, tiny presets; the plan's FLOP counter keeps no activation alive under
gradient checkpointing; and the plan reads no weight file."""
from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F
from oracle import tiny_blip
from safetensors.torch import save_file
from test_train import PROMPTS

import plan
from unet import TINY_SD15, UNet, add_lora


def test_plan_estimate_matches_measured_peak(tmp_path):
    """SD1.5's layout in fp32: the bookkeeping checked without autocast. SDXL's layout (two text
    encoders, added conditioning) in bf16 with checkpointing: tests/test_gpu_check.py, the same
    5 % against a real step (each fake plan of a tiny model takes ~20 s of the suite)."""
    (tmp_path / "p.txt").write_text("\n".join(PROMPTS) + "\n")
    args = ["--model", "tiny", "--prompts", str(tmp_path / "p.txt"), "--size", "64",
            "--captioner", tiny_blip(str(tmp_path / "blip")), "--total_steps", "8",
            "--grad_steps", "2", "--rank", "8", "--batch", "2", "--precision", "fp32"]
    est = plan.main(args)
    real = plan.main(args + ["--real"])
    assert est["weights"] == pytest.approx(real["weights"], rel=1e-6)  # same models, same bytes
    assert est["optimiser"] == pytest.approx(real["optimiser"], rel=1e-6)
    # the stated tolerance (README "What fits where"): 5 % of the peak
    assert est["peak"] == pytest.approx(real["peak"], rel=0.05)
    assert est["flops"] == pytest.approx(real["flops"], rel=1e-6)  # FLOPs follow from shapes


def test_flop_counter_keeps_no_checkpoint_recomputation():
    """Checkpointing lowers the peak with the FLOP counter on about as much as with it off: torch's
    FlopCounterMode per-module tracker held every recomputed activation to the end of backward,
    so the plan showed checkpointing RAISING SDXL's peak (README "What fits where")."""
    torch.manual_seed(0)
    unet = UNet(TINY_SD15).requires_grad_(False)
    add_lora(unet, 4)
    x0, ctx = torch.randn(1, 4, 32, 32), torch.randn(1, 77, TINY_SD15.ctx_dim)

    def peak(ckpt, count):
        unet.gradient_checkpointing = ckpt
        with plan.Tracker() as tracker, plan.flops() if count else nullcontext():
            x = x0
            for _ in range(3):  # K = 3 steps with graph, inputs detached (SDXL's official path)
                x = x - 0.1 * unet(x.detach(), 10, ctx)
            x.square().mean().backward()
        return tracker.peak

    off, on = peak(False, True), peak(True, True)
    assert on < 0.7 * off  # checkpointing keeps only block inputs
    # with torch's module tracker: about 2.5 x (one more copy of the K steps' activations)
    assert on < 1.5 * peak(True, False)


def test_cuda_rules_keep_norms_and_softmax_in_fp32_through_recomputation():
    """plan.CudaRules: under CPU autocast, group_norm, layer_norm and softmax give fp32 (CUDA
    autocast's rule; the CPU's gives bf16) while convolutions stay bf16, also in the
    recomputation of a checkpointed block in backward (else torch's checkpoint would refuse the
    recomputed dtypes); the gradient is the one without checkpointing."""
    x = torch.randn(2, 8, 4, 4, dtype=torch.bfloat16)  # an activation from a bf16 matmul
    with torch.autocast("cpu", torch.bfloat16):
        assert F.group_norm(x, 4).dtype == torch.bfloat16  # the CPU's own rule
        with plan.CudaRules():
            assert F.group_norm(x, 4).dtype == torch.float32
            assert F.layer_norm(x, (4,)).dtype == torch.float32
            assert x.softmax(-1).dtype == F.softmax(x, -1).dtype == torch.float32
            assert F.conv2d(x, torch.randn(8, 8, 1, 1)).dtype == torch.bfloat16
    torch.manual_seed(0)
    unet = UNet(TINY_SD15).requires_grad_(False)
    add_lora(unet, 4)
    z, ctx = torch.randn(1, 4, 16, 16), torch.randn(1, 77, TINY_SD15.ctx_dim)
    grads = []
    for ckpt in (False, True):
        unet.gradient_checkpointing = ckpt
        with plan.CudaRules(), torch.autocast("cpu", torch.bfloat16):
            out = unet(z, 10, ctx)
        out.float().square().mean().backward()
        grads.append([p.grad.clone() for p in unet.parameters() if p.requires_grad])
        unet.zero_grad(set_to_none=True)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_plan_under_cuda_rules_and_its_defaults(tmp_path):
    """The plan applies CUDA's autocast rules (more bytes than the CPU's: fp32 norm and softmax
    outputs), labels GiB, and plans a tiny preset at its own 64 px unless --size is given.
    Without the discriminator and checkpointing: the rules act on every activation alike, and the
    two plans take half the time."""
    (tmp_path / "p.txt").write_text("a red cat\n")
    args = ["--model", "tiny", "--prompts", str(tmp_path / "p.txt"), "--captioner",
            tiny_blip(str(tmp_path / "blip")), "--total_steps", "2", "--grad_steps", "1",
            "--batch", "1", "--rank", "4", "--w_adv", "0", "--no-checkpointing"]
    cuda = plan.main(args + ["--out", str(tmp_path / "never")])
    cpu = plan.main(args + ["--rules", "cpu"])
    assert cuda["rules"] == "cuda" and cpu["rules"] == "cpu" and cuda["size"] == 64
    assert cuda["weights"] == cpu["weights"] and cuda["activations"] > 1.2 * cpu["activations"]
    # the plan reads no weight file and writes nothing where the run would write
    assert cuda["peak"] > cuda["weights"] > 0 and cuda["flops"] > 0
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("extra, message", [
    (["--model", "nosuch"], "error: --model: nosuch: no such model folder"),
    (["--model", "EMPTY"], "error: --model: .*missing"),
    (["--model", "FILE"], "error: --model .*needs a preset .* or a diffusers folder"),
    (["--batch", "0"], "error: --batch must be at least 1, got 0"),
    (["--batch", "-2"], "error: --batch must be at least 1, got -2"),
    (["--captioner", "MISSING"], "error: --captioner .*: no such folder"),
    (["--model", "sdxl", "--real", "--size", "100"], "error: --size must be a multiple of 8"),
])
def test_plan_bad_inputs_are_one_line_errors(tmp_path, extra, message):
    """Each bad input stops before a model is built (--real SDXL would take ~20 GB first)."""
    (tmp_path / "p.txt").write_text("a red cat\n")
    (tmp_path / "empty").mkdir()
    save_file({"model.diffusion_model.x": torch.zeros(1)}, tmp_path / "one.safetensors")
    paths = {"EMPTY": tmp_path / "empty", "FILE": tmp_path / "one.safetensors",
             "MISSING": tmp_path / "no-blip"}
    extra = [str(paths.get(a, a)) for a in extra]
    with pytest.raises(SystemExit, match=message):
        plan.main(["--prompts", str(tmp_path / "p.txt"), "--model", "tiny", *extra])
