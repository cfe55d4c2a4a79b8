"""Stable Diffusion 1.5 / SDXL denoising UNet in plain PyTorch, one config-driven class.

Source: diffusers `UNet2DConditionModel` (0.42); SDXL's differences (two text encoders, pooled
embedding and time ids, transformer depths) in docs/official-code.md 7.
Layout: attribute names ARE diffusers' state-dict keys (`down_blocks.1.attentions.0.proj_in`),
so `UNet(SDXL).load_state_dict(diffusers_sd, strict=True)` works with no renaming.
Shapes: B batch, C channels, H, W latent size, HW pixels, T text tokens, heads, d head size.
Usage: `eps = UNet(SDXL)(x, t, ctx, pooled=pooled, time_ids=time_ids)`.
"""
import math
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import _get_current_function_mode_stack
from torch.utils._device import DeviceContext
from torch.utils.checkpoint import checkpoint


@dataclass(frozen=True)
class UNetConfig:
    channels: tuple[int, ...] = (320, 640, 1280, 1280)  # per level
    depth: tuple[int, ...] = (1, 1, 1, 0)   # transformer blocks per attention; 0 = no attention
    heads: tuple[int, ...] = (8, 8, 8, 8)   # head COUNT (diffusers' misnamed attention_head_dim)
    mid_depth: int = 1                      # mid-block transformer blocks (SDXL 10)
    n_res: int = 2                          # ResBlocks per down level (up levels get n_res + 1)
    groups: int = 32                        # GroupNorm groups
    ctx_dim: int = 768                      # cross-attention context width
    linear_proj: bool = False               # SD1.5 1x1 conv proj_in/out; SDXL Linear
    adm_dim: int = 0                        # SDXL text_time in: 1280 pooled + 6*256 = 2816
    time_id_dim: int = 256                  # sinusoid width per SDXL time id
    in_channels: int = 4                    # latent channels (= out channels)


SD15 = UNetConfig()
SDXL = UNetConfig(channels=(320, 640, 1280), depth=(0, 2, 10), heads=(5, 10, 20), mid_depth=10,
                  ctx_dim=2048, linear_proj=True, adm_dim=2816)
# Tiny random presets for tests: SD1.5-like (conv proj, one 32-wide text encoder) and SDXL-like
# (linear proj, depth > 1, add-embedding from a 32-wide pooled vector, two 32-wide encoders -> 64).
TINY_SD15 = UNetConfig(channels=(32, 64), depth=(1, 1), heads=(2, 4), mid_depth=1, groups=8,
                       ctx_dim=32)
TINY_SDXL = UNetConfig(channels=(32, 64, 64), depth=(0, 1, 2), heads=(2, 2, 4), mid_depth=2,
                       groups=8, ctx_dim=64, linear_proj=True, adm_dim=32 + 6 * 8, time_id_dim=8)


# diffusers: models/embeddings.py get_timestep_embedding (flip_sin_to_cos=True, shift 0)
def sinusoid(t: torch.Tensor, dim: int, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal embedding (N,) -> (N, dim), cos half first, as in diffusers and SGM."""
    half = dim // 2
    # Computed in fp32 whatever the model dtype (t up to 1000 needs the mantissa), then cast,
    # exactly like diffusers; this is the one dtype cast in the model.
    i = torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(-math.log(10000) * i / half)  # (half,)
    arg = t.float()[:, None] * freqs[None]  # (N, half)
    return torch.cat([arg.cos(), arg.sin()], dim=-1).to(dtype)


# diffusers: models/embeddings.py TimestepEmbedding
class TimeEmbedding(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.linear_1 = nn.Linear(cin, cout)
        self.linear_2 = nn.Linear(cout, cout)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


# diffusers: models/resnet.py ResnetBlock2D (additive time embedding, eps 1e-5)
class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin, eps=1e-5)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.time_emb_proj = nn.Linear(emb_dim, cout)
        self.norm2 = nn.GroupNorm(groups, cout, eps=1e-5)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        # 1x1 conv only when the width changes; Identity has no parameters, so no key either way
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]  # (B, C, 1, 1) over H, W
        h = self.conv2(F.silu(self.norm2(h)))
        return self.conv_shortcut(x) + h


# diffusers: models/attention_processor.py Attention + AttnProcessor2_0
class Attention(nn.Module):
    """Multi-head attention; self-attention when ctx is None. With `store`, keeps the probs."""

    def __init__(self, dim: int, heads: int, ctx_dim: int | None = None):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim or dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim or dim, dim, bias=False)
        # to_out.1 is diffusers' dropout slot, kept as a parameter-free placeholder.
        self.to_out = nn.ModuleList([nn.Linear(dim, dim), nn.Dropout(0.0)])
        # Set on cross-attention (attn2) only, by the loss code: see `cross_attentions`.
        self.store = False
        self.probs: list[torch.Tensor] = []

    def forward(self, x, ctx=None):
        src = x if ctx is None else ctx
        q, k, v = self.to_q(x), self.to_k(src), self.to_v(src)  # (B, HW, C), (B, T, C), (B, T, C)
        B, N, C = q.shape
        q, k, v = (z.view(B, -1, self.heads, C // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.store:
            # Same maths as SDPA, written out so the maps (with their graph) feed the CoMat losses.
            logits = q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5  # (B, heads, HW, T)
            probs = logits.softmax(dim=-1)
            self.probs.append(probs)
            o = probs @ v  # (B, heads, HW, d)
        else:
            o = F.scaled_dot_product_attention(q, k, v)  # (B, heads, HW, d)
        o = o.transpose(1, 2).reshape(B, N, C)  # (B, HW, C)
        return self.to_out[1](self.to_out[0](o))


# diffusers: models/activations.py GEGLU
class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * inner)

    def forward(self, x):
        # First half is the value, second half the gate; exact (erf) GELU.
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


# diffusers: models/attention.py FeedForward (GEGLU, multiplier 4)
class FeedForward(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        # net.1 is diffusers' dropout slot: a parameter-free placeholder keeps net.2 at its index.
        self.net = nn.ModuleList([GEGLU(dim, 4 * dim), nn.Dropout(0.0), nn.Linear(4 * dim, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


# diffusers: models/attention.py BasicTransformerBlock (pre-LayerNorm, eps 1e-5)
class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, ctx_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, ctx_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, ctx):
        x = x + self.attn1(self.norm1(x))  # self-attention over HW
        x = x + self.attn2(self.norm2(x), ctx)  # cross-attention to the T text tokens
        return x + self.ff(self.norm3(x))


@contextmanager
def replay(attns: list, flags: list, loras: list, sets: list, modes: list):
    """Checkpoint recomputation (during backward) must take the forward's path, explicit softmax or
    SDPA, whatever `store` says by then, and the forward's LoRA set (a shared discriminator's call
    is recomputed after the generator's set is back); recomputed probs go to a throwaway list. It
    also runs under the forward's torch-function modes, which backward does not keep (torch
    re-enters only its device context): plan.py's CUDA autocast rules must hold there too."""
    saved = [(a.store, a.probs) for a in attns]
    saved_sets = [m.use_second for m in loras]
    for a, flag in zip(attns, flags):
        a.store, a.probs = flag, []
    for m, second in zip(loras, sets):
        m.use_second = second
    try:
        with ExitStack() as stack:
            for mode in modes:  # bottom of the stack first
                stack.enter_context(mode)
            yield
    finally:
        for a, (flag, probs) in zip(attns, saved):
            a.store, a.probs = flag, probs
        for m, second in zip(loras, saved_sets):
            m.use_second = second


def run(m: nn.Module, ckpt: bool, *args):
    """m(*args), under non-reentrant activation checkpointing when ckpt is True.

    Non-reentrant so stored attention probs keep a graph that reaches the weights."""
    if not ckpt:
        return m(*args)
    attns = [a for a in m.modules() if isinstance(a, Attention)]
    loras = [a for a in m.modules() if isinstance(a, LoRALinear)]
    modes = [f for f in _get_current_function_mode_stack() if not isinstance(f, DeviceContext)]
    # context_fn runs at forward time, so the flags are the forward's: (forward, recompute) contexts
    ctx = lambda: (nullcontext(), replay(attns, [a.store for a in attns],
                                         loras, [a.use_second for a in loras], modes))
    return checkpoint(m, *args, use_reentrant=False, context_fn=ctx)


# diffusers: models/transformers/transformer_2d.py Transformer2DModel (continuous input)
class SpatialTransformer(nn.Module):
    def __init__(self, dim: int, heads: int, depth: int, ctx_dim: int, groups: int, linear: bool):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, dim, eps=1e-6)  # 1e-6 is hard-wired in diffusers
        # SDXL projects tokens with Linear; SD1.5 with a 1x1 conv, on the image before flattening.
        self.proj_in = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)
        blocks = [TransformerBlock(dim, heads, ctx_dim) for _ in range(depth)]
        self.transformer_blocks = nn.ModuleList(blocks)
        self.proj_out = nn.Linear(dim, dim) if linear else nn.Conv2d(dim, dim, 1)

    def forward(self, x, ctx, ckpt=False):
        B, C, H, W = x.shape
        h = self.norm(x)
        if not self.linear:
            h = self.proj_in(h)
        h = h.permute(0, 2, 3, 1).reshape(B, H * W, C)  # (B, HW, C), row-major tokens
        if self.linear:
            h = self.proj_in(h)
        for block in self.transformer_blocks:
            h = run(block, ckpt, h, ctx)
        if self.linear:
            h = self.proj_out(h)
        h = h.reshape(B, H, W, C).permute(0, 3, 1, 2)  # (B, C, H, W)
        if not self.linear:
            h = self.proj_out(h)
        return x + h  # residual from before the GroupNorm


# diffusers: models/downsampling.py Downsample2D (stride-2 conv, pad 1: ceil(n/2) for odd n)
class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


# diffusers: models/upsampling.py Upsample2D (nearest, then 3x3 conv)
class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x, size):
        # Interpolate to the skip's exact size: x2 for even sizes, undoes ceil(n/2) for odd ones.
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


def transformers(cfg: UNetConfig, c: int, depth: int, heads: int, n: int) -> nn.ModuleList:
    """n SpatialTransformers of `depth` blocks, or an empty list (no keys) when depth is 0."""
    args = (c, heads, depth, cfg.ctx_dim, cfg.groups, cfg.linear_proj)
    return nn.ModuleList([SpatialTransformer(*args) for _ in range(n if depth else 0)])


# diffusers: models/unets/unet_2d_blocks.py CrossAttnDownBlock2D and DownBlock2D
class DownBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, cin: int, cout: int, depth: int, heads: int, down: bool):
        super().__init__()
        emb_dim = 4 * cfg.channels[0]
        ins = [cin] + [cout] * (cfg.n_res - 1)
        self.resnets = nn.ModuleList([ResBlock(c, cout, emb_dim, cfg.groups) for c in ins])
        self.attentions = transformers(cfg, cout, depth, heads, cfg.n_res)
        self.downsamplers = nn.ModuleList([Downsample(cout)] if down else [])

    def forward(self, x, emb, ctx, skips: list, ckpt=False):
        """Pushes every ResBlock(+attention) output and the downsampled tensor onto `skips`."""
        for i, resnet in enumerate(self.resnets):
            x = run(resnet, ckpt, x, emb)
            if self.attentions:
                x = self.attentions[i](x, ctx, ckpt)
            skips.append(x)
        for down in self.downsamplers:
            x = down(x)
            skips.append(x)
        return x


# diffusers: models/unets/unet_2d_blocks.py UNetMidBlock2DCrossAttn
class MidBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, c: int, depth: int, heads: int):
        super().__init__()
        emb_dim = 4 * cfg.channels[0]
        self.resnets = nn.ModuleList([ResBlock(c, c, emb_dim, cfg.groups) for _ in range(2)])
        self.attentions = transformers(cfg, c, depth, heads, 1)

    def forward(self, x, emb, ctx, ckpt=False):
        x = run(self.resnets[0], ckpt, x, emb)
        x = self.attentions[0](x, ctx, ckpt)
        return run(self.resnets[1], ckpt, x, emb)


# diffusers: models/unets/unet_2d_blocks.py CrossAttnUpBlock2D and UpBlock2D
class UpBlock(nn.Module):
    def __init__(self, cfg: UNetConfig, cprev: int, cout: int, cskip: int, depth: int, heads: int,
                 up: bool):
        super().__init__()
        emb_dim = 4 * cfg.channels[0]
        n = cfg.n_res + 1
        # ResBlock j sees cat(x, skip): x has cprev channels for j = 0, else cout; the last skip
        # comes from the shallower level (cskip channels), the others from this level (cout).
        ins = [(cprev if j == 0 else cout) + (cskip if j == n - 1 else cout) for j in range(n)]
        self.resnets = nn.ModuleList([ResBlock(c, cout, emb_dim, cfg.groups) for c in ins])
        self.attentions = transformers(cfg, cout, depth, heads, n)
        self.upsamplers = nn.ModuleList([Upsample(cout)] if up else [])

    def forward(self, x, emb, ctx, skips: list, ckpt=False):
        """Pops one skip per ResBlock (LIFO), then upsamples to the size of the next skip."""
        for i, resnet in enumerate(self.resnets):
            x = torch.cat([x, skips.pop()], dim=1)  # (B, C + C_skip, H, W)
            x = run(resnet, ckpt, x, emb)
            if self.attentions:
                x = self.attentions[i](x, ctx, ckpt)
        for up in self.upsamplers:
            x = up(x, skips[-1].shape[-2:])
        return x


# diffusers: models/unets/unet_2d_condition.py UNet2DConditionModel
class UNet(nn.Module):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.cfg = cfg
        self.gradient_checkpointing = False  # read in forward; only acts while grad is enabled
        c0, n = cfg.channels[0], len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, c0, 3, padding=1)
        self.time_embedding = TimeEmbedding(c0, 4 * c0)
        # SDXL "text_time": pooled text embedding + sinusoids of the 6 size/crop ids.
        self.add_embedding = TimeEmbedding(cfg.adm_dim, 4 * c0) if cfg.adm_dim else None
        self.down_blocks = nn.ModuleList()
        for i, (c, d, h) in enumerate(zip(cfg.channels, cfg.depth, cfg.heads)):
            cin = cfg.channels[max(i - 1, 0)]
            self.down_blocks.append(DownBlock(cfg, cin, c, d, h, down=i < n - 1))
        # The mid block uses the deepest level's head count, with its own depth.
        self.mid_block = MidBlock(cfg, cfg.channels[-1], cfg.mid_depth, cfg.heads[-1])
        # Up levels mirror the down levels (reversed channels, depth, heads).
        rc, rd, rh = cfg.channels[::-1], cfg.depth[::-1], cfg.heads[::-1]
        self.up_blocks = nn.ModuleList()
        for i in range(n):
            cprev, cskip = rc[max(i - 1, 0)], rc[min(i + 1, n - 1)]
            self.up_blocks.append(UpBlock(cfg, cprev, rc[i], cskip, rd[i], rh[i], up=i < n - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.groups, c0, eps=1e-5)
        self.conv_out = nn.Conv2d(c0, cfg.in_channels, 3, padding=1)

    def forward(self, x, t, ctx, pooled=None, time_ids=None):
        """x (B, C, H, W), t int/float/0-d/(B,), ctx (B, T, ctx_dim) -> eps (B, C, H, W)."""
        cfg, B = self.cfg, x.shape[0]
        assert x.ndim == 4 and x.shape[1] == cfg.in_channels, f"x: (B, {cfg.in_channels}, H, W)"
        assert ctx.ndim == 3 and ctx.shape[-1] == cfg.ctx_dim, f"ctx must be (B, T, {cfg.ctx_dim})"
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)  # (B,)
        emb = self.time_embedding(sinusoid(t, cfg.channels[0], x.dtype))  # (B, 4 C0)
        if self.add_embedding is not None:
            assert pooled is not None and time_ids is not None, "SDXL needs pooled and time_ids"
            assert time_ids.shape == (B, 6), "time_ids must be (B, 6): h, w, top, left, h, w"
            ids = sinusoid(time_ids.flatten(), cfg.time_id_dim, x.dtype).reshape(B, -1)  # (B, 6 D)
            emb = emb + self.add_embedding(torch.cat([pooled, ids], dim=-1))  # pooled first
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x = block(x, emb, ctx, skips, ckpt)
        x = self.mid_block(x, emb, ctx, ckpt)
        for block in self.up_blocks:
            x = block(x, emb, ctx, skips, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


def cross_attentions(unet: UNet) -> list[tuple[str, Attention]]:
    """(name, module) of every cross-attention (attn2), in forward order (down, mid, up)."""
    return [(name, m) for name, m in unet.named_modules() if name.endswith("attn2")]


# LoRA as in CoMat (training_utils/pipeline.py): rank 128 on to_q/to_k/to_v/to_out.0 of every
# attention, A ~ N(0, std 1/r), B = 0, scale 1 (alpha = r), LoRA weights in fp32.
class LoRALinear(nn.Linear):
    """nn.Linear plus a low-rank branch: y = W x + b + scale * B(A x). The base `weight`/`bias`
    are the wrapped layer's own Parameters (shared, not copied), so their keys do not move."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None):
        nn.Module.__init__(self)  # not nn.Linear's: it would allocate and init a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        self.lora_A, self.lora_B = lora_pair(base, rank)  # peft's names: diffusers reads them
        self.scale = (alpha or rank) / rank
        # A second adapter set (A, B) on the same base, used while use_second is True: a shared
        # discriminator's (comat.SharedDiscriminator owns it; a tuple is not registered here, so
        # it stays out of this UNet's parameters and state dict).
        self.second, self.use_second = None, False

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        A, B = self.second if self.use_second else (self.lora_A, self.lora_B)
        # The branch runs in the LoRA dtype (fp32 beside a bf16 base) and is added back in the
        # base dtype; under autocast both casts are no-ops next to autocast's own.
        lora = B(A(x.to(A.weight.dtype)))  # (..., r) -> (..., out)
        return y + (self.scale * lora).to(y.dtype)


def lora_pair(base: nn.Linear, rank: int) -> tuple[nn.Linear, nn.Linear]:
    """LoRA's down and up projections (A, B) for `base`: A ~ N(0, 1/r), B = 0, fp32 whatever the
    base dtype, on the base's device (real after a meta + assign load)."""
    kw = dict(bias=False, device=base.weight.device, dtype=torch.float32)
    A, B = nn.Linear(base.in_features, rank, **kw), nn.Linear(rank, base.out_features, **kw)
    nn.init.normal_(A.weight, std=1 / rank)
    nn.init.zeros_(B.weight)  # zero branch: the adapted UNet starts as the base
    return A, B


def lora_targets(unet: nn.Module, targets=("to_q", "to_k", "to_v", "to_out.0")) -> list[str]:
    """Names of the Linears LoRA adapts: `targets` of every Attention (attn1 and attn2)."""
    return [f"{n}.{t}" for n, m in unet.named_modules() if isinstance(m, Attention)
            for t in targets]


def add_lora(unet: nn.Module, rank: int, targets=("to_q", "to_k", "to_v", "to_out.0"),
             alpha: float | None = None) -> list[str]:
    """Freeze the UNet and swap the `targets` Linears of every Attention (attn1 and attn2) for
    LoRALinear in place; only the LoRA weights are trainable. Returns the adapted names."""
    unet.requires_grad_(False)
    names = lora_targets(unet, targets)
    for name in names:
        base = unet.get_submodule(name)
        assert type(base) is nn.Linear, f"{name} is not a plain nn.Linear (LoRA added twice?)"
        unet.set_submodule(name, LoRALinear(base, rank, alpha))
    return names


def lora_state_dict(unet: nn.Module) -> dict[str, torch.Tensor]:
    """The LoRA weights under peft keys `unet.<module>.lora_A.weight` / `lora_B.weight`, which
    diffusers' `load_lora_weights` reads. No alpha key (diffusers then takes alpha = r, scale 1),
    so the scale is folded into B."""
    sd = {}
    for name, m in unet.named_modules():
        if isinstance(m, LoRALinear):
            sd[f"unet.{name}.lora_A.weight"] = m.lora_A.weight.detach().clone()
            sd[f"unet.{name}.lora_B.weight"] = m.scale * m.lora_B.weight.detach()
    return sd


@torch.no_grad()
def fold_lora(unet: nn.Module) -> None:
    """W += scale * B A in every LoRALinear, which then becomes a plain nn.Linear with the same
    weight/bias Parameters: the state dict is diffusers' layout again (a plain fine-tuned UNet)."""
    for name, m in list(unet.named_modules()):
        if isinstance(m, LoRALinear):
            w, B, A = m.weight, m.lora_B.weight, m.lora_A.weight
            dt = torch.promote_types(w.dtype, B.dtype)  # add in the wider dtype, round once
            w.copy_(w.to(dt) + m.scale * (B.to(dt) @ A.to(dt)))  # (out, r) @ (r, in)
            plain = nn.Linear(m.in_features, m.out_features, m.bias is not None, device="meta")
            plain.weight, plain.bias = m.weight, m.bias
            unet.set_submodule(name, plain)


def merge_lora(unet: nn.Module, sd: dict) -> None:
    """Merge LoRA weights into the UNet: W += (alpha / r) * up @ down for each adapted Linear.

    Accepts diffusers/peft keys (`unet.<module>.lora_A.weight`, `lora_B.weight`) and the older
    `<module>.lora.down.weight` / `lora.up.weight`; an optional `<module>.alpha` sets the scale.
    """
    down = (".lora_A.weight", ".lora.down.weight")
    names = {k.removeprefix("unet.").removesuffix(down[0]).removesuffix(down[1])
             for k in sd if k.endswith(down)}
    if not names:
        raise ValueError("no LoRA keys (*.lora_A.weight / *.lora.down.weight) in the file")
    mods, pairs = dict(unet.named_modules()), {}
    for n in sorted(names):  # all checked before any weight changes: never half merged
        pre = next(p for p in ("unet." + n, n) if p + ".lora_A.weight" in sd
                   or p + ".lora.down.weight" in sd)
        down = sd.get(pre + ".lora_A.weight", sd.get(pre + ".lora.down.weight"))
        up = sd.get(pre + ".lora_B.weight", sd.get(pre + ".lora.up.weight"))
        w = getattr(mods.get(n), "weight", None)
        if w is None or up is None or w.shape != (up.shape[0], down.shape[1]):
            what = "no such module" if w is None else "no up weight" if up is None else \
                f"{tuple(w.shape)} vs the LoRA's {(up.shape[0], down.shape[1])}"
            raise ValueError(f"LoRA does not fit this UNet (one for another model, e.g. SDXL's "
                             f"on SD1.5?): {n}: {what}")
        pairs[n] = pre, down, up
    for n, (pre, down, up) in pairs.items():
        alpha = sd.get(pre + ".alpha")
        w = mods[n].weight
        scale = 1.0 if alpha is None else float(alpha) / down.shape[0]
        w.data += scale * (up.to(w) @ down.to(w))  # (out, r) @ (r, in)
