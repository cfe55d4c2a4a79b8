"""vae.py against diffusers' AutoencoderKL: float64 parity, key/shape equality, legacy key names."""
import pytest
import torch
from oracle import diffusers_vae

from vae import SD15_VAE, SDXL_VAE, TINY_VAE, VAE, rename_legacy_vae_keys


def tiny_pair():
    """Our tiny VAE and diffusers' in float64, ours loaded strictly from diffusers' weights."""
    ref = diffusers_vae(TINY_VAE).double().eval()
    with torch.no_grad():  # move norms and biases off their 1 / 0 init so swapped names would show
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = VAE(TINY_VAE).double().eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@torch.no_grad()
def test_parity_float64():
    torch.manual_seed(0)
    ours, ref = tiny_pair()
    # not powers of two, and an odd size that exercises the asymmetric downsample padding
    for h, w in [(24, 40), (23, 41)]:
        img = torch.rand(2, 3, h, w, dtype=torch.float64) * 2 - 1
        mean, logvar = ours.encode(img)
        dist = ref.encode(img).latent_dist
        assert mean.shape == (2, 4, h // 2, w // 2)
        torch.testing.assert_close(mean, dist.mean)
        torch.testing.assert_close(logvar, dist.logvar)
        z = torch.randn(2, 4, h // 2, w // 2, dtype=torch.float64)
        torch.testing.assert_close(ours.decode(z), ref.decode(z).sample)


@pytest.mark.parametrize("cfg", [SD15_VAE, SDXL_VAE])
def test_full_keys_and_shapes(cfg):
    with torch.device("meta"):  # no memory, no init: only names and shapes matter here
        ours, ref = VAE(cfg), diffusers_vae(cfg)
    shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert len(shapes) == 248
    assert sum(p.numel() for p in ours.parameters()) == 83_653_863
    assert not list(ours.buffers()), "buffers would stay on meta under assign=True loading"


@torch.no_grad()
def test_legacy_keys():
    torch.manual_seed(0)
    ours, ref = tiny_pair()
    new = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    legacy = {}
    for k, v in ref.state_dict().items():
        for a, b in new.items():
            if f".attentions.0.{a}." in k:
                k = k.replace(f".{a}.", f".{b}.")
                v = v[:, :, None, None] if v.ndim == 2 else v  # LDM-style 1x1 conv weights
        legacy[k] = v
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy
    renamed = rename_legacy_vae_keys(legacy)
    assert "encoder.mid_block.attentions.0.proj_attn.weight" in legacy, "input must be left intact"
    assert renamed.keys() == ref.state_dict().keys()
    # untouched entries are the very same tensors
    assert renamed["decoder.conv_out.weight"] is legacy["decoder.conv_out.weight"]
    other = VAE(TINY_VAE).double().eval()
    other.load_state_dict(renamed, strict=True)
    img = torch.rand(1, 3, 24, 40, dtype=torch.float64) * 2 - 1
    z = torch.randn(1, 4, 12, 20, dtype=torch.float64)
    assert torch.equal(other.encode(img)[0], ours.encode(img)[0])
    assert torch.equal(other.encode(img)[1], ours.encode(img)[1])
    assert torch.equal(other.decode(z), ours.decode(z))
