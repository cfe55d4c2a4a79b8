"""Will it fit? Memory, FLOPs and GPU time of one CoMat training step, before loading a weight.

`python plan.py --model sdxl [train.py flags]` runs train.py's own step (generator step and
discriminator step, twice, so the optimiser state exists) on fake tensors: torch's FakeTensorMode
gives every tensor a shape, dtype and device but no data, so SDXL at 512 px costs no memory. Models
are built from their configs (presets or a folder's config.json files), never from weights. A
dispatch mode adds up the bytes of the live tensor storages and keeps the peak (what
torch.cuda.max_memory_allocated sees, minus allocator rounding); FlopCounterMode counts matmul,
convolution and attention FLOPs.
`python plan.py --real ...` runs the same on random real weights: the measurement the estimate is
checked on.
Limits (README "What fits where"): CPU autocast rules (bf16 norm and softmax outputs; CUDA autocast
keeps those in fp32), no segmenter activations, no allocator fragmentation or CUDA workspaces.
"""
import json
import os
import resource
import sys
import tempfile
import weakref
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, CLIPTextConfig,
                          CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer)

import sample
import train
import unet as U
import vae as V
import weights
from captioner import Captioner

GB = 2**30
# bf16 dense tensor-core peak, datasheet, TFLOP/s; ASSUMED utilisation of it by a training step
GPUS = (("RTX 4090", 24, 165), ("A100 40GB", 40, 312), ("A100 80GB", 80, 312),
        ("H100 SXM", 80, 989))
UTILISATION = 0.35
# Official architectures with random weights (plan only): UNet, VAE, text encoders, captioner
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
              num_attention_heads=12, projection_dim=768)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32,
              num_attention_heads=20, projection_dim=1280, hidden_act="gelu")
PRESETS = {"sd15": (U.SD15, V.SD15_VAE, [CLIP_L]), "sdxl": (U.SDXL, V.SDXL_VAE, [CLIP_L, CLIP_G])}
# Salesforce/blip-image-captioning-large: ViT-L/16 at 384 px, BERT-base decoder (470 M params)
BLIP_LARGE = dict(vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                     num_attention_heads=16, image_size=384, patch_size=16),
                  text_config=dict(encoder_hidden_size=1024))


class Tracker(TorchDispatchMode):
    """Live and peak bytes of the tensor storages created while active (views share a storage,
    in-place ops make none); a storage's bytes are subtracted when Python frees it."""

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.seen = 0, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                if st._cdata not in self.seen:
                    self.seen.add(st._cdata)
                    self.live += st.nbytes()
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(st, self._free, st._cdata, st.nbytes())
        return out

    def _free(self, key, n):
        self.seen.discard(key)
        self.live -= n


def rss():
    """This process's peak resident memory in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def fake_mode():
    """FakeTensorMode that survives nn.Module's dtype casts and copy.deepcopy: its per-output memo
    holds weakrefs, which forbid the tensor swap `.to()` does on fake parameters, and a deepcopied
    fake tensor would otherwise carry a copy of the mode (a second, incompatible mode)."""
    mode = FakeTensorMode()
    mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
    mode.__deepcopy__ = lambda memo: mode
    return mode


class NoModules:
    """Stands in for FlopCounterMode's ModuleTracker (its per-module table, unused here). That
    tracker registers a grad hook on the tensors of every module call and keeps the handles until
    exit; under gradient checkpointing those include the recomputations' outputs, whose graphs are
    built in backward and never run, so every recomputed activation stayed alive to the end of the
    backward: the plan counted SDXL K 5 with checkpointing above the same run without it, a leak a
    training run, which counts no FLOPs, does not have."""
    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *args):
        pass


def flops():
    """FlopCounterMode (totals only) that also counts CPU flash attention (the CUDA formula)."""
    aten = torch.ops.aten
    counter = flop_counter.FlopCounterMode(display=False, custom_mapping={  # args come as shapes
        aten._scaled_dot_product_flash_attention_for_cpu:
            lambda q, k, v, *_, **__: flop_counter.sdpa_flop_count(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward:
            lambda g, q, k, v, *_, **__: flop_counter.sdpa_backward_flop_count(g, q, k, v)})
    counter.mod_tracker = NoModules()
    return counter


def meta_if_fake():
    """Fake runs build models on the meta device, then give them fake storage (materialise):
    transformers' initialisers read values, which fake tensors do not have."""
    return torch.device("meta") if isinstance(torch.empty(0), FakeTensor) else nullcontext()


def materialise(m, device, dtype):
    if next(m.parameters()).device.type == "meta":
        m.to_empty(device=device)
    return m.to(device, dtype).requires_grad_(False).eval()


def pipeline(model, device, dtype):
    """A Pipeline with random weights: preset name (sd15, sdxl, tiny, tiny-sdxl) or a diffusers
    folder, of which only the config.json and tokenizer files are read."""
    with meta_if_fake():
        if model in ("tiny", "tiny-sdxl"):
            pipe = weights.tiny_pipeline(sdxl=model == "tiny-sdxl")
        elif model in PRESETS:
            ucfg, vcfg, texts = PRESETS[model]
            toks = [weights.clip_tokenizer(pad=p) for p in ("<|endoftext|>", "!")][:len(texts)]
            encs = [cls(CLIPTextConfig(**t, vocab_size=49408, max_position_embeddings=77))
                    for cls, t in zip((CLIPTextModel, CLIPTextModelWithProjection), texts)]
            pipe = weights.Pipeline(U.UNet(ucfg), V.VAE(vcfg), toks, encs, ucfg.adm_dim > 0)
        else:
            model = weights.find(model)
            assert os.path.isdir(model), f"plan.py needs a preset or a diffusers folder: {model}"
            ucfg, vcfg = (parse(json.load(open(os.path.join(model, part, "config.json"))))
                          for part, parse in (("unet", weights.unet_config_from_diffusers),
                                              ("vae", weights.vae_config_from_diffusers)))
            toks, encs = [], []
            for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
                if os.path.isdir(os.path.join(model, "text_encoder" + sub)):
                    encs.append(cls(CLIPTextConfig.from_pretrained(
                        os.path.join(model, "text_encoder" + sub))))
                    toks.append(CLIPTokenizer.from_pretrained(os.path.join(model,
                                                                           "tokenizer" + sub)))
            pipe = weights.Pipeline(U.UNet(ucfg), V.VAE(vcfg), toks, encs, ucfg.adm_dim > 0)
    for m in (pipe.unet, pipe.vae, *pipe.encoders):
        materialise(m, device, dtype)
    return pipe


def captioner(path, device, dtype):
    """BLIP with random weights from a folder's config, or the official size when path is empty."""
    if path:
        cfg, tok = BlipConfig.from_pretrained(path), BertTokenizer.from_pretrained(path)
    else:
        cfg = BlipConfig(**BLIP_LARGE)
        vocab = os.path.join(tempfile.mkdtemp(), "vocab.txt")
        with open(vocab, "w") as f:  # a word-level stand-in: only token ids < vocab size matter
            f.write("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "photography",
                               "of", "red", "blue", "cat", "dog", "and"]) + "\n")
        tok = BertTokenizer(vocab)
    with meta_if_fake():
        blip = BlipForConditionalGeneration(cfg)
    return Captioner(materialise(blip, device, dtype), tok)


def masks(images, nouns):
    """Segmenter stand-in: every object found, random masks (masks come under no_grad anyway)."""
    B, _, H, W = images.shape
    K = max([len(n) for n in nouns] + [1])
    return torch.rand(B, K, H, W) > 0.5, torch.ones(B, K, dtype=torch.bool)


def nbytes(*objs):
    """Bytes of the distinct storages of modules' parameters and buffers, tensors, or optimisers'
    state and their parameters' gradients."""
    seen, total = set(), 0
    for o in objs:
        if isinstance(o, torch.optim.Optimizer):
            ts = [v for s in o.state.values() for v in s.values() if torch.is_tensor(v)]
            ts += [p.grad for g in o.param_groups for p in g["params"] if p.grad is not None]
        elif isinstance(o, torch.nn.Module):
            ts = [*o.parameters(), *o.buffers()]
        else:
            ts = [o]
        for t in ts:
            if t.untyped_storage()._cdata not in seen:
                seen.add(t.untyped_storage()._cdata)
                total += t.untyped_storage().nbytes()
    return total


def unet_flops(unet, cfg, batch, side):
    """FLOPs of one UNet call without a graph on the CFG batch [uncond; cond] (random inputs)."""
    n = 2 * batch if cfg.cfg > 1 else batch
    ucfg, p = unet.cfg, next(unet.parameters())
    x = torch.randn(n, ucfg.in_channels, side, side, dtype=p.dtype)
    ctx = torch.randn(n, 77, ucfg.ctx_dim, dtype=p.dtype)
    extra = ((torch.randn(n, ucfg.adm_dim - 6 * ucfg.time_id_dim, dtype=p.dtype),
              torch.zeros(n, 6)) if ucfg.adm_dim else ())
    with flops() as counter, torch.no_grad(), torch.autocast("cpu", torch.bfloat16,
                                                             enabled=p.dtype == torch.bfloat16):
        unet(x, 1, ctx, *extra)
    return counter.get_total_flops()


def report(cfg, tracker, counter, rss0, models, opts, steps, extra_flops, real):
    """Print the plan; returns its numbers (GB, FLOPs per step) for tests and bench scripts.
    steps: the run's optimizer steps; extra_flops: per step, the denoising steps left out."""
    w = nbytes(*models.values())
    o = nbytes(*opts)
    peak = tracker.peak
    act = peak - w - o
    per_step = counter.get_total_flops() / cfg.steps + extra_flops
    r = {"weights": w / GB, "optimiser": o / GB, "activations": act / GB, "peak": peak / GB,
         "flops": per_step, "parts": {k: nbytes(v) / GB for k, v in models.items()}}
    r["batch_fit"] = {gb: int((gb * GB - w - o) // (act / cfg.batch)) for _, gb, _ in GPUS}
    fake = not real
    kind = "estimate (fake tensors)" if fake else "measured (random real weights)"
    print(f"plan, {kind}: {cfg.model}, {cfg.size} px, batch {cfg.batch}, LoRA rank {cfg.rank}, "
          f"K {cfg.grad_steps}, checkpointing {'on' if cfg.checkpointing else 'off'}, "
          f"{cfg.precision}")
    print("  weights GB " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()))
    print(f"  peak {r['peak']:.2f} GB = weights {r['weights']:.2f} + gradients and AdamW state "
          f"{r['optimiser']:.2f} + activations {r['activations']:.2f}")
    if not fake:
        rise = rss() - rss0
        r["rss_rise"] = rise / GB
        print(f"  max RSS rise over the process start {r['rss_rise']:.2f} GB (CPU allocator)")
    for name, gb, tf in GPUS:
        fits = r["peak"] <= gb
        sec = per_step / (tf * 1e12 * UTILISATION)
        print(f"  {name:10s} {gb:3d} GB: {'fits' if fits else 'does NOT fit'}, largest batch "
              f"~{r['batch_fit'][gb]}; ~{sec:.1f} s/step, {steps} steps ~"
              f"{sec * steps / 3600:.1f} h (estimate: {tf} TFLOP/s x {UTILISATION})")
    print(f"  {per_step / 1e12:.1f} TFLOP per step (K {cfg.grad_steps} of the T steps)")
    if r["peak"] > 40:  # the official setups' target card (README "What fits where": levers)
        print(f"  over 40 GB, levers: {'' if cfg.checkpointing else '--checkpointing; '}fewer "
              f"gradient steps (--grad_steps 1: activations grow with K); the discriminator's own "
              f"frozen UNet, {r['parts'].get('discriminator', 0):.1f} GB, shared with the "
              f"generator's (not implemented)")
    return r


def plan(cfg: train.TrainConfig, real: bool = False) -> dict:
    """Two steps of train.py's own step code (train.setup, train.losses, train.update) on models
    with random weights: fake tensors (no memory: any size plans on a laptop) or, with real, real
    ones (the check of the estimate). T = K denoising steps has the graph and memory of T = 50;
    the FLOPs of the T - K steps without graph are added from one UNet call."""
    steps, T = cfg.steps, cfg.total_steps
    cfg = replace(cfg, steps=2, total_steps=cfg.grad_steps, every=10**9,
                  out=tempfile.mkdtemp(prefix="plan-"))
    cuda = real and torch.cuda.is_available()  # fake tensors live on the CPU
    device = "cuda" if cuda else "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (cuda or not real))
    dtype = torch.bfloat16 if bf16 else torch.float32
    prompts = sample.read_prompts(cfg.prompts)
    with fake_mode() if not real else nullcontext(), Tracker() as tracker, flops() as counter:
        rss0 = rss()
        pipe = pipeline(cfg.model, device, dtype)
        train.check_size(cfg, pipe)
        cap = captioner(cfg.captioner, device, dtype)  # BLIP-large unless a folder is given
        run = train.setup(cfg, pipe, cap, masks, prompts, device, dtype)
        # cached reals are a tensor of the run's size; fly makes them in the step, as train does
        reals = torch.randn(len(prompts), *run.lat_shape) if cfg.real == "cache" else None
        tracker.peak = tracker.live  # the plan's peak and FLOPs are the steps', not the set-up's
        counter.flop_counts.clear()
        for step in range(cfg.steps):  # fake tensors hold no values to draw a batch order from
            idx = [j % len(prompts) for j in range(cfg.batch)]
            train.update(run, train.losses(run, idx, step), reals, idx)
        models = {"unet": pipe.unet, "discriminator": run.D, "vae": pipe.vae,
                  "text": torch.nn.ModuleList(pipe.encoders), "captioner": cap.model}
        extra = (T - cfg.total_steps) * unet_flops(pipe.unet, cfg, cfg.batch, run.lat_shape[-1])
        return report(cfg, tracker, counter, rss0, models, (run.opt, run.opt_d), steps, extra,
                      real)


def main(argv=None):
    """python plan.py [--real] [train.py flags]: the flags are train.py's, --model included."""
    argv = list(sys.argv[1:] if argv is None else argv)
    real = "--real" in argv
    return plan(train.parse([a for a in argv if a != "--real"]), real)


if __name__ == "__main__":
    main()
