"""AutoencoderKL, the Stable Diffusion VAE: images <-> latents, in plain PyTorch.

Source: diffusers models/autoencoders/{autoencoder_kl,vae}.py (Rombach et al. 2022, LDM). SD1.5 and
SDXL share this architecture (different weights and latent scale). Parameter names are diffusers'
AutoencoderKL keys, so a `vae/diffusion_pytorch_model.safetensors` loads with strict=True.
Shapes: B batch, C channels, H, W image size, HW = H*W, f = 2**(levels-1) = 8 latent downscale.
Usage: vae = VAE(SD15_VAE); mean, logvar = vae.encode(img); img = vae.decode(z / SD15_VAE.scale)
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unet import run  # a block's call, checkpointed or not (the UNet's helper)


@dataclass(frozen=True)
class VAEConfig:
    channels: tuple[int, ...] = (128, 256, 512, 512)
    n_res: int = 2            # resnets per encoder level (decoder levels get n_res + 1)
    groups: int = 32
    latent: int = 4
    scale: float = 0.18215    # latent scaling factor (SDXL 0.13025)
    upcast: bool = False      # decode in fp32 even when the model runs fp16 (SDXL VAE overflows)
    in_channels: int = 3

    @property
    def factor(self) -> int:
        """Pixels per latent pixel: one stride-2 downsampler per level but the last (SD: 8)."""
        return 2 ** (len(self.channels) - 1)


SD15_VAE = VAEConfig()
SDXL_VAE = VAEConfig(scale=0.13025, upcast=True)
TINY_VAE = VAEConfig(channels=(32, 64), n_res=1, groups=8)


def group_norm(groups: int, c: int) -> nn.GroupNorm:
    # every norm in the VAE uses eps 1e-6 (the UNet's resnets use 1e-5: don't share this helper)
    return nn.GroupNorm(groups, c, eps=1e-6)


# diffusers: models/resnet.py ResnetBlock2D with temb_channels=None (the VAE has no time embedding)
class ResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, groups: int):
        super().__init__()
        self.norm1 = group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # a 1x1 projection only where the width changes: the checkpoint has no key otherwise
        self.conv_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # diffusers' dropout here is p=0, so omitted
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


# diffusers: models/attention_processor.py Attention + AttnProcessor2_0, as built by UNetMidBlock2D
# for the VAE: one head of width C, biased projections, GroupNorm in front, residual added after.
class Attention(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.group_norm = group_norm(groups, c)
        self.to_q = nn.Linear(c, c)
        self.to_k = nn.Linear(c, c)
        self.to_v = nn.Linear(c, c)
        # a list so the output projection keeps diffusers' key `to_out.0` (index 1 is Dropout(0))
        self.to_out = nn.ModuleList([nn.Linear(c, c), nn.Dropout(0.0)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.group_norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        q, k, v = self.to_q(h), self.to_k(h), self.to_v(h)
        # single head, so SDPA on (B, HW, C) directly; scale 1/sqrt(C) is SDPA's default
        h = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        h = self.to_out[1](self.to_out[0](h))
        return x + h.transpose(1, 2).reshape(B, C, H, W)


# diffusers: models/downsampling.py Downsample2D with padding=0 (the VAE encoder's variant)
class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the LDM VAE pads only right and bottom by one pixel, then convolves unpadded: this is
        # NOT the same as padding=1 (which would shift the sampling grid by one pixel)
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # (B, C, H/2, W/2)


# diffusers: models/upsampling.py Upsample2D (nearest x2, then a 3x3 conv)
class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))  # (B, C, 2H, 2W)


# diffusers: models/unets/unet_2d_blocks.py DownEncoderBlock2D (resnets, optional downsample)
class DownBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, groups: int, down: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out, groups)
                                     for j in range(n))
        # an empty list on the last level: no keys, same as the checkpoint
        self.downsamplers = nn.ModuleList([Downsample(c_out)] if down else [])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for m in [*self.resnets, *self.downsamplers]:
            x = m(x)
        return x


# diffusers: models/unets/unet_2d_blocks.py UpDecoderBlock2D (resnets, optional upsample)
class UpBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, n: int, groups: int, up: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResBlock(c_in if j == 0 else c_out, c_out, groups)
                                     for j in range(n))
        self.upsamplers = nn.ModuleList([Upsample(c_out)] if up else [])

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        for m in [*self.resnets, *self.upsamplers]:  # ckpt: each one recomputed in backward
            x = run(m, ckpt, x)
        return x


# diffusers: models/unets/unet_2d_blocks.py UNetMidBlock2D (resnet, attention, resnet; no temb)
class MidBlock(nn.Module):
    def __init__(self, c: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResBlock(c, c, groups), ResBlock(c, c, groups)])
        self.attentions = nn.ModuleList([Attention(c, groups)])

    def forward(self, x: torch.Tensor, ckpt: bool = False) -> torch.Tensor:
        x = run(self.resnets[0], ckpt, x)
        x = run(self.attentions[0], ckpt, x)
        return run(self.resnets[1], ckpt, x)


# diffusers: models/autoencoders/vae.py Encoder (double_z: outputs mean and logvar channels)
class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.channels, cfg.groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        # level i maps ch[i-1] -> ch[i] and halves the size, except on the last level
        self.down_blocks = nn.ModuleList(
            DownBlock(ch[max(i - 1, 0)], ch[i], cfg.n_res, g, i < n - 1) for i in range(n))
        self.mid_block = MidBlock(ch[-1], g)
        self.conv_norm_out = group_norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 2*latent, H/f, W/f)


# diffusers: models/autoencoders/vae.py Decoder (norm_type="group"; mirror of the encoder)
class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.channels[::-1], cfg.groups, len(cfg.channels)  # widest level first
        self.conv_in = nn.Conv2d(cfg.latent, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g)
        # one more resnet per level than the encoder; every level but the last doubles the size
        self.up_blocks = nn.ModuleList(
            UpBlock(ch[max(i - 1, 0)], ch[i], cfg.n_res + 1, g, i < n - 1) for i in range(n))
        self.conv_norm_out = group_norm(g, ch[-1])
        self.conv_out = nn.Conv2d(ch[-1], cfg.in_channels, 3, padding=1)
        # read in forward, acts only while grad is enabled: training's decode keeps the graph,
        # and at 512 px its full-resolution activations are the step's largest (docs/performance)
        self.gradient_checkpointing = False

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        ckpt = self.gradient_checkpointing and torch.is_grad_enabled()
        x = self.mid_block(self.conv_in(z), ckpt)
        for block in self.up_blocks:
            x = block(x, ckpt)
        return self.conv_out(F.silu(self.conv_norm_out(x)))  # (B, 3, H, W)


# diffusers: models/autoencoders/autoencoder_kl.py AutoencoderKL (no tiling or slicing)
class VAE(nn.Module):
    """The KL-regularised autoencoder. Latents here are UNSCALED: callers multiply by cfg.scale.

    cfg.upcast is not acted on here (modules never cast): the SDXL VAE overflows fp16, so the
    loader keeps it in fp32 and the caller casts latents to fp32 before decode.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent, 2 * cfg.latent, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent, cfg.latent, 1)

    def encode(self, img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image in [-1, 1] (B, 3, H, W) -> posterior (mean, logvar), each (B, latent, H/f, W/f)."""
        assert img.ndim == 4 and img.shape[1] == self.cfg.in_channels, f"image {tuple(img.shape)}"
        mean, logvar = self.quant_conv(self.encoder(img)).chunk(2, dim=1)
        # same clamp as diffusers' DiagonalGaussianDistribution: keeps exp(logvar / 2) finite
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Unscaled latents (B, latent, h, w) -> image (B, 3, f*h, f*w) in ~[-1, 1], unclamped."""
        assert z.ndim == 4 and z.shape[1] == self.cfg.latent, f"bad latents {tuple(z.shape)}"
        return self.decoder(self.post_quant_conv(z))


# the mid-attention names in diffusers files saved before about v0.14 (e.g. the SD1.5 repo)
LEGACY_ATTN = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def rename_legacy_vae_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """New dict with legacy mid-attention names mapped to ours and 1x1-conv weights made Linear."""
    out = {}
    for key, w in sd.items():
        if ".mid_block.attentions." in key:
            *head, name, leaf = key.split(".")  # ...attentions.0 | query | weight
            key = ".".join([*head, LEGACY_ATTN.get(name, name), leaf])
            if w.ndim == 4:
                w = w[:, :, 0, 0]  # LDM stores q/k/v/proj_out as 1x1 convs: [C, C, 1, 1] -> [C, C]
        out[key] = w
    return out
