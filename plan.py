"""Will it fit? Memory, FLOPs and GPU time of one CoMat training step, before loading a weight.

`python plan.py --model sdxl [train.py flags]` runs train.py's own step (generator step and
discriminator step, twice, so the optimiser state exists) on fake tensors: torch's FakeTensorMode
gives every tensor a shape, dtype and device but no data, so SDXL at 512 px costs no memory. Models
are built from their configs (presets or a folder's config.json files), never from weights. A
dispatch mode adds up the bytes of the live tensor storages and keeps the peak (what
torch.cuda.max_memory_allocated sees, minus allocator rounding); FlopCounterMode counts matmul,
convolution and attention FLOPs.
`python plan.py --real ...` runs the same on random real weights: the measurement the estimate is
checked on. The plan is for a GPU, so it applies CUDA autocast's dtype rules (CudaRules); `--rules
cpu` keeps the CPU's, the default of `--real` on a CPU.
Limits (README "What fits where"): no segmenter activations, no allocator rounding, fragmentation,
CUDA context or workspaces (hence MARGIN).
"""
import argparse
import json
import os
import resource
import sys
import tempfile
import time
import weakref
from contextlib import nullcontext
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils import flop_counter
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from transformers import (BertTokenizer, BlipConfig, BlipForConditionalGeneration, CLIPTextConfig,
                          CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer)

import sample
import train
import unet as U
import vae as V
import weights
from captioner import Captioner

GiB = 2**30
# Cards: memory in GiB as the driver reports it; bf16 dense tensor-core peak, datasheet, TFLOP/s;
# ASSUMED utilisation of that peak by a training step
GPUS = (("RTX 4090", 24.0, 165), ("A100 40GB", 40.0, 312), ("A100 80GB", 80.0, 312),
        ("H100 SXM", 79.6, 989))
UTILISATION = 0.35
# Share of a card kept free before the plan says "fits": allocator rounding and fragmentation,
# the CUDA context and library workspaces, none of which the tracked storages include
# (bench/gpu_check.py measures the real peak against the plan on a GPU)
MARGIN = 0.15
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


class CudaRules(TorchFunctionMode):
    """CUDA autocast's dtype rules on the CPU: while (CPU) autocast is on, the ops CUDA autocast
    runs in fp32 get fp32 inputs, so their outputs and what their backward saves are fp32, as on
    the GPU; CPU autocast runs them in bf16. The ops: those of CUDA's fp32 list that take
    activations in these models (norms and softmax; the list's losses and reductions act on small
    tensors here). Matmuls and convolutions follow the same bf16 rule on both devices."""
    FP32 = (F.group_norm, F.layer_norm, F.softmax, F.log_softmax, torch.softmax,
            torch.log_softmax, torch.Tensor.softmax, torch.Tensor.log_softmax)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.FP32 and torch.is_autocast_enabled("cpu"):
            up = lambda t: t.float() if torch.is_tensor(t) and t.is_floating_point() else t
            with torch.autocast("cpu", enabled=False):
                return func(*tree_map(up, args), **tree_map(up, kwargs))
        return func(*args, **kwargs)


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
    """FakeTensorMode that survives nn.Module's dtype casts: its per-output memo holds weakrefs,
    which forbid the tensor swap `.to()` does on fake parameters."""
    mode = FakeTensorMode()
    mode.fake_tensor_converter.set_tensor_memo = lambda t, v: None
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
            ucfg = weights.unet_config_from_diffusers(read_config(model, "unet"))
            vcfg = vae_config(model)
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


def read_config(folder, part):
    with open(os.path.join(folder, part, "config.json"), encoding="utf-8") as f:
        return json.load(f)


def vae_config(model):
    """The VAE's config of a preset or a diffusers folder, without building anything."""
    if model in ("tiny", "tiny-sdxl"):
        return V.TINY_VAE
    if model in PRESETS:
        return PRESETS[model][1]
    model = weights.find(model)
    if not os.path.isdir(model):  # a single checkpoint file: its configs are not in it
        raise SystemExit(f"error: --model {model}: plan.py needs a preset (sd15, sdxl, tiny, "
                         f"tiny-sdxl) or a diffusers folder")
    return weights.vae_config_from_diffusers(read_config(model, "vae"))


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
    dev = images.device
    return torch.rand(B, K, H, W, device=dev) > 0.5, torch.ones(B, K, dtype=torch.bool, device=dev)


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


def report(cfg, tracker, counter, rss0, models, opts, steps, extra_flops, real, rules, step_s):
    """Print the plan; returns its numbers (GB, FLOPs per step) for tests and bench scripts.
    steps: the run's optimizer steps; extra_flops: per step, the denoising steps left out."""
    w = nbytes(*models.values())
    o = nbytes(*opts)
    peak = tracker.peak
    act = peak - w - o
    per_step = counter.get_total_flops() / cfg.steps + extra_flops
    r = {"weights": w / GiB, "optimiser": o / GiB, "activations": act / GiB, "peak": peak / GiB,
         "flops": per_step, "parts": {k: nbytes(v) / GiB for k, v in models.items()},
         "rules": rules, "size": cfg.size}
    r["batch_fit"] = {name: max(0, int((gib * (1 - MARGIN) * GiB - w - o) // (act / cfg.batch)))
                      for name, gib, _ in GPUS}
    fake = not real
    kind = "estimate (fake tensors)" if fake else "measured (random real weights)"
    print(f"plan, {kind}, {rules.upper()} autocast rules: {cfg.model}, {cfg.size} px, batch "
          f"{cfg.batch}, LoRA rank {cfg.rank}, K {cfg.grad_steps}, checkpointing "
          f"{'on' if cfg.checkpointing else 'off'}, discriminator {cfg.disc}, {cfg.precision}")
    print("  weights GiB " + ", ".join(f"{k} {v:.2f}" for k, v in r["parts"].items()))
    print(f"  peak {r['peak']:.2f} GiB = weights {r['weights']:.2f} + gradients and AdamW state "
          f"{r['optimiser']:.2f} + activations {r['activations']:.2f}")
    if not fake:
        r["rss_rise"], r["step_s"] = (rss() - rss0) / GiB, step_s
        print(f"  max RSS rise over the process start {r['rss_rise']:.2f} GiB (CPU allocator); "
              f"{step_s:.2f} s for the second step (with the planner's counters)")
    print(f"  fits: peak within {1 - MARGIN:.0%} of the card (the rest for the allocator, the CUDA "
          f"context and workspaces)")
    for name, gib, tf in GPUS:
        fits = r["peak"] <= gib * (1 - MARGIN)
        sec = per_step / (tf * 1e12 * UTILISATION)
        print(f"  {name:10s} {gib:4.1f} GiB: {'fits' if fits else 'does NOT fit'}, largest batch "
              f"~{r['batch_fit'][name]}; ~{sec:.1f} s/step, {steps} steps ~"
              f"{sec * steps / 3600:.1f} h (estimate: {tf} TFLOP/s x {UTILISATION})")
    print(f"  {per_step / 1e12:.1f} TFLOP per step (K {cfg.grad_steps} of the T steps)")
    if r["peak"] > GPUS[0][1] * (1 - MARGIN):  # short of a 24 GiB card: the levers that cost least
        levers = ([] if cfg.disc == "shared" or not cfg.rank else
                  [f"--disc shared (the discriminator's own frozen UNet, "
                   f"{r['parts']['discriminator']:.1f} GiB, goes)"])
        levers += [] if cfg.checkpointing else ["--checkpointing"]
        levers += ["fewer gradient steps (--grad_steps 1: activations grow with K)"]
        print("  levers: " + "; ".join(levers))
    return r


def plan(cfg: train.TrainConfig, real: bool = False, rules: str = "cuda") -> dict:
    """Two steps of train.py's own step code (train.setup, train.losses, train.update) on models
    with random weights: fake tensors (no memory: any size plans on a laptop) or, with real, real
    ones (the check of the estimate), under CUDA's or the CPU's autocast rules. T = K denoising
    steps has the graph and memory of T = 50; the FLOPs of the T - K steps without graph are added
    from one UNet call."""
    paths = train.captioner_paths(cfg.captioner) or [""]  # "": BLIP-large
    for path in filter(None, paths):  # else a hub "Repo id" error, later
        if not os.path.isdir(path):
            raise SystemExit(f"error: --captioner {path}: no such folder")
    train.check_size(cfg, vae_config(cfg.model))  # before anything is built
    steps, T = cfg.steps, cfg.total_steps
    cfg = replace(cfg, steps=2, total_steps=cfg.grad_steps, every=10**9,
                  out=tempfile.mkdtemp(prefix="plan-"))
    cuda = real and torch.cuda.is_available()  # fake tensors live on the CPU
    device = "cuda" if cuda else "cpu"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and (cuda or not real))
    dtype = torch.bfloat16 if bf16 else torch.float32
    prompts = sample.read_prompts(cfg.prompts)
    emulate = rules == "cuda" and device == "cpu"  # on a GPU, autocast applies its own rules
    with (fake_mode() if not real else nullcontext(), CudaRules() if emulate else nullcontext(),
          Tracker() as tracker, flops() as counter):
        rss0 = rss()
        pipe = pipeline(cfg.model, device, dtype)
        caps = [captioner(path, device, dtype) for path in paths]
        run = train.setup(cfg, pipe, caps, masks, prompts, device, dtype)
        # cached reals are a tensor of the run's size; fly makes them in the step, as train does
        reals = torch.randn(len(prompts), *run.lat_shape) if cfg.real == "cache" else None
        tracker.peak = tracker.live  # the plan's peak and FLOPs are the steps', not the set-up's
        counter.flop_counts.clear()
        for step in range(cfg.steps):  # fake tensors hold no values to draw a batch order from
            t0 = time.perf_counter()
            idx = [j % len(prompts) for j in range(cfg.batch)]
            train.update(run, train.losses(run, idx, step), reals, idx)
            step_s = time.perf_counter() - t0  # the last step's: optimiser state exists by then
        models = {"unet": pipe.unet, "discriminator": run.D, "vae": pipe.vae,
                  "text": torch.nn.ModuleList(pipe.encoders),
                  "captioner": torch.nn.ModuleList([c.model for c in caps])}
        extra = (T - cfg.total_steps) * unet_flops(pipe.unet, cfg, cfg.batch, run.lat_shape[-1])
        return report(cfg, tracker, counter, rss0, models, (run.opt, run.opt_d), steps, extra,
                      real, rules, step_s)


def main(argv=None):
    """python plan.py [--real] [--rules cuda|cpu] [train.py flags]: the other flags are train.py's,
    --model included. Tiny presets plan at their own size (64 px) unless --size is given."""
    ap = argparse.ArgumentParser(add_help=False)  # --help: train.py's flags
    ap.add_argument("--real", action="store_true")
    ap.add_argument("--rules", choices=("cuda", "cpu"))
    own, argv = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = train.parse(argv)
    if cfg.model in ("tiny", "tiny-sdxl") and not any(a.startswith("--size") for a in argv):
        cfg = replace(cfg, size=64)
    cuda = own.real and torch.cuda.is_available()
    rules = own.rules or ("cpu" if own.real and not cuda else "cuda")  # the device it runs on
    return plan(cfg, own.real, rules)


if __name__ == "__main__":
    main()
