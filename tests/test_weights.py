"""weights.py: key maps checked against diffusers' own single-file converter, single-file and
diffusers-folder round trips with tiny random models, and the one-line error messages."""
import os
from dataclasses import replace

import pytest
import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from oracle import char_tokenizer, diffusers_unet, diffusers_vae
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

import weights
from unet import SD15, SDXL, TINY_SD15, TINY_SDXL, UNet
from vae import SD15_VAE, SDXL_VAE, TINY_VAE, VAE

FULL = {"sd15": (SD15, SD15_VAE), "sdxl": (SDXL, SDXL_VAE)}
TINY = {"sd15": TINY_SD15, "sdxl": TINY_SDXL}


def unet_inputs(cfg, b=2, hw=8):
    ctx = torch.randn(b, 5, cfg.ctx_dim, dtype=torch.float64)
    x, t = torch.randn(b, cfg.in_channels, hw, hw, dtype=torch.float64), torch.tensor([10, 500])
    if not cfg.adm_dim:
        return (x, t, ctx), {}
    pooled = torch.randn(b, cfg.adm_dim - 6 * cfg.time_id_dim, dtype=torch.float64)
    ids = torch.tensor([[64.0, 64, 0, 0, 64, 64]] * b, dtype=torch.float64)
    return (x, t, ctx, pooled, ids), {"text_embeds": pooled, "time_ids": ids}


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_key_maps_cover_full_models_and_match_diffusers_converter(kind):
    ucfg, vcfg = FULL[kind]
    with torch.device("meta"):
        ref_u, ref_v = diffusers_unet(ucfg), diffusers_vae(vcfg)
    umap, vmap = weights.unet_key_map(ucfg), weights.vae_key_map(vcfg)
    assert set(umap) == set(ref_u.state_dict()) and len(set(umap.values())) == len(umap)
    assert set(vmap) == set(ref_v.state_dict()) and len(set(vmap.values())) == len(vmap)
    assert len(umap) == {"sd15": 686, "sdxl": 1680}[kind] and len(vmap) == 248
    # one distinct scalar per key, so the oracle's output shows where each tensor went
    usd = {k: torch.tensor([float(i)]) for i, k in enumerate(umap)}
    vsd = {k: torch.full((1, 1), float(i)) for i, k in enumerate(vmap)}
    sd = weights.to_single_file(usd, vsd, ucfg, vcfg)
    assert all(sd[f"first_stage_model.{vmap[k]}"].ndim == 4 for k in vsd if ".attentions.0.to_" in k
               and k.endswith("weight"))  # LDM stores them as 1x1 convs
    assert convert_ldm_unet_checkpoint(sd, ref_u.config) == usd
    assert convert_ldm_vae_checkpoint(sd, ref_v.config) == vsd
    assert weights.single_file_kind(sd) == kind


def test_key_map_spot_checks():
    xl, v15 = weights.unet_key_map(SDXL), weights.unet_key_map(SD15)
    assert xl["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.2.conv.weight"
    assert xl["up_blocks.1.upsamplers.0.conv.bias"] == "output_blocks.5.2.conv.bias"
    assert xl["add_embedding.linear_2.weight"] == "label_emb.0.2.weight"
    assert xl["down_blocks.1.downsamplers.0.conv.weight"] == "input_blocks.6.0.op.weight"
    assert xl["down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_k.weight"] == \
        "input_blocks.8.1.transformer_blocks.9.attn2.to_k.weight"
    assert v15["up_blocks.0.upsamplers.0.conv.weight"] == "output_blocks.2.1.conv.weight"
    assert v15["mid_block.resnets.1.time_emb_proj.bias"] == "middle_block.2.emb_layers.1.bias"
    assert v15["up_blocks.3.resnets.2.conv_shortcut.bias"] == \
        "output_blocks.11.0.skip_connection.bias"
    vae = weights.vae_key_map(SD15_VAE)
    assert vae["decoder.up_blocks.0.resnets.0.conv1.weight"] == "decoder.up.3.block.0.conv1.weight"
    assert vae["decoder.up_blocks.2.upsamplers.0.conv.bias"] == "decoder.up.1.upsample.conv.bias"
    assert vae["encoder.mid_block.attentions.0.to_out.0.bias"] == "encoder.mid.attn_1.proj_out.bias"
    assert vae["encoder.conv_norm_out.bias"] == "encoder.norm_out.bias"


def text_parts(folder, kind):
    """Tiny CLIP text encoder(s) and char tokenizer(s) in the diffusers folder layout."""
    cfg = dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=77, bos_token_id=512,
               eos_token_id=513)  # the ids of char_tokenizer's <|startoftext|>, <|endoftext|>
    CLIPTextModel(CLIPTextConfig(**cfg)).save_pretrained(folder / "text_encoder")
    char_tokenizer(str(folder / "tokenizer"))
    if kind == "sdxl":
        enc2 = CLIPTextModelWithProjection(CLIPTextConfig(**cfg, projection_dim=32))
        enc2.save_pretrained(folder / "text_encoder_2")
        char_tokenizer(str(folder / "tokenizer_2"), pad="!")


def tiny_models(kind):
    unet, vae = UNet(TINY[kind]).double().eval(), VAE(TINY_VAE).double().eval()
    return unet, vae


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_round_trip(kind, tmp_path, monkeypatch):
    torch.manual_seed(0)
    unet, vae = tiny_models(kind)
    sd = weights.to_single_file(unet.state_dict(), vae.state_dict(), TINY[kind], TINY_VAE)
    # what real files also hold, all to be dropped
    sd |= {"model_ema.decay": torch.ones(()), "betas": torch.ones(3),
           "cond_stage_model.transformer.text_model.x": torch.ones(2),
           "conditioner.embedders.1.model.ln_final.weight": torch.ones(2)}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    assert weights.single_file_kind(weights.load_state(str(tmp_path / "model.safetensors"))) == kind
    # a single file carries no config: the loader uses the full presets, made tiny here
    monkeypatch.setattr(weights, "SDXL" if kind == "sdxl" else "SD15", TINY[kind])
    monkeypatch.setattr(weights, "SDXL_VAE" if kind == "sdxl" else "SD15_VAE", TINY_VAE)
    text_parts(tmp_path / "text", kind)
    pipe = weights.load_pipeline(str(tmp_path / "model.safetensors"), dtype=torch.float64,
                                 text_from=str(tmp_path / "text"))
    assert pipe.sdxl == (kind == "sdxl") and len(pipe.encoders) == 1 + pipe.sdxl
    args, _ = unet_inputs(TINY[kind])
    with torch.no_grad():
        torch.testing.assert_close(pipe.unet(*args), unet(*args))
        z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(pipe.vae.decode(z), vae.decode(z))


def test_corrupted_single_file_key_is_named():
    torch.manual_seed(0)
    unet, vae = tiny_models("sd15")
    sd = weights.to_single_file(unet.state_dict(), vae.state_dict(), TINY_SD15, TINY_VAE)
    sd["model.diffusion_model.input_blocks.1.0.in_layerz.0.weight"] = \
        sd.pop("model.diffusion_model.input_blocks.1.0.in_layers.0.weight")
    usd, _ = weights.from_single_file(sd, TINY_SD15, TINY_VAE)
    with torch.device("meta"):
        fresh = UNet(TINY_SD15)
    with pytest.raises(ValueError) as e:
        weights.load_strict(fresh, usd, "unet")
    msg = str(e.value)
    assert "\n" not in msg and "1 missing keys (first: down_blocks.0.resnets.0.norm1.weight)" in msg
    assert "1 unexpected (first: input_blocks.1.0.in_layerz.0.weight)" in msg


def test_load_strict_message():
    m = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 4))
    sd = {"0.weight": torch.ones(3, 2), "1.weight": torch.ones(4, 4), "x.y": torch.ones(1)}
    with pytest.raises(ValueError) as e:
        weights.load_strict(m, sd, "toy")
    assert str(e.value) == ("toy: 2 missing keys (first: 0.bias, 1.bias), 1 unexpected (first: "
                            "x.y), 1 shape mismatches (first: 1.weight (4, 4) vs (4, 3))")


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_diffusers_folder(kind, tmp_path):
    """SD1.5: fp16-variant UNet file + legacy VAE attention names; SDXL: sharded UNet."""
    torch.manual_seed(0)
    vcfg = replace(TINY_VAE, upcast=kind == "sdxl")  # SDXL's vae/config.json sets force_upcast
    ref_u, ref_v = diffusers_unet(TINY[kind]), diffusers_vae(vcfg)
    if kind == "sd15":
        ref_u.half().save_pretrained(tmp_path / "unet", variant="fp16")
        ref_v.save_pretrained(tmp_path / "vae")
        # pre-0.14 diffusers names for the mid-block attention, as in the SD1.5 repo
        old = {"to_q.": "query.", "to_k.": "key.", "to_v.": "value.", "to_out.0.": "proj_attn."}
        sd = {}
        for k, v in ref_v.state_dict().items():
            for new, name in old.items():
                k = k.replace("attentions.0." + new, "attentions.0." + name)
            sd[k] = v
        assert "encoder.mid_block.attentions.0.query.weight" in sd
        save_file(sd, tmp_path / "vae/diffusion_pytorch_model.safetensors")
    else:
        ref_u.save_pretrained(tmp_path / "unet", max_shard_size="200KB")
        assert os.path.isfile(tmp_path / "unet/diffusion_pytorch_model.safetensors.index.json")
        ref_v.save_pretrained(tmp_path / "vae")
    text_parts(tmp_path, kind)
    pipe = weights.load_pipeline(str(tmp_path), dtype=torch.float64)
    assert pipe.sdxl == (kind == "sdxl")
    assert len(pipe.encoders) == len(pipe.tokenizers) == 1 + pipe.sdxl
    assert not any(p.requires_grad for e in pipe.encoders + [pipe.vae] for p in e.parameters())
    assert pipe.tokenizers[-1].pad_token == ("!" if kind == "sdxl" else "<|endoftext|>")
    args, added = unet_inputs(TINY[kind])
    ref_u, ref_v = ref_u.double().eval(), ref_v.double().eval()
    with torch.no_grad():
        want = ref_u(*args[:3], added_cond_kwargs=added or None).sample
        torch.testing.assert_close(pipe.unet(*args), want)
        z = torch.randn(1, 4, 8, 8, dtype=torch.float64)
        torch.testing.assert_close(pipe.vae.decode(z), ref_v.decode(z).sample)
    half = weights.load_pipeline(str(tmp_path), dtype=torch.float16)
    assert next(half.unet.parameters()).dtype == torch.float16
    assert next(half.encoders[0].parameters()).dtype == torch.float16
    # only the SDXL VAE (force_upcast) stays fp32 under fp16
    assert next(half.vae.parameters()).dtype == (torch.float32 if kind == "sdxl" else torch.float16)


def test_weights_file_preference(tmp_path):
    with torch.device("meta"):
        diffusers_unet(TINY_SD15).save_config(tmp_path / "unet")
    names = ["diffusion_pytorch_model.fp16.safetensors.index.json",
             "diffusion_pytorch_model.safetensors.index.json",
             "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.safetensors"]
    for name in names:  # each newly added (empty) file must win over all earlier ones
        (tmp_path / "unet" / name).write_bytes(b"")
        with pytest.raises(ValueError, match=f"unet/{name}: empty file"):
            weights.load_pipeline(str(tmp_path))


def test_config_parsing():
    for cfg in (TINY_SD15, TINY_SDXL, SD15, SDXL):
        with torch.device("meta"):
            d = dict(diffusers_unet(cfg).config)
        assert weights.unet_config_from_diffusers(d) == cfg
    with torch.device("meta"):
        assert weights.vae_config_from_diffusers(dict(diffusers_vae(TINY_VAE).config)) == TINY_VAE
    # SD1.5's vae/config.json has neither scaling_factor nor force_upcast
    d = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4}
    assert weights.vae_config_from_diffusers(d) == SD15_VAE
    assert weights.vae_config_from_diffusers(d | {"scaling_factor": 0.13025,
                                                  "force_upcast": True}) == SDXL_VAE


def test_one_line_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such"):
        weights.load_pipeline(str(tmp_path / "nope"))
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="empty file"):
        weights.load_state(str(tmp_path / "empty.safetensors"))
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        weights.load_state(str(tmp_path / "junk.safetensors"))
    (tmp_path / "model.ckpt").write_bytes(b"pickle")
    with pytest.raises(ValueError, match="expected a .safetensors"):
        weights.load_state(str(tmp_path / "model.ckpt"))
    save_file({"text_model.x": torch.ones(1)}, tmp_path / "clip.safetensors")
    with pytest.raises(ValueError, match="not an SD1.5/SDXL single-file"):
        weights.single_file_kind(weights.load_state(str(tmp_path / "clip.safetensors")))
    with pytest.raises(ValueError, match="not an SD1.5/SDXL single-file"):
        weights.load_pipeline(str(tmp_path / "clip.safetensors"), bpe=tiny_bpe(tmp_path / "b.gz"))
    (tmp_path / "folder/unet").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="config.json"):
        weights.load_pipeline(str(tmp_path / "folder"))
    with torch.device("meta"):
        diffusers_unet(TINY_SD15).save_config(tmp_path / "folder/unet")
    with pytest.raises(FileNotFoundError, match="no diffusion_pytorch_model"):
        weights.load_pipeline(str(tmp_path / "folder"))


def test_clip_tokenizer_makes_every_word_one_token():
    # sorted order once split "triangle": "right"'s merges ("r i") outrank "triangle"'s ("t r")
    words = sorted("a and right left triangle circle square red purple cyan the to of".split())
    tok = weights.clip_tokenizer(words=words, max_len=16)
    assert all(tok.tokenize(w) == [w + "</w>"] for w in words)
    ids = tok("a red triangle to the right").input_ids
    assert len(ids) == 8 and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id


# --- single files with their text encoders, and CLIP tokenizers from a BPE merges file ---


def tiny_bpe(path, words=("red", "circle", "square", "cat", "a", "of")):
    """A BPE merges file in CLIP's format (gzip, a version line, merges by rank) that makes each
    word one token; returns its path."""
    import gzip
    merges = []
    for w in words:
        pieces = [*w[:-1], w[-1] + "</w>"]
        while len(pieces) > 1:  # join from the left: "r e", "re d</w>"
            if (pieces[0], pieces[1]) not in merges:
                merges.append((pieces[0], pieces[1]))
            pieces = [pieces[0] + pieces[1], *pieces[2:]]
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("bpe_simple_vocab_16e6.txt#version: 0.2\n" + "\n".join(map(" ".join, merges)))
    return str(path)


def tiny_sd_folder(folder, kind, bpe):
    """A tiny diffusers SD1.5 / SDXL pipeline saved as a folder (CLIP tokenizers from `bpe`);
    returns (unet config, state dicts of unet, vae, text encoders) for a single file."""
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
    )
    torch.manual_seed(0)
    ucfg = replace(TINY_SD15, ctx_dim=64) if kind == "sd15" else \
        replace(TINY_SDXL, ctx_dim=128, adm_dim=64 + 6 * 8)  # CLIP heads are 64 wide
    tok = weights.bpe_tokenizer(bpe)
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=37, num_hidden_layers=2,
                num_attention_heads=1, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    parts = dict(unet=diffusers_unet(ucfg), vae=diffusers_vae(replace(TINY_VAE,
                                                                      upcast=kind == "sdxl")),
                 text_encoder=CLIPTextModel(CLIPTextConfig(**text, hidden_act="quick_gelu")),
                 tokenizer=tok, scheduler=DDIMScheduler(clip_sample=False))
    if kind == "sd15":
        pipe = StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    else:
        parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
            **text, hidden_act="gelu", projection_dim=64))
        parts["tokenizer_2"] = weights.bpe_tokenizer(bpe, pad="!")
        pipe = StableDiffusionXLPipeline(**parts)
    pipe.save_pretrained(folder)
    encoders = [pipe.text_encoder] + ([pipe.text_encoder_2] if kind == "sdxl" else [])
    return ucfg, pipe.unet.state_dict(), pipe.vae.state_dict(), [e.state_dict() for e in encoders]


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_single_file_text_encoders_match_the_folder(kind, tmp_path, monkeypatch):
    import sample
    bpe = tiny_bpe(tmp_path / "bpe.txt.gz")
    ucfg, usd, vsd, texts = tiny_sd_folder(tmp_path / "folder", kind, bpe)
    sd = weights.to_single_file(usd, vsd, ucfg, TINY_VAE, texts)
    prefixes = weights.TEXT_PREFIXES[kind]
    assert sum(k.startswith(tuple(prefixes)) for k in sd) == sum(map(len, texts)) - 2 * (
        kind == "sdxl") * 2 * 2  # bigG: q, k, v (weight and bias) fused into in_proj, 2 layers
    # both directions, and diffusers' own converters agree on the names and the fused split
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_open_clip_checkpoint,
    )
    back, texts = weights.text_from_single_file(sd), [weights.clip_names(t) for t in texts]
    assert all(b.keys() == t.keys() and all(torch.equal(b[k], t[k]) for k in t)
               for b, t in zip(back, texts)) and len(back) == len(texts)
    assert convert_ldm_clip_checkpoint(sd).keys() == texts[0].keys()
    if kind == "sdxl":
        ref = convert_open_clip_checkpoint(None, sd, prefix=weights.OPENCLIP_PREFIX)
        assert ref.keys() == back[1].keys() and all(torch.equal(ref[k], back[1][k]) for k in ref)
        assert sd[weights.OPENCLIP_PREFIX + "transformer.resblocks.1.attn.in_proj_weight"].shape \
            == (3 * 64, 64)
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "model.safetensors")
    # a single file carries no config: the loader uses the full presets, made tiny here
    monkeypatch.setattr(weights, "SDXL" if kind == "sdxl" else "SD15", ucfg)
    monkeypatch.setattr(weights, "SDXL_VAE" if kind == "sdxl" else "SD15_VAE",
                        replace(TINY_VAE, upcast=kind == "sdxl"))
    one = weights.load_pipeline(str(tmp_path / "model.safetensors"), bpe=bpe)
    folder = weights.load_pipeline(str(tmp_path / "folder"))
    assert [t.pad_token for t in one.tokenizers] == [t.pad_token for t in folder.tokenizers]
    prompts = ["a red circle", "a cat of square"]
    assert all(a(prompts).input_ids == b(prompts).input_ids
               for a, b in zip(one.tokenizers, folder.tokenizers))
    with torch.no_grad():
        (c1, p1), (c2, p2) = sample.encode_prompt(one, prompts), sample.encode_prompt(folder,
                                                                                     prompts)
    assert torch.equal(c1, c2) and (p1 is None if kind == "sd15" else torch.equal(p1, p2))
    images = [sample.generate(p, prompts, steps=2, size=32, progress=False) for p in (one, folder)]
    assert torch.equal(*images)


def test_single_file_errors(tmp_path, monkeypatch):
    bpe = tiny_bpe(tmp_path / "bpe.txt.gz")
    ucfg, usd, vsd, _ = tiny_sd_folder(tmp_path / "folder", "sd15", bpe)
    save_file(weights.to_single_file(usd, vsd, ucfg, TINY_VAE), tmp_path / "bare.safetensors")
    monkeypatch.setattr(weights, "SD15", ucfg)
    monkeypatch.setattr(weights, "SD15_VAE", TINY_VAE)
    with pytest.raises(ValueError, match="bare.safetensors: holds no text encoders; give "):
        weights.load_pipeline(str(tmp_path / "bare.safetensors"), bpe=bpe)
    pipe = weights.load_pipeline(str(tmp_path / "bare.safetensors"),
                                 text_from=str(tmp_path / "folder"))  # --text-from still works
    assert len(pipe.encoders) == 1
    vqa = os.path.join(weights.ROOT, "toy", "model", "vqa")  # a --text-from of the wrong kind
    with pytest.raises(ValueError, match="vqa/text_encoder: not a readable text encoder with"):
        weights.load_pipeline(str(tmp_path / "bare.safetensors"), text_from=vqa)
    with pytest.raises(FileNotFoundError, match="nope: no such folder"):
        weights.load_pipeline(str(tmp_path / "bare.safetensors"), text_from=str(tmp_path / "nope"))
    (tmp_path / "bad.txt").write_text("#version: 0.2\na b c\n")
    with pytest.raises(ValueError, match="bad.txt: not a BPE merges file"):
        weights.bpe_tokenizer(str(tmp_path / "bad.txt"))


def test_bpe_file_of_open_clip():
    """The real vocabulary, where open-clip-torch is installed (optional): CLIP's known ids."""
    import importlib.util
    if importlib.util.find_spec("open_clip") is None:
        with pytest.raises(FileNotFoundError, match="pip install --no-deps open-clip-torch"):
            weights.bpe_file()
        return
    tok = weights.bpe_tokenizer(weights.bpe_file())
    assert len(tok) == 49408 and tok("a photo of a cat").input_ids == [
        49406, 320, 1125, 539, 320, 2368, 49407]


def test_a_folders_preset_resolves_each_of_several_captioners(tmp_path):
    """comat.json paths are relative to the model folder; --captioner may list several."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "comat.json").write_text('{"captioner": "c1,sub/c2", "sam": "s", "steps": 3}')
    p = weights.folder_preset(str(tmp_path / "m"))
    assert [os.path.abspath(c) for c in p["captioner"].split(",")] == [
        str(tmp_path / "m" / "c1"), str(tmp_path / "m" / "sub" / "c2")]
    assert os.path.abspath(p["sam"]) == str(tmp_path / "m" / "s") and p["steps"] == 3
